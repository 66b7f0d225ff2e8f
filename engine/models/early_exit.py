"""Deployment forms of a `MultiExitModel`: truncated at one exit, or stopping at the first confident exit.

Exit indices follow `ExitOutputs`: 0 = shallowest, `num_exits - 1` = the backbone's own head (the full model).

`TruncatedModel(model, k)` runs the stem, the backbone stages up to exit k's stage and exit k's head, and returns
exit k's logits [B, C]: exactly `model(x).logits[k]` in eval mode, without the later stages or the other heads.

`EarlyExitModel(model, threshold)` applies the confidence policy **per sample**: sample i leaves at the first exit
whose max-softmax probability is >= `threshold` (the deepest exit takes whatever is left). It returns
`(logits [B, C] float32, exit_index [B] int64)`, where logits[i] == model(x).logits[exit_index[i]][i]. So threshold
0 always takes exit 0, and any threshold above 1 always takes the last exit. The batch is processed together and
only the samples that have not exited yet go on to the next stages ("compaction": the batch shrinks, so a large
batch saves compute too). Inference only: the module refuses to run in training mode, because BatchNorm would
otherwise see the shrinking batch; in eval mode every sample's result is independent of the others in its batch.

Export:
- `TruncatedModel` is static: `torch.export.export` and `torch.jit.trace` take it as is.
- `EarlyExitModel.forward` (compaction) runs eagerly and as TorchScript: `to_torchscript(example)` traces each
  static step (stages + head) and scripts the data-dependent policy around them.
- `EarlyExitModel.exportable()` is the `torch.export` form. Shrinking the batch gives data-dependent shapes that
  torch.export cannot pass through a convolution, so this form keeps the batch whole, masks the samples that
  have exited and skips the remaining stages once *every* sample has exited (`torch.cond`). Per-sample outputs
  are identical to the compaction form; it saves compute at batch 1 and whenever a whole batch exits early.

`EarlyExitModel` needs a backbone with a stage chain: `forward_stem`, a `stages` list and `forward_head` (the
engine's ResNets). `TruncatedModel` takes any backbone: without a chain (timm's) it stops the backbone's
`forward_intermediates` at exit k's level.
"""
from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TruncatedModel", "EarlyExitModel", "ExitStep", "exit_steps", "exit_index_for_threshold",
           "policy_curve"]


def _has_chain(backbone: nn.Module) -> bool:
    return all(hasattr(backbone, a) for a in ("forward_stem", "stages", "forward_head"))


def _check_backbone(backbone: nn.Module) -> None:
    if not _has_chain(backbone):
        raise NotImplementedError(
            f"{type(backbone).__name__} has no stage chain (forward_stem(), a `stages` list, forward_head()), which "
            "early exit runs stage by stage; such backbones (timm's) deploy one exit at a time (export --exit K)")


def _child_name(parent: nn.Module, child: nn.Module) -> Optional[str]:
    return next((n for n, m in parent._modules.items() if m is child), None)


def _pruned(backbone: nn.Module, drop_classifier: bool) -> nn.Module:
    """A shallow copy of the backbone sharing its parameters, with every stage (and optionally the classifier)
    replaced by nn.Identity, so a step holds only the stem / final-norm / pooling modules it calls. The stem of the
    first step and the final exit's copy both reach the stem's parameters: they are the same tensors under two names
    (torch.export, TorchScript and torch.save keep such aliases tied)."""
    pruned = copy.copy(backbone)
    pruned._modules = dict(backbone._modules)  # own module table; parameters stay shared
    for stage in backbone.stages:
        name = _child_name(backbone, stage)
        if name is None:
            raise NotImplementedError(f"{type(backbone).__name__}.stages are not direct children; cannot prune")
        pruned._modules[name] = nn.Identity()
    if drop_classifier and hasattr(backbone, "get_classifier"):
        name = _child_name(backbone, backbone.get_classifier())
        if name is not None:
            pruned._modules[name] = nn.Identity()
    return pruned


