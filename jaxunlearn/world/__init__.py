"""The built-in world: a small pre-trained target model, its exact-retrain oracle and their data, made on the
machine itself from the Python standard library (see :mod:`jaxunlearn.world.build`)."""

from jaxunlearn.world.build import SMALL_RECIPE, World, WorldRecipe, ensure_world

__all__ = ["SMALL_RECIPE", "World", "WorldRecipe", "ensure_world"]
