"""How jaxunlearn parameters are stored in Hugging Face checkpoints: tensor names and layouts.

A family's :meth:`~jaxunlearn.models.registry.Family.hf_tensors` lists one :class:`HFTensor` per parameter. Its
:class:`Layout` converts between the jaxunlearn shape (e.g. ``[embed, heads, head_dim]``) and the HF tensor
(``[heads*head_dim, embed]``) in both directions, and reads one block of a parameter (a device's shard) from the
HF tensor without touching the rest. Layouts only move data, so conversions are exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

# Reads a block (one slice per HF axis) of the HF tensor.
Reader = Callable[[tuple[slice, ...]], np.ndarray]


class Layout:
    """A rearrangement between a (per-layer) jaxunlearn parameter and its HF tensor."""

    name: str = ""

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The HF tensor shape of a parameter of ``shape``."""
        raise NotImplementedError

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        """The HF tensor of a whole parameter."""
        raise NotImplementedError

    def read_block(self, read: Reader, shape: tuple[int, ...], block: tuple[slice, ...]) -> np.ndarray:
        """The block ``block`` (unit-stride slices with explicit bounds) of a parameter of ``shape``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Layout({self.name!r})"


class _Same(Layout):
    name = "same"

    def hf_shape(self, shape):
        return shape

    def to_hf(self, value):
        return value

    def read_block(self, read, shape, block):
        return read(block)


class _Transpose(Layout):
    """HF linear weights are ``[out, in]``; ours ``[in, out]``."""

    name = "transpose"

    def hf_shape(self, shape):
        return shape[::-1]

    def to_hf(self, value):
        return value.T

    def read_block(self, read, shape, block):
        return read((block[1], block[0])).T


class _HeadsIn(Layout):
    """``[embed, heads, head_dim]`` <-> HF ``[heads*head_dim, embed]`` (q/k/v projections)."""

    name = "heads_in"

    def hf_shape(self, shape):
        e, h, d = shape
        return (h * d, e)

    def to_hf(self, value):
        return value.transpose(1, 2, 0).reshape(-1, value.shape[0])

    def read_block(self, read, shape, block):
        e, h, dd = block
        d = shape[2]
        rows = read((slice(h.start * d, h.stop * d), e))
        return rows.reshape(h.stop - h.start, d, e.stop - e.start)[:, dd, :].transpose(2, 0, 1)


class _HeadsOut(Layout):
    """``[heads, head_dim, embed]`` <-> HF ``[embed, heads*head_dim]`` (the attention output projection)."""

    name = "heads_out"

    def hf_shape(self, shape):
        h, d, e = shape
        return (e, h * d)

    def to_hf(self, value):
        return value.transpose(2, 0, 1).reshape(value.shape[2], -1)

    def read_block(self, read, shape, block):
        h, dd, e = block
        d = shape[1]
        cols = read((e, slice(h.start * d, h.stop * d)))
        return cols.reshape(e.stop - e.start, h.stop - h.start, d)[:, :, dd].transpose(1, 2, 0)


class _HeadsBias(Layout):
    """``[heads, head_dim]`` <-> HF ``[heads*head_dim]`` (q/k/v biases)."""

    name = "heads_bias"

    def hf_shape(self, shape):
        h, d = shape
        return (h * d,)

    def to_hf(self, value):
        return value.reshape(-1)

    def read_block(self, read, shape, block):
        h, dd = block
        d = shape[1]
        return read((slice(h.start * d, h.stop * d),)).reshape(h.stop - h.start, d)[:, dd]


SAME, TRANSPOSE, HEADS_IN, HEADS_OUT, HEADS_BIAS = _Same(), _Transpose(), _HeadsIn(), _HeadsOut(), _HeadsBias()
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (SAME, TRANSPOSE, HEADS_IN, HEADS_OUT, HEADS_BIAS)}


def get_layout(layout: str | Layout) -> Layout:
    """A :class:`Layout` object, or the built-in one of that name."""
    if isinstance(layout, Layout):
        return layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; built-in layouts: {', '.join(LAYOUTS)}")
    return LAYOUTS[layout]


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """Where one jaxunlearn parameter lives in a Hugging Face checkpoint.

    ``path`` is the parameter's key path in the params dict; ``name`` the HF tensor name, containing
    ``{layer}`` for stacked per-layer parameters (whose leading ``layers`` axis is split into one HF tensor per
    layer); ``layout`` a :class:`Layout` or the name of a built-in one (``same``, ``transpose``, ``heads_in``,
    ``heads_out``, ``heads_bias``).
    """

    path: tuple[str, ...]
    name: str
    layout: str | Layout = "same"

    @property
    def stacked(self) -> bool:
        return "{layer}" in self.name


def nested_get(tree: Any, path: tuple[str, ...]) -> Any:
    """``tree[path[0]][path[1]]...``: the parameter at an :class:`HFTensor`'s ``path`` (or its parent's)."""
    for key in path:
        tree = tree[key]
    return tree


def hf_shape(layout: str | Layout, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape of a (per-layer) jaxunlearn parameter of ``shape``."""
    return get_layout(layout).hf_shape(tuple(shape))


def to_hf_layout(layout: str | Layout, value: np.ndarray) -> np.ndarray:
    """Rearrange a full (per-layer) jaxunlearn parameter into its HF tensor."""
    return get_layout(layout).to_hf(value)


def read_block(layout: str | Layout, read: Reader, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """Block ``index`` of a (per-layer) parameter of ``shape``, reading only that block of the HF tensor.

    Raises ``ValueError`` for strided slices (shardings never produce them).
    """
    ranges = [s.indices(n) for s, n in zip(index, shape)]
    if any(step != 1 for _, _, step in ranges):
        raise ValueError("strided blocks are not supported")
    return get_layout(layout).read_block(read, tuple(shape), tuple(slice(a, b) for a, b, _ in ranges))
