"""selfdistill: a PyTorch training engine for self-distillation of image classifiers. The metadata lives in
pyproject.toml; this shim is for tools that still call setup.py."""
from setuptools import setup

setup()
