"""selfdistill engine: multi-exit models, objectives, training loop, evaluation."""
__version__ = "0.1.0"
