"""Gradient ascent on the forget set + gradient descent on general (out-of-domain) retain data."""

from jaxunlearn.config import base_config


def get_config():
    return base_config("ga_gd", retain="general")
