"""Unlearning methods: one pure loss function each, registered by name."""
