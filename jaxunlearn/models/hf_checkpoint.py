"""Hugging Face checkpoints in and out: ``config.json`` + safetensors <-> a sharded jaxunlearn model.

Loading places every tensor straight into its mesh sharding: each device's shard is read from the
memory-mapped safetensors file and cast to the parameter dtype on its own, so a 7B checkpoint is never
materialised whole (or in fp32) on one host. Only safetensors are read; pickle-based weights (``*.bin``,
``*.pt``, ...) are refused, and remote code is never run. Which tensors exist and how they are laid out comes
from the model family's table (:meth:`~jaxunlearn.models.registry.Family.hf_tensors`); nothing here is specific
to one architecture.

A GGUF file (llama.cpp's format, ``*.gguf``) is read in place of a directory: its metadata gives the
``config.json`` and the tokenizer, and its tensors are dequantized one at a time (:mod:`jaxunlearn.models.gguf`).
Exports are always ordinary safetensors directories.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so safetensors can read bf16 tensors)
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxunlearn.models import LanguageModel, abstract_model, family, split_model
from jaxunlearn.models.gguf import GGUFError, GGUFFile, is_gguf
from jaxunlearn.models.layouts import HFTensor, hf_shape, nested_get, read_block, to_hf_layout
from jaxunlearn.models.spec import ModelConfig
from jaxunlearn.parallel import sharding
from jaxunlearn.storage import locations

__all__ = [
    "CheckpointError",
    "from_pretrained",
    "hf_shape",
    "load_config",
    "load_model",
    "load_tokenizer",
    "read_generation_config",
    "read_hf_config",
    "resolve_model_dir",
    "stop_token_ids",
    "save_pretrained",
    "to_hf_layout",
]

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
# Files any transformers tokenizer is saved as (fast, sentencepiece, tiktoken, BPE/WordPiece vocabularies).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "merges.txt")
_TOKENIZER_GLOBS = ("*.model", "*.tiktoken")
# What reading a damaged or unreadable tensor raises (safetensors, mmap, numpy without the dtype).
_READ_ERRORS = (SafetensorError, OSError, ValueError, TypeError, AttributeError)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or written safely; the message names the culprit."""


# --- locating a checkpoint ----------------------------------------------------------------------------------


# ``shapes:NAME``: a public model's config.json shipped with the package (no weights), for planning.
SHAPES_PREFIX = "shapes:"
SHAPES_DIR = Path(__file__).resolve().parent / "shapes"


def shape_names() -> list[str]:
    """The model shapes shipped with the package (``shapes:yi-6b`` ...)."""
    return sorted(p.parent.name for p in SHAPES_DIR.glob("*/config.json"))


def shape_dir(name: str) -> Path:
    """The directory of a shipped model shape; an error lists the known ones."""
    directory = SHAPES_DIR / name
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{SHAPES_PREFIX}{name}: no such model shape; known: {', '.join(shape_names())}")
    return directory


def resolve_model_dir(
    name_or_path: str | os.PathLike, *, revision: str | None = None, cache_dir: str | None = None
) -> Path:
    """Where a checkpoint is on this machine: a local directory holding ``config.json`` (the path itself, the
    local mirror of a storage URL such as ``gs://BUCKET/model``, or the Hub snapshot of a repo id), or a local
    GGUF file (``*.gguf``, or the mirror of one at a URL); ``package:NAME/PATH`` is a file shipped in an installed
    Python package, ``shapes:NAME`` a shipped model shape.

    Hub downloads go through ``huggingface_hub`` (so ``HF_HOME``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` apply)
    and fetch only configs, safetensors and tokenizer files, never pickles.
    """
    text = os.fspath(name_or_path)
    if text.startswith(SHAPES_PREFIX):
        return shape_dir(text[len(SHAPES_PREFIX) :])
    if locations.is_package_path(text):
        try:
            return locations.package_path(text, "model")
        except locations.LocationError as e:
            raise CheckpointError(str(e)) from e
    if locations.is_url(text):  # gs://..., file://...: read from a local mirror
        return Path(locations.fetch(text, "model directory"))
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and is_gguf(path):
        return path
    if path.exists():
        raise CheckpointError(
            f"{text} is a file; expected a directory with config.json and *.safetensors, or a .gguf file"
        )
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


@functools.lru_cache(maxsize=2)
def _gguf_file(path: Path, stamp: tuple[int, int]) -> GGUFFile:
    """One open GGUF file per path and version (``stamp``: size and modification time): opening parses the
    tokenizer's arrays, and a run reads the config, tokenizer and weights in turn."""
    try:
        return GGUFFile(path)
    except GGUFError as e:
        raise CheckpointError(str(e)) from e


