"""Hugging Face checkpoints in and out: ``config.json`` + safetensors <-> a sharded jaxunlearn model.

Loading places every tensor straight into its mesh sharding: each device's shard is read from the
memory-mapped safetensors file and cast to the parameter dtype on its own, so a 7B checkpoint is never
materialised whole (or in fp32) on one host. Only safetensors are read; pickle-based weights (``*.bin``,
``*.pt``, ...) are refused, and remote code is never run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so safetensors can read bf16 tensors)
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxunlearn import sharding
from jaxunlearn.models import abstract_model, family
from jaxunlearn.models.config import ModelConfig

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
# Buffers some old checkpoints saved next to the weights; they are recomputed from the config.
_IGNORABLE = re.compile(r".*rotary_emb\.inv_freq$")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or written safely; the message names the culprit."""


# --- locating a checkpoint ----------------------------------------------------------------------------------


def resolve_model_dir(
    name_or_path: str | os.PathLike, *, revision: str | None = None, cache_dir: str | None = None
) -> Path:
    """A local directory holding ``config.json``: the path itself, or the Hub snapshot of a repo id.

    Hub downloads go through ``huggingface_hub`` (so ``HF_HOME``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` apply)
    and fetch only configs, safetensors and tokenizer files, never pickles.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{text} is a file; expected a directory with config.json and *.safetensors")
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text
    if looks_local or not _HUB_ID.fullmatch(text):
        raise CheckpointError(f"model directory {text} does not exist")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(repo_id=text, revision=revision, cache_dir=cache_dir, allow_patterns=_HUB_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated repo, network error: all need the same advice
        raise CheckpointError(
            f"{text!r} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {e}). Pass a local directory, or download it first where there is network "
            "(HF_HOME/HF_HUB_CACHE choose the cache; HF_HUB_OFFLINE=1 uses only the cache)."
        ) from e
    return Path(local)


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def load_config(name_or_path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a local or Hub checkpoint (``overrides`` set dtypes, remat, ...)."""
    return ModelConfig.from_hf(read_hf_config(resolve_model_dir(name_or_path)), **overrides)


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it; refuse pickles."""
    index = model_dir / SAFE_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{index} refers to {f.name}, which is missing from {model_dir}")
        return files
    single = model_dir / SAFE_SINGLE
    candidates = [single] if single.is_file() else sorted(model_dir.glob("*.safetensors"))
    if not candidates:
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{model_dir} only has pickle-format weights ({', '.join(pickles)}). jaxunlearn never unpickles "
                "model files; convert them to safetensors first (e.g. transformers' save_pretrained with "
                "safe_serialization=True on a machine you trust)."
            )
        raise CheckpointError(f"{model_dir} has no *.safetensors weights")
    files = {}
    for f in candidates:
        with safe_open(f, framework="numpy") as handle:
            files.update({name: f for name in handle.keys()})
    return files


class _SafetensorsReader:
    """Lazy, slice-level access to the tensors of one checkpoint (memory-mapped, one handle per file)."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._handles: dict[Path, Any] = {}

    def _handle(self, name: str) -> Any:
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="numpy")
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(self._handle(name).get_slice(name)[index])


# --- parameter layouts ------------------------------------------------------------------------------------


