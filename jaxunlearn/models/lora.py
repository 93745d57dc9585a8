"""LoRA adapters over a frozen base: which weights get one, their parameters, the forward and the merge, and
PEFT's file format.

An adapter on a decoder-layer weight ``W`` (Hugging Face layout ``[out, in]``) is PEFT's: ``lora_A`` ``[rank, in]``,
``lora_B`` ``[out, rank]``, and the layer uses ``W + (alpha / rank) * B @ A``. Adapters are kept in exactly PEFT's
orientation (stacked over layers: ``a`` ``[layers, rank, in]``, ``b`` ``[layers, out, rank]``), so export is a rename
and any family's weight layout (fused GPT-NeoX ``query_key_value`` included) works through its
:class:`~jaxunlearn.models.layouts.Layout`.

The delta is added to each layer's weights inside the layer scan (:func:`merge_layer`), one layer at a time: no
merged copy of the model and no full-size gradient ever exists; the gradient of a layer's merged weight lives only
while that layer's backward pass runs. A trained model's params are the base's dict plus the adapters under
:data:`LORA_KEY`; the base alone (adapters off) is the original model, so methods with a frozen reference need no
second copy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxunlearn.models.registry as registry
from jaxunlearn.errors import DTYPE, NON_NEGATIVE, ConfigError, check_rules, require
from jaxunlearn.models.layouts import Layout, get_layout, hf_shape, nested_get

LORA_KEY = "lora"
# Every linear weight of a decoder layer (Llama/Mistral/Qwen2 and GPT-NeoX names): PEFT's "all-linear" minus the head.
ALL_LINEAR = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|query_key_value|dense|dense_h_to_4h|dense_4h_to_h)\.weight"
PEFT_PREFIX = "base_model.model."
ADAPTER_FILE, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def default_config() -> dict[str, Any]:
    """The ``lora`` section: ``rank=0`` trains every weight (no adapters)."""
    return dict(
        rank=0,  # > 0: train rank-`rank` adapters on the weights `targets` selects; the base stays frozen
        alpha=16.0,  # the adapter's output is scaled by alpha / rank (PEFT's lora_alpha)
        dropout=0.0,  # PEFT's lora_dropout; only 0 (the adapters are merged into each layer's weights)
        # Full-match regular expression on Hugging Face tensor names, per layer (as RMU's trainable_params).
        targets=ALL_LINEAR,
        base_dtype="bfloat16",  # the frozen base's storage dtype (the adapters and AdamW stay float32)
    )


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted weight: its parameter path (stacked over layers), HF name, layout and which layers have one."""

    path: tuple[str, ...]
    name: str  # the HF tensor name with {layer}
    layout: Layout
    shape: tuple[int, ...]  # the per-layer parameter shape (ours)
    in_features: int
    out_features: int
    layers: tuple[bool, ...]

    @property
    def module(self) -> str:
        """The HF module name template (``model.layers.{layer}.self_attn.q_proj``)."""
        return self.name.removesuffix(".weight")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """A run's adapters: rank, scale and targets (static: it is part of the traced program)."""

    rank: int
    alpha: float
    targets: tuple[Target, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def num_params(self) -> int:
        """Trainable parameters (adapters of every layer that has one)."""
        return sum(self.rank * (t.in_features + t.out_features) * sum(t.layers) for t in self.targets)


def check_config(lora: Any) -> None:
    """The ``lora`` section, on its own (targets are checked against the model once it is known)."""
    check_rules(
        lora,
        "config.lora",
        {
            "rank": NON_NEGATIVE,
            "alpha": (lambda v: v > 0, "must be > 0"),
            "base_dtype": DTYPE,
        },
    )
    require(
        lora.dropout == 0.0,
        "config.lora.dropout",
        lora.dropout,
        "only 0: the adapters are merged into each layer's weights, so their input cannot be dropped apart from "
        "the base's",
    )
    try:
        re.compile(lora.targets)
    except re.error as e:
        raise ConfigError(f"config.lora.targets={lora.targets!r}: not a regular expression ({e})") from None


def spec_for(lora: Any, model_config: Any, trainable: Any = None) -> LoraSpec | None:
    """The adapters a ``lora`` config section puts on a model (``None`` when ``rank`` is 0). ``trainable``: a
    method's parameter mask (RMU's ``trainable_params``): adapters only where it trains the weight, too."""
    if not lora or not lora.rank:
        return None
    from flax import nnx

    family = registry.get_family(model_config.model_type)
    regex = re.compile(lora.targets)
    _, abstract = nnx.split(nnx.eval_shape(lambda: family.module(model_config, rngs=nnx.Rngs(0))), nnx.Param)
    shapes = abstract.to_pure_dict()
    targets = []
    for entry in family.hf_tensors(model_config):
        if not entry.stacked or not entry.name.endswith(".weight"):
            continue
        shape = tuple(nested_get(shapes, entry.path).shape[1:])
        hf = hf_shape(entry.layout, shape)
        if len(hf) != 2:  # norms, biases
            continue
        layers = tuple(regex.fullmatch(entry.name.format(layer=i)) is not None for i in range(model_config.num_layers))
        if trainable is not None:
            allowed = np.asarray(nested_get(trainable, entry.path)).reshape(len(layers), -1).max(axis=1) > 0
            layers = tuple(bool(a and b) for a, b in zip(layers, allowed))
        if any(layers):
            targets.append(Target(entry.path, entry.name, get_layout(entry.layout), shape, hf[1], hf[0], layers))
    if not targets:
        trained = " that the method trains" if trainable is not None else ""
        raise ConfigError(
            f"config.lora.targets={lora.targets!r}: matches no decoder-layer weight{trained} of this "
            f"{model_config.model_type} "
            f"model (e.g. {family.hf_tensors(model_config)[-3].name.format(layer=0)})"
        )
    return LoraSpec(int(lora.rank), float(lora.alpha), tuple(targets))


# --- parameters ------------------------------------------------------------------------------------------------


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _logical(size: int, model_config: Any) -> str | None:
    """The logical axis of an adapter dimension: that of the base weight's dimension of the same size."""
    return {model_config.hidden_size: "embed", model_config.intermediate_size: "mlp"}.get(size)


def adapter_axes(spec: LoraSpec, model_config: Any) -> dict:
    """Logical axes of every adapter array (shaped like the adapters)."""
    axes: dict = {}
    for t in spec.targets:
        a = ("layers", None, _logical(t.in_features, model_config))
        b = ("layers", _logical(t.out_features, model_config), None)
        _set(axes, t.path, {"a": a, "b": b})
    return axes


def adapter_shapes(spec: LoraSpec, num_layers: int) -> dict:
    """``ShapeDtypeStruct`` of every adapter array (float32)."""
    shapes: dict = {}
    for t in spec.targets:
        a = jax.ShapeDtypeStruct((num_layers, spec.rank, t.in_features), jnp.float32)
        b = jax.ShapeDtypeStruct((num_layers, t.out_features, spec.rank), jnp.float32)
        _set(shapes, t.path, {"a": a, "b": b})
    return shapes


def adapter_mask(spec: LoraSpec, method_mask: Any = None) -> dict:
    """1/0 per layer (``[layers, 1, 1]``) for each adapter array: the layers ``targets`` selects, and, for a method
    that trains only some parameters (RMU), only where it trains the adapted weight."""
    mask: dict = {}
    for t in spec.targets:
        m = np.asarray(t.layers, np.float32)
        if method_mask is not None:
            m = m * np.asarray(nested_get(method_mask, t.path), np.float32).reshape(len(t.layers), -1).max(axis=1)
        m = m.reshape(-1, 1, 1)
        _set(mask, t.path, {"a": m, "b": m})
    return mask


def init_adapters(spec: LoraSpec, num_layers: int, seed: int) -> dict:
    """PEFT's initialisation: ``A`` Kaiming-uniform (``a=sqrt(5)``: bound ``1/sqrt(in)``), ``B`` zeros, so the
    adapted model starts as the base. Adapters of unselected layers are zero and stay so."""
    adapters: dict = {}
    key = jax.random.key(seed)
    for i, t in enumerate(spec.targets):
        bound = 1.0 / math.sqrt(t.in_features)
        a = jax.random.uniform(jax.random.fold_in(key, i), (num_layers, spec.rank, t.in_features), jnp.float32)
        a = (2 * a - 1) * bound * jnp.asarray(t.layers, jnp.float32)[:, None, None]
        b = jnp.zeros((num_layers, t.out_features, spec.rank), jnp.float32)
        _set(adapters, t.path, {"a": a, "b": b})
    return adapters


# --- forward and merge ---------------------------------------------------------------------------------------


def attach(base: dict, adapters: dict) -> dict:
    """The params of the adapted model: the base's dict with the adapters under :data:`LORA_KEY`."""
    return {**base, LORA_KEY: adapters}


def split(params: dict) -> tuple[dict, dict | None]:
    """``(base, adapters)`` of a params dict (``adapters`` None when there are none)."""
    if LORA_KEY not in params:
        return params, None
    return {k: v for k, v in params.items() if k != LORA_KEY}, params[LORA_KEY]


def delta(target: Target, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``scale * B @ A`` for one layer, in our layout of the weight (float32)."""
    hf = scale * jnp.matmul(b, a, precision=jax.lax.Precision.HIGHEST)  # [out, in]
    full = tuple(slice(0, n) for n in target.shape)
    return target.layout.read_block(lambda block: hf[block], target.shape, full)


def merge_layer(spec: LoraSpec, layer_params: dict, layer_adapters: dict) -> dict:
    """One layer's params (a pure dict, without the ``layers`` axis) with its adapters' deltas added (float32)."""
    out = jax.tree.map(lambda x: x, layer_params)
    for t in spec.targets:
        w = nested_get(layer_params, t.path[1:])
        ab = nested_get(layer_adapters, t.path[1:])
        _set(
            out, t.path[1:], w.astype(jnp.promote_types(w.dtype, jnp.float32)) + delta(t, ab["a"], ab["b"], spec.scale)
        )
    return out


def merge(spec: LoraSpec, params: dict, dtype: Any = None) -> dict:
    """The adapted model as ordinary params (PEFT's ``merge_and_unload``): each adapted weight plus its delta, in
    ``dtype`` (default: float32 for adapted weights, the base's dtype elsewhere)."""
    base, adapters = split(params)
    out = jax.tree.map(lambda x: x if dtype is None else x.astype(dtype), base)
    for t in spec.targets:
        w = nested_get(base, t.path)
        ab = nested_get(adapters, t.path)
        d = jax.vmap(lambda a, b, t=t: delta(t, a, b, spec.scale))(ab["a"], ab["b"])
        _set(out, t.path, (w.astype(jnp.float32) + d).astype(dtype or jnp.promote_types(w.dtype, jnp.float32)))
    return out


# --- PEFT's format -------------------------------------------------------------------------------------------


def to_peft(spec: LoraSpec, adapters: dict) -> dict[str, np.ndarray]:
    """PEFT's ``adapter_model.safetensors`` tensors (float32) of the selected layers."""
    tensors = {}
    for t in spec.targets:
        ab = nested_get(adapters, t.path)
        a, b = np.asarray(jax.device_get(ab["a"])), np.asarray(jax.device_get(ab["b"]))
        for layer, on in enumerate(t.layers):
            if on:
                module = PEFT_PREFIX + t.module.format(layer=layer)
                tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(a[layer], np.float32)
                tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(b[layer], np.float32)
    return tensors


def peft_target_modules(spec: LoraSpec) -> list[str] | str:
    """PEFT's ``target_modules``: the modules' short names when every layer has them, else a full-match regex of
    the exact module names."""
    if all(all(t.layers) for t in spec.targets):
        return sorted({t.module.split(".")[-1] for t in spec.targets})
    names = [t.module.format(layer=i) for t in spec.targets for i, on in enumerate(t.layers) if on]
    return "|".join(re.escape(n) for n in names)


def peft_config(spec: LoraSpec, base_model: str) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for these adapters."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": peft_target_modules(spec),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_peft(spec: LoraSpec, adapters: dict, directory: str | Path, base_model: str) -> Path:
    """Write the adapters as a PEFT adapter directory (loadable with ``PeftModel.from_pretrained``)."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(to_peft(spec, adapters), str(directory / ADAPTER_FILE), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(peft_config(spec, base_model), indent=2) + "\n")
    return directory


def is_peft_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_peft(directory: str | Path, model_config: Any) -> tuple[LoraSpec, dict, str]:
    """``(spec, adapters, base_model)`` of a PEFT LoRA directory, on this model's structure. Refuses what this
    implementation does not compute (DoRA, rsLoRA, per-module ranks, biases)."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    cfg: Mapping[str, Any] = json.loads((directory / ADAPTER_CONFIG).read_text())
    unsupported = {
        "peft_type": cfg.get("peft_type", "LORA") != "LORA",
        "use_dora": bool(cfg.get("use_dora")),
        "use_rslora": bool(cfg.get("use_rslora")),
        "rank_pattern": bool(cfg.get("rank_pattern")),
        "alpha_pattern": bool(cfg.get("alpha_pattern")),
        "bias": cfg.get("bias", "none") != "none",
        "modules_to_save": bool(cfg.get("modules_to_save")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"{directory / ADAPTER_CONFIG}: {', '.join(f'{k}={cfg.get(k)!r}' for k in bad)} not supported")
    tensors = load_file(str(directory / ADAPTER_FILE))
    rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    names = "|".join(
        re.escape(k.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight"))
        for k in tensors
        if k.endswith(".lora_A.weight")
    )
    spec = spec_for(_Section(rank=rank, alpha=alpha, targets=f"({names})\\.weight"), model_config)
    adapters: dict = {}
    n = model_config.num_layers
    for t in spec.targets:
        a = np.zeros((n, rank, t.in_features), np.float32)
        b = np.zeros((n, t.out_features, rank), np.float32)
        for layer, on in enumerate(t.layers):
            if on:
                module = PEFT_PREFIX + t.module.format(layer=layer)
                a[layer], b[layer] = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
        _set(adapters, t.path, {"a": a, "b": b})
    return spec, adapters, str(cfg.get("base_model_name_or_path") or "")


class _Section(dict):
    """A minimal stand-in for a ``lora`` config section."""

    def __getattr__(self, name: str) -> Any:
        return self[name]
