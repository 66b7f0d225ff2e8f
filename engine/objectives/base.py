"""Objective protocol and registry.

An objective runs the forward passes its method needs (anchors, no-grad partners, an EMA or frozen teacher) and
hands explicit tensors to pure loss functions. It returns a `LossOutput` whose `total` is the sum of its named,
already-weighted `terms`, so the log, the tests and the Triton kernels all see the same names.

Each objective class declares, as data, what it needs from the rest of the config (`requires`, see
requirements.py) and whether it has a soft-target cross-entropy (`soft_targets`); `check_config` asks it.

`objective.backend` (torch | triton | auto; auto = Triton on CUDA, PyTorch elsewhere) is resolved once, when the
objective is built. Each objective declares its kernel wiring itself: `kernel_options` (its
kernels.multi_exit.options.LossOptions) and `routed` (what runs through the kernel), or `torch_only` (why it always
runs PyTorch). A routed objective on triton holds its fused call (engine/objectives/fused.py) in `fused` and
computes its terms with it, otherwise with its PyTorch twin; both return the same term names and values, and the
fused total backpropagates through one sum. `routing()` lists both kinds. Both backends take the same
`objective.log_eps` (`log_eps`): the official log(p + 1e-8) of the Beta-smoothing code in the methods that come from
it, the exact log-softmax elsewhere.
"""
from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor, nn

from engine.config import ConfigError
from engine.objectives.requirements import Requirement
from engine.objectives.self_check import arm
from engine.registry import Registry
from engine.types import Batch, ExitOutputs, LossOutput

OBJECTIVES = Registry("objective")
register_objective = OBJECTIVES.register


class Objective(nn.Module):
    """Default: one forward of the anchors, then `loss` on its outputs. Methods needing more override `forward`."""

    requires: tuple[Requirement, ...] = ()
    soft_targets = False  # has a soft-target cross-entropy, the only loss that objective.log_eps changes
    official_log_eps = 0.0  # the eps of log(p + eps) there in the official code (0 = exact log-softmax)
    fused = None  # the fused call, when objective.backend resolved to triton at construction (`use_fused`)
    kernel_checks = None  # the fused call's self-checks (engine/objectives/self_check.py), when it has any
    routed = ""  # what runs through the fused kernel when objective.backend resolves to triton
    torch_only = ""  # why the objective always runs PyTorch, whatever objective.backend says (then routed is "")

    @classmethod
    def kernel_options(cls, cfg, num_exits: int):
        """The kernels.multi_exit.options.LossOptions of the objective's fused call (for CS-KD: the anchor/partner
        one); a torch-only objective has none."""
        raise ConfigError(f"objective.backend: objective {cfg.objective.name!r} has no fused-kernel form "
                          f"({cls.torch_only}); use objective.backend=torch")

    def fused_call(self, cfg, device: torch.device, names: dict[str, tuple[int, int]], num_exits: int = 1):
        """The objective's fused call when objective.backend resolves to triton, else None; `names` maps each logged
        term to its (exit, column) in the kernel's [E, 3] losses."""
        if resolve_backend(cfg.objective.backend, device) != "triton":
            return None
        return self.fused_twin(cfg, names, num_exits)

    def fused_twin(self, cfg, names: dict[str, tuple[int, int]], num_exits: int):
        """The fused twin of `torch_terms`: one call with `kernel_options` (an objective needing several launches
        returns its own callable with the same arguments and result)."""
        from engine.objectives.fused import FusedCall  # loads triton, optional: for this backend only

        return FusedCall(self.kernel_options(cfg, num_exits), names)

    def forward(self, model: nn.Module, batch: Batch) -> tuple[LossOutput, ExitOutputs]:
        out = model(batch.images)
        return self.loss(out, batch), out

    def loss(self, out: ExitOutputs, batch: Batch) -> LossOutput:
        raise NotImplementedError

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after each optimizer step (EMA teachers update here)."""

    def use_fused(self, fused) -> None:
        """The backend, chosen once: the terms come from the fused call, or from `torch_terms` when it is None.
        Both take the fused call's arguments and return (differentiable total, {name: term})."""
        self.fused = fused
        self.compute = self.torch_terms if fused is None else fused

    @classmethod
    def default_log_eps(cls, cfg) -> float:
        return cls.official_log_eps

    @property
    def backend(self) -> str:
        return "torch" if self.fused is None else "triton"


def routing() -> tuple[dict[str, str], dict[str, str]]:
    """({objective: what runs through the fused kernel}, {objective: why it always runs PyTorch}), as each declares."""
    classes = {n: OBJECTIVES.get(n) for n in OBJECTIVES.names()}
    return ({n: c.routed for n, c in classes.items() if c.routed},
            {n: c.torch_only for n, c in classes.items() if c.torch_only})


def objective_class(cfg) -> type[Objective]:
    name = cfg.objective.name
    if name not in OBJECTIVES:
        raise ConfigError(f"objective.name: {name!r} is not allowed; allowed values: {', '.join(OBJECTIVES.names())}")
    return OBJECTIVES.get(name)


def log_eps(cfg) -> float:
    """The eps of log(p + eps) in the method's soft-target cross-entropy (0 = exact log-softmax)."""
    value = cfg.objective.log_eps
    return objective_class(cfg).default_log_eps(cfg) if value is None else value


def check_config(cfg) -> None:
    """Raise ConfigError at the first thing objective.name requires that the config does not give."""
    cls = objective_class(cfg)
    for r in cls.requires:
        if r.applies(cfg) and not r.holds(cfg):
            raise ConfigError(r.message(cfg.objective.name))
    value = cfg.objective.log_eps
    if value and not cls.soft_targets:
        soft = [n for n in OBJECTIVES.names() if OBJECTIVES.get(n).soft_targets]
        raise ConfigError(f"objective.log_eps: {value} applies to soft-target cross-entropies, and objective "
                          f"{cfg.objective.name!r} has none (only {', '.join(soft)})")


def summed(terms: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """(sum of the terms, the terms): what a fused call returns, for the PyTorch twins."""
    return torch.stack(list(terms.values())).sum(), terms


def sum_terms(terms: dict[str, Tensor]) -> LossOutput:
    return LossOutput(*summed(terms))


def combine(*parts: tuple[Tensor, dict[str, Tensor]]) -> LossOutput:
    """One LossOutput from several (total, terms) pairs: the totals add up, the terms merge."""
    total, terms = parts[0][0], dict(parts[0][1])
    for t, more in parts[1:]:
        total = total + t
        terms.update(more)
    return LossOutput(total, terms)


def resolve_backend(name: str, device: torch.device) -> str:
    """auto = Triton on CUDA where triton is installed (it is a dependency only where it has wheels), else
    PyTorch."""
    has_triton = importlib.util.find_spec("triton") is not None
    if name == "auto":
        return "triton" if device.type == "cuda" and has_triton else "torch"
    if name == "triton" and not has_triton:
        raise ConfigError("objective.backend=triton needs triton (pip install triton), which has wheels for Linux "
                          "only; objective.backend=torch runs everywhere")
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"objective.backend=triton needs a CUDA device (this run is on {device.type}); on CPU the "
                          "kernels run only in Triton's interpreter, with TRITON_INTERPRET=1 in the environment "
                          "(slow: for checking, not training). objective.backend=torch or auto runs here")
    return name


def build_objective(cfg, num_exits: int, device: torch.device) -> Objective:
    check_config(cfg)
    objective = objective_class(cfg)(cfg, num_exits=num_exits, device=device)
    objective.kernel_checks = arm(objective, cfg.objective.backend, cfg.objective.self_check)
    return objective