def open_gguf(path: Path) -> GGUFFile:
    """The open :class:`~jaxunlearn.models.gguf.GGUFFile` of a local GGUF file (:class:`CheckpointError` if it
    cannot be read faithfully)."""
    stat = path.stat()
    return _gguf_file(path.resolve(), (stat.st_size, stat.st_mtime_ns))


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    """The ``config.json`` of a model directory (or the one a GGUF file's metadata describes) as a dict."""
    if is_gguf(model_dir) and model_dir.is_file():
        try:
            return open_gguf(model_dir).hf_config()
        except GGUFError as e:
            raise CheckpointError(str(e)) from e
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deeply ('[' * 200000)
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


GENERATION_CONFIG = "generation_config.json"


def read_generation_config(model_dir: Path) -> dict[str, Any] | None:
    """A model directory's ``generation_config.json`` as a dict (``None`` without one, or for a GGUF file)."""
    path = model_dir / GENERATION_CONFIG
    if not model_dir.is_dir() or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deeply ('[' * 200000)
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def stop_token_ids(model_dir: Path) -> tuple[int, ...]:
    """The ids greedy generation stops at, as transformers' ``generate`` takes them: the ``eos_token_id`` (one id or
    a list) of ``generation_config.json`` when it has one, else of ``config.json``; e.g. Llama-3's ``<|eot_id|>``
    and Phi-3.5's ``<|end|>`` beside the tokenizer's EOS."""
    generation = read_generation_config(model_dir) or {}
    eos = generation.get("eos_token_id")
    if eos is None:
        eos = read_hf_config(model_dir).get("eos_token_id")
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return tuple(int(i) for i in ids)


def load_config(name_or_path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a local or Hub checkpoint (``overrides`` set dtypes, remat, ...)."""
    return ModelConfig.from_hf(read_hf_config(resolve_model_dir(name_or_path)), **overrides)


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it; refuse pickles."""
    index = model_dir / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from e
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
        if model_dir.parent == SHAPES_DIR:
            raise CheckpointError(
                f"{SHAPES_PREFIX}{model_dir.name} is a model shape for planning (python -m jaxunlearn.commands.plan), with "
                "no weights: give the checkpoint itself in config.model.path"
            )
        raise CheckpointError(f"{model_dir} has no *.safetensors weights")
    files = {}
    for f in candidates:
        with _open_safetensors(f) as handle:
            files.update({name: f for name in handle.keys()})
    return files


def _open_safetensors(path: Path) -> Any:
    """``safe_open`` that turns a damaged file (truncated, bad header) into a :class:`CheckpointError`."""
    try:
        return safe_open(path, framework="numpy")
    except _READ_ERRORS as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated by an interrupted "
            "download or copy: fetch it again"
        ) from e


class _SafetensorsReader:
    """Lazy, slice-level access to the tensors of one checkpoint (memory-mapped, one handle per file)."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._handles: dict[Path, Any] = {}

    def _handle(self, name: str) -> Any:
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = _open_safetensors(path)
        return self._handles[path]

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def release(self) -> None:
        self._handles = {}

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        handle = self._handle(name)
        try:
            return np.asarray(handle.get_slice(name)[index])
        except _READ_ERRORS as e:
            raise CheckpointError(f"{self.files[name]}: cannot read tensor {name} ({type(e).__name__}: {e})") from e


def _open_weights(model_dir: Path) -> _SafetensorsReader | GGUFFile:
    """The checkpoint's tensors by Hugging Face name: safetensors files, or a GGUF file dequantized on read."""
    if is_gguf(model_dir) and model_dir.is_file():
        return open_gguf(model_dir)
    return _SafetensorsReader(_weight_files(model_dir))


def _read_block(
    reader: _SafetensorsReader | GGUFFile, entry: HFTensor, name: str, shape: tuple[int, ...], index: tuple[slice, ...]
) -> np.ndarray:
    """Read the block ``index`` of a per-layer parameter from HF tensor ``name``, touching only that block."""
    try:
        return read_block(entry.layout, lambda block: reader.read(name, block), shape, index)
    except CheckpointError:
        raise
    except ValueError as e:  # a sharding the layout cannot read block-wise
        raise CheckpointError(f"cannot read {name} for shard {index}: {e}") from e


