"""Gradient ascent (GA) on the forget set."""

from jaxunlearn.config import base_config


def get_config():
    return base_config("ga")
