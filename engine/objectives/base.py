"""Objective protocol and registry.

An objective runs the forward passes its method needs (anchors, no-grad partners, an EMA or frozen teacher) and
hands explicit tensors to pure loss functions. It returns a `LossOutput` whose `total` is the sum of its named,
already-weighted `terms`, so the log, the tests and the Triton kernels all see the same names.

`objective.backend` (torch | triton | auto; auto = Triton on CUDA, PyTorch elsewhere) picks who computes the
loss terms. With "triton" the objectives in `TRITON_ROUTED` hand their logits to the fused kernel
(engine/objectives/fused.py) and return the same term names and values as the PyTorch path, with a total that
backpropagates through one sum; the others always run PyTorch (`TORCH_ONLY`, with the reason). Both backends take
the same `objective.log_eps` (`log_eps(cfg)`): the official log(p + 1e-8) of the Beta-smoothing code in the methods
that come from it, the exact log-softmax elsewhere.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.registry import Registry
from engine.types import Batch, ExitOutputs, LossOutput

OBJECTIVES = Registry("objective")
register_objective = OBJECTIVES.register


class Objective(nn.Module):
    """Default: one forward of the anchors, then `loss(out, batch)`. Methods needing more override `forward`."""

    def forward(self, model: nn.Module, batch: Batch) -> tuple[LossOutput, ExitOutputs]:
        out = model(batch.images)
        return self.loss(out, batch), out

    def loss(self, out: ExitOutputs, batch: Batch) -> LossOutput:
        raise NotImplementedError

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after each optimizer step (EMA teachers update here)."""

    @property
    def backend(self) -> str:
        """Who computes the loss terms: "triton" when the objective holds a fused call (chosen at construction)."""
        return "triton" if getattr(self, "fused", None) is not None else "torch"


# objective name -> what runs through the fused kernel when objective.backend resolves to "triton"
TRITON_ROUTED: dict[str, str] = {
    "byot": "every term: ce_i, kd_i, hint_i, in one launch",
    "byot_cskd": "the BYOT terms, and the CS-KD KL terms (one launch per chosen exit and per target)",
    "cskd": "ce + cskd (+ cskd_sample for CS-KD-E): one launch per chosen exit (+ one for the second view)",
    "beta": "ce + beta, the Beta targets in closed form from the per-row b",
    "kd": "ce + kd (Hinton: KL at T, student scaled, T^2)",
    "sd_generation": "ce + kd (soft CE at T, scale_student / t_squared as configured)",
    "ls_wrong_classes": "ls (eps/(K-1) per wrong class)",
    "ls_all_classes": "ls (eps/K on every class)",
    "label_smoothing": "as ls_wrong_classes / ls_all_classes",
    "dsn": "ce_i at every exit, one launch",
    "ce": "ce on the deepest exit",
    "mixup_cskd": "the cskd KL term only; the mixed CE stays on PyTorch",
}
# objective name -> why it always runs PyTorch, whatever objective.backend says
TORCH_ONLY: dict[str, str] = {
    "max_entropy": "the entropy bonus of the student's own prediction has no kernel term",
    "mixup": "the CE against two labels mixed by an on-device l has no kernel form",
}


# log(p + eps) in the soft-target cross-entropies of the methods whose official code has it (Beta-smoothing code)
OFFICIAL_LOG_EPS = {"ls_wrong_classes": 1e-8, "beta": 1e-8, "sd_generation": 1e-8}
SOFT_TARGET_METHODS = ("ls_wrong_classes", "ls_all_classes", "label_smoothing", "beta", "sd_generation")


def smoothing_name(cfg) -> str:
    """The objective's name, with `label_smoothing` resolved to ls_<objective.label_smoothing.convention>."""
    name = cfg.objective.name
    return "ls_" + cfg.objective.label_smoothing.convention if name == "label_smoothing" else name


def log_eps(cfg) -> float:
    """The eps of log(p + eps) in the method's soft-target cross-entropy (0 = exact log-softmax)."""
    value = cfg.objective.log_eps
    if value is None:
        return OFFICIAL_LOG_EPS.get(smoothing_name(cfg), 0.0)
    if value > 0 and cfg.objective.name not in SOFT_TARGET_METHODS:
        from engine.config import ConfigError

        raise ConfigError(f"objective.log_eps: {value} applies to soft-target cross-entropies, and objective "
                          f"{cfg.objective.name!r} has none (only {', '.join(SOFT_TARGET_METHODS)})")
    return value


def sum_terms(terms: dict[str, torch.Tensor]) -> LossOutput:
    total = torch.stack(list(terms.values())).sum()
    return LossOutput(total, terms)


def combine(*parts: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> LossOutput:
    """One LossOutput from several (total, terms) pairs, e.g. fused calls: the totals add up, the terms merge."""
    total, terms = parts[0][0], dict(parts[0][1])
    for t, more in parts[1:]:
        total = total + t
        terms.update(more)
    return LossOutput(total, terms)


def fused_call(cfg, device: torch.device, names: dict[str, tuple[int, int]], num_exits: int = 1):
    """The objective's fused call (engine/objectives/fused.py) when objective.backend resolves to triton, else None;
    `names` maps each logged term to its (exit, column) in the kernel's [E, 3] losses."""
    if resolve_backend(cfg.objective.backend, device) != "triton":
        return None
    from engine.objectives.fused import FusedCall, loss_options  # triton loads with this backend only

    return FusedCall(loss_options(cfg, num_exits), names)


def resolve_backend(name: str, device: torch.device) -> str:
    """auto = Triton on CUDA, PyTorch elsewhere."""
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return name


def build_objective(cfg, num_exits: int, device: torch.device) -> Objective:
    import engine.objectives  # noqa: F401  (registers every method)

    if cfg.objective.name not in OBJECTIVES:
        from engine.config import ConfigError

        raise ConfigError(f"objective.name: {cfg.objective.name!r} is not allowed; allowed values: "
                          f"{', '.join(OBJECTIVES.names())}")
    log_eps(cfg)  # a log_eps the method cannot take is a config error, whichever backend runs
    return OBJECTIVES.get(cfg.objective.name)(cfg, num_exits=num_exits, device=device)
