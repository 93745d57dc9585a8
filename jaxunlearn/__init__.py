"""jaxunlearn: machine unlearning of pre-trained LLMs in JAX/Flax."""

__version__ = "0.1.0"
