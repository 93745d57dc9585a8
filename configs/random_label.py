"""Fine-tuning the forget set on random labels."""

from jaxunlearn.config import base_config


def get_config():
    return base_config("random_label")