class _Stem(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = _pruned(backbone, drop_classifier=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone.forward_stem(x)


class _ShallowExit(nn.Module):
    """An exit head returning only its logits."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x)[0]


class _FinalExit(nn.Module):
    """The backbone's own head: final norm/activation (pre-activation nets), pooling, classifier."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = _pruned(backbone, drop_classifier=False)
        self.has_final_norm = hasattr(backbone, "final_norm_act")

    def forward(self, x: Tensor) -> Tensor:
        if self.has_final_norm:
            x = self.backbone.final_norm_act(x)
        return self.backbone.forward_head(x)


class ExitStep(nn.Module):
    """One link of the exit chain: (stem), the stages between the previous exit and this one, this exit's head.
    forward(h) -> (stage output, this exit's logits)."""

    def __init__(self, stem: Optional[nn.Module], stages: list[nn.Module], head: nn.Module):
        super().__init__()
        self.stem = stem if stem is not None else nn.Identity()
        self.stages = nn.Sequential(*stages)
        self.head = head

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        h = self.stages(self.stem(h))
        return h, self.head(h)


def _exit_stages(model: nn.Module) -> list[int]:
    """The 0-based stage after which each exit sits (the deepest: the last stage)."""
    return [int(info["stage"]) for info in model.exit_info]


def exit_steps(model: nn.Module) -> list[ExitStep]:
    """The model as a chain of ExitSteps, one per exit (shallow -> deep); the modules are shared with `model`."""
    backbone = model.backbone
    _check_backbone(backbone)
    stages = list(backbone.stages)
    bounds = _exit_stages(model)
    heads: list[nn.Module] = [_ShallowExit(h) for h in model.heads] + [_FinalExit(backbone)]
    steps, prev = [], 0
    for j, (stage, head) in enumerate(zip(bounds, heads)):
        steps.append(ExitStep(_Stem(backbone) if j == 0 else None, stages[prev:stage + 1], head))
        prev = stage + 1
    return steps


def _normalise_exit(model: nn.Module, k: int) -> int:
    n = model.num_exits
    if not -n <= k < n:
        raise ValueError(f"exit {k} is out of range: the model has {n} exits (0..{n - 1}; -1 = the last)")
    return k % n


class _IntermediatesExit(nn.Module):
    """Exit k of a backbone without a stage chain (timm's): its `forward_intermediates` stopped at exit k's level,
    then exit k's head; the deepest exit is the backbone's own forward."""

    def __init__(self, model: nn.Module, k: int):
        super().__init__()
        self.backbone = model.backbone
        self.final = k == model.num_exits - 1
        self.level = _exit_stages(model)[k]
        self.head = nn.Identity() if self.final else _ShallowExit(model.heads[k])

    def forward(self, x: Tensor) -> Tensor:
        if self.final:
            return self.backbone(x)
        _, inters = self.backbone.forward_intermediates(x, indices=[self.level], stop_early=True)
        return self.head(inters[0])


class TruncatedModel(nn.Module):
    """The backbone up to exit k's stage plus exit k's head: forward(x) -> exit k's logits [B, C]."""

    def __init__(self, model: nn.Module, k: int):
        super().__init__()
        k = _normalise_exit(model, k)
        self.exit = k
        self.num_exits = model.num_exits
        self.stage = _exit_stages(model)[k]
        self.chain = _has_chain(model.backbone)
        if not self.chain:
            self.body = _IntermediatesExit(model, k)
            return
        final = k == model.num_exits - 1
        head = _FinalExit(model.backbone) if final else _ShallowExit(model.heads[k])
        self.body = ExitStep(_Stem(model.backbone), list(model.backbone.stages)[: self.stage + 1], head)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)[1] if self.chain else self.body(x)


def exit_index_for_threshold(logits: list[Tensor], threshold: float) -> Tensor:
    """The policy applied to precomputed per-exit logits: index of the first exit with max-softmax >= threshold,
    else the last. Used by the profiler and the tests as the reference of `EarlyExitModel`."""
    n = len(logits)
    conf = torch.stack([F.softmax(z.float(), dim=1).amax(dim=1) for z in logits[:-1]], dim=1) if n > 1 else None
    batch = logits[0].shape[0]
    if conf is None:
        return torch.zeros(batch, dtype=torch.long, device=logits[0].device)
    hit = conf >= threshold
    first = torch.where(hit.any(1), hit.float().argmax(1), torch.full((batch,), n - 1, device=hit.device))
    return first.long()


def policy_curve(logits: list[Tensor], labels: Optional[Tensor], thresholds: list[float], path_flops: list[float],
                 full_flops: float) -> list[dict]:
    """The policy simulated on collected per-exit logits, one row per threshold: the fraction of samples leaving at
    each exit, the top-1 of the exits they leave at (None without labels), and the mean FLOPs per image, where a
    sample leaving at exit k costs `path_flops[k]` (every stage and head up to k), with its speed-up over the full
    model's `full_flops`."""
    rows = []
    for thr in thresholds:
        idx = exit_index_for_threshold(logits, thr)
        frac = (torch.bincount(idx, minlength=len(logits)).double() / len(idx)).tolist()
        chosen = torch.stack(logits)[idx, torch.arange(len(idx))]
        mean_flops = sum(f * p for f, p in zip(frac, path_flops))
        rows.append({"threshold": thr, "exit_fraction": [round(f, 6) for f in frac], "mean_flops_per_image": mean_flops,
                     "flop_speedup_vs_full": round(full_flops / mean_flops, 4),
                     "top1": None if labels is None else round(100.0 * (chosen.argmax(1) == labels).double().mean()
                                                                .item(), 4)})
    return rows


class EarlyExitModel(nn.Module):
    """Per-sample confidence early exit; forward(x) -> (logits [B, C] float32, exit_index [B] int64)."""

    def __init__(self, model: nn.Module, threshold: float):
        super().__init__()
        self.steps = nn.ModuleList(exit_steps(model))
        self.num_exits = int(model.num_exits)
        self.num_classes = int(model.exit_info[-1]["num_classes"])
        self.exit_stages = _exit_stages(model)
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float32))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training:
            raise RuntimeError("EarlyExitModel is inference-only: call .eval() first (BatchNorm in training mode "
                               "would see the shrinking batch)")
        n = self.num_exits
        batch = x.shape[0]
        logits = torch.zeros([batch, self.num_classes], dtype=torch.float32, device=x.device)
        exit_index = torch.full([batch], n - 1, dtype=torch.long, device=x.device)
        active = torch.arange(batch, device=x.device)  # original positions of the samples still running
        h = x
        j = 0
        for step in self.steps:
            if h.shape[0] > 0:  # every sample has exited: skip the remaining stages
                h, z = step(h)
                z = z.float()
                if j == n - 1:
                    logits = logits.index_copy(0, active, z)
                else:
                    take = torch.softmax(z, dim=1).amax(dim=1) >= self.threshold
                    leaving = active[take]
                    logits = logits.index_copy(0, leaving, z[take])
                    exit_index = exit_index.index_copy(0, leaving, torch.full_like(leaving, j))
                    stay = torch.logical_not(take)
                    active = active[stay]
                    h = h[stay]
            j += 1
        return logits, exit_index

    def exportable(self) -> nn.Module:
        """The torch.export form (whole batch, masked, `torch.cond` skip); same per-sample outputs."""
        return _MaskedEarlyExit(self)

    def to_torchscript(self, example: Tensor) -> torch.jit.ScriptModule:
        """Trace each static step on `example` (any batch size works afterwards) and script the policy around."""
        if self.training:
            raise RuntimeError("call .eval() before exporting")
        clone = copy.copy(self)
        clone._modules = dict(self._modules)
        traced, h = [], example
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script warns: deprecated in recent torch
            for step in self.steps:
                traced.append(torch.jit.trace(step, (h,), check_trace=False))
                h, _ = step(h)
            clone.steps = nn.ModuleList(traced)
            return torch.jit.script(clone)


