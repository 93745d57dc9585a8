"""GGUF files as a model source, on tiny files written here the way llama.cpp's converter writes them: weights
(with its Q/K row permutation undone), config and byte-level BPE tokenizer against the transformers model and
tokenizer they came from; one-line refusals of what cannot be read faithfully. The real SmolLM2 file is
checked against transformers' own GGUF loader in ``test_real_model.py``."""

from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxunlearn.models.hf_checkpoint import CheckpointError, from_pretrained, load_tokenizer, save_pretrained
from jaxunlearn.parallel import sharding
from tests.tiny_models import padded_batch, torch_logits

VOCAB = 300  # byte-level BPE: 256 byte tokens, merges and specials
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = ["def forget(x):\n    return x  + 1  # the quick brown fox", "import heapq\nheapq.heappush(h, (2, 'a'))"]


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's Q/K row permutation, transcribed from convert_hf_to_gguf.py (``LlamaModel.permute``)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def byte_level_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT * 50 + ["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[1], eos_token=SPECIALS[2])


ROPE_THETA = 5000.0


def tiny_llama(tie: bool = False) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(
    path: Path,
    model: transformers.LlamaForCausalLM,
    tokenizer,
    *,
    arch: str = "llama",
    tokenizer_model: str = "gpt2",
    pre: str = "gpt-2",
    extra_tensors: dict[str, np.ndarray] | None = None,
    raw_dtype: gguf.GGMLQuantizationType | None = None,
) -> Path:
    """``model`` as llama.cpp's converter writes a Llama (F32 tensors, Q/K rows permuted, no head when tied)."""
    c = model.config
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_vocab_size(c.vocab_size)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in SPECIALS else 1 for t, _ in vocab])
    import json

    w.add_token_merges([" ".join(m) for m in json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", state["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        for hf, name in LAYER_NAMES.items():
            value = state[f"model.layers.{i}.{hf}"]
            if hf.startswith("self_attn.q_proj"):
                value = permute(value, c.num_attention_heads, c.num_attention_heads)
            elif hf.startswith("self_attn.k_proj"):
                value = permute(value, c.num_attention_heads, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{name}", value)
    for name, value in (extra_tensors or {}).items():
        w.add_tensor(name, value, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_gguf_loads_as_the_model_it_came_from(tokenizer, tmp_path, tie):
    source = tiny_llama(tie)
    path = write_gguf(tmp_path / "tiny.gguf", source, tokenizer)
    model = from_pretrained(path, mesh=sharding.single_device_mesh(), dtype="float32")
    assert model.config.num_kv_heads == 2 and model.config.tie_word_embeddings == tie
    tokens, mask = padded_batch()
    ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
    assert np.abs(ours - torch_logits(source, tokens, mask))[mask.astype(bool)].max() < 1e-4

    ours_tok = load_tokenizer(path)
    for text in TEXT:
        assert ours_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert ours_tok.decode(ours_tok(text)["input_ids"]) == text
    pieces = ours_tok.tokenize("<|im_start|>hi<|im_end|>")
    assert (pieces[0], pieces[-1], len(pieces) > 2) == ("<|im_start|>", "<|im_end|>", True)  # control tokens whole

    # The export is an ordinary Hugging Face directory: transformers loads weights and tokenizer.
    out = save_pretrained(model, tmp_path / "export", tokenizer=ours_tok)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert np.abs(torch_logits(hf, tokens, mask) - ours)[mask.astype(bool)].max() < 1e-4
    again = transformers.AutoTokenizer.from_pretrained(out)
    assert again(TEXT[0])["input_ids"] == tokenizer(TEXT[0])["input_ids"]
    assert again.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == ("<|im_start|>x<|im_end|>")


def assert_refused(path: Path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as info:
        from_pretrained(path, mesh=sharding.single_device_mesh())
        load_tokenizer(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_unsupported_architecture_is_refused_naming_it(tokenizer, tmp_path):
    path = write_gguf(tmp_path / "neox.gguf", tiny_llama(), tokenizer, arch="gptneox")
    assert_refused(path, r"architecture 'gptneox' is not supported for GGUF files; supported: llama, qwen2")


def test_undequantizable_tensor_type_is_refused_naming_it(tokenizer, tmp_path):
    extra = {"blk.0.attn_q.scale": np.zeros(4, np.int32)}
    path = write_gguf(tmp_path / "i32.gguf", tiny_llama(), tokenizer, extra_tensors=extra)
    assert_refused(path, r"quantization type\(s\) I32 cannot be dequantized")


def test_rope_frequency_table_is_refused(tokenizer, tmp_path):
    path = write_gguf(
        tmp_path / "l31.gguf", tiny_llama(), tokenizer, extra_tensors={"rope_freqs.weight": np.ones(2, np.float32)}
    )
    assert_refused(path, r"RoPE frequency factors \(rope_freqs\) are not supported")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tokenizer_model": "llama"}, r"tokenizer model 'llama' is not supported .*config.model.tokenizer"),
        ({"pre": "chameleon"}, r"pre-tokenizer 'chameleon' is not supported"),
    ],
)
def test_tokenizer_it_cannot_rebuild_is_refused_with_the_way_out(tokenizer, tmp_path, kwargs, match):
    path = write_gguf(tmp_path / "tok.gguf", tiny_llama(), tokenizer, **kwargs)
    from_pretrained(path, mesh=sharding.single_device_mesh())  # the weights are fine
    with pytest.raises(CheckpointError, match=match):
        load_tokenizer(path)


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 10)
    assert_refused(path, r"is not a readable GGUF file")
