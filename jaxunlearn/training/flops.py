"""Compute accounting: model FLOPs of unlearning and of pre-training from scratch.

Counts follow the usual convention (Kaplan et al. 2020; PaLM appendix B): a forward pass costs
``2 N + 2 L T H D`` FLOPs per token (``N`` parameters touched by matmuls, i.e. all but the embedding lookup;
the attention term is halved for causal masking), a training step three times that. XLA's own cost analysis
is not used because it counts a scanned layer loop's body once. The per-family counts live on the model family
(:meth:`~jaxunlearn.models.registry.Family.forward_flops_per_token`).
"""

from __future__ import annotations

from jaxunlearn.models import ModelConfig


def matmul_params(config: ModelConfig) -> int:
    """Parameters used in matmuls: everything except the embedding lookup (the output head counts)."""
    return config.family.matmul_params(config)


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one token's forward pass at sequence length ``seq_len``."""
    return config.family.forward_flops_per_token(config, seq_len)


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward plus backward (twice the forward): three forwards."""
    return 3.0 * forward_flops_per_token(config, seq_len)


def unlearning_step_flops(
    config: ModelConfig, seq_len: int, chunks_per_step: int, *, retain: bool, reference_forwards: int
) -> float:
    """FLOPs of one optimizer step: training on forget (+ retain) chunks, plus frozen-reference forwards
    (``reference_forwards`` chunks per forget chunk: 1 for GA+KL's retain half or for adversarial labels)."""
    tokens = chunks_per_step * seq_len
    trained = tokens * (2 if retain else 1)
    return trained * training_flops_per_token(config, seq_len) + (
        reference_forwards * tokens * forward_flops_per_token(config, seq_len)
    )


def recompute_flops_per_step(
    config: ModelConfig, seq_len: int, chunks_per_step: int, *, retain: bool, logits_chunk_size: int
) -> float:
    """FLOPs the backward pass spends recomputing forward work, beyond :func:`unlearning_step_flops`.

    ``config.remat``: ``full`` recomputes every layer's forward; ``dots_no_batch`` recomputes the attention
    score and value products (their dots have batch dimensions); ``dots`` and ``none`` recompute no matmul.
    The losses project hidden states to logits one chunk at a time under ``jax.checkpoint`` (whenever a sequence
    spans more than one chunk), so the output head's forward runs twice for trained tokens. The frozen
    reference's logits recomputed inside KL chunks are not counted.
    """
    trained = chunks_per_step * seq_len * (2 if retain else 1)
    attention = 2.0 * config.num_layers * seq_len * config.num_heads * config.head_dim
    head = 2.0 * config.hidden_size * config.vocab_size
    layers = forward_flops_per_token(config, seq_len) - head
    per_token = {"full": layers, "dots_no_batch": attention}.get(config.remat, 0.0)
    if logits_chunk_size < seq_len:
        per_token += head
    return trained * per_token


def pretraining_flops(config: ModelConfig, tokens: float, seq_len: int = 4096) -> float:
    """Training from scratch on ``tokens`` tokens (the retraining that exact unlearning would need)."""
    return tokens * training_flops_per_token(config, seq_len)
