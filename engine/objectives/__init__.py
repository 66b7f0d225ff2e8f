"""Importing this package registers every objective."""
from engine.objectives import beta, byot, ce, cskd, dsn, kd, label_smoothing, max_entropy, mixup  # noqa: F401
from engine.objectives.base import (  # noqa: F401
    OBJECTIVES,
    Objective,
    build_objective,
    check_config,
    register_objective,
    routing,
)

# objective name -> what runs through the fused kernel on triton / why it always runs PyTorch, as each declares
TRITON_ROUTED, TORCH_ONLY = routing()
