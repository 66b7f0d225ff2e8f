"""The baselines the three papers compare with, each one objective name (deepest exit unless stated):

  ls_wrong_classes  label smoothing, 1-eps on the true class and eps/(K-1) on each wrong one (Beta-smoothing code
                    `soft_cce_loss`, including its log(p + 1e-8): objective.log_eps)
  ls_all_classes    label smoothing, (1-eps)·onehot + eps/K on every class (PyTorch `label_smoothing=eps`)
  label_smoothing   either of the two, chosen by objective.label_smoothing.convention
  max_entropy       CE - beta·H(p)  (objective.max_entropy_beta; Beta code `ent_reg`)
  dsn               deep supervision: plain CE at every exit, no distillation
  kd                Hinton KD from a frozen teacher checkpoint of any architecture:
                    (1-a)·CE + a·T²·KL(softmax(z_T/T) || softmax(z/T))
                    (objective.teacher.checkpoint, .alpha, .temperature)
  mixup             Zhang et al. 2018: x~ = l·x + (1-l)·x[perm], l ~ Beta(a, a) once per batch, CE mixed the same way
  mixup_cskd        mixup + CS-KD: anchors and partners mixed with the same l and permutation, CE on the mixed
                    anchors, CS-KD KL from the mixed partners' (no-grad) prediction to the mixed anchors' one

Every random draw (mixup's l and permutation) happens on the training device: nothing here reads a value back.
objective.backend=triton (base.TRITON_ROUTED): ls_*, label_smoothing, dsn, kd and the CS-KD term of mixup_cskd run
through the fused kernel (engine/objectives/fused.py) with the same names and values; max_entropy and mixup always
run PyTorch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.objectives.base import Objective, fused_call, log_eps, register_objective, sum_terms
from engine.objectives.byot import kd_loss, upcast
from engine.types import Batch, ExitOutputs, LossOutput

LOG_EPS = 1e-8  # the Beta-smoothing code takes log(softmax + 1e-8) in every soft-target loss


# --------------------------------------------------------------------------------------------- pure losses


def soft_target_ce(logits: Tensor, target: Tensor, log_eps: float = LOG_EPS) -> Tensor:
    """-(1/N) sum_i sum_k t_ik log p_ik with p = softmax(logits); `log_eps` > 0 = the official code's
    log(p + eps), 0 = exact log_softmax. The target is treated as a constant."""
    z = upcast(logits)
    log_p = torch.log(F.softmax(z, -1) + log_eps) if log_eps > 0 else F.log_softmax(z, -1)
    return -(target.detach().to(log_p.dtype) * log_p).sum(-1).mean()


def ls_wrong_classes_target(labels: Tensor, num_classes: int, eps: float, dtype=torch.float32) -> Tensor:
    """1 - eps on the true class, eps/(K-1) on each of the K-1 others (rows sum to 1)."""
    on = F.one_hot(labels, num_classes).to(dtype)
    return on * (1.0 - eps) + (1.0 - on) * (eps / (num_classes - 1))


def ls_all_classes_target(labels: Tensor, num_classes: int, eps: float, dtype=torch.float32) -> Tensor:
    """(1 - eps)·onehot + eps/K on every class, true one included (PyTorch's convention)."""
    return F.one_hot(labels, num_classes).to(dtype) * (1.0 - eps) + eps / num_classes


def ls_wrong_classes_loss(logits: Tensor, labels: Tensor, eps: float, log_eps: float = LOG_EPS) -> Tensor:
    z = upcast(logits)
    return soft_target_ce(z, ls_wrong_classes_target(labels, z.shape[-1], eps, z.dtype), log_eps)


def ls_all_classes_loss(logits: Tensor, labels: Tensor, eps: float, log_eps: float = 0.0) -> Tensor:
    z = upcast(logits)
    if log_eps > 0:
        return soft_target_ce(z, ls_all_classes_target(labels, z.shape[-1], eps, z.dtype), log_eps)
    return F.cross_entropy(z, labels, label_smoothing=eps)


def entropy(logits: Tensor) -> Tensor:
    """Mean over rows of H(softmax(z)) = -sum_k p_k log p_k."""
    log_p = F.log_softmax(upcast(logits), -1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def max_entropy_terms(logits: Tensor, labels: Tensor, beta: float) -> dict[str, Tensor]:
    """Confidence penalty (Pereyra et al. 2017) as the Beta code's `ent_reg`: CE - beta·H(p)."""
    return {"ce": F.cross_entropy(upcast(logits), labels), "entropy": -beta * entropy(logits)}


def dsn_terms(logits: list[Tensor], labels: Tensor) -> dict[str, Tensor]:
    return {f"ce_{i}": F.cross_entropy(upcast(z), labels) for i, z in enumerate(logits)}


def hinton_kd_terms(student: Tensor, teacher: Tensor, labels: Tensor, alpha: float,
                    temperature: float) -> dict[str, Tensor]:
    return {"ce": (1 - alpha) * F.cross_entropy(upcast(student), labels),
            "kd": alpha * kd_loss(student, teacher, temperature, "kl", t_squared=True)}


def mix(x: Tensor, lam: Tensor, perm: Tensor) -> Tensor:
    lam = lam.to(x.dtype)
    return lam * x + (1 - lam) * x[perm]


def mixup_ce(logits: Tensor, labels: Tensor, lam: Tensor, perm: Tensor) -> Tensor:
    z = upcast(logits)
    lam = lam.to(z.dtype)
    return lam * F.cross_entropy(z, labels) + (1 - lam) * F.cross_entropy(z, labels[perm])


class MixupSampler(torch.nn.Module):
    """l ~ Beta(a, a) and a permutation, drawn on the device of the batch (no host round trip)."""

    def __init__(self, alpha: float):
        super().__init__()
        if alpha <= 0:
            from engine.config import ConfigError

            raise ConfigError("objective.mixup_alpha must be > 0 for mixup (e.g. 1.0 as in Zhang et al. 2018)")
        self.register_buffer("conc", torch.tensor([alpha, alpha], dtype=torch.float32), persistent=False)

    def forward(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        conc = self.conc.to(device)
        lam = torch.distributions.Beta(conc[0], conc[1], validate_args=False).sample()
        perm = torch.randperm(n, device=device)
        return lam, perm


# --------------------------------------------------------------------------------------------- objectives


@register_objective("ls_wrong_classes")
class LabelSmoothingWrongClasses(Objective):
    """Target 1-eps / eps/(K-1) (Zhang & Sabuncu's code). eps = objective.label_smoothing.epsilon."""

    convention = "wrong_classes"

    def __init__(self, cfg, num_exits: int, device: torch.device):
        super().__init__()
        self.eps = cfg.objective.label_smoothing.epsilon
        self.log_eps = log_eps(cfg)
        self.fused = fused_call(cfg, device, {"ls": (0, 0)})

    def loss(self, out: ExitOutputs, batch: Batch) -> LossOutput:
        z = out.logits[-1]
        if self.fused is not None:
            return LossOutput(*self.fused(z, batch.labels))
        if self.convention == "wrong_classes":
            return sum_terms({"ls": ls_wrong_classes_loss(z, batch.labels, self.eps, self.log_eps)})
        return sum_terms({"ls": ls_all_classes_loss(z, batch.labels, self.eps, self.log_eps)})


@register_objective("ls_all_classes")
class LabelSmoothingAllClasses(LabelSmoothingWrongClasses):
    """Target (1-eps)·onehot + eps/K (PyTorch `cross_entropy(label_smoothing=eps)`)."""

    convention = "all_classes"


@register_objective("label_smoothing")
def label_smoothing(cfg, num_exits: int, device: torch.device) -> Objective:
    cls = LabelSmoothingWrongClasses if cfg.objective.label_smoothing.convention == "wrong_classes" \
        else LabelSmoothingAllClasses
    return cls(cfg, num_exits, device)


@register_objective("max_entropy")
class MaxEntropy(Objective):
    def __init__(self, cfg, num_exits: int, device: torch.device):
        super().__init__()
        self.beta = cfg.objective.max_entropy_beta

    def loss(self, out: ExitOutputs, batch: Batch) -> LossOutput:
        return sum_terms(max_entropy_terms(out.logits[-1], batch.labels, self.beta))


@register_objective("dsn")
class DeepSupervision(Objective):
    """CE at every exit with weight 1 (Lee et al. 2015); the baseline BYOT must beat (luanyunteng issue #8)."""

    def __init__(self, cfg, num_exits: int, device: torch.device):
        super().__init__()
        self.fused = fused_call(cfg, device, {f"ce_{i}": (i, 0) for i in range(num_exits)}, num_exits)

    def loss(self, out: ExitOutputs, batch: Batch) -> LossOutput:
        if self.fused is not None:
            return LossOutput(*self.fused(out.logits, batch.labels))
        return sum_terms(dsn_terms(out.logits, batch.labels))


@register_objective("kd")
class HintonKD(Objective):
    """Classic KD from `objective.teacher.checkpoint` (any architecture with the same classes); the teacher runs
    in eval mode under no_grad on the same augmented batch. Always Hinton's form: KL, student and teacher both
    divided by T, times T² (objective.teacher.scale_student / t_squared only concern `sd_generation`)."""

    def __init__(self, cfg, num_exits: int, device: torch.device):
        super().__init__()
        from engine.objectives.teacher import FrozenTeacher

        t = cfg.objective.teacher
        self.alpha, self.temperature = t.alpha, t.temperature
        self.teacher = FrozenTeacher.from_config(cfg, device)
        self.fused = fused_call(cfg, device, {"ce": (0, 0), "kd": (0, 1)})

    def forward(self, model, batch: Batch) -> tuple[LossOutput, ExitOutputs]:
        out = model(batch.images)
        zt = self.teacher(batch.images)
        if self.fused is not None:
            return LossOutput(*self.fused(out.logits[-1], batch.labels, teacher_logits=zt)), out
        return sum_terms(hinton_kd_terms(out.logits[-1], zt, batch.labels, self.alpha, self.temperature)), out

    def get_extra_state(self):
        return {"teacher": self.teacher.info}

    def set_extra_state(self, state) -> None:
        self.teacher.check_same(state.get("teacher"))


@register_objective("mixup")
class Mixup(Objective):
    def __init__(self, cfg, num_exits: int, device: torch.device):
        super().__init__()
        self.sampler = MixupSampler(cfg.objective.mixup_alpha)

    def forward(self, model, batch: Batch) -> tuple[LossOutput, ExitOutputs]:
        lam, perm = self.sampler(len(batch), batch.images.device)
        out = model(mix(batch.images, lam, perm))
        return sum_terms({"ce": mixup_ce(out.logits[-1], batch.labels, lam, perm)}), out


@register_objective("mixup_cskd")
class MixupCSKD(Objective):
    """CE on mixed anchors + lam_cskd·T²·KL(p(mixed partners; T) || p(mixed anchors; T)), same l and permutation
    for both halves, so the partner target mixes the same two classes as the anchor input."""

    def __init__(self, cfg, num_exits: int, device: torch.device):
        super().__init__()
        from engine.objectives.cskd import PartnerForward

        c = cfg.objective.cskd
        if c.sample_wise:
            from engine.config import ConfigError

            raise ConfigError("objective.cskd.sample_wise (CS-KD-E) is not combined with mixup; use objective cskd")
        self.sampler = MixupSampler(cfg.objective.mixup_alpha)
        self.lam, self.temperature = c.lam, c.temperature
        self.partner = PartnerForward(c.partner_updates_bn)
        # the KL only: the mixed CE (two labels, l on device) has no kernel form
        self.fused = fused_call(cfg, device, {"cskd": (0, 1)})

    def forward(self, model, batch: Batch) -> tuple[LossOutput, ExitOutputs]:
        from engine.objectives.cskd import partner_images

        lam, perm = self.sampler(len(batch), batch.images.device)
        out, zp = self.partner.ordered(model, lambda: model(mix(batch.images, lam, perm)),
                                       lambda: self.partner(model, mix(partner_images(batch), lam, perm)).logits[-1])
        ce = mixup_ce(out.logits[-1], batch.labels, lam, perm)
        if self.fused is not None:
            kl_total, kl_terms = self.fused(out.logits[-1], batch.labels, teacher_logits=zp)
            return LossOutput(ce + kl_total, {"ce": ce, **kl_terms}), out
        cskd = self.lam * kd_loss(out.logits[-1], zp, self.temperature, "kl", t_squared=True)
        return sum_terms({"ce": ce, "cskd": cskd}), out
