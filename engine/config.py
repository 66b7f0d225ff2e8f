"""Typed configuration: a tree of dataclasses, loaded from YAML plus dotted `key.sub=value` overrides.

Every leaf is checked against its annotation (Literal = allowed values, list[int], Optional, ...) and against the
`ge`/`gt`/`le` bounds in its field metadata. Any unknown key, wrong type or out-of-range value raises `ConfigError`
naming the dotted key and what is allowed, before anything runs.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from engine.config_errors import ConfigError  # noqa: F401  re-exported: every module takes it from here
from engine.config_files import find_config, flatten, migrate, read_yaml, refuse_old_key


def _f(default: Any = dataclasses.MISSING, *, factory: Any = None, ge: float | None = None,
       gt: float | None = None, le: float | None = None, doc: str = "") -> Any:
    meta = {"ge": ge, "gt": gt, "le": le, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = _f("resnet18", doc="registered backbone (see `selfdistill train --list-models`) or timm:<name>")
    stem: Literal["imagenet", "cifar"] = "imagenet"
    num_classes: int = _f(1000, ge=2)
    in_chans: int = _f(3, ge=1)
    width: float = _f(1.0, gt=0, doc="channel multiplier for small CPU models")
    depths: Optional[list[int]] = _f(None, doc="blocks per stage, overrides the named depth (e.g. [1,1,1,1])")
    zero_init_residual: bool = False
    drop_rate: float = _f(0.0, ge=0, le=1)
    pretrained_file: Optional[str] = _f(None, doc="timm models: start from this local weights file (timm's "
                                        "pretrained_cfg_overlay); nothing is downloaded")
    img_size: Optional[int] = _f(None, ge=1, doc="timm models with a fixed input size (ViT): build for this size "
                                 "(timm's img_size), e.g. data.image_size")


# Exits are indexed 0..E-1, shallow to deep, everywhere (config, logs, reports): exit i of BYOT sits after backbone
# stage exits.stages[i], and the deepest exit is the backbone's own head after its last stage.
EXIT_STAGES = (0, 1, 2)  # 0-based stages of the 4-stage backbones (timm's forward_intermediates indices)


@dataclass
class ExitsConfig:
    stages: list[int] = _f(factory=lambda: [0, 1, 2], doc="0-based backbone stages followed by an exit head (the "
                           "last stage ends in the backbone's own head); [] = the plain backbone")
    head: Literal["bottleneck", "journal"] = _f("bottleneck", doc="ICCV bottleneck head or journal attention+SepConv")
    hint_adapter: bool = _f(False, doc="a Linear on each shallow exit's feature before the hint (journal code)")


@dataclass
class ByotConfig:
    # Defaults follow the ICCV paper: sum_i (1-a) CE + a KL(q_i || q_C) + lambda ||F_i - F_C||^2, with the values of
    # the ICCV re-implementation (alpha 0.1, T 3, lambda 1e-6). Other codebases are one switch away (README).
    alpha: float = _f(0.1, ge=0, le=1)
    beta: float = _f(1e-6, ge=0, doc="hint weight lambda")
    temperature: float = _f(3.0, gt=0)
    kd: Literal["kl", "soft_ce"] = "kl"
    t_squared: bool = True
    hint: Literal["sse", "l2", "mse", "none"] = _f("sse", doc="masked summed sq. error | torch.dist | MSE | off")
    hint_exits: Optional[list[int]] = _f(None, doc="0-based shallow exits that get the hint; null = all")
    deepest_ce_weight: Optional[float] = _f(None, ge=0, doc="CE weight of the deepest exit; null = 1 - alpha")
    ce_weights: Optional[list[float]] = _f(None, doc="per shallow exit; null = 1 - alpha each")
    kd_weights: Optional[list[float]] = _f(None, doc="per shallow exit; null = alpha each")
    hint_weights: Optional[list[float]] = _f(None, doc="per shallow exit; null = beta each")


@dataclass
class LabelSmoothingConfig:
    epsilon: float = _f(0.1, ge=0, le=1)
    convention: Literal["wrong_classes", "all_classes"] = _f(
        "wrong_classes", doc="eps/(K-1) on wrong classes (Beta code) | eps/K on all classes (PyTorch)")


@dataclass
class CskdConfig:
    lam: float = _f(1.0, ge=0)
    temperature: float = _f(4.0, gt=0)
    partner_updates_bn: bool = _f(True, doc="the no-grad partner forward updates BN statistics (official code)")
    allow_self_partner: bool = _f(True, doc="official sampler may pick the anchor itself")
    sample_wise: bool = _f(False, doc="CS-KD-E: add the KL between two views of the same image")
    exits: Literal["deepest", "all"] = "deepest"


@dataclass
class BetaConfig:
    alpha: float = _f(0.6, ge=0, le=1)
    beta: float = _f(3.0, gt=0)
    ema_decay: float = _f(0.999, ge=0, le=1)


@dataclass
class TeacherKDConfig:
    checkpoint: Optional[str] = _f(None, doc="teacher checkpoint (classic KD / next generation)")
    model: Optional[str] = _f(None, doc="teacher architecture if different from model.name")
    alpha: float = _f(0.4, ge=0, le=1)
    temperature: float = _f(4.0, gt=0)
    scale_student: bool = _f(False, doc="divide the student logits by T too (Beta repo: no)")
    t_squared: bool = _f(False, doc="multiply the KD term by T^2 (Beta repo: no)")


@dataclass
class MaxEntropyConfig:
    beta: float = _f(0.1, ge=0, doc="CE - beta H(p)")


@dataclass
class MixupConfig:
    alpha: float = _f(0.0, ge=0, doc="mixup Beta(a, a); 0 = off")


@dataclass
class ObjectiveConfig:
    name: str = _f("byot", doc="registered objective (ce, byot, ...)")
    backend: Literal["torch", "triton", "auto"] = _f("auto", doc="auto = Triton on CUDA, PyTorch on CPU")
    self_check: bool = _f(True, doc="check the fused loss against PyTorch on the first call of each launch plan "
                          "(auto falls back on a mismatch, triton stops)")
    byot: ByotConfig = field(default_factory=ByotConfig)
    label_smoothing: LabelSmoothingConfig = field(default_factory=LabelSmoothingConfig)
    cskd: CskdConfig = field(default_factory=CskdConfig)
    beta: BetaConfig = field(default_factory=BetaConfig)
    teacher: TeacherKDConfig = field(default_factory=TeacherKDConfig)
    max_entropy: MaxEntropyConfig = field(default_factory=MaxEntropyConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    log_eps: Optional[float] = _f(None, ge=0, le=0.5, doc="soft-target CEs take log(p + log_eps); null = the method's "
                                  "official form (1e-8 for beta, sd_generation and label_smoothing's wrong_classes "
                                  "convention; else 0 = exact)")


@dataclass
class DataConfig:
    dataset: Literal["fashion_mnist", "digits", "imagefolder", "synthetic"] = _f(
        "fashion_mnist", doc="synthetic = random batches made on the device (compute-only throughput), any backend")
    root: Optional[str] = _f(None, doc="data folder; fashion_mnist default: the Debian package's folder")
    backend: Literal["torch", "dali", "dali-cpu"] = _f("torch", doc="the loader for real images")
    image_size: int = _f(224, ge=8)
    augment: Literal["none", "crop_flip", "random_resized_crop"] = _f(
        "random_resized_crop", doc="crop_flip = pad-4 crop + flip (32-px recipe); random_resized_crop for 224 px")
    batch_size: int = _f(256, ge=1, doc="per process")
    eval_batch_size: int = _f(256, ge=1)
    workers: int = _f(4, ge=0)
    val_split: int = _f(0, ge=0, doc="images carved from train for model selection; 0 = select on `val`/`test`")
    select_on_test: bool = _f(False, doc="allow model selection on the test set when there is no val split")
    skip_corrupt: bool = _f(False, doc="skip (and count) unreadable images instead of failing")
    sampler: Literal["random", "class_pair"] = _f(
        "random", doc="class_pair = CS-KD: B anchors then B same-class partners (Batch.extra['partner'])")
    extra_view: bool = _f(False, doc="also yield a second augmentation of each anchor (Batch.extra['view'])")
    dali_hw_decoder_load: float = _f(0.65, ge=0, le=1, doc="share of JPEG decoding sent to the HW decoder")
    dali_prefetch: int = _f(2, ge=1)
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    limit_train: int = _f(0, ge=0, doc="use only N training samples (quick runs): image folders keep N spread over "
                          "the classes, the built-in sets the first N of their seed-shuffled order")
    split_seed: Optional[int] = _f(None, doc="seed of the validation carve, the training subset and the label noise; "
                                   "null = the run's seed (a study varies the model's seed on fixed data with it)")
    balanced_subset: bool = _f(False, doc="limit_train keeps the first limit_train/K samples of each of the K classes "
                               "(fashion_mnist, digits)")
    label_noise: float = _f(0.0, ge=0, le=0.9, doc="share of training labels moved to another class drawn uniformly, "
                            "seed-fixed (symmetric noise; fashion_mnist, digits); val and test stay clean")
    limit_eval: int = _f(0, ge=0, doc="evaluate on N images only, chosen as limit_train's")


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = _f(0.1, gt=0, doc="peak LR for the global batch")
    momentum: float = _f(0.9, ge=0, le=1)
    nesterov: bool = False
    weight_decay: float = _f(5e-4, ge=0)
    no_decay_bn_bias: bool = _f(False, doc="no weight decay on BN parameters and biases")
    betas: list[float] = _f(factory=lambda: [0.9, 0.999])
    impl: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    clip_grad_norm: float = _f(0.0, ge=0, doc="0 = off")


@dataclass
class ScheduleConfig:
    epochs: int = _f(200, ge=1)
    name: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[int] = _f(factory=lambda: [75, 130, 180], doc="epochs at which the LR is multiplied by gamma")
    gamma: float = _f(0.1, gt=0, le=1)
    warmup_epochs: float = _f(0.0, ge=0)
    min_lr: float = _f(0.0, ge=0)


@dataclass
class PrecisionConfig:
    amp: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    compile_mode: Optional[str] = None
    compile_backend: str = _f("inductor", doc="torch.compile backend; `eager` only traces (CPU tests, rehearsals)")
    deterministic: bool = False


@dataclass
class DistributedConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    sync_bn: bool = False
    find_unused_parameters: bool = False
    timeout_s: float = _f(1800.0, gt=0, doc="how long a collective waits for a missing rank before the run fails")


@dataclass
class CheckpointConfig:
    dir: str = _f("runs/default", doc="run directory")
    every_epochs: int = _f(1, ge=1)
    every_steps: int = _f(0, ge=0, doc="also write last.pt every N steps, mid-epoch (0 = at epoch ends only); a "
                          "resume from it continues exactly, data order included")
    resume: Optional[str] = _f(None, doc="checkpoint to resume; 'auto' = run dir's last.pt if present")
    overwrite: bool = _f(False, doc="start afresh in a run directory that already holds a run, deleting its "
                                    "checkpoints and metrics")


@dataclass
class LoggingConfig:
    log_every: int = _f(50, ge=1, doc="steps between host reads of the accumulated losses")
    progress: bool = True
    tensorboard: bool = False
    ece_bins: int = _f(15, ge=1)


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = _f(0.9998, ge=0, le=1)
    eval: bool = _f(False, doc="evaluate the EMA weights instead of the live ones")


@dataclass
class Config:
    seed: int = 0
    generations: int = _f(1, ge=1, doc="multi-generation self-distillation (Zhang & Sabuncu)")
    model: ModelConfig = field(default_factory=ModelConfig)
    exits: ExitsConfig = field(default_factory=ExitsConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)


# --------------------------------------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {sorted(f.name for f in dataclasses.fields(tp))}, "
                              f"got {value!r}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(key, value, a)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads '1e-6' (no dot) as a string: accept what float() accepts
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema bug


def _check_bounds(key: str, value: Any, meta: dict) -> None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if not math.isfinite(v):  # NaN passes every comparison below
            raise ConfigError(f"{key}: {v} is not a finite number")
        if meta.get("ge") is not None and v < meta["ge"]:
            raise ConfigError(f"{key}: {v} is out of range; must be >= {meta['ge']}")
        if meta.get("gt") is not None and v <= meta["gt"]:
            raise ConfigError(f"{key}: {v} is out of range; must be > {meta['gt']}")
        if meta.get("le") is not None and v > meta["le"]:
            raise ConfigError(f"{key}: {v} is out of range; must be <= {meta['le']}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        k = sorted(unknown)[0]
        raise ConfigError(f"unknown config key '{prefix}{k}'; allowed keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(prefix + name, value, hints[name])
        _check_bounds(prefix + name, kwargs[name], dict(fields[name].metadata))
    obj = cls(**kwargs)
    return obj


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def _merge(base: dict, path: list[str], value: Any) -> None:
    node = base
    for i, part in enumerate(path[:-1]):
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = node[part] = {} if nxt is None else nxt
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {'.'.join(path)}: '{'.'.join(path[:i + 1])}' is not a section")
        node = nxt
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """YAML file or shipped recipe (`find_config`; may name `base: other.yaml`, resolved relative to it) + dotted
    overrides -> validated Config."""
    if path is None:
        return config_from_dict({}, overrides)
    path = find_config(path)
    data = read_yaml(path)
    for key in flatten(data):
        refuse_old_key(key, str(path))
    return config_from_dict(data, overrides)


def refuse_repeated_keys(overrides: list[str]) -> None:
    """A key given twice on a command line: the earlier value would be lost without a word. (Programs that build
    overrides may layer them, the last one winning; the command line may not.)"""
    seen: dict[str, str] = {}
    for ov in overrides:
        key = ov.split("=", 1)[0].strip()
        if key in seen:
            raise ConfigError(f"{key}: given twice on the command line ({seen[key]!r} and {ov!r}); keep one")
        seen[key] = ov


def config_from_dict(data: dict, overrides: list[str] = ()) -> Config:
    """A plain nested dict (YAML, or a checkpoint's saved config) + dotted overrides -> validated Config."""
    data = migrate(copy.deepcopy(data))
    for ov in overrides:
        keys, value = _parse_override(ov)
        refuse_old_key(".".join(keys), "the command line")
        _merge(data, keys, value)
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that a single annotation cannot express; the config is left as it is. What each objective
    needs from the other sections is checked by engine.objectives.check_config."""
    allowed = ", ".join(map(str, EXIT_STAGES))
    for s in cfg.exits.stages:
        if s not in EXIT_STAGES:
            raise ConfigError(f"exits.stages: {s} is not allowed; allowed values: {allowed} (0-based backbone "
                              f"stages; the last stage, {EXIT_STAGES[-1] + 1}, ends in the backbone's own head, the "
                              "deepest exit)")
    if len(set(cfg.exits.stages)) != len(cfg.exits.stages):
        raise ConfigError(f"exits.stages: {cfg.exits.stages} has duplicates")
    n_shallow = len(cfg.exits.stages)
    b = cfg.objective.byot
    for name in ("ce_weights", "kd_weights", "hint_weights"):
        w = getattr(b, name)
        if w is not None and len(w) != n_shallow:
            raise ConfigError(f"objective.byot.{name}: needs {n_shallow} values (one per shallow exit), got {w}")
    for i in b.hint_exits or []:
        if not 0 <= i < n_shallow:
            raise ConfigError(f"objective.byot.hint_exits: {i} is out of range; allowed 0..{n_shallow - 1}")
    if cfg.model.depths is not None and (len(cfg.model.depths) != 4 or min(cfg.model.depths) < 1):
        raise ConfigError(f"model.depths: expected 4 positive ints, got {cfg.model.depths}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: expected 2 values in [0, 1), got {cfg.optim.betas}")
    if not 0 <= cfg.seed < 2 ** 63:
        raise ConfigError(f"seed: {cfg.seed} is out of range; allowed 0 .. 2^63 - 1")
    for m in cfg.schedule.milestones:
        if m < 0:
            raise ConfigError(f"schedule.milestones: {m} must be >= 0")
    for name in ("mean", "std"):
        v = getattr(cfg.data, name)
        if v is not None and len(v) != cfg.model.in_chans:
            raise ConfigError(f"data.{name}: needs {cfg.model.in_chans} values (model.in_chans), got {v}")
    if cfg.generations > 1 and cfg.objective.name not in ("ce", "sd_generation"):
        raise ConfigError(f"generations={cfg.generations}: generation 0 trains with 'ce' and later ones with "
                          f"'sd_generation'; set objective.name to one of them (got {cfg.objective.name!r})")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
