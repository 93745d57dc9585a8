"""Experiments built from many unlearning runs."""
