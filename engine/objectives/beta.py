"""Beta smoothing (Zhang & Sabuncu, NeurIPS 2020, "Self-distillation as instance-specific label smoothing").

As in `ZhiluZhang123/neurips_2020_distillation` (`loss.py::soft_beta_loss`, `train_smoothing.py`):

    p~ = softmax(f_ema(x))              EMA "mean teacher", no grad, in train mode (batch statistics)
    c_i = p~_i[y_i]                     teacher confidence on the true class
    b_(1) <= ... <= b_(n) ~ Beta(beta, 1), sorted; the k-th smallest goes to the k-th least confident sample
    t_i = b_i·onehot(y_i) + (1 - b_i)/(K - 1) on every other class
    L = (1 - alpha)·CE(z, y) + alpha·(-(1/n) sum_i sum_k t_ik log(p_ik + 1e-8))          alpha 0.6, beta 3

The EMA model is held inside this objective (so it is checkpointed with it and a resumed run continues the same
teacher). It starts from its own random initialisation, like the official `ema_model`, and after optimizer step
number s (1-based, the official `global_step`) its parameters move by decay min(1 - 1/(s+1), ema_decay); BN
buffers are not averaged. The draws, sort and assignment run on the training device with no host read: for
Beta(beta, 1) the inverse CDF is u^(1/beta), so b = sort(u)^(1/beta) with u ~ U(0, 1) on device.
Multi-exit models: the loss and the teacher confidence use the deepest exit.

objective.backend=triton: both terms come from one fused launch with the Beta target given by its per-row b only
(never built as [B, K]), with the same log(p + eps) (objective.log_eps). The draws, their assignment and the random
stream are the same on both backends.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.ema import ModelEMA
from engine.models import create_model
from engine.objectives.base import Objective, log_eps, register_objective, summed
from engine.objectives.functional import LOG_EPS, ce, soft_target_ce, upcast
from engine.types import Batch, ExitOutputs, LossOutput
from kernels.multi_exit.options import LossOptions

EMA_SEED_OFFSET = 7_777  # the EMA's own initialisation is drawn from seed + this, off the global RNG stream


def sample_beta_sorted(n: int, beta: float, device: torch.device | str, generator: torch.Generator | None = None,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """n draws of Beta(beta, 1), ascending: F^-1(u) = u^(1/beta) is increasing, so sorting u sorts b."""
    u = torch.rand(n, device=device, generator=generator, dtype=dtype)
    return u.sort().values.pow(1.0 / beta)


def assign_by_confidence(confidence: Tensor, sorted_draws: Tensor) -> Tensor:
    """b_i such that the k-th least confident sample gets the k-th smallest draw."""
    order = confidence.argsort()
    return torch.empty_like(sorted_draws).scatter_(0, order, sorted_draws)


def beta_targets(labels: Tensor, num_classes: int, b: Tensor) -> Tensor:
    on = F.one_hot(labels, num_classes).to(b.dtype)
    return on * b[:, None] + (1.0 - on) * ((1.0 - b) / (num_classes - 1))[:, None]


def true_class_confidence(teacher_logits: Tensor, labels: Tensor) -> Tensor:
    return F.softmax(upcast(teacher_logits.detach()), -1).gather(1, labels[:, None]).squeeze(1)


def beta_masses(logits: Tensor, teacher_logits: Tensor, labels: Tensor, beta: float,
                draws: Tensor | None = None) -> Tensor:
    """b [B] (true-class mass of each row's Beta target), in the loss dtype; `draws` (sorted) may be given."""
    dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype  # = upcast's
    if draws is None:
        draws = sample_beta_sorted(logits.shape[0], beta, logits.device, dtype=dtype)
    return assign_by_confidence(true_class_confidence(teacher_logits, labels), draws.to(dtype))


def beta_terms(logits: Tensor, labels: Tensor, b: Tensor, alpha: float, log_eps: float = LOG_EPS) -> dict[str, Tensor]:
    """`ce` = (1-alpha)·CE and `beta` = alpha·softCE(the Beta targets of true-class masses `b`)."""
    z = upcast(logits)
    target = beta_targets(labels, z.shape[-1], b)
    return {"ce": (1 - alpha) * ce(z, labels), "beta": alpha * soft_target_ce(z, target, log_eps)}


def beta_smoothing_terms(logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float, beta: float,
                         draws: Tensor | None = None, log_eps: float = LOG_EPS) -> dict[str, Tensor]:
    """The terms with the masses drawn and assigned here; `draws` (sorted) may be given for tests."""
    return beta_terms(logits, labels, beta_masses(logits, teacher_logits, labels, beta, draws), alpha, log_eps)


@register_objective("beta")
class BetaSmoothing(Objective):
    soft_targets = True
    official_log_eps = LOG_EPS
    routed = "ce + beta, the Beta targets in closed form from the per-row b"

    @classmethod
    def kernel_options(cls, cfg, num_exits: int) -> LossOptions:
        a = cfg.objective.beta.alpha
        return LossOptions(teacher="closed_form", ce_weight=1 - a, kd_weight=a, kd="soft_ce", log_eps=log_eps(cfg))

    def __init__(self, cfg, num_exits: int, device: torch.device):
        super().__init__()
        b = cfg.objective.beta
        self.alpha, self.beta = b.alpha, b.beta
        self.log_eps = log_eps(cfg)
        self.use_fused(self.fused_call(cfg, device, {"ce": (0, 0), "beta": (0, 1)}))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + EMA_SEED_OFFSET)
            teacher = create_model(cfg.model, cfg.exits)
        if cfg.precision.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        self.ema = ModelEMA(teacher, decay=b.ema_decay, warmup=True, params_only=True).to(device)
        self.ema.module.train()  # the official teacher normalises with the batch's statistics

    def forward(self, model, batch: Batch) -> tuple[LossOutput, ExitOutputs]:
        out = model(batch.images)
        if not self.ema.module.training:
            self.ema.module.train()
        with torch.no_grad():
            zt = self.ema.module(batch.images).logits[-1]
        b = beta_masses(out.logits[-1], zt, batch.labels, self.beta)
        return LossOutput(*self.compute(out.logits[-1], batch.labels, soft_b=b)), out

    def torch_terms(self, logits: Tensor, labels: Tensor, soft_b: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return summed(beta_terms(logits, labels, soft_b, self.alpha, self.log_eps))

    def decay_at(self, step: int) -> float:
        """Decay applied after 0-based optimizer step `step` (the official global_step is step + 1)."""
        return self.ema.decay_at(step + 1)

    def after_step(self, model, step: int) -> None:
        self.ema.update(model, step + 1)
