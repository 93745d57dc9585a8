"""GGUF files (llama.cpp's single-file checkpoints) read as Hugging Face checkpoints, without torch.

A ``.gguf`` file holds the architecture, the tokenizer and the (usually quantized) weights. This module gives
what :mod:`jaxunlearn.models.hf_checkpoint` needs from a checkpoint directory, read from the file instead:

- :meth:`GGUFFile.hf_config`: a ``config.json`` dict (``model_type`` ``llama`` or ``qwen2``) from the metadata;
- :meth:`GGUFFile.read` / :meth:`GGUFFile.shape`: every tensor under its Hugging Face name and layout, dequantized
  to float32 with the ``gguf`` library (numpy) when first read. llama.cpp's converter permutes the rows of the
  Llama family's Q and K projections (to its own RoPE layout); reading undoes that permutation;
- :meth:`GGUFFile.tokenizer`: a ``transformers`` fast tokenizer built from the vocabulary, merges, special tokens
  and chat template in the metadata, with the pre-tokenizer llama.cpp uses for the file's ``tokenizer.ggml.pre``.

What it cannot read faithfully it refuses in one line naming the culprit (:class:`GGUFError`): an architecture
other than those above, a quantization type the ``gguf`` library cannot dequantize, a tokenizer other than
byte-level BPE or an unknown pre-tokenizer, and RoPE variants jaxunlearn does not implement.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GGUF_SUFFIX", "GGUFError", "GGUFFile", "is_gguf"]

GGUF_SUFFIX = ".gguf"

# llama.cpp architecture -> Hugging Face model_type. Mistral and SmolLM files say "llama".
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
# Architectures whose Q/K rows llama.cpp's converter permutes (``LlamaModel.permute`` in convert_hf_to_gguf.py).
_PERMUTED_QK = {"llama"}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")

# How text is split before the byte-level BPE, by ``tokenizer.ggml.pre`` (llama.cpp's names; its llama-vocab.cpp
# lists the same splits as regular expressions). GPT-2's expression is what ``ByteLevel(use_regex=True)`` applies;
# the StarCoder-style tokenizers (SmolLM's tokenizer.json among them) isolate every digit first.
_GPT2_PRE = ("gpt-2", "phi-2", "mpt", "olmo", "jais")
_DIGITS_PRE = ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b")
_LLAMA3_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), _QWEN2_SPLIT),
}
PRE_TOKENIZERS = (*_GPT2_PRE, *_DIGITS_PRE, *_SPLITS)
# llama.cpp token types (``llama_token_type``).
_CONTROL, _USER_DEFINED = 3, 4


class GGUFError(ValueError):
    """A GGUF file jaxunlearn cannot read faithfully; the message names the file and the culprit."""


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix; the header is checked on opening)."""
    return os.fspath(path).lower().endswith(GGUF_SUFFIX)


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: it interleaved each head's two rotary halves."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _pre_tokenizer(pre: str) -> Any:
    """The ``tokenizers`` pre-tokenizer for llama.cpp's pre-tokenizer type ``pre`` (one of :data:`PRE_TOKENIZERS`)."""
    from tokenizers import Regex, pre_tokenizers

    steps = []
    if pre in _DIGITS_PRE:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if pre in _SPLITS:
        steps.append(pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _SPLITS)
    return pre_tokenizers.Sequence([*steps, byte_level])


