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
