"""Frozen teachers loaded from our own checkpoints, and the multi-generation self-distillation objective.

A checkpoint carries its config (`ck["config"]`) and weights (`ck["model"]`), so a teacher of any registered
architecture is rebuilt exactly as it was trained. It runs in eval mode under no_grad, is never registered as a
submodule (so student checkpoints do not carry a copy of it), and what was loaded is recorded in the objective's
state (`get_extra_state`): path, architecture, epoch, best-validation epoch and a SHA-256 of the weights.

`sd_generation` (Zhang & Sabuncu, `train_distillation.py`), for generation g >= 1:
    L = (1 - a)·CE(z, y) + a·softCE(target = softmax(z_T / T), pred = softmax(z / s))·f
with a = 0.4, T = 4, s = T if objective.teacher.scale_student else 1 (official: 1), f = T² if
objective.teacher.t_squared else 1 (official: 1), and the official log(p + 1e-8).

objective.backend=triton: both terms from one fused launch (kd="soft_ce"), with the same log(p + eps)
(objective.log_eps).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.objectives.base import Objective, fused_call, log_eps, register_objective, sum_terms
from engine.objectives.baselines import LOG_EPS, soft_target_ce
from engine.objectives.byot import upcast
from engine.types import Batch, ExitOutputs, LossOutput


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
    from engine.checkpoint import load_checkpoint, model_from_checkpoint

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
    """Holds the teacher outside the module tree; `teacher(images)` -> its deepest exit's logits (no grad)."""

    def __init__(self, model: nn.Module, info: dict):
        self.model, self.info = model, info

    @classmethod
    def from_config(cls, cfg, device: torch.device) -> "FrozenTeacher":
        from engine.config import ConfigError

        t = cfg.objective.teacher
        if not t.checkpoint:
            raise ConfigError(f"objective.name={cfg.objective.name!r} needs objective.teacher.checkpoint")
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


def generation_kd_terms(student: Tensor, teacher: Tensor, labels: Tensor, alpha: float, temperature: float,
                        scale_student: bool = False, t_squared: bool = False,
                        log_eps: float = LOG_EPS) -> dict[str, Tensor]:
    """`ce` = (1-a)·CE and `kd` = a·f·softCE."""
    z = upcast(student)
    target = F.softmax(upcast(teacher.detach()) / temperature, -1)
    soft = soft_target_ce(z / temperature if scale_student else z, target, log_eps)
    factor = temperature**2 if t_squared else 1.0
    return {"ce": (1 - alpha) * F.cross_entropy(z, labels), "kd": alpha * factor * soft}


@register_objective("sd_generation")
class GenerationKD(Objective):
    def __init__(self, cfg, num_exits: int, device: torch.device):
        super().__init__()
        t = cfg.objective.teacher
        self.alpha, self.temperature = t.alpha, t.temperature
        self.scale_student, self.t_squared = t.scale_student, t.t_squared
        self.teacher = FrozenTeacher.from_config(cfg, device)
        self.log_eps = log_eps(cfg)
        self.fused = fused_call(cfg, device, {"ce": (0, 0), "kd": (0, 1)})

    def forward(self, model, batch: Batch) -> tuple[LossOutput, ExitOutputs]:
        out = model(batch.images)
        zt = self.teacher(batch.images)
        if self.fused is not None:
            return LossOutput(*self.fused(out.logits[-1], batch.labels, teacher_logits=zt)), out
        terms = generation_kd_terms(out.logits[-1], zt, batch.labels, self.alpha, self.temperature,
                                    self.scale_student, self.t_squared, self.log_eps)
        return sum_terms(terms), out

    def get_extra_state(self):
        return {"teacher": self.teacher.info}

    def set_extra_state(self, state) -> None:
        self.teacher.check_same(state.get("teacher"))
