"""Attacks on unlearning: relearning (fine-tuning) and weight quantization."""
