"""Importing this package registers every objective."""
from engine.objectives import baselines, beta, byot, cskd, teacher  # noqa: F401
from engine.objectives.base import OBJECTIVES, Objective, build_objective, register_objective  # noqa: F401
