"""BYOT terms against an independent NumPy float64 transcription of each reference formula."""
import math

import numpy as np
import pytest
import torch

from engine.config import load_config
from engine.objectives.byot import ByotWeights, byot_terms
from engine.objectives.functional import hint_loss, kd_loss


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kd(s, t, T, kind, t2):
    lq, lp = np_log_softmax(s / T), np_log_softmax(t / T)
    p = np.exp(lp)
    rows = (p * (lp - lq)).sum(-1) if kind == "kl" else -(p * lq).sum(-1)
    return rows.mean() * (T * T if t2 else 1.0)


def np_hint(f, g, kind):
    if kind == "sse":
        return (((f - g) ** 2) * ((f > 0) | (g > 0))).sum()
    if kind == "l2":
        return math.sqrt(((f - g) ** 2).sum())
    return ((f - g) ** 2).mean()


def np_ce(z, y):
    return -np_log_softmax(z)[np.arange(len(y)), y].mean()


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, 7, generator=g, dtype=torch.float64) * 3 for _ in range(4)]
    feats = [torch.randn(5, 6, generator=g, dtype=torch.float64).relu() for _ in range(4)]
    y = torch.randint(0, 7, (5,), generator=g)
    return logits, feats, y


@pytest.mark.parametrize("kind", ["kl", "soft_ce"])
@pytest.mark.parametrize("t2", [True, False])
def test_kd_matches_formula(tensors, kind, t2):
    (s, *_, t), _, _ = tensors
    got = kd_loss(s, t, 3.0, kind, t2)
    assert got.item() == pytest.approx(np_kd(s.numpy(), t.numpy(), 3.0, kind, t2), rel=1e-6)


@pytest.mark.parametrize("kind", ["sse", "l2", "mse"])
def test_hint_matches_formula(tensors, kind):
    _, (f, *_, g), _ = tensors
    f = f - 0.2  # some negatives so the sse mask matters
    assert hint_loss(f, g, kind).item() == pytest.approx(np_hint(f.numpy(), g.numpy(), kind), rel=1e-6)


@pytest.mark.parametrize("variant", [
    [],  # ICCV defaults
    ["objective.byot.kd=soft_ce", "objective.byot.t_squared=false", "objective.byot.hint=l2",
     "objective.byot.hint_exits=[0,1]", "objective.byot.ce_weights=[0.7,0.7,0.7]", "objective.byot.deepest_ce_weight=1",
     "objective.byot.kd_weights=[0.3,0.3,0.3]", "objective.byot.beta=0.03"],  # journal code
    ["objective.byot.hint=mse", "objective.byot.alpha=0.5", "objective.byot.temperature=4"],
    ["objective.byot.hint=none"],
])
def test_total_matches_formula(tensors, variant):
    logits, feats, y = tensors
    b = load_config(None, variant).objective.byot
    w = ByotWeights.from_config(b, 4)
    terms = byot_terms(logits, feats, y, w, b.temperature, b.kd, b.t_squared, b.hint)
    L, F, Y = [z.numpy() for z in logits], [f.numpy() for f in feats], y.numpy()
    hint_on = set(range(3)) if b.hint_exits is None else set(b.hint_exits)
    expected = (b.deepest_ce_weight if b.deepest_ce_weight is not None else 1 - b.alpha) * np_ce(L[3], Y)
    for i in range(3):
        expected += (b.ce_weights[i] if b.ce_weights else 1 - b.alpha) * np_ce(L[i], Y)
        expected += (b.kd_weights[i] if b.kd_weights else b.alpha) * np_kd(L[i], L[3], b.temperature, b.kd,
                                                                           b.t_squared)
        if b.hint != "none" and i in hint_on:
            expected += b.beta * np_hint(F[i], F[3], b.hint)
    assert sum(t.item() for t in terms.values()) == pytest.approx(expected, rel=1e-9)
    assert ("hint_2" in terms) == (b.hint != "none" and 2 in hint_on)


def test_hand_computed_two_samples_three_classes():
    # Uniform logits: CE = log 3 per exit; identical exits: KD = 0 (KL) and = log 3 * T^2 (soft-CE).
    z = torch.zeros(2, 3, dtype=torch.float64)
    assert kd_loss(z, z, 3.0, "kl").item() == pytest.approx(0.0, abs=1e-12)
    assert kd_loss(z, z, 3.0, "soft_ce").item() == pytest.approx(9 * math.log(3))
    # One-hot-ish teacher with T = 1: KL = sum_c p_c log(p_c/q_c), worked by hand for p = softmax([ln 2, 0, 0]).
    t = torch.tensor([[math.log(2), 0.0, 0.0]] * 2, dtype=torch.float64)  # p = (1/2, 1/4, 1/4)
    expected = 0.5 * math.log(0.5 * 3) + 2 * 0.25 * math.log(0.25 * 3)  # q uniform
    assert kd_loss(z, t, 1.0, "kl", t_squared=False).item() == pytest.approx(expected)
    # Hints on 2 samples x 2 dims by hand.
    f = torch.tensor([[1.0, 0.0], [2.0, -1.0]], dtype=torch.float64)
    g = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    assert hint_loss(f, g, "sse").item() == pytest.approx(1 + 1)  # the (-1 vs 0) entry is masked out
    assert hint_loss(f, g, "l2").item() == pytest.approx(math.sqrt(3))
    assert hint_loss(f, g, "mse").item() == pytest.approx(3 / 4)


def test_teacher_is_detached(tensors):
    logits, feats, y = tensors
    logits = [z.clone().requires_grad_() for z in logits]
    feats = [f.clone().requires_grad_() for f in feats]
    b = load_config(None, ["objective.byot.alpha=1.0", "objective.byot.deepest_ce_weight=0"]).objective.byot
    terms = byot_terms(logits, feats, y, ByotWeights.from_config(b, 4), 3.0, "kl", True, "mse")
    sum(terms.values()).backward()
    assert logits[-1].grad is None or logits[-1].grad.abs().max() == 0  # only KD/hint reach it, and they detach
    assert feats[-1].grad is None or feats[-1].grad.abs().max() == 0
    assert logits[0].grad.abs().max() > 0 and feats[0].grad.abs().max() > 0


@pytest.mark.parametrize("hint", ["l2", "mse", "sse"])
def test_gradcheck(tensors, hint):
    logits, feats, y = tensors
    b = load_config(None, [f"objective.byot.hint={hint}", "objective.byot.beta=0.5"]).objective.byot
    w = ByotWeights.from_config(b, 4)
    feats = [f + 0.1 for f in feats]  # away from the sse mask's kink at 0

    # The deepest exit's logits and features are the (detached) teacher: finite differences would see through the
    # detach, so they stay constants here and only the students are checked.
    def fn(*xs):
        return sum(byot_terms(list(xs[:3]) + logits[3:], list(xs[3:]) + feats[3:], y, w, 3.0, "kl", True,
                              hint).values())

    inputs = [t.clone().requires_grad_() for t in logits[:3] + feats[:3]]
    assert torch.autograd.gradcheck(fn, inputs)
