"""The options of the fused multi-exit loss: one frozen, hashable object for the op, its fake, its backward and the
reference. It travels through `torch.library` as a string (`encoded` / `decode`), since custom ops take no objects.

The terms, per exit e (shallow -> deep) with logits z_e [B, C], labels y and pooled features f_e [B, D]:

    ce   = ce_weight[e]   * mean over labelled rows of CE(z_e, target)         target: the label, or smoothed
    kd   = kd_weight[e]   * (T^2 if t_squared) * mean over rows of KD(p || softmax(z_e / Ts))      Ts = T or 1
    hint = hint_weight[e] * hint(f_e, f_{E-1}.detach())                          sse | l2 (torch.dist) | mse

`teacher` picks p: "deepest" softmax(z_{E-1} / T) detached (BYOT; the deepest exit has no KD or hint term),
"logits" softmax(teacher_logits / T) detached (classic KD, generations, CS-KD partners), "closed_form" b_i on the
label and (1 - b_i) / (C - 1) elsewhere from a per-row b (Beta smoothing; mean over labelled rows), "none".
`kd` is "kl" or "soft_ce" (-sum p log q: KL plus the teacher's entropy, same gradient).
Label smoothing eps: "wrong_classes" puts eps / (C - 1) on each wrong class, "all_classes" eps / C on every class
(= F.cross_entropy(label_smoothing=eps)). `log_eps` > 0 replaces log q by log(q + log_eps) in one soft-target
cross-entropy, as the Beta-smoothing paper's code does with 1e-8: in the KD term when it is a soft_ce with a
teacher, else in the CE term (hard or smoothed).
A weight given as a scalar applies to every exit that can have the term; a sequence gives one per exit (E values,
or E - 1 for the terms whose teacher is the deepest exit). `block_c` forces the class tile (0 = automatic); it
changes no value and exists for tests of the multi-tile path.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Union

import torch

TEACHERS = ("none", "deepest", "logits", "closed_form")
KD_KINDS = ("kl", "soft_ce")
HINTS = ("none", "sse", "l2", "mse")
SMOOTHING_CONVENTIONS = ("wrong_classes", "all_classes")
MAX_EXITS = 8  # exits of one launch: every exit of a row block is handled by one program

Weight = Union[float, tuple[float, ...]]


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: {value!r} is not allowed; allowed values: {', '.join(allowed)}")


def _weight(name: str, value) -> Weight:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
        values = (value,)
    else:
        value = tuple(float(v) for v in value)
        values = value
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name}: {value} must be finite")
    return value


@dataclass(frozen=True)
class LossOptions:
    teacher: str = "deepest"
    ce_weight: Weight = 1.0
    kd_weight: Weight = 0.0
    hint_weight: Weight = 0.0
    temperature: float = 1.0
    kd: str = "kl"
    t_squared: bool = False
    scale_student: bool = True
    label_smoothing: float = 0.0
    smoothing_convention: str = "wrong_classes"
    hint: str = "none"
    log_eps: float = 0.0
    ignore_index: int = -100
    block_c: int = 0

    def __post_init__(self):
        _choice("teacher", self.teacher, TEACHERS)
        _choice("kd", self.kd, KD_KINDS)
        _choice("hint", self.hint, HINTS)
        _choice("smoothing_convention", self.smoothing_convention, SMOOTHING_CONVENTIONS)
        for name in ("ce_weight", "kd_weight", "hint_weight"):
            object.__setattr__(self, name, _weight(name, getattr(self, name)))
        for name in ("temperature", "label_smoothing", "log_eps"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature: {self.temperature} must be > 0")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing: {self.label_smoothing} must be in [0, 1]")
        if not 0.0 <= self.log_eps < 1.0:
            raise ValueError(f"log_eps: {self.log_eps} must be in [0, 1)")
        object.__setattr__(self, "t_squared", bool(self.t_squared))
        object.__setattr__(self, "scale_student", bool(self.scale_student))
        object.__setattr__(self, "ignore_index", int(self.ignore_index))
        if self.block_c < 0 or (self.block_c & (self.block_c - 1)):
            raise ValueError(f"block_c: {self.block_c} must be 0 (automatic) or a power of two")
        # encoded and hashed once: torch.compile reads `encoded` as a constant, and the per-call plan lookup hashes
        object.__setattr__(self, "encoded", json.dumps(asdict(self), sort_keys=True))
        object.__setattr__(self, "_hash", hash(self.encoded))

    def __hash__(self) -> int:
        return self._hash

    @property
    def log_eps_on_kd(self) -> bool:
        """Whether log_eps goes to the KD term (else to the CE term)."""
        return self.kd == "soft_ce" and self.teacher != "none"

    @property
    def student_temperature(self) -> float:
        """Ts: the temperature of the student's softmax inside the KD term."""
        return self.temperature if self.scale_student else 1.0

    def as_kwargs(self) -> dict:
        return asdict(self)

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def decode(text: str) -> "LossOptions":
        raw = json.loads(text)
        return LossOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


