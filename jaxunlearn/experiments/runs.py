"""What experiments share about the runs they are made of."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from jaxunlearn.parallel import sharding
from jaxunlearn.storage import locations


def read_report(run_dir: str) -> dict[str, Any]:
    """A finished run's ``report.json``, as process 0 reads it (only process 0 writes it), on every process."""
    import jax

    text = None
    if jax.process_index() == 0:
        with contextlib.suppress(FileNotFoundError):
            text = locations.read_text(locations.join(run_dir, "report.json"), "--workdir")
    text = sharding.from_process0(text)
    if text is None:
        raise FileNotFoundError(f"{run_dir} has no report.json: the experiment needs config.evaluation.enabled=True")
    return json.loads(text)
