"""Frozen teachers loaded from our own checkpoints (objectives kd and sd_generation, kd.py).

A checkpoint carries its config (`ck["config"]`) and weights (`ck["model"]`), so a teacher of any registered
architecture is rebuilt exactly as it was trained. It runs in eval mode under no_grad, is never registered as a
submodule (so student checkpoints do not carry a copy of it), and what was loaded is recorded in the objective's
state (`get_extra_state`): path, architecture, epoch, best-validation epoch and a SHA-256 of the weights.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor, nn

from engine.checkpoint import load_checkpoint, model_from_checkpoint
from engine.config import ConfigError


def weights_digest(state_dict: dict[str, Tensor]) -> str:
    """SHA-256 over the sorted keys and raw bytes of a state dict (host side, once per run)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k]
        h.update(k.encode())
        if isinstance(t, Tensor):
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_teacher(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """(frozen eval-mode model on `device`, record of what was loaded)."""
    path = Path(path)
    ck = load_checkpoint(path, "cpu")
    if "config" not in ck or "model" not in ck:
        raise ValueError(f"teacher checkpoint {path} has no 'config'/'model' entries (not a selfdistill checkpoint)")
    model, tcfg = model_from_checkpoint(ck)
    model.eval().requires_grad_(False)
    state = ck.get("state", {})
    info = {"path": str(path.resolve()), "model": tcfg.model.name, "num_classes": tcfg.model.num_classes,
            "in_chans": tcfg.model.in_chans, "epoch": state.get("epoch"), "best_epoch": state.get("best_epoch"),
            "sha256": weights_digest(ck["model"])}
    return model.to(device), info


class FrozenTeacher:
    """Holds the teacher outside the module tree; called on images, it gives its deepest exit's logits (no grad)."""

    def __init__(self, model: nn.Module, info: dict):
        self.model, self.info = model, info

    @classmethod
    def from_config(cls, cfg, device: torch.device) -> "FrozenTeacher":
        t = cfg.objective.teacher
        model, info = load_teacher(t.checkpoint, device)
        if t.model is not None and t.model != info["model"]:
            raise ConfigError(f"objective.teacher.model={t.model!r} but {t.checkpoint} holds a {info['model']!r}")
        if info["num_classes"] != cfg.model.num_classes or info["in_chans"] != cfg.model.in_chans:
            raise ConfigError(f"teacher {t.checkpoint} has {info['num_classes']} classes / {info['in_chans']} "
                              f"channels; the student has {cfg.model.num_classes} / {cfg.model.in_chans}")
        if cfg.precision.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return cls(model, info)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        if self.model.training:
            self.model.eval()
        return self.model(images).logits[-1]

    def check_same(self, saved: dict | None) -> None:
        """On resume: the teacher must be the one the interrupted run used."""
        if saved and saved.get("sha256") != self.info["sha256"]:
            raise RuntimeError(f"resuming with a different teacher: the run started with {saved.get('path')} "
                               f"(sha256 {str(saved.get('sha256'))[:12]}), now {self.info['path']} "
                               f"(sha256 {self.info['sha256'][:12]})")