OPTION_NAMES = tuple(f.name for f in fields(LossOptions))


def per_exit(name: str, w: Weight, n: int) -> list[float]:
    if isinstance(w, float):
        return [w] * n
    if len(w) != n:
        raise ValueError(f"{name}: expected {n} values, got {len(w)}")
    return list(w)


def _taught_by_deepest(name: str, w: Weight, num_exits: int) -> list[float]:
    """A scalar or E - 1 values; E values must end with 0, since the deepest exit is the teacher of the term."""
    if not isinstance(w, float) and len(w) == num_exits:
        if w[-1] != 0.0:
            raise ValueError(f"{name}: the deepest exit is the teacher of this term, its weight must be 0, got {w[-1]}")
        return list(w)
    return per_exit(name, w, num_exits - 1) + [0.0]


def resolve_weights(opts: LossOptions, num_exits: int) -> list[tuple[float, float, float]]:
    """(ce, kd, hint) weight of every exit."""
    ce = per_exit("ce_weight", opts.ce_weight, num_exits)
    if opts.teacher == "none":
        if any(per_exit("kd_weight", opts.kd_weight, num_exits)):
            raise ValueError("kd_weight: teacher='none' has no KD term, the weight must be 0")
        kd = [0.0] * num_exits
    elif opts.teacher == "deepest":
        kd = _taught_by_deepest("kd_weight", opts.kd_weight, num_exits)
    else:
        kd = per_exit("kd_weight", opts.kd_weight, num_exits)
    hint = [0.0] * num_exits if opts.hint == "none" else _taught_by_deepest("hint_weight", opts.hint_weight,
                                                                            num_exits)
    return list(zip(ce, kd, hint))


def ce_true_mass(opts: LossOptions, num_classes: int) -> float:
    """b of the CE target: b on the label, (1 - b) / (C - 1) on every other class."""
    eps = opts.label_smoothing
    return 1.0 - eps + eps / num_classes if opts.smoothing_convention == "all_classes" else 1.0 - eps


def options(opts: LossOptions | None = None, **kwargs) -> LossOptions:
    """`opts` as given, or a LossOptions built from keyword options (the functional API's spelling)."""
    if opts is not None:
        if kwargs:
            raise TypeError(f"pass either a LossOptions or keyword options, not both ({sorted(kwargs)})")
        return opts
    return _from_items(tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items())))


@torch.compiler.assume_constant_result  # built at trace time, so keyword options compile without a graph break
def _from_items(items: tuple) -> LossOptions:
    return _build(items)


@functools.lru_cache(maxsize=256)
def _build(items: tuple) -> LossOptions:
    unknown = {k for k, _ in items} - set(OPTION_NAMES)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; allowed: {', '.join(OPTION_NAMES)}")
    return LossOptions(**dict(items))
