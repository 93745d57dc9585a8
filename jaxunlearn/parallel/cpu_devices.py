"""One XLA CPU device per core, so that CPU runs use every core.

XLA's CPU client has one device by default, and one device keeps two cores only partly busy: its matmuls are
multi-threaded, but the many small fusions of a train step run one after another. With one device per core the
batch is split over the cores (the ``fsdp`` axis of the default mesh, exactly as over the chips of a TPU slice)
and each core runs its share of every op: a 1.2-1.4x faster train step on 2 cores (``benchmarks/vs_torch.py``).

The command lines call :func:`configure` before JAX starts its backends. Nothing changes when ``XLA_FLAGS``
already sets a device count, when the config gives its own mesh, or with ``JAXUNLEARN_CPU_DEVICES=1``; results
depend on the number of devices only within float tolerance (the sharding tests check it).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from jaxunlearn.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "JAXUNLEARN_CPU_DEVICES"  # a device count; 1 keeps XLA's single CPU device
_FLAG = "--xla_force_host_platform_device_count"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def requested() -> int | None:
    """``$JAXUNLEARN_CPU_DEVICES`` as a count (``None`` when unset or empty); ConfigError naming the variable when
    it is not a whole number >= 1."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError(f"{ENV}={value!r}: a number of CPU devices >= 1 (1 keeps XLA's single CPU device), or unset")
    return count


def device_count(config: Any = None) -> int:
    """How many CPU devices to ask for: ``$JAXUNLEARN_CPU_DEVICES``, else one per usable core, reduced to the
    largest count that splits the config's micro-batch evenly; 1 when the config chooses its own mesh."""
    wanted = requested() or usable_cores()
    if config is None:
        return max(wanted, 1)
    mesh = config.mesh
    if (mesh.data, mesh.fsdp, mesh.tensor, mesh.get("dcn_data", 1)) != (1, -1, 1, 1) or config.get("distributed"):
        return 1
    batch = config.train.micro_batch_size
    return max(d for d in range(1, max(wanted, 1) + 1) if batch % d == 0)


def configure(config: Any = None) -> int | None:
    """Ask XLA for :func:`device_count` CPU devices (before any JAX backend exists); returns the count set, or
    ``None`` when nothing was changed. A bad ``$JAXUNLEARN_CPU_DEVICES`` is refused (ConfigError) in any case."""
    requested()
    flags = os.environ.get("XLA_FLAGS", "")
    if _FLAG in flags:
        return None
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return None
    n = device_count(config)
    if n <= 1:
        return None
    os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}={n}".strip()
    return n
