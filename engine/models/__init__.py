from engine.models.multi_exit import MultiExitModel  # noqa: F401
from engine.models.registry import MODELS, create_backbone, create_model, register_model  # noqa: F401
