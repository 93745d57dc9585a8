"""Orbax checkpoints of the train state in ``<workdir>/checkpoints``.

Each checkpoint holds the sharded state (params, AdamW moments, step) and a JSON ``meta`` item (data position,
the resolved config, versions). Saves are asynchronous and atomic (Orbax writes to a temporary directory and
renames it when complete), so a run killed at any moment resumes from the last *complete* checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxunlearn.errors import AT_LEAST_1, DTYPE_OR_DEFAULT, NON_NEGATIVE, check_rules

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str | Path | epath.Path, *, keep: int = 2):
        # A store's path (gs://...) stays an epath.Path: pathlib would fold its "//".
        self.directory = directory if isinstance(directory, epath.Path) else Path(directory).absolute()
        remove_incomplete_steps(self.directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        )

    def read_meta(self, step: int) -> dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """The state at ``step`` placed in the shardings of ``abstract_state`` (``ShapeDtypeStruct`` leaves)."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


# What every complete step directory holds (Orbax's finalised metadata and this module's two items).
STEP_PARTS = ("_CHECKPOINT_METADATA", "state", "meta")


def remove_incomplete_steps(directory: Path | epath.Path) -> list[str]:
    """Remove step directories that lack part of a complete checkpoint: one whose deletion (Orbax's ``max_to_keep``)
    a kill cut short, which Orbax would otherwise warn about on every later run and could never restore. Orbax's
    own temporary directories are left to it. Process 0 removes them; every process then waits for it."""
    path = epath.Path(directory)
    removed = []
    if jax.process_index() == 0 and path.exists():
        for step in path.iterdir():
            if step.name.isdigit() and step.is_dir() and not all((step / part).exists() for part in STEP_PARTS):
                log.warning("removing %s: an incomplete checkpoint (a run was killed while deleting it)", step)
                step.rmtree()
                removed.append(step.name)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxunlearn: incomplete checkpoints removed")
    return removed


def abstract_like(tree: Any) -> Any:
    """``ShapeDtypeStruct`` (with sharding) for every array of ``tree``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def check_config(checkpoint: Any) -> None:
    """The ``checkpoint`` section: how often (in steps and in minutes), how many kept, and the export's dtype."""
    check_rules(
        checkpoint,
        "config.checkpoint",
        {
            "every_steps": (NON_NEGATIVE[0], ">= 0 (0 = only at the end)"),
            "every_minutes": (NON_NEGATIVE[0], ">= 0 (0 = off)"),
            "keep": AT_LEAST_1,
            "export_dtype": DTYPE_OR_DEFAULT,
        },
    )
