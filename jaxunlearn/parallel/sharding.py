"""Device meshes and the mapping from logical axis names to mesh axes.

Layers only ever name *logical* axes (``batch``, ``length``, ``embed``, ``mlp``, ``heads``, ``kv_heads``,
``head_dim``, ``vocab``, ``layers``, ``norm``). Which mesh axis (``data``, ``fsdp``, ``tensor``) each of them
is split over is data: a tuple of ``(logical, mesh_axes)`` rules that comes from the config. The same model
code therefore runs unchanged on one CPU, on fake multi-device CPU meshes and on TPU/GPU pods.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxunlearn.errors import ConfigError, check_rules

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Parameters use the same table as activations; a mesh axis already taken by an
# earlier dimension of the same array is skipped, so activations shaped (batch, length, embed) put `batch` on
# data x fsdp and leave `embed` whole, while an (embed, mlp) weight is split fsdp x tensor (ZeRO-3 style).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("length", None),
    ("layers", None),
    ("norm", None),
)

# Axes that must divide exactly: splitting attention heads unevenly is never what a user wants.
_STRICT_AXES = ("heads", "kv_heads")


class MeshError(ValueError):
    """A mesh or sharding rule that cannot work for this device count or model."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape. ``-1`` on one axis means "all remaining devices".

    ``dcn_data`` > 1 is multislice (MaxText's convention, ``dcn_data_parallelism x ici_data_parallelism``):
    ``data``, ``fsdp`` and ``tensor`` then shape each slice (its devices joined by the fast inter-chip network),
    and the global ``data`` axis is ``data x dcn_data``, its outer factor spanning the slices over the
    data-centre network. Slices are TPU slices (``device.slice_index``); on other platforms (GPU, CPU) each
    process (host) is one.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1

    @classmethod
    def from_config(cls, mesh: Any) -> MeshConfig:
        """From the config's ``mesh`` section."""
        return cls(mesh.data, mesh.fsdp, mesh.tensor, mesh.get("dcn_data", 1))

    def ici_shape(self, num_devices: int) -> tuple[int, int, int]:
        """The ``(data, fsdp, tensor)`` shape of one slice of ``num_devices // dcn_data`` devices."""
        if self.dcn_data < 1:
            raise MeshError(f"mesh.dcn_data={self.dcn_data}: must be >= 1 (the number of slices)")
        if num_devices % self.dcn_data:
            raise MeshError(f"mesh.dcn_data={self.dcn_data} does not divide the {num_devices} available devices.")
        per_slice = num_devices // self.dcn_data
        available = f"{per_slice} available devices" if self.dcn_data == 1 else f"{per_slice} devices of a slice"
        sizes = [self.data, self.fsdp, self.tensor]
        given = dict(zip(MESH_AXES, sizes))
        for name, size in given.items():
            if size == 0 or size < -1:
                raise MeshError(f"mesh.{name}={size}: sizes must be positive or -1 (fill with the rest).")
        if sizes.count(-1) > 1:
            raise MeshError(f"mesh {given}: at most one axis may be -1.")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if per_slice % known:
                raise MeshError(f"mesh {given}: the fixed axes ({known} devices) do not divide the {available}.")
            sizes[sizes.index(-1)] = per_slice // known
        elif known != per_slice:
            raise MeshError(
                f"mesh {given} needs {known} devices but {per_slice} are "
                f"{'available' if self.dcn_data == 1 else 'in each slice'}; use -1 on one axis to fill with the rest."
            )
        return tuple(sizes)  # type: ignore[return-value]

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """The global ``(data, fsdp, tensor)`` shape over ``num_devices`` (``data`` includes ``dcn_data``)."""
        data, fsdp, tensor = self.ici_shape(num_devices)
        return data * self.dcn_data, fsdp, tensor


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None, **sizes: int) -> Mesh:
    """Build a ``(data, fsdp, tensor)`` mesh with Auto axis types (GSPMD-style propagation).

    ``make_mesh()`` puts every device on ``fsdp``; ``make_mesh(fsdp=4, tensor=2)`` or
    ``make_mesh(MeshConfig(data=8, fsdp=1))`` pick a shape. ``devices`` defaults to all global devices
    (every host of a multi-host run); devices of a TPU slice are laid out for its torus, and with
    ``dcn_data`` > 1 the ``data`` axis spans the slices (:func:`hybrid_device_grid`).
    """
    if config is None:
        config = MeshConfig(**sizes)
    elif sizes:
        raise TypeError("pass either a MeshConfig or axis sizes, not both")
    everything = devices is None or list(devices) == jax.devices()
    devices = list(jax.devices() if devices is None else devices)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if config.dcn_data > 1:
        return Mesh(hybrid_device_grid(config, devices), MESH_AXES, axis_types=auto)
    shape = config.shape(len(devices))
    if everything:
        # Let JAX order the devices for the physical topology (TPU ICI rings, GPU NVLink islands).
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
    if devices[0].platform == "tpu":  # a slice's devices, e.g. a TPU topology compiled for on another host
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def slice_of(device: jax.Device) -> int:
    """The slice a device belongs to: its TPU slice (a single slice may carry no index), or its process on
    platforms without slices (GPU and CPU hosts, as MaxText treats them)."""
    if device.platform != "tpu":
        return device.process_index
    return getattr(device, "slice_index", 0)


