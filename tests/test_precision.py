"""Mixed precision through the engine against PyTorch's AMP recipe written out by hand, the GradScaler's state
across a resume, and gradient clipping after unscaling (checked against the hand-computed step length)."""
from __future__ import annotations

import pytest
import torch

from engine.models import create_model
from engine.objectives import build_objective
from engine.optim import build_optimizer, lr_at, set_lr
from engine.setup_run import data_from_config, seed_everything
from engine.train import train
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

# 4 steps per epoch of plain CE on the backbone; no validation pass needed.
BASE = ("objective.name=ce", "exits.stages=[]", "data.limit_train=256", "data.val_split=0", "data.limit_eval=64",
        "schedule.epochs=2", "logging.log_every=2")
DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def by_hand(cfg, steps: int) -> tuple[torch.nn.Module, torch.amp.GradScaler]:
    """The AMP recipe of the PyTorch docs ("Working with unscaled gradients"), independent of engine.train."""
    seed_everything(cfg.seed)
    dev = torch.device("cpu")
    data = data_from_config(cfg, dev)
    model = create_model(cfg.model, cfg.exits).train()
    objective = build_objective(cfg, model.num_exits, dev)
    opt = build_optimizer(model, cfg, dev)
    scaler = torch.amp.GradScaler("cpu", enabled=cfg.precision.amp == "fp16")
    per_epoch, step = len(data.train), 0
    for epoch in range(cfg.schedule.epochs):
        data.train.set_epoch(epoch)
        for batch in data.train:
            if step == steps:
                return model, scaler
            set_lr(opt, lr_at(step, per_epoch, cfg.optim.lr, cfg.schedule))
            with torch.autocast("cpu", dtype=DTYPE.get(cfg.precision.amp, torch.float32),
                                enabled=cfg.precision.amp != "fp32"):
                loss = objective(model, batch)[0].total
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if cfg.optim.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
            scaler.step(opt)
            scaler.update()
            step += 1
    return model, scaler


def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["model"]


def _assert_recipe(got: dict, cfg, tmp_path) -> torch.amp.GradScaler:
    ref, scaler = by_hand(cfg, 8)
    fp32, _ = by_hand(tiny_config(tmp_path / "fp32", *BASE), 8)
    gap = max((p - q).abs().max().item() for p, q in zip(ref.state_dict().values(), fp32.state_dict().values())
              if p.is_floating_point())
    assert gap > 1e-4  # the recipe's weights tell autocast from fp32 ...
    for k, v in ref.state_dict().items():  # ... and the engine's are the recipe's
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
    return scaler


def test_bf16_autocast_matches_the_recipe(tmp_path):
    cfg = tiny_config(tmp_path, *BASE, "precision.amp=bf16")
    train(cfg, device="cpu")
    _assert_recipe(torch.load(tmp_path / "run" / "last.pt", weights_only=False)["model"], cfg, tmp_path)


def test_fp16_with_grad_scaler_matches_the_recipe_across_a_resume(tmp_path):
    full = tiny_config(tmp_path / "a", *BASE, "precision.amp=fp16")
    train(full, device="cpu")
    a = torch.load(tmp_path / "a" / "run" / "last.pt", weights_only=False)
    scaler = _assert_recipe(a["model"], full, tmp_path)
    assert a["scaler"] == scaler.state_dict()
    part = tiny_config(tmp_path / "b", *BASE, "precision.amp=fp16")
    assert train(part, on_step=lambda s: s == 3, device="cpu")["interrupted"]
    train(tiny_config(tmp_path / "b", *BASE, "precision.amp=fp16", "checkpoint.resume=auto"), device="cpu")
    b = torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=False)
    # The growth tracker counts the steps since the last overflow (8 here): a scaler restarted at the resume has 5.
    assert b["scaler"] == a["scaler"] and a["scaler"]["_growth_tracker"] > 0
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_clipping_sees_unscaled_gradients(tmp_path, monkeypatch):
    """SGD without momentum or decay moves the weights by exactly lr * clip when the gradient norm exceeds `clip`;
    clipping the scaled gradients (65536x larger) would move them 65536x less."""
    import engine.train as engine_train

    lr, clip = 0.1, 1e-3
    real, seen = engine_train.train_step, []

    def probe(parts, settings, batch, step, window):
        flat = lambda: torch.cat([p.detach().flatten() for p in parts.model.parameters()]).clone()  # noqa: E731
        before, scale = flat(), parts.scaler.get_scale()
        out = real(parts, settings, batch, step, window)
        seen.append(((flat() - before).double().norm().item(), scale, parts.scaler.get_scale(), out[1].item()))
        return out

    monkeypatch.setattr(engine_train, "train_step", probe)
    train(tiny_config(tmp_path, *BASE, "precision.amp=fp16", f"optim.lr={lr}", f"optim.clip_grad_norm={clip}",
                      "optim.momentum=0", "optim.weight_decay=0", "schedule.epochs=1"), device="cpu")
    assert len(seen) == 4
    taken = 0
    for moved, scale, next_scale, grad_norm in seen:
        if next_scale < scale:  # an overflow: the scaler skipped this step and halved its scale
            assert moved == 0 and next_scale == scale / 2
        else:
            assert grad_norm > clip and moved == pytest.approx(lr * clip, rel=1e-3)
            taken += 1
    assert taken >= 2
