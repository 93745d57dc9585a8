"""Unlearning with adversarial samples: the original model's best wrong next token."""

from jaxunlearn.config import base_config


def get_config():
    return base_config("adversarial")
