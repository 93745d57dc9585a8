"""TPU slice names (``v5e-16``, ``v4-32``, ``v5p:2x2x1``) -> devices the real TPU compiler targets, on any host.

``jax.experimental.topologies.get_topology_desc`` describes a slice without owning one: with libtpu installed
(``pip install "jax[tpu]"``, a test requirement) the TPU compiler runs on a plain CPU machine, so a train step
can be compiled and its per-chip memory read before a slice is rented.

Slice names follow Cloud TPU's accelerator types: v4 and v5p count TensorCores (two per chip: ``v4-8`` is 4
chips), v5e and v6e count chips (``v5e-16`` is 16 chips).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str
    device_kind: str  # as jax reports it
    hbm_gib: float  # per chip
    peak_bf16_tflops: float  # per chip, dense
    dims: int  # torus dimensions of a slice's topology string
    cores_per_chip_in_name: int  # v4-8: 8 TensorCores = 4 chips
    chip_config: str  # "megacore": one jax device per chip


GENERATIONS = {
    g.name: g
    for g in (
        Generation("v4", "TPU v4", 32, 275, 3, 2, "megacore"),
        Generation("v5e", "TPU v5 lite", 16, 197, 2, 1, "default"),
        Generation("v5p", "TPU v5", 95, 459, 3, 2, "default"),
        Generation("v6e", "TPU v6 lite", 32, 918, 2, 1, "default"),
    )
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}

# Chips -> the slice shape Cloud TPU gives for that accelerator type.
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_SHAPES_3D = {
    4: (2, 2, 1),
    8: (2, 2, 2),
    16: (2, 2, 4),
    32: (2, 4, 4),
    64: (4, 4, 4),
    128: (4, 4, 8),
    256: (4, 8, 8),
    512: (8, 8, 8),
}


class TopologyError(ValueError):
    """A slice name that does not describe a TPU slice."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """One TPU slice shape (times ``slices`` for multislice)."""

    generation: Generation
    shape: tuple[int, ...]
    slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.slices

    @property
    def hbm_bytes(self) -> int:
        return int(self.generation.hbm_gib * GIB)

    @property
    def name(self) -> str:
        g = self.generation
        base = f"{g.name}-{self.chips_per_slice * g.cores_per_chip_in_name}"
        return base if self.slices == 1 else f"{self.slices}x {base}"

    @property
    def topology_string(self) -> str:
        return f"{self.generation.name}:{'x'.join(map(str, self.shape))}"

    def devices(self) -> list[Any]:
        """The slice's devices as the TPU compiler sees them (no TPU needed; libtpu must be installed)."""
        # Compiling needs no TPU, so several processes may load libtpu at once (tests, a planner next to a run).
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        try:
            from jax.experimental import topologies
        except ImportError as e:  # pragma: no cover - jax always ships it
            raise TopologyError(f"this jax cannot describe TPU topologies: {e}") from e
        bounds = (2, 4, 1) if self.chips_per_slice == 8 and len(self.shape) == 2 else (2, 2, 1)
        if self.chips_per_slice < 4:
            bounds = (*self.shape, 1)[:3] if len(self.shape) == 2 else self.shape
        try:
            desc = topologies.get_topology_desc(
                platform="tpu",
                topology_name=self.topology_string,
                chip_config_name=self.generation.chip_config,
                chips_per_host_bounds=tuple(bounds),
                num_slices=self.slices,
            )
        except Exception as e:
            hint = "" if _libtpu_installed() else ' (libtpu is not installed: pip install "jax[tpu]==<your jax>")'
            raise TopologyError(f"cannot describe TPU slice {self.topology_string}{hint}: {e}") from e
        return list(desc.devices)


def _libtpu_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def parse_topology(spec: str, slices: int = 1) -> Topology:
    """``v5e-16`` / ``v5litepod-16`` / ``v4-32`` / ``v5p-8`` / ``v6e-8`` (Cloud TPU accelerator types) or the
    topology form ``v5e:4x4`` / ``v4:2x2x2``; ``slices`` > 1 for multislice."""
    if slices < 1:
        raise TopologyError(f"--slices={slices}: must be >= 1")
    text = spec.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)*))", text)
    if not m:
        raise TopologyError(f"--topology={spec!r}: expected a slice like v5e-16, v4-32, v5p-8 or v5e:4x4")
    name = _ALIASES.get(m.group(1), m.group(1))
    if name not in GENERATIONS:
        raise TopologyError(
            f"--topology={spec!r}: unknown TPU generation {m.group(1)!r} (known: {', '.join(GENERATIONS)})"
        )
    gen = GENERATIONS[name]
    if m.group(3):
        shape = tuple(int(x) for x in m.group(3).split("x"))
        if len(shape) != gen.dims or min(shape) < 1:
            raise TopologyError(f"--topology={spec!r}: {name} slices have {gen.dims} dimensions, e.g. {_example(gen)}")
        return Topology(gen, shape, slices)
    cores = int(m.group(2))
    if cores % gen.cores_per_chip_in_name:
        raise TopologyError(f"--topology={spec!r}: {name}-N counts TensorCores, {gen.cores_per_chip_in_name} per chip")
    chips = cores // gen.cores_per_chip_in_name
    table = _SHAPES_2D if gen.dims == 2 else _SHAPES_3D
    if chips not in table:
        sizes = ", ".join(f"{name}-{c * gen.cores_per_chip_in_name}" for c in table)
        raise TopologyError(
            f"--topology={spec!r}: no such slice; known sizes: {sizes} (or give the shape: {_example(gen)})"
        )
    return Topology(gen, table[chips], slices)


def _example(gen: Generation) -> str:
    return f"{gen.name}:4x4" if gen.dims == 2 else f"{gen.name}:2x2x2"
