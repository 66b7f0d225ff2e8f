"""Engine-level EMA (`ema.enabled`): the averaged weights against the recurrence computed by hand in float64 from
the live weights after every step; `ema.eval` evaluates them, including the EMA weights reloaded from best.pt."""
from __future__ import annotations

import pytest
import torch

from engine.checkpoint import model_from_checkpoint
from engine.evaluate import evaluate
from engine.setup_run import data_from_config
from engine.train import train
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = ("objective.name=ce", "exits.stages=[]", "data.limit_train=192", "data.val_split=100", "data.limit_eval=100",
        "logging.log_every=3")  # 3 steps per epoch


def test_ema_follows_the_recurrence(tmp_path, monkeypatch):
    import engine.train as engine_train

    decay = 0.6
    real, live = engine_train.train_step, []

    def probe(parts, settings, batch, step, window):
        if not live:
            live.append({k: v.clone() for k, v in parts.model.state_dict().items()})  # w0: the EMA's starting point
        out = real(parts, settings, batch, step, window)
        live.append({k: v.clone() for k, v in parts.model.state_dict().items()})
        return out

    monkeypatch.setattr(engine_train, "train_step", probe)
    train(tiny_config(tmp_path, *BASE, "schedule.epochs=1", "ema.enabled=true", f"ema.decay={decay}"), device="cpu")
    ema = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["ema"]
    assert len(live) == 4
    for key, got in ema.items():
        if not got.is_floating_point():  # num_batches_tracked is copied, not averaged
            assert torch.equal(got, live[-1][key]), key
            continue
        want = live[0][key].double()
        for w in live[1:]:
            want = decay * want + (1 - decay) * w[key].double()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6, msg=key)
    assert any(not torch.equal(ema[k], live[-1][k]) for k in ema if ema[k].is_floating_point())


def test_ema_eval_uses_the_ema_weights_of_last_and_best(tmp_path):
    cfg = tiny_config(tmp_path, *BASE, "schedule.epochs=2", "ema.enabled=true", "ema.decay=0.5", "ema.eval=true")
    summary = train(cfg, device="cpu")
    test = data_from_config(cfg, torch.device("cpu")).test
    for key, name in (("test_last", "last.pt"), ("test_best", "best.pt")):
        ck = torch.load(tmp_path / "run" / name, weights_only=False)
        ema, _ = model_from_checkpoint(ck, weights="ema")
        live, _ = model_from_checkpoint(ck, weights="model")
        want = evaluate(ema, test, torch.device("cpu"), n_bins=cfg.logging.ece_bins)["exit0"]
        other = evaluate(live, test, torch.device("cpu"), n_bins=cfg.logging.ece_bins)["exit0"]
        assert want["nll"] != pytest.approx(other["nll"], rel=1e-3)  # the two sets of weights are told apart
        assert summary[key]["exit0"]["nll"] == pytest.approx(want["nll"], rel=1e-6), key
        assert summary[key]["exit0"]["top1"] == want["top1"], key


def test_resumed_run_has_the_uninterrupted_runs_ema_bit_for_bit(tmp_path):
    """Stopped mid-epoch and resumed, the EMA weights in last.pt equal an uninterrupted run's exactly."""
    over = (*BASE, "ema.enabled=true", "ema.decay=0.7", "schedule.epochs=2")
    train(tiny_config(tmp_path / "a", *over), device="cpu")
    s = train(tiny_config(tmp_path / "b", *over), on_step=lambda step: step == 4, device="cpu")
    assert s["interrupted"] and s["step"] == 4
    train(tiny_config(tmp_path / "b", *over, "checkpoint.resume=auto"), device="cpu")
    ea, eb = (torch.load(d / "run" / "last.pt", weights_only=False)["ema"] for d in (tmp_path / "a", tmp_path / "b"))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    live = torch.load(tmp_path / "a" / "run" / "last.pt", weights_only=False)["model"]
    assert any(not torch.equal(ea[k], live[k]) for k in ea if ea[k].is_floating_point())  # a real average
