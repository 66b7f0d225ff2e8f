"""CS-KD (Yun et al., CVPR 2020): class-wise self-knowledge distillation, and CS-KD-E, its sample-wise extension.

The loader's class-pair sampler puts B anchors in `batch.images` and B same-class partners (own augmentation) in
`batch.extra["partner"]`. As in `alinlab/cs-kd` `train.py`:

    z  = f(anchors)                       with grad
    z' = f(partners)                      under no_grad, model still in train mode (BN uses the partners' batch)
    L  = CE(z, y) + lam·T²·(1/B)·sum_b KL(softmax(z'_b/T) || softmax(z_b/T))          lam = 1, T = 4

`objective.cskd.partner_updates_bn=false` keeps the BN running statistics as they were before the partner
forward (saved and restored on device), so only the anchors move them; the partner forward itself still
normalises with its own batch statistics, exactly like the official code.

CS-KD-E (`objective.cskd.sample_wise=true`, needs `data.extra_view=true`) adds the same KL from a second, no-grad
augmentation of each anchor (`batch.extra["view"]`, DDGSD-style sample-wise term) with the same lam and T.

`objective.cskd.exits`: `deepest` applies CE and the KL to the backbone's own head; `all` to every exit (so a
multi-exit model gets deep supervision plus CS-KD at each exit). `byot_cskd` sums the BYOT terms and the CS-KD
KL terms (on the deepest exit or every exit), for BYOT + CS-KD.

objective.backend=triton: for each chosen exit, CE and the partner KL come from one fused launch (partner logits as
the external teacher, detached) and the sample-wise KL from a second one; same names and values as `cskd_terms`.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from engine.checkpoint import unwrap
from engine.objectives.base import Objective, combine, register_objective, summed
from engine.objectives.byot import BYOT, SHALLOW_EXIT
from engine.objectives.functional import ce, kd_loss
from engine.objectives.requirements import Requirement
from engine.types import Batch, ExitOutputs, LossOutput
from kernels.multi_exit.options import LossOptions


def cskd_kl(student: Tensor, partner: Tensor, temperature: float) -> Tensor:
    """T²·mean_b KL(softmax(z'_b/T) || softmax(z_b/T)); the official `KDLoss` (KLDivLoss(sum)·T²/B)."""
    return kd_loss(student, partner, temperature, "kl", t_squared=True)


def chosen_exits(num_exits: int, exits: str) -> list[tuple[int, str]]:
    """(exit index, term-name suffix) of the exits CS-KD applies to."""
    if exits == "deepest":
        return [(num_exits - 1, "")]
    return [(i, f"_{i}") for i in range(num_exits)]


def cskd_terms(logits: list[Tensor], partner_logits: list[Tensor], labels: Tensor, lam: float, temperature: float,
               exits: str = "deepest", view_logits: list[Tensor] | None = None,
               with_ce: bool = True) -> dict[str, Tensor]:
    """Named terms: `ce`, `cskd` (+ `cskd_sample`) for the deepest exit, or `ce_i`, `cskd_i`, `cskd_sample_i`."""
    terms: dict[str, Tensor] = {}
    for i, sfx in chosen_exits(len(logits), exits):
        if with_ce:
            terms[f"ce{sfx}"] = ce(logits[i], labels)
        terms[f"cskd{sfx}"] = lam * cskd_kl(logits[i], partner_logits[i], temperature)
        if view_logits is not None:
            terms[f"cskd_sample{sfx}"] = lam * cskd_kl(logits[i], view_logits[i], temperature)
    return terms


def partner_images(batch: Batch) -> Tensor:
    if "partner" not in batch.extra:
        raise KeyError("CS-KD needs class-pair batches (Batch.extra['partner']): set data.sampler=class_pair")
    return batch.extra["partner"]


def bn_buffers(model: nn.Module) -> list[Tensor]:
    """Running mean/var and batch counters of every BatchNorm (SyncBatchNorm included) in the model."""
    out = []
    for m in unwrap(model).modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            out += [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    return out


@contextmanager
def bn_stats_frozen(buffers: list[Tensor]):
    """Restore the given BN buffers on exit (device copies; no host sync)."""
    with torch.no_grad():
        saved = torch._foreach_mul(buffers, 1) if buffers else []  # one grouped copy per dtype
    try:
        yield
    finally:
        if buffers:
            with torch.no_grad():
                torch._foreach_copy_(buffers, saved)


class PartnerForward:
    """No-grad forward of partner / second-view images with the model in train mode, optionally leaving the BN
    running statistics untouched."""

    def __init__(self, updates_bn: bool):
        self.updates_bn = updates_bn
        self._buffers: tuple[int, list[Tensor]] | None = None

    def _bn(self, model: nn.Module) -> list[Tensor]:
        if self._buffers is None or self._buffers[0] != id(model):
            self._buffers = (id(model), bn_buffers(model))
        return self._buffers[1]

    def ordered(self, model: nn.Module, anchor_fn, partner_fn):
        """(anchor_fn(), partner_fn()). The official order is anchors first; when the BN statistics are restored
        after the no-grad forwards, those run first instead, so the restore never writes into buffers that the
        anchors' autograd graph has saved (the outputs are the same either way)."""
        if self.updates_bn:
            out = anchor_fn()
            return out, partner_fn()
        targets = partner_fn()
        return anchor_fn(), targets

    @torch.no_grad()
    def __call__(self, model: nn.Module, images: Tensor) -> ExitOutputs:
        if self.updates_bn:
            return model(images)
        with bn_stats_frozen(self._bn(model)):
            return model(images)


def cskd_options(cfg, with_ce: bool = True) -> LossOptions:
    """CE + lam T^2 KL(partner || anchor) on one exit; the partner logits are the external teacher."""
    c = cfg.objective.cskd
    return LossOptions(teacher="logits", ce_weight=1.0 if with_ce else 0.0, kd_weight=c.lam, temperature=c.temperature,
                       kd="kl", t_squared=True)


class FusedCSKD:
    """The fused twin of cskd_terms: per chosen exit, one launch for CE + the partner KL (CE left out for
    byot_cskd) and one for the sample-wise KL."""

    def __init__(self, cfg, num_exits: int, with_ce: bool):
        from engine.objectives.fused import FusedCall  # loads triton, optional: for this backend only

        pair, view = cskd_options(cfg, with_ce), cskd_options(cfg, with_ce=False)
        self.calls = []
        for i, sfx in chosen_exits(num_exits, cfg.objective.cskd.exits):
            names = {f"ce{sfx}": (0, 0), f"cskd{sfx}": (0, 1)} if with_ce else {f"cskd{sfx}": (0, 1)}
            self.calls.append((i, FusedCall(pair, names), FusedCall(view, {f"cskd_sample{sfx}": (0, 1)})))

    def __call__(self, logits: list[Tensor], partner_logits: list[Tensor], labels: Tensor,
                 view_logits: list[Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        parts = []
        for i, pair, view in self.calls:
            parts.append(pair(logits[i], labels, teacher_logits=partner_logits[i]))
            if view_logits is not None:
                parts.append(view(logits[i], labels, teacher_logits=view_logits[i]))
        loss = combine(*parts)
        return loss.total, loss.terms


# the loader's class-pair sampler puts the partners in Batch.extra["partner"]
PAIRS = Requirement("data.sampler", "==", "class_pair", note="CS-KD anchor/partner batches")


@register_objective("cskd")
class CSKD(Objective):
    requires = (PAIRS, Requirement("data.extra_view", "==", True, when=("objective.cskd.sample_wise", True),
                                   note="CS-KD-E takes its sample-wise target from a second view of each anchor"))
    routed = "ce + cskd (+ cskd_sample for CS-KD-E): one launch per chosen exit (+ one for the second view)"

    @classmethod
    def kernel_options(cls, cfg, num_exits: int) -> LossOptions:
        return cskd_options(cfg)

    def fused_twin(self, cfg, names, num_exits: int) -> FusedCSKD:
        return FusedCSKD(cfg, num_exits, self.with_ce)

    def __init__(self, cfg, num_exits: int, device: torch.device, with_ce: bool = True):
        super().__init__()
        c = cfg.objective.cskd
        self.lam, self.temperature, self.exits, self.sample_wise = c.lam, c.temperature, c.exits, c.sample_wise
        self.with_ce = with_ce
        self.partner = PartnerForward(c.partner_updates_bn)
        self.use_fused(self.fused_call(cfg, device, {}, num_exits))  # names: FusedCSKD's own, per chosen exit

    def torch_terms(self, logits: list[Tensor], partner_logits: list[Tensor], labels: Tensor,
                    view_logits: list[Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        return summed(cskd_terms(logits, partner_logits, labels, self.lam, self.temperature, self.exits, view_logits,
                                 self.with_ce))

    def _targets(self, model, batch: Batch) -> tuple[list[Tensor], list[Tensor] | None]:
        zp = self.partner(model, partner_images(batch)).logits
        zv = None
        if self.sample_wise:
            if "view" not in batch.extra:
                raise KeyError("CS-KD-E needs a second view of each anchor (Batch.extra['view']): "
                               "set data.extra_view=true")
            zv = self.partner(model, batch.extra["view"]).logits
        return zp, zv

    def _forward_all(self, model, batch: Batch) -> tuple[ExitOutputs, list[Tensor], list[Tensor] | None]:
        return self.partner.ordered(model, lambda: model(batch.images), lambda: self._targets(model, batch))

    def forward(self, model, batch: Batch) -> tuple[LossOutput, ExitOutputs]:
        out, (zp, zv) = self._forward_all(model, batch)
        return LossOutput(*self.compute(out.logits, zp, batch.labels, zv)), out


@register_objective("byot_cskd")
class BYOTCSKD(CSKD):
    """BYOT terms (objective.byot.*) + CS-KD KL terms (objective.cskd.*), each on the chosen backend."""

    requires = (*CSKD.requires, SHALLOW_EXIT)
    routed = "the BYOT terms, and the CS-KD KL terms (one launch per chosen exit and per target)"

    @classmethod
    def kernel_options(cls, cfg, num_exits: int) -> LossOptions:
        return BYOT.kernel_options(cfg, num_exits)  # its first launch; the CS-KD ones are cskd_options(cfg, False)

    def __init__(self, cfg, num_exits: int, device: torch.device):
        super().__init__(cfg, num_exits, device, with_ce=False)
        self.byot = BYOT(cfg, num_exits, device)

    def forward(self, model, batch: Batch) -> tuple[LossOutput, ExitOutputs]:
        out, (zp, zv) = self._forward_all(model, batch)
        byot = self.byot.loss(out, batch)
        return combine((byot.total, byot.terms), self.compute(out.logits, zp, batch.labels, zv)), out
