"""Importing this package registers every objective: each module in it is imported, so a new objective is one file
(its class registered with `register_objective`) plus its section in engine/config.py. `fused` is left to the
objectives that need it, when objective.backend resolves to triton: it loads triton."""
import importlib
import pkgutil

from engine.objectives.base import (  # noqa: F401
    OBJECTIVES,
    Objective,
    build_objective,
    check_config,
    register_objective,
    routing,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "fused":
        importlib.import_module(f"{__name__}.{_module.name}")

# objective name -> what runs through the fused kernel on triton / why it always runs PyTorch, as each declares
TRITON_ROUTED, TORCH_ONLY = routing()