def hybrid_device_grid(config: MeshConfig, devices: Sequence[jax.Device]) -> np.ndarray:
    """The ``(data x dcn_data, fsdp, tensor)`` device grid of a multislice mesh: each slice's devices laid out
    for its own network with the per-slice shape, the slices stacked along ``data`` (JAX's
    ``create_hybrid_device_mesh``, as MaxText builds its DCN x ICI meshes)."""
    from jax.experimental import mesh_utils

    ici = config.ici_shape(len(devices))
    found: dict[int, int] = {}
    for d in devices:
        found[slice_of(d)] = found.get(slice_of(d), 0) + 1
    by_process = devices[0].platform != "tpu"
    unit = f"processes ({devices[0].platform} devices have no slices: a process is one)" if by_process else "slices"
    if len(found) != config.dcn_data or len(set(found.values())) != 1:
        counts = ", ".join(f"{v} devices" for _, v in sorted(found.items()))
        raise MeshError(
            f"mesh.dcn_data={config.dcn_data} must equal the number of {unit}, here {len(found)} ({counts}), "
            "with as many devices in each."
        )
    return mesh_utils.create_hybrid_device_mesh(
        ici, (config.dcn_data, 1, 1), devices, process_is_granule=by_process, allow_split_physical_axes=True
    )


def single_device_mesh(device: jax.Device | None = None) -> Mesh:
    """A 1x1x1 mesh on one device: the reference layout for tests and for small CPU runs."""
    return make_mesh(devices=[device or jax.devices()[0]])


Rules = tuple[tuple[str, Any], ...]