class GGUFFile:
    """One GGUF file, memory-mapped; tensors are dequantized when read (the latest few are kept)."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = Path(path)
        try:
            self._reader = gguf.GGUFReader(self.path)
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise GGUFError(f"{self.path} is not a readable GGUF file ({type(e).__name__}: {e})") from e
        self.architecture = str(self.metadata.get("general.architecture", ""))
        if self.architecture not in ARCHITECTURES:
            raise GGUFError(
                f"{self.path}: architecture {self.architecture!r} is not supported for GGUF files; supported: "
                f"{', '.join(ARCHITECTURES)}"
            )
        self._tensors = {self._hf_name(t.name): t for t in self._reader.tensors}
        self._check_types()
        self._cache: dict[str, np.ndarray] = {}  # the latest dequantized tensors, newest last

    # --- metadata --------------------------------------------------------------------------------------------

    @functools.cached_property
    def metadata(self) -> dict[str, Any]:
        """Every key-value field but the tokenizer's long arrays (read on demand by :meth:`tokenizer`)."""
        long_arrays = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
        long_arrays += ("tokenizer.ggml.scores",)
        return {k: f.contents() for k, f in self._reader.fields.items() if k not in long_arrays}

    def _arch(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def _require(self, key: str) -> Any:
        value = self._arch(key)
        if value is None:
            raise GGUFError(f"{self.path}: metadata {self.architecture}.{key} is missing")
        return value

    def hf_config(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict describing the file's model (weights dequantized to float32)."""
        heads = int(self._require("attention.head_count"))
        hidden = int(self._require("embedding_length"))
        vocab = self._arch("vocab_size") or len(self._reader.fields["tokenizer.ggml.tokens"].data)
        hf: dict[str, Any] = {
            "model_type": ARCHITECTURES[self.architecture],
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(self._require("feed_forward_length")),
            "num_hidden_layers": int(self._require("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._arch("attention.head_count_kv") or heads),
            "head_dim": int(self._arch("attention.key_length") or hidden // heads),
            "rms_norm_eps": float(self._require("attention.layer_norm_rms_epsilon")),
            "rope_theta": float(self._arch("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._arch("context_length", 4096)),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "hidden_act": "silu",
            "dtype": "float32",  # dequantized values are exact in float32; export writes this unless told otherwise
            **self._rope_scaling(),
            **self._token_ids(),
        }
        if hf["model_type"] == "qwen2":
            hf["use_sliding_window"] = False
        return hf

    def _rope_scaling(self) -> dict[str, Any]:
        if "rope_freqs.weight" in self._tensors:  # Llama 3.1's frequency table
            raise GGUFError(f"{self.path}: RoPE frequency factors (rope_freqs) are not supported for GGUF files")
        kind = self._arch("rope.scaling.type", "none")
        if kind in ("none", ""):
            return {}
        if kind == "linear":
            return {"rope_scaling": {"rope_type": "linear", "factor": float(self._require("rope.scaling.factor"))}}
        raise GGUFError(f"{self.path}: RoPE scaling {kind!r} is not supported for GGUF files (only linear)")

    def _token_ids(self) -> dict[str, int]:
        keys = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "padding_token_id"}
        meta = self.metadata
        return {hf: int(meta[f"tokenizer.ggml.{g}"]) for hf, g in keys.items() if f"tokenizer.ggml.{g}" in meta}

    # --- tensors ---------------------------------------------------------------------------------------------

    def _hf_name(self, name: str) -> str:
        if name in _GLOBAL_TENSORS:
            return _GLOBAL_TENSORS[name]
        match = _LAYER_NAME.fullmatch(name)
        if match and match.group(2) in _LAYER_TENSORS:
            return f"model.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}"
        return name  # unknown: the checkpoint check names it as unexpected

    def _check_types(self) -> None:
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import _type_traits

        readable = {Q.F32, Q.F16, *_type_traits}
        bad = sorted({t.tensor_type.name for t in self._reader.tensors if t.tensor_type not in readable})
        if bad:
            raise GGUFError(
                f"{self.path}: quantization type(s) {', '.join(bad)} cannot be dequantized; readable: "
                f"{', '.join(sorted(q.name for q in readable))}"
            )

    @property
    def names(self) -> list[str]:
        """Every tensor, by its Hugging Face name."""
        return list(self._tensors)

    @property
    def quantization(self) -> dict[str, int]:
        """How many tensors each quantization type holds, e.g. ``{"Q4_1": 210, "F32": 61, "Q8_0": 1}``."""
        counts: dict[str, int] = {}
        for t in self._tensors.values():
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return counts

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape in Hugging Face (PyTorch) order: GGUF lists dimensions fastest-first."""
        return tuple(int(d) for d in reversed(self._tensors[name].shape.tolist()))

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        """The block ``index`` of tensor ``name`` in Hugging Face layout, as float32."""
        if name not in self._cache:  # the shards of one tensor are read one after another: keep the last two
            self._cache = {**dict(list(self._cache.items())[-1:]), name: self._dequantized(name)}
        return self._cache[name][index]

    def release(self) -> None:
        """Drop the dequantized tensors kept for the next read."""
        self._cache = {}

    def _dequantized(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        tensor = self._tensors[name]
        value = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(self.shape(name))
        if self.architecture in _PERMUTED_QK:
            if name.endswith("self_attn.q_proj.weight"):
                value = _unpermute(value, int(self._require("attention.head_count")))
            elif name.endswith("self_attn.k_proj.weight"):
                heads = int(self._arch("attention.head_count_kv") or self._require("attention.head_count"))
                value = _unpermute(value, heads)
        return value

    # --- tokenizer -------------------------------------------------------------------------------------------

    def tokenizer(self) -> Any:
        """A ``transformers`` fast tokenizer equal to the one llama.cpp runs for this file."""
        from tokenizers import Tokenizer, decoders, models, processors
        from transformers import PreTrainedTokenizerFast

        meta = self.metadata
        kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt-2")
        if kind != "gpt2":
            raise GGUFError(
                f"{self.path}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2'); set "
                "config.model.tokenizer to the model's Hugging Face tokenizer"
            )
        if pre not in PRE_TOKENIZERS:
            raise GGUFError(
                f"{self.path}: pre-tokenizer {pre!r} is not supported (known: {', '.join(sorted(PRE_TOKENIZERS))}); "
                "set config.model.tokenizer to the model's Hugging Face tokenizer"
            )
        tokens = [str(t) for t in self._reader.fields["tokenizer.ggml.tokens"].contents()]
        merges = [tuple(str(m).split(" ", 1)) for m in self._reader.fields["tokenizer.ggml.merges"].contents()]
        bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
        backend = Tokenizer(bpe)
        backend.pre_tokenizer = _pre_tokenizer(pre)
        backend.decoder = decoders.ByteLevel()
        self._add_special_tokens(backend, tokens)
        special = {name: tokens[i] for name, i in self._special_ids().items()}
        backend.post_processor = self._post_processor(processors, special)
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            chat_template=meta.get("tokenizer.chat_template"),
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            **special,
        )

    def _special_ids(self) -> dict[str, int]:
        keys = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id"}
        keys["pad_token"] = "padding_token_id"
        meta = self.metadata
        return {name: int(meta[f"tokenizer.ggml.{k}"]) for name, k in keys.items() if f"tokenizer.ggml.{k}" in meta}

    def _add_special_tokens(self, backend: Any, tokens: list[str]) -> None:
        """Control tokens (``<|im_start|>``) are matched whole and are special; user-defined ones are matched whole."""
        from tokenizers import AddedToken

        types = self._reader.fields["tokenizer.ggml.token_type"].contents()
        control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
        user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
        backend.add_special_tokens(control)
        backend.add_tokens(user)

    def _post_processor(self, processors: Any, special: dict[str, str]) -> Any:
        """BOS/EOS around each sequence as the file's ``add_bos_token``/``add_eos_token`` say."""
        meta = self.metadata
        bos = special.get("bos_token") if meta.get("tokenizer.ggml.add_bos_token", False) else None
        eos = special.get("eos_token") if meta.get("tokenizer.ggml.add_eos_token", False) else None
        if bos is None and eos is None:
            return processors.ByteLevel(trim_offsets=False)
        ids = self._special_ids()
        single = " ".join(x for x in (bos and f"{bos}:0", "$A:0", eos and f"{eos}:0") if x)
        pair = " ".join(x for x in (single, bos and f"{bos}:1", "$B:1", eos and f"{eos}:1") if x)
        used = [(t, ids[n]) for n, t in (("bos_token", bos), ("eos_token", eos)) if t]
        return processors.TemplateProcessing(single=single, pair=pair, special_tokens=used)
