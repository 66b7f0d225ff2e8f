"""2-process DDP (gloo, CPU) against a single process stepping on the same global batch.

BatchNorm normalises per process under DDP (SyncBatchNorm needs a GPU), so the single-process reference
forwards each rank's half separately and averages the gradients: exactly the arithmetic DDP performs.
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from engine.checkpoint import load_checkpoint
from engine.models import create_model
from engine.objectives import build_objective
from engine.optim import build_optimizer, lr_at, set_lr
from engine.setup_run import seed_everything
from pipelines.factory import build_data
from tests.helpers import tiny_config

OVERRIDES = ("schedule.epochs=1", "data.limit_train=256", "data.batch_size=32", "data.val_split=0",
             "optim.lr=0.05", "logging.log_every=2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, tmp: str, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pathlib import Path

    from engine.train import train
    train(tiny_config(Path(tmp), *OVERRIDES), device="cpu")


def _reference(tmp) -> dict[str, torch.Tensor]:
    cfg = tiny_config(tmp / "ref", *OVERRIDES)
    seed_everything(cfg.seed)
    dev = torch.device("cpu")
    halves = [build_data(cfg, dev, rank, 2).train for rank in (0, 1)]
    model = create_model(cfg.model, cfg.exits)
    objective = build_objective(cfg, model.num_exits, dev)
    opt = build_optimizer(model, cfg, dev)
    steps = len(halves[0])
    for step, batches in enumerate(zip(*halves)):
        set_lr(opt, lr_at(step, steps, cfg.optim.lr, cfg.schedule))
        opt.zero_grad(set_to_none=True)
        for b in batches:
            loss, _ = objective(model, b)
            (loss.total / 2).backward()
        opt.step()
    return {k: v for k, v in model.named_parameters()}


@pytest.mark.timeout(600)
def test_ddp_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path), _free_port()), nprocs=2, join=True)
    ddp = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    ref = _reference(tmp_path)
    assert ref.keys() <= ddp.keys()
    for name, p in ref.items():
        torch.testing.assert_close(ddp[name], p.detach(), rtol=1e-4, atol=1e-5, msg=name)
    cfg = tiny_config(tmp_path / "init", *OVERRIDES)
    seed_everything(cfg.seed)
    init = dict(create_model(cfg.model, cfg.exits).named_parameters())
    assert max((init[n] - p).abs().max().item() for n, p in ref.items()) > 1e-3  # training moved the weights


def test_ddp_wraps_the_model_before_compile(tmp_path, monkeypatch):
    """torch.compile(DDP(model)), never DDP(torch.compile(model)); `model` stays the bare module."""
    from torch import nn

    import engine.distributed
    from engine.setup_run import build_components

    class Tag(nn.Module):
        def __init__(self, kind: str, inner: nn.Module):
            super().__init__()
            self.kind, self.inner = kind, inner

    monkeypatch.setattr(engine.distributed, "wrap_ddp", lambda m, info, find_unused: Tag("ddp", m))
    monkeypatch.setattr(torch, "compile", lambda m, mode=None: Tag("compile", m))
    c = build_components(tiny_config(tmp_path, *OVERRIDES, "precision.compile=true"), "cpu")
    assert c.train_model.kind == "compile" and c.train_model.inner.kind == "ddp"
    assert c.train_model.inner.inner is c.model and not isinstance(c.model, Tag)