def _nested_set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _check_tensors(
    reader: _SafetensorsReader | GGUFFile, config: ModelConfig, abs_params: Any, model_dir: Path
) -> None:
    """Fail once, naming every missing, mis-shaped and unexpected tensor."""
    fam = family(config)
    expected: dict[str, tuple[int, ...]] = {}
    for entry in fam.hf_tensors(config):
        shape = tuple(nested_get(abs_params, entry.path).shape)
        if entry.stacked:
            for i in range(config.num_layers):
                expected[entry.name.format(layer=i)] = hf_shape(entry.layout, shape[1:])
        else:
            expected[entry.name] = hf_shape(entry.layout, shape)
    present = set(reader.names)
    missing = sorted(set(expected) - present)
    mismatched = sorted(
        f"{n}: checkpoint {reader.shape(n)} vs config {expected[n]}"
        for n in set(expected) & present
        if reader.shape(n) != expected[n]
    )
    ignorable = {n for n in present if fam.ignored_hf_tensor(config, n)}
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


def check_checkpoint(model_dir: Path, config: ModelConfig) -> None:
    """Check a checkpoint's files without reading its weights: every safetensors header opens, every tensor the
    architecture needs is there with its shape (so a damaged download is refused before any work starts)."""
    reader = _open_weights(model_dir)
    if isinstance(reader, _SafetensorsReader):
        for path in sorted(set(reader.files.values())):
            with _open_safetensors(path):
                pass
    _check_tensors(reader, config, nnx.state(abstract_model(config)), model_dir)


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
    """Load a checkpoint of a registered family (local directory or Hub id) as a sharded jaxunlearn model.

    Args:
      name_or_path: a directory with ``config.json`` and ``model.safetensors`` (or sharded safetensors with
        ``model.safetensors.index.json``), or a Hugging Face Hub repo id.
      mesh: the device mesh; defaults to all devices on ``fsdp``.
      rules: logical-to-mesh axis rules (default :data:`jaxunlearn.parallel.sharding.DEFAULT_RULES`).
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
    reader = _open_weights(model_dir)
    mesh = mesh or sharding.make_mesh()
    graphdef, abs_state = nnx.split(abstract_model(config))
    _check_tensors(reader, config, abs_state, model_dir)
    shardings = sharding.param_shardings(abs_state, mesh, rules)
    try:
        nnx.replace_by_pure_dict(abs_state, _read_params(reader, config, abs_state, shardings))
    finally:
        reader.release()
    log.info("loaded %s (%s params, %s) from %s", config.model_type, f"{config.num_params:,}", param_dtype, model_dir)
    return nnx.merge(graphdef, abs_state)


def _read_params(reader: _SafetensorsReader | GGUFFile, config: ModelConfig, abs_state: Any, shardings: Any) -> dict:
    """Every parameter as a global array built shard by shard from the checkpoint, in ``config.param_dtype``."""
    target_dtype = np.dtype(config.param_dtype)
    loaded: dict = {}
    for entry in family(config).hf_tensors(config):
        shape = tuple(nested_get(abs_state, entry.path).shape)
        target = nested_get(shardings, entry.path).get_value()

        def read_shard(index: tuple[slice, ...], entry=entry, shape=shape) -> np.ndarray:
            if not entry.stacked:
                return _read_block(reader, entry, entry.name, shape, index).astype(target_dtype)
            layers = range(*index[0].indices(shape[0]))
            blocks = [_read_block(reader, entry, entry.name.format(layer=i), shape[1:], index[1:]) for i in layers]
            return np.stack(blocks).astype(target_dtype)

        _nested_set(loaded, entry.path, jax.make_array_from_callback(shape, target, read_shard))
    return loaded


def load_model(
    path: str | os.PathLike,
    model_cfg: Mapping[str, Any],
    *,
    mesh: Mesh,
    rules: Any = None,
    dtype: str | None = None,
) -> tuple[LanguageModel, dict]:
    """Load ``path`` with the numerics of a run config's ``config.model`` section: ``(structure, params)``.

    ``param_dtype``, ``dtype``, ``remat`` and ``attention_impl`` come from ``model_cfg`` (an ml_collections
    ``ConfigDict`` or any mapping; missing keys take :func:`from_pretrained`'s defaults); an explicit ``dtype``
    overrides the compute dtype (e.g. ``"float32"`` to evaluate exactly). ``model_cfg.revision`` applies when
    ``path`` is ``model_cfg.path`` itself: a revision names a commit of that repo, not of another model.
    """

    def get(key: str, default: Any) -> Any:
        value = model_cfg.get(key, default)
        return default if value in (None, "") else value

    revision = get("revision", None) if os.fspath(path) == get("path", None) else None
    model = from_pretrained(
        path,
        mesh=mesh,
        rules=rules,
        param_dtype=get("param_dtype", "float32"),
        dtype=dtype or get("dtype", "bfloat16"),
        remat=get("remat", "none"),
        attention_impl=get("attention_impl", "xla"),
        revision=revision,
    )
    return split_model(model)


def _has_tokenizer_files(model_dir: Path) -> bool:
    return any((model_dir / f).is_file() for f in _TOKENIZER_FILES) or any(
        next(model_dir.glob(pattern), None) is not None for pattern in _TOKENIZER_GLOBS
    )


def load_tokenizer(
    name_or_path: str | os.PathLike, *, revision: str | None = None, label: str = "config.model.tokenizer"
) -> Any:
    """The Hugging Face tokenizer saved in a directory or Hub repo (never with remote code).

    ``label`` names the setting that chose ``name_or_path``; a directory without tokenizer files and any
    failure to load one raise :class:`CheckpointError` naming the directory and telling to set ``label``.
    """
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(name_or_path, revision=revision)
    if is_gguf(model_dir) and model_dir.is_file():
        try:
            return open_gguf(model_dir).tokenizer()
        except GGUFError as e:
            raise CheckpointError(f"{e} ({label})") from e
    if not _has_tokenizer_files(model_dir):
        raise CheckpointError(
            f"{model_dir} has no tokenizer files (tokenizer.json, tokenizer.model, tokenizer_config.json or "
            f"vocabulary files); set {label} to a directory or Hub id that has them"
        )
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:  # transformers raises many types (OSError, ValueError, JSON, sentencepiece errors)
        raise CheckpointError(
            f"could not load the tokenizer in {model_dir} ({type(e).__name__}: {e}); set {label} to a directory "
            "or Hub id with a working tokenizer"
        ) from e


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
        value = nested_get(params, entry.path).get_value()
        if entry.stacked:
            for i in range(config.num_layers):
                yield entry.name.format(layer=i), to_hf_layout(entry.layout, _to_host(value[i])).astype(dtype)
        else:
            yield entry.name, to_hf_layout(entry.layout, _to_host(value)).astype(dtype)


def export_dtype(config: ModelConfig, dtype: str | None = None) -> str:
    """The dtype an export writes: ``dtype``, else the source checkpoint's ``dtype``/``torch_dtype``, else the
    parameter dtype (a numpy name, e.g. ``bfloat16``)."""
    source = json.loads(config.hf_config_json) if config.hf_config_json else {}
    return _dtype_name(dtype or source.get("dtype") or source.get("torch_dtype") or config.param_dtype)


def save_pretrained(
    model: nnx.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    generation_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory that ``transformers`` loads.

    ``dtype`` defaults to the source checkpoint's ``torch_dtype``/``dtype`` (else the parameter dtype);
    ``generation_config`` (the source's) is written as ``generation_config.json``, so that generation stops at the
    same ids. Files
    are written to a temporary sibling directory and moved into place at the end, so an interrupted export
    never leaves a half-written checkpoint behind. In multi-host runs every process must call this; only
    process 0 writes.
    """
    config: ModelConfig = model.config
    np_dtype = np.dtype(export_dtype(config, dtype))
    out = Path(out_dir)
    writer = jax.process_index() == 0
    tmp = None
    if writer:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_weights(model, tmp, np_dtype, max_shard_bytes)
        if writer:
            (tmp / "config.json").write_text(json.dumps(config.to_hf(_dtype_name(np_dtype)), indent=2, sort_keys=True))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            if generation_config is not None:
                (tmp / GENERATION_CONFIG).write_text(json.dumps(dict(generation_config), indent=2, sort_keys=True))
            _apply_umask(tmp)
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
    finally:
        if writer and tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_weights(model: nnx.Module, tmp: Path | None, dtype: np.dtype, max_shard_bytes: int) -> None:
    """Safetensors files of at most ``max_shard_bytes`` (and their index) in ``tmp``; ``None`` on non-writers,
    which only take part in the gathers."""
    part, current, size, total = 0, {}, 0, 0
    for name, tensor in _export_tensors(model, dtype):
        if current and size + tensor.nbytes > max_shard_bytes:
            _write_part(tmp, part, current)
            part, current, size = part + 1, {}, 0
        if tmp is not None:
            current[name] = np.ascontiguousarray(tensor)
        size += tensor.nbytes
        total += tensor.nbytes
    if tmp is not None:
        _write_part(tmp, part, current)
        _name_shards(tmp, total)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` alone must set one)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(root: Path) -> None:
    """Give ``root`` and everything in it the permissions a plain ``mkdir``/``open`` would have.

    ``tempfile.mkdtemp`` creates a 0700 directory (and libraries may write 0600 temp files), which would make
    an export unreadable to teammates on a shared filesystem.
    """
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            Path(dirpath, d).chmod(0o777 & ~mask)
        for f in filenames:
            Path(dirpath, f).chmod(0o666 & ~mask)


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