class _MaskedEarlyExit(nn.Module):
    def __init__(self, ee: EarlyExitModel):
        super().__init__()
        self.steps = ee.steps
        self.num_exits = ee.num_exits
        self.num_classes = ee.num_classes
        self.register_buffer("threshold", ee.threshold)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        batch = x.shape[0]
        logits = torch.zeros([batch, self.num_classes], dtype=torch.float32, device=x.device)
        exit_index = torch.full([batch], self.num_exits - 1, dtype=torch.long, device=x.device)
        done = torch.zeros([batch], dtype=torch.bool, device=x.device)
        return self._run(0, x, logits, exit_index, done)

    def _run(self, j: int, h: Tensor, logits: Tensor, exit_index: Tensor, done: Tensor) -> tuple[Tensor, Tensor]:
        h, z = self.steps[j](h)
        z = z.float()
        if j == self.num_exits - 1:
            return (torch.where(done[:, None], logits, z),
                    torch.where(done, exit_index, torch.full_like(exit_index, j)))
        take = (torch.softmax(z, dim=1).amax(dim=1) >= self.threshold) & ~done
        logits = torch.where(take[:, None], z, logits)
        exit_index = torch.where(take, torch.full_like(exit_index, j), exit_index)
        done = done | take

        def stop(h: Tensor, logits: Tensor, exit_index: Tensor, done: Tensor) -> tuple[Tensor, Tensor]:
            return logits.clone(), exit_index.clone()

        def go_on(h: Tensor, logits: Tensor, exit_index: Tensor, done: Tensor) -> tuple[Tensor, Tensor]:
            return self._run(j + 1, h, logits, exit_index, done)

        return torch.cond(done.all(), stop, go_on, (h, logits, exit_index, done))