def normalize_rules(rules: Sequence[Sequence[Any]] | None) -> Rules:
    """Validate and freeze a rules table (from config: a list of ``[logical, mesh_axes]`` pairs)."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for entry in rules:
        if len(entry) != 2 or not isinstance(entry[0], str):
            raise MeshError(f"sharding rule {entry!r}: expected a (logical_axis, mesh_axes) pair")
        logical, target = entry
        if not logical:
            raise MeshError(f"sharding rule {entry!r}: the logical axis name is empty")
        if logical in (name for name, _ in out):
            raise MeshError(f"sharding rule {entry!r}: logical axis {logical!r} has a rule already")
        if target is None:
            targets: tuple[str, ...] = ()
        elif isinstance(target, str):
            targets = (target,)
        else:
            targets = tuple(target)
        for t in targets:
            if t not in MESH_AXES:
                raise MeshError(f"sharding rule {logical!r} -> {t!r}: unknown mesh axis (known: {MESH_AXES})")
        out.append((logical, targets[0] if len(targets) == 1 else (targets or None)))
    return tuple(out)


def logical_to_spec(
    axes: Sequence[str | None],
    rules: Rules,
    mesh: Mesh,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Translate logical axis names into a mesh ``PartitionSpec``.

    A mesh axis is used at most once per array (first dimension wins). When ``shape`` is given, a dimension
    that the assigned mesh axes do not divide is left unsplit, except heads, which raise :class:`MeshError`.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise MeshError(f"logical axis {name!r} has no sharding rule (rules cover {sorted(table)})")
        targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        targets = tuple(t for t in targets if t not in used and mesh.shape[t] > 1)
        if targets and shape is not None:
            size = math.prod(mesh.shape[t] for t in targets)
            if shape[dim] % size:
                if name in _STRICT_AXES:
                    raise MeshError(
                        f"{name}={shape[dim]} cannot be split over mesh axes {targets} of size {size}: choose a "
                        f"tensor-parallel size that divides the number of {name.replace('_', ' ')}."
                    )
                log.warning("dimension %s=%d not divisible by mesh %s=%d; kept whole", name, shape[dim], targets, size)
                targets = ()
        used.update(targets)
        spec.append(None if not targets else (targets[0] if len(targets) == 1 else targets))
    return PartitionSpec(*spec)


def batch_ways(mesh: Mesh, rules: Sequence[Sequence[Any]] | None = None) -> int:
    """How many ways the ``batch`` logical axis is split on ``mesh`` under ``rules`` (default: data x fsdp).

    Batch sizes must be multiples of this; it is read from the rules table, never spelled out by callers.
    """
    table = dict(normalize_rules(rules))
    target = table.get("batch")
    targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    return math.prod(mesh.shape[t] for t in targets)


def named_sharding(
    axes: Sequence[str | None], rules: Rules, mesh: Mesh, shape: Sequence[int] | None = None
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape))


# --- activation constraints -------------------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("jaxunlearn_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Rules | None = None) -> Iterator[None]:
    """While tracing inside this context, :func:`constrain` pins activations to ``mesh`` by ``rules``."""
    token = _ACTIVE.set(None if mesh is None else (mesh, normalize_rules(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding hint for an activation, by logical axis names. A no-op outside :func:`activation_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, named_sharding(axes, rules, mesh, x.shape))


def is_split(logical: str) -> bool:
    """Whether the active rules split the logical axis ``logical`` over more than one device (False outside
    :func:`activation_sharding`)."""
    active = _ACTIVE.get()
    if active is None:
        return False
    mesh, rules = active
    target = dict(rules).get(logical)
    targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    return math.prod(mesh.shape[t] for t in targets) > 1


def describe_mesh(mesh: Mesh) -> dict[str, Any]:
    """A JSON-able description of a mesh for run records."""
    return {
        "shape": dict(mesh.shape),
        "num_devices": int(mesh.devices.size),
        "platform": mesh.devices.flat[0].platform,
        "device_kind": mesh.devices.flat[0].device_kind,
        "num_processes": jax.process_count(),
    }


def host_to_global(tree: Any, shardings: Any) -> Any:
    """Global arrays from host arrays that every process holds whole (same values everywhere).

    Each process places only the blocks of its own devices, so this works on one host and on a
    multi-host runtime (TPU pods, multi-node GPU) alike, unlike ``jax.device_put`` of a numpy array.
    """
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]), tree, shardings)


def initialize_distributed() -> None:
    """Join JAX's multi-controller runtime (``config.distributed``): ``jax.distributed.initialize()`` once per
    process, before any device is used. Later calls (several runs in one process, as in the comparison) do
    nothing; a second ``initialize`` would raise."""
    if not jax.distributed.is_initialized():
        jax.distributed.initialize()


def from_process0(value: Any) -> Any:
    """A JSON-able ``value`` as process 0 has it, on every process (identity on one process).

    Decisions taken from files (a cached result, a finished export, the run's history) must be the same on
    every host, or the hosts run different collectives and hang; process 0's view is the one that counts.
    """
    if jax.process_count() == 1:
        return value
    import json

    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.asarray(data.size, np.int32)))
    buffer = data if jax.process_index() == 0 else np.zeros(size, np.uint8)  # only process 0's bytes count
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes().decode())


# --- parameters --------------------------------------------------------------------------------------------


def param_shardings(state: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """``NamedSharding`` for each variable of an (abstract or concrete) NNX state, by its logical axes.

    The result has the state's structure (variables holding shardings), so it can be passed as ``jit``
    ``out_shardings`` or to ``jax.device_put``.
    """
    from flax import nnx

    rules = normalize_rules(rules)

    def sharding(var: Any) -> Any:
        names = var.get_metadata().get("axes")
        if names is None:
            raise MeshError(f"variable of shape {var.shape} has no logical `axes` metadata")
        return var.replace(named_sharding(names, rules, mesh, var.shape))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


_MESH_AXIS = (lambda v: v >= 1 or v == -1, "positive, or -1 for the remaining devices")


def check_config(mesh: Any) -> None:
    """The ``mesh`` section: axis sizes and the logical axis rules."""
    check_rules(
        mesh,
        "config.mesh",
        {
            "data": _MESH_AXIS,
            "fsdp": _MESH_AXIS,
            "tensor": _MESH_AXIS,
            "dcn_data": (lambda v: v >= 1, ">= 1 (the number of slices the data axis spans)"),
        },
    )
    if not mesh.rules:  # no rule shards anything, not even the batch: every device would hold and compute it all
        raise ConfigError("config.mesh.rules=(): an empty table shards nothing; give (logical_axis, mesh_axes) rules")
    try:
        normalize_rules(mesh.rules)
    except (MeshError, TypeError, ValueError) as e:
        raise ConfigError(f"config.mesh.rules: {e}") from e
