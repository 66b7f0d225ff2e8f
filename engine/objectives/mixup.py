"""Mixup (Zhang et al. 2018), alone and combined with CS-KD, on the deepest exit.

  mixup       x~ = l·x + (1-l)·x[perm], l ~ Beta(a, a) once per batch (a = objective.mixup.alpha), CE mixed the
              same way
  mixup_cskd  anchors and partners mixed with the same l and permutation, CE on the mixed anchors, CS-KD KL
              from the mixed partners' (no-grad) prediction to the mixed anchors' one

Every random draw (l and the permutation) happens on the training device: nothing here reads a value back. The
mixed CE (two labels, l on device) has no kernel form, so `mixup` always runs PyTorch and `mixup_cskd` routes only
its KL term through the fused kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.objectives.base import Objective, register_objective, sum_terms, summed
from engine.objectives.cskd import PAIRS, PartnerForward, cskd_options, partner_images
from engine.objectives.functional import kd_loss, upcast
from engine.objectives.requirements import Requirement
from engine.types import Batch, ExitOutputs, LossOutput

MIXUP_ALPHA = Requirement("objective.mixup.alpha", ">", 0, note="e.g. 1.0 as in Zhang et al. 2018")


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
        self.register_buffer("conc", torch.tensor([alpha, alpha], dtype=torch.float32), persistent=False)

    def forward(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        conc = self.conc.to(device)
        lam = torch.distributions.Beta(conc[0], conc[1], validate_args=False).sample()
        perm = torch.randperm(n, device=device)
        return lam, perm


@register_objective("mixup")
class Mixup(Objective):
    requires = (MIXUP_ALPHA,)
    torch_only = "the CE against two labels mixed by an on-device l has no kernel form"

    def __init__(self, cfg, num_exits: int, device: torch.device):
        super().__init__()
        self.sampler = MixupSampler(cfg.objective.mixup.alpha)

    def forward(self, model, batch: Batch) -> tuple[LossOutput, ExitOutputs]:
        lam, perm = self.sampler(len(batch), batch.images.device)
        out = model(mix(batch.images, lam, perm))
        return sum_terms({"ce": mixup_ce(out.logits[-1], batch.labels, lam, perm)}), out


@register_objective("mixup_cskd")
class MixupCSKD(Objective):
    """CE on mixed anchors + lam_cskd·T²·KL(p(mixed partners; T) || p(mixed anchors; T)), same l and permutation
    for both halves, so the partner target mixes the same two classes as the anchor input."""

    requires = (MIXUP_ALPHA, PAIRS,
                Requirement("objective.cskd.sample_wise", "==", False,
                            note="CS-KD-E is not combined with mixup; use objective cskd"))
    routed = "the cskd KL term only; the mixed CE stays on PyTorch"

    @classmethod
    def kernel_options(cls, cfg, num_exits: int):
        return cskd_options(cfg, with_ce=False)

    def __init__(self, cfg, num_exits: int, device: torch.device):
        super().__init__()
        c = cfg.objective.cskd
        self.sampler = MixupSampler(cfg.objective.mixup.alpha)
        self.lam, self.temperature = c.lam, c.temperature
        self.partner = PartnerForward(c.partner_updates_bn)
        self.use_fused(self.fused_call(cfg, device, {"cskd": (0, 1)}))

    def torch_terms(self, logits: Tensor, labels: Tensor, teacher_logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return summed({"cskd": self.lam * kd_loss(logits, teacher_logits, self.temperature, "kl", t_squared=True)})

    def forward(self, model, batch: Batch) -> tuple[LossOutput, ExitOutputs]:
        lam, perm = self.sampler(len(batch), batch.images.device)
        out, zp = self.partner.ordered(model, lambda: model(mix(batch.images, lam, perm)),
                                       lambda: self.partner(model, mix(partner_images(batch), lam, perm)).logits[-1])
        ce = mixup_ce(out.logits[-1], batch.labels, lam, perm)
        kl_total, kl_terms = self.compute(out.logits[-1], batch.labels, teacher_logits=zp)
        return LossOutput(ce + kl_total, {"ce": ce, **kl_terms}), out
