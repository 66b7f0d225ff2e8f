"""Beta smoothing: draws, confidence-ordered assignment, the EMA teacher's schedule and state, exact resume."""
from __future__ import annotations

import json

import pytest
import torch

from engine.models import create_model
from engine.objectives import build_objective
from engine.objectives.beta import assign_by_confidence, beta_targets, sample_beta_sorted
from engine.train import train
from engine.types import Batch
from tests.helpers import tiny_config


def test_assignment_is_monotone_in_confidence():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(257, generator=g, dtype=torch.float64)
    draws = sample_beta_sorted(257, 3.0, "cpu", generator=g, dtype=torch.float64)
    b = assign_by_confidence(conf, draws)
    order = conf.argsort()
    assert torch.equal(b[order], draws)  # k-th least confident gets the k-th smallest draw
    assert bool((b[order].diff() >= 0).all())
    assert sorted(b.tolist()) == draws.tolist()  # a permutation of the draws, nothing lost


@pytest.mark.parametrize("beta", [0.5, 3.0])
def test_draws_follow_beta_b_1(beta):
    n = 200_000
    g = torch.Generator().manual_seed(1)
    x = sample_beta_sorted(n, beta, "cpu", generator=g, dtype=torch.float64)
    assert bool((x.diff() >= 0).all()) and 0 <= x.min() and x.max() <= 1
    mean, var = beta / (beta + 1), beta / ((beta + 1) ** 2 * (beta + 2))
    assert x.mean().item() == pytest.approx(mean, abs=4 * (var / n) ** 0.5)
    for q in (0.2, 0.5, 0.9):  # the CDF of Beta(beta, 1) is q^beta
        assert (x <= q).double().mean().item() == pytest.approx(q**beta, abs=0.005)


def test_targets_rows():
    b = torch.tensor([0.9, 0.55], dtype=torch.float64)
    t = beta_targets(torch.tensor([2, 0]), 4, b)
    expected = torch.tensor([[0.1 / 3, 0.1 / 3, 0.9, 0.1 / 3], [0.55, 0.15, 0.15, 0.15]], dtype=torch.float64)
    torch.testing.assert_close(t, expected)
    assert t.sum(1).tolist() == pytest.approx([1.0, 1.0])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("beta"), "objective.name=beta", "exits.stages=[]")
    torch.manual_seed(0)
    model = create_model(cfg.model, cfg.exits)
    return cfg, model


def test_ema_teacher_is_own_init_and_leaves_global_rng_alone(setup):
    cfg, model = setup
    before = torch.get_rng_state()
    obj = build_objective(cfg, model.num_exits, torch.device("cpu"))
    assert torch.equal(before, torch.get_rng_state())
    again = build_objective(cfg, model.num_exits, torch.device("cpu"))
    ema_p = list(obj.ema.module.parameters())
    assert all(torch.equal(a, b) for a, b in zip(ema_p, again.ema.module.parameters()))  # seeded
    assert not all(torch.equal(a, b) for a, b in zip(ema_p, model.parameters()))  # like the official ema_model
    assert not any(p.requires_grad for p in ema_p)


def test_ema_decay_schedule_and_params_only_update(setup):
    cfg, model = setup
    obj = build_objective(cfg, model.num_exits, torch.device("cpu"))
    # decay after 0-based optimizer step s is min(1 - 1/(g+1), 0.999) with the official global_step g = s + 1
    for s in (0, 1, 2, 9, 997, 998, 5000):
        assert obj.decay_at(s) == pytest.approx(min(1 - 1 / (s + 2), 0.999))
    assert obj.decay_at(0) == 0.5
    old = [p.clone() for p in obj.ema.module.parameters()]
    old_buf = [b.clone() for b in obj.ema.module.buffers()]
    obj.after_step(model, 2)  # decay 1 - 1/4 = 0.75
    for o, e, m in zip(old, obj.ema.module.parameters(), model.parameters()):
        torch.testing.assert_close(e, 0.75 * o + 0.25 * m.detach())
    assert all(torch.equal(a, b) for a, b in zip(old_buf, obj.ema.module.buffers()))  # BN buffers not averaged


def test_forward_uses_batch_statistics_teacher_and_checkpoints_it(setup):
    cfg, model = setup
    obj = build_objective(cfg, model.num_exits, torch.device("cpu"))
    obj.ema.module.eval()  # e.g. after someone called .eval() on the objective
    x = torch.randn(8, 1, 8, 8)
    y = torch.arange(8) % 10
    loss, out = obj(model, Batch(x, y))
    assert obj.ema.module.training  # official: ema_model.train()
    assert list(loss.terms) == ["ce", "beta"]
    assert loss.total.requires_grad and out.logits[-1].shape == (8, 10)
    sd = obj.state_dict()
    assert any(k.startswith("ema.module.") for k in sd)
    fresh = build_objective(cfg, model.num_exits, torch.device("cpu"))
    fresh.after_step(model, 0)  # now differs from obj's EMA
    fresh.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(fresh.ema.module.parameters(), obj.ema.module.parameters()))


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["beta"]) for r in rows if r["kind"] == "train"}


def test_interrupted_beta_run_resumes_exactly(tmp_path):
    over = ["objective.name=beta", "data.limit_train=256", "exits.stages=[]"]
    full = train(tiny_config(tmp_path / "a", *over), device="cpu")
    assert "test_best" in full and "test_last" in full
    part = train(tiny_config(tmp_path / "b", *over), on_step=lambda s: s == 6, device="cpu")
    assert part["interrupted"]
    train(tiny_config(tmp_path / "b", *over, "checkpoint.resume=auto"), device="cpu")
    a, b = _losses(tmp_path / "a" / "run"), _losses(tmp_path / "b" / "run")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:  # the EMA teacher and the Beta draws continue exactly
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
