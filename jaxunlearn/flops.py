"""Compute accounting: model FLOPs of unlearning and of pre-training from scratch.

Counts follow the usual convention (Kaplan et al. 2020; PaLM appendix B): a forward pass costs
``2 N + 2 L T H D`` FLOPs per token (``N`` parameters touched by matmuls, i.e. all but the embedding lookup;
the attention term is halved for causal masking), a training step three times that. XLA's own cost analysis
is not used because it counts a scanned layer loop's body once.
"""

from __future__ import annotations

from jaxunlearn.models import ModelConfig


def matmul_params(config: ModelConfig) -> int:
    """Parameters used in matmuls: everything except the embedding lookup (the output head counts)."""
    embedding = config.vocab_size * config.hidden_size
    head = 0 if not config.tie_word_embeddings else embedding  # a tied head still multiplies
    return config.num_params - embedding + head


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    attention = 2 * config.num_layers * seq_len * config.num_heads * config.head_dim
    return 2.0 * matmul_params(config) + attention


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
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


def pretraining_flops(config: ModelConfig, tokens: float, seq_len: int = 4096) -> float:
    """Training from scratch on ``tokens`` tokens (the retraining that exact unlearning would need)."""
    return tokens * training_flops_per_token(config, seq_len)
