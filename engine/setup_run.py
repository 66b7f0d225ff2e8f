"""Everything the loop needs, built from the config: device, data, model, objective, optimizer, EMA, scaler."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from engine.config import Config, ConfigError
from engine.distributed import DistInfo, init_distributed
from engine.ema import ModelEMA
from engine.models import MultiExitModel, create_model
from engine.objectives import Objective, build_objective
from engine.optim import build_optimizer
from engine.precision import grad_scaler, training_module
from engine.step import StepParts
from pipelines.base import DataBundle
from pipelines.factory import build_data


@dataclass
class Components:
    info: DistInfo
    data: DataBundle
    model: MultiExitModel  # the bare model (checkpoints, eval); `train_model` is what the step calls
    train_model: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: Optional[ModelEMA]

    @property
    def step_parts(self) -> StepParts:
        return StepParts(self.model, self.train_model, self.objective, self.optimizer, self.scaler, self.ema)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def data_from_config(cfg: Config, device: torch.device, rank: int = 0, world: int = 1) -> DataBundle:
    """The run's loaders: the `data.*` options, plus the few other keys the data layer needs, passed explicitly."""
    return build_data(cfg.data, device, rank, world, seed=cfg.seed, num_classes=cfg.model.num_classes,
                      in_chans=cfg.model.in_chans, channels_last=cfg.precision.channels_last, amp=cfg.precision.amp,
                      allow_self_partner=cfg.objective.cskd.allow_self_partner)


def check_data_matches(cfg: Config, data: DataBundle) -> None:
    if cfg.model.num_classes != data.num_classes:
        raise ConfigError(f"model.num_classes: {cfg.model.num_classes} but the dataset has {data.num_classes} classes;"
                          f" set model.num_classes={data.num_classes}")
    if cfg.model.in_chans != data.in_chans:
        raise ConfigError(f"model.in_chans: {cfg.model.in_chans} but the images have {data.in_chans} channels; "
                          f"set model.in_chans={data.in_chans}")


def build_components(cfg: Config, device: str | None = None) -> Components:
    info = init_distributed(cfg.distributed.backend, device, cfg.distributed.timeout_s)
    if cfg.precision.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not cfg.precision.deterministic
    seed_everything(cfg.seed)  # same seed on every rank: identical initial weights (DDP also broadcasts them)
    data = data_from_config(cfg, info.device, info.rank, info.world)
    check_data_matches(cfg, data)
    mf = torch.channels_last if cfg.precision.channels_last else torch.contiguous_format
    model = create_model(cfg.model, cfg.exits)
    if info.enabled and cfg.distributed.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # before the optimizer sees the parameters
    model = model.to(info.device, memory_format=mf)
    objective = build_objective(cfg, model.num_exits, info.device).to(info.device)
    ema = ModelEMA(model, cfg.ema.decay) if cfg.ema.enabled else None
    optimizer = build_optimizer(model, cfg, info.device)
    scaler = grad_scaler(info.device, cfg.precision.amp)
    train_model = training_module(model, info, cfg.precision, cfg.distributed.find_unused_parameters)
    return Components(info, data, model, train_model, objective, optimizer, scaler, ema)