def hf_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape of a (per-layer) jaxunlearn parameter of ``shape``."""
    if layout == "same":
        return shape
    if layout == "transpose":
        return shape[::-1]
    if layout == "heads_in":
        e, h, d = shape
        return (h * d, e)
    if layout == "heads_out":
        h, d, e = shape
        return (e, h * d)
    if layout == "heads_bias":
        h, d = shape
        return (h * d,)
    raise ValueError(f"unknown layout {layout!r}")


def to_hf_layout(layout: str, value: np.ndarray) -> np.ndarray:
    """Rearrange a full (per-layer) jaxunlearn parameter into its HF tensor."""
    if layout == "same":
        return value
    if layout == "transpose":
        return value.T
    if layout == "heads_in":
        return value.transpose(1, 2, 0).reshape(-1, value.shape[0])
    if layout == "heads_out":
        return value.transpose(2, 0, 1).reshape(value.shape[2], -1)
    if layout == "heads_bias":
        return value.reshape(-1)
    raise ValueError(f"unknown layout {layout!r}")


def _read_block(
    reader: _SafetensorsReader, name: str, layout: str, shape: tuple[int, ...], index: tuple[slice, ...]
) -> np.ndarray:
    """Read the block ``index`` of a per-layer jaxunlearn parameter from its HF tensor, touching only that block."""
    ranges = [s.indices(n) for s, n in zip(index, shape)]
    if any(step != 1 for _, _, step in ranges):
        raise CheckpointError(f"strided shard of {name} is not supported")
    sl = [slice(a, b) for a, b, _ in ranges]
    if layout == "same":
        return reader.read(name, tuple(sl))
    if layout == "transpose":
        return reader.read(name, (sl[1], sl[0])).T
    if layout == "heads_in":  # [h*d, e] -> [e, h, d]
        e, h, dd = sl
        d = shape[2]
        block = reader.read(name, (slice(h.start * d, h.stop * d), e))
        return block.reshape(h.stop - h.start, d, e.stop - e.start)[:, dd, :].transpose(2, 0, 1)
    if layout == "heads_out":  # [e, h*d] -> [h, d, e]
        h, dd, e = sl
        d = shape[1]
        block = reader.read(name, (e, slice(h.start * d, h.stop * d)))
        return block.reshape(e.stop - e.start, h.stop - h.start, d)[:, :, dd].transpose(1, 2, 0)
    if layout == "heads_bias":  # [h*d] -> [h, d]
        h, dd = sl
        d = shape[1]
        block = reader.read(name, (slice(h.start * d, h.stop * d),))
        return block.reshape(h.stop - h.start, d)[:, dd]
    raise ValueError(f"unknown layout {layout!r}")


def _nested_get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _nested_set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _check_tensors(reader: _SafetensorsReader, config: ModelConfig, abs_params: Any, model_dir: Path) -> None:
    """Fail once, naming every missing, mis-shaped and unexpected tensor."""
    expected: dict[str, tuple[int, ...]] = {}
    for entry in family(config).hf_tensors(config):
        shape = tuple(_nested_get(abs_params, entry.path).shape)
        if entry.stacked:
            for i in range(config.num_layers):
                expected[entry.name.format(layer=i)] = hf_shape(entry.layout, shape[1:])
        else:
            expected[entry.name] = hf_shape(entry.layout, shape)
    present = set(reader.files)
    missing = sorted(set(expected) - present)
    mismatched = sorted(
        f"{n}: checkpoint {reader.shape(n)} vs config {expected[n]}"
        for n in set(expected) & present
        if reader.shape(n) != expected[n]
    )
    ignorable = {n for n in present if _IGNORABLE.fullmatch(n)}
    if config.tie_word_embeddings:
        ignorable.add("lm_head.weight")  # tied checkpoints sometimes store the copy; transformers ignores it too
    unexpected = sorted(present - set(expected) - ignorable)
    problems = []
    for label, names in (("missing", missing), ("shape mismatch", mismatched), ("unexpected", unexpected)):
        if names:
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(
            f"checkpoint {model_dir} does not match its config.json ({config.model_type}): " + "; ".join(problems)
        )


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    rules: Any = None,
    param_dtype: str = "float32",
    dtype: str = "bfloat16",
    remat: str = "none",
    attention_impl: str = "xla",
    revision: str | None = None,
    cache_dir: str | None = None,
    trust_remote_code: bool = False,
) -> nnx.Module:
    """Load a Llama/Mistral/Qwen2 checkpoint (local directory or Hub id) as a sharded jaxunlearn model.

    Args:
      name_or_path: a directory with ``config.json`` and ``model.safetensors`` (or sharded safetensors with
        ``model.safetensors.index.json``), or a Hugging Face Hub repo id.
      mesh: the device mesh; defaults to all devices on ``fsdp``.
      rules: logical-to-mesh axis rules (default :data:`jaxunlearn.sharding.DEFAULT_RULES`).
      param_dtype: storage dtype of the parameters (fp32 master weights by default).
      dtype: compute dtype.
      remat: rematerialisation policy of the scanned layers.
      attention_impl: ``xla`` or ``dot_product_attention`` (cuDNN flash attention on GPUs).
      revision, cache_dir: Hub revision and cache directory.
      trust_remote_code: must stay False: jaxunlearn never runs code shipped with a checkpoint.
    """
    if trust_remote_code:
        raise CheckpointError(
            "trust_remote_code=True is refused: jaxunlearn never executes code shipped with a checkpoint; it "
            "implements the supported architectures itself."
        )
    model_dir = resolve_model_dir(name_or_path, revision=revision, cache_dir=cache_dir)
    config = ModelConfig.from_hf(
        read_hf_config(model_dir), param_dtype=param_dtype, dtype=dtype, remat=remat, attention_impl=attention_impl
    )
    reader = _SafetensorsReader(_weight_files(model_dir))
    mesh = mesh or sharding.make_mesh()
    graphdef, abs_state = nnx.split(abstract_model(config))
    _check_tensors(reader, config, abs_state, model_dir)
    shardings = sharding.param_shardings(abs_state, mesh, rules)
    target_dtype = np.dtype(param_dtype)

    loaded: dict = {}
    for entry in family(config).hf_tensors(config):
        abstract = _nested_get(abs_state, entry.path)
        shape = tuple(abstract.shape)
        target = _nested_get(shardings, entry.path).get_value()

        def read_shard(index: tuple[slice, ...], entry=entry, shape=shape) -> np.ndarray:
            if not entry.stacked:
                return _read_block(reader, entry.name, entry.layout, shape, index).astype(target_dtype)
            layers = range(*index[0].indices(shape[0]))
            blocks = [
                _read_block(reader, entry.name.format(layer=i), entry.layout, shape[1:], index[1:]) for i in layers
            ]
            return np.stack(blocks).astype(target_dtype)

        _nested_set(loaded, entry.path, jax.make_array_from_callback(shape, target, read_shard))
    nnx.replace_by_pure_dict(abs_state, loaded)
    log.info("loaded %s (%s params, %s) from %s", config.model_type, f"{config.num_params:,}", param_dtype, model_dir)
    return nnx.merge(graphdef, abs_state)


def load_tokenizer(name_or_path: str | os.PathLike, *, revision: str | None = None):
    """The Hugging Face tokenizer saved with a checkpoint (never with remote code)."""
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(name_or_path, revision=revision)
    return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)


# --- export ------------------------------------------------------------------------------------------------


def _to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


def _export_tensors(model: nnx.Module, dtype: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
    """HF (name, tensor) pairs, one layer slice at a time so host memory stays at one tensor."""
    config = model.config
    params = nnx.state(model, nnx.Param)
    for entry in family(config).hf_tensors(config):
        value = _nested_get(params, entry.path).get_value()
        if entry.stacked:
            for i in range(config.num_layers):
                yield entry.name.format(layer=i), to_hf_layout(entry.layout, _to_host(value[i])).astype(dtype)
        else:
            yield entry.name, to_hf_layout(entry.layout, _to_host(value)).astype(dtype)


def save_pretrained(
    model: nnx.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory that ``transformers`` loads.

    ``dtype`` defaults to the source checkpoint's ``torch_dtype``/``dtype`` (else the parameter dtype). Files
    are written to a temporary sibling directory and moved into place at the end, so an interrupted export
    never leaves a half-written checkpoint behind. In multi-host runs every process must call this; only
    process 0 writes.
    """
    config: ModelConfig = model.config
    source = json.loads(config.hf_config_json) if config.hf_config_json else {}
    dtype_name = dtype or source.get("dtype") or source.get("torch_dtype") or config.param_dtype
    np_dtype = np.dtype(dtype_name)
    out = Path(out_dir)
    writer = jax.process_index() == 0
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)) if writer else None
    if writer:
        out.parent.mkdir(parents=True, exist_ok=True)
    try:
        part, current, size, total = 0, {}, 0, 0
        for name, tensor in _export_tensors(model, np_dtype):
            if current and size + tensor.nbytes > max_shard_bytes:
                _write_part(tmp, part, current)
                part, current, size = part + 1, {}, 0
            if writer:  # other processes only take part in the gathers
                current[name] = np.ascontiguousarray(tensor)
            size += tensor.nbytes
            total += tensor.nbytes
        if writer:
            _write_part(tmp, part, current)
            _name_shards(tmp, total)
            (tmp / "config.json").write_text(json.dumps(config.to_hf(_dtype_name(np_dtype)), indent=2, sort_keys=True))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
    finally:
        if writer and tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_part(tmp: Path | None, part: int, tensors: dict[str, np.ndarray]) -> None:
    if tmp is not None and tensors:
        save_file(tensors, str(tmp / f"part-{part:05d}.safetensors"), metadata={"format": "pt"})


def _name_shards(tmp: Path, total: int) -> None:
    """Rename parts to transformers' names; write the index when there is more than one file."""
    parts = sorted(tmp.glob("part-*.safetensors"))
    if len(parts) == 1:
        parts[0].rename(tmp / SAFE_SINGLE)
        return
    weight_map = {}
    for i, part in enumerate(parts):
        final = tmp / f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        with safe_open(part, framework="numpy") as handle:
            weight_map.update({name: final.name for name in handle.keys()})
        part.rename(final)
    (tmp / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
