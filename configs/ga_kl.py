"""Gradient ascent on the forget set + KL to the original model on in-distribution retain data."""

from jaxunlearn.config import base_config


def get_config():
    return base_config("ga_kl")
