"""Training: the optimizer and jitted train step, the step loop, and its periodic hooks."""
