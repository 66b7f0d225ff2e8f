"""Distillation from a frozen teacher checkpoint (teacher.py), on the deepest exit.

`kd`: classic KD (Hinton et al.) from a teacher of any architecture with the same classes, on the same augmented
batch: (1-a)·CE + a·T²·KL(softmax(z_T/T) || softmax(z/T)), always Hinton's form (objective.teacher.alpha,
.temperature; .scale_student and .t_squared only concern `sd_generation`).

`sd_generation` (Zhang & Sabuncu, `train_distillation.py`), generation g >= 1 of multi-generation self-distillation:
    L = (1 - a)·CE(z, y) + a·softCE(target = softmax(z_T / T), pred = softmax(z / s))·f
with a = 0.4, T = 4, s = T if objective.teacher.scale_student else 1 (official: 1), f = T² if
objective.teacher.t_squared else 1 (official: 1), and the official log(p + 1e-8) (objective.log_eps).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.objectives.base import Objective, log_eps, register_objective, summed
from engine.objectives.functional import LOG_EPS, ce, kd_loss, soft_target_ce, upcast
from engine.objectives.requirements import Requirement
from engine.objectives.teacher import FrozenTeacher
from engine.types import Batch, ExitOutputs, LossOutput
from kernels.multi_exit.options import LossOptions


def hinton_kd_terms(student: Tensor, teacher: Tensor, labels: Tensor, alpha: float,
                    temperature: float) -> dict[str, Tensor]:
    return {"ce": (1 - alpha) * ce(student, labels),
            "kd": alpha * kd_loss(student, teacher, temperature, "kl", t_squared=True)}


def generation_kd_terms(student: Tensor, teacher: Tensor, labels: Tensor, alpha: float, temperature: float,
                        scale_student: bool = False, t_squared: bool = False,
                        log_eps: float = LOG_EPS) -> dict[str, Tensor]:
    """`ce` = (1-a)·CE and `kd` = a·f·softCE."""
    z = upcast(student)
    target = F.softmax(upcast(teacher.detach()) / temperature, -1)
    soft = soft_target_ce(z / temperature if scale_student else z, target, log_eps)
    factor = temperature**2 if t_squared else 1.0
    return {"ce": (1 - alpha) * F.cross_entropy(z, labels), "kd": alpha * factor * soft}


class TeacherKD(Objective):
    """One forward of the anchors and one of the frozen teacher on the same images, then the fused call or the
    subclass's `torch_terms`."""

    def __init__(self, cfg, num_exits: int, device: torch.device):
        super().__init__()
        t = cfg.objective.teacher
        self.alpha, self.temperature = t.alpha, t.temperature
        self.teacher = FrozenTeacher.from_config(cfg, device)
        self.use_fused(self.fused_call(cfg, device, {"ce": (0, 0), "kd": (0, 1)}))

    def forward(self, model, batch: Batch) -> tuple[LossOutput, ExitOutputs]:
        out = model(batch.images)
        zt = self.teacher(batch.images)
        return LossOutput(*self.compute(out.logits[-1], batch.labels, teacher_logits=zt)), out

    def get_extra_state(self):
        return {"teacher": self.teacher.info}

    def set_extra_state(self, state) -> None:
        self.teacher.check_same(state.get("teacher"))


@register_objective("kd")
class HintonKD(TeacherKD):
    requires = (Requirement("objective.teacher.checkpoint", "set"),)
    routed = "ce + kd (Hinton: KL at T, student scaled, T^2)"

    @classmethod
    def kernel_options(cls, cfg, num_exits: int) -> LossOptions:
        t = cfg.objective.teacher
        return LossOptions(teacher="logits", ce_weight=1 - t.alpha, kd_weight=t.alpha, temperature=t.temperature,
                           kd="kl", t_squared=True)

    def torch_terms(self, logits: Tensor, labels: Tensor, teacher_logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return summed(hinton_kd_terms(logits, teacher_logits, labels, self.alpha, self.temperature))


@register_objective("sd_generation")
class GenerationKD(TeacherKD):
    # a chain (generations > 1) sets each generation's teacher to the previous generation's best checkpoint
    requires = (Requirement("objective.teacher.checkpoint", "set", when=("generations", 1),
                            note="or generations > 1"),)
    soft_targets = True
    official_log_eps = LOG_EPS
    routed = "ce + kd (soft CE at T, scale_student / t_squared as configured)"

    @classmethod
    def kernel_options(cls, cfg, num_exits: int) -> LossOptions:
        t = cfg.objective.teacher
        return LossOptions(teacher="logits", ce_weight=1 - t.alpha, kd_weight=t.alpha, temperature=t.temperature,
                           kd="soft_ce", t_squared=t.t_squared, scale_student=t.scale_student, log_eps=log_eps(cfg))

    def __init__(self, cfg, num_exits: int, device: torch.device):
        super().__init__(cfg, num_exits, device)
        t = cfg.objective.teacher
        self.scale_student, self.t_squared = t.scale_student, t.t_squared
        self.log_eps = log_eps(cfg)

    def torch_terms(self, logits: Tensor, labels: Tensor, teacher_logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return summed(generation_kd_terms(logits, teacher_logits, labels, self.alpha, self.temperature,
                                          self.scale_student, self.t_squared, self.log_eps))
