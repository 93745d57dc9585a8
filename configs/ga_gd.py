"""Gradient ascent on the forget set + gradient descent on in-distribution retain data."""

from jaxunlearn.config import base_config


def get_config():
    return base_config("ga_gd")
