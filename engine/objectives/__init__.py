"""Importing this package registers every objective."""
from engine.objectives import byot  # noqa: F401
from engine.objectives.base import OBJECTIVES, Objective, build_objective, register_objective  # noqa: F401
