"""Objective protocol and registry.

An objective runs the forward passes its method needs (anchors, no-grad partners, an EMA or frozen teacher) and
hands explicit tensors to pure loss functions. It returns a `LossOutput` whose `total` is the sum of its named,
already-weighted `terms`, so the log, the tests and the Triton kernels all see the same names.

`objective.backend` (torch | triton | auto; auto = Triton on CUDA, PyTorch elsewhere) picks who computes the
loss terms. With "triton" the objectives in `TRITON_ROUTED` hand their logits to the fused kernel
(kernels/objective_bridge.py) and return the same term names and values as the PyTorch path; the others always
run PyTorch (`TORCH_ONLY`, with the reason). The objectives whose PyTorch path follows the Beta-smoothing code's
log(softmax + 1e-8) (ls_wrong_classes, beta, sd_generation; baselines.LOG_EPS) compute the exact log-softmax on
the Triton backend (the kernel has no epsilon); their PyTorch path gives the same numbers with `log_eps=None`
(each objective's `log_eps` attribute: LOG_EPS on torch, None on triton). The difference is tiny except for
classes the model gives probability below ~1e-8, where log(p + 1e-8) flattens the loss and its gradient.
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


# objective name -> what runs through the fused kernel when objective.backend resolves to "triton"
TRITON_ROUTED: dict[str, str] = {
    "byot": "every term: ce_i, kd_i, hint_i (one launch per 4 exits)",
    "byot_cskd": "the BYOT terms, and the CS-KD KL terms (one launch per chosen exit and per target)",
    "cskd": "ce + cskd (+ cskd_sample for CS-KD-E): one launch per chosen exit (+ one for the second view)",
    "beta": "ce + beta, Beta targets in closed form from the per-row b (exact log-softmax)",
    "kd": "ce + kd (Hinton: KL at T, student scaled, T^2)",
    "sd_generation": "ce + kd (soft CE at T, scale_student / t_squared as configured; exact log-softmax)",
    "ls_wrong_classes": "ls (eps/(K-1) per wrong class; exact log-softmax)",
    "ls_all_classes": "ls (= F.cross_entropy(label_smoothing=eps))",
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


def sum_terms(terms: dict[str, torch.Tensor]) -> LossOutput:
    total = torch.stack(list(terms.values())).sum()
    return LossOutput(total, terms)


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
    return OBJECTIVES.get(cfg.objective.name)(cfg, num_exits=num_exits, device=device)
