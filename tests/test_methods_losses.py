"""Every method's loss against (a) an independent NumPy float64 transcription of its formula, values and
finite-difference gradients, on small fixed tensors, and (b) values worked out by hand on 2 samples x 3 classes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.objectives.beta import beta_smoothing_terms
from engine.objectives.cskd import cskd_terms
from engine.objectives.dsn import dsn_terms
from engine.objectives.kd import generation_kd_terms, hinton_kd_terms
from engine.objectives.label_smoothing import (
    ls_all_classes_loss,
    ls_all_classes_target,
    ls_wrong_classes_loss,
    ls_wrong_classes_target,
)
from engine.objectives.max_entropy import entropy, max_entropy_terms
from engine.objectives.mixup import mix, mixup_ce

LN2, LN3 = math.log(2), math.log(3)
EPS = 1e-8  # the Beta code's log(p + 1e-8)


# ------------------------------------------------------------------------------------- NumPy float64 references


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_onehot(y, k):
    return np.eye(k)[y]


def np_ce(z, y):
    return -np_log_softmax(z)[np.arange(len(y)), y].mean()


def np_soft_ce_eps(z, t):
    return -(t * np.log(np_softmax(z) + EPS)).sum(-1).mean()


def np_ls_wrong(z, y, eps):
    k = z.shape[1]
    t = np_onehot(y, k) * (1 - eps) + (1 - np_onehot(y, k)) * eps / (k - 1)
    return np_soft_ce_eps(z, t)


def np_ls_all(z, y, eps):
    k = z.shape[1]
    t = np_onehot(y, k) * (1 - eps) + eps / k
    return -(t * np_log_softmax(z)).sum(-1).mean()


def np_entropy(z):
    p = np_softmax(z)
    return -(p * np.log(p)).sum(-1).mean()


def np_kl_t2(z, zt, T):
    """T^2 * mean_b KL(softmax(zt/T) || softmax(z/T))."""
    lq, lp = np_log_softmax(z / T), np_log_softmax(zt / T)
    return T * T * (np.exp(lp) * (lp - lq)).sum(-1).mean()


def np_beta(z, zt, y, alpha, draws):
    """Transcription of `soft_beta_loss`: sort the samples by teacher confidence, pair with sorted draws."""
    n, k = z.shape
    conf = np_softmax(zt)[np.arange(n), y]
    order = np.argsort(conf, kind="stable")
    b = np.empty(n)
    b[order] = np.sort(draws)
    t = np_onehot(y, k) * b[:, None] + (1 - np_onehot(y, k)) * ((1 - b) / (k - 1))[:, None]
    return (1 - alpha) * np_ce(z, y) + alpha * np_soft_ce_eps(z, t)


def np_generation(z, zt, y, alpha, T, scale_student, t_squared):
    target = np_softmax(zt / T)
    soft = np_soft_ce_eps(z / T if scale_student else z, target)
    return (1 - alpha) * np_ce(z, y) + alpha * soft * (T * T if t_squared else 1.0)


def num_grad(f, z, h=1e-6):
    g = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += h
        zm[idx] -= h
        g[idx] = (f(zp) - f(zm)) / (2 * h)
    return g


def check(torch_fn, np_fn, z_np, atol=1e-7):
    """Value and gradient of torch_fn(z) (float64) against np_fn(z) and its central differences."""
    z = torch.tensor(z_np, dtype=torch.float64, requires_grad=True)
    val = torch_fn(z)
    val.backward()
    assert val.item() == pytest.approx(np_fn(z_np), abs=atol, rel=1e-9)
    np.testing.assert_allclose(z.grad.numpy(), num_grad(np_fn, z_np), atol=1e-6, rtol=1e-5)


RNG = np.random.default_rng(1234)
Z = RNG.normal(size=(6, 5)) * 2.0
ZT = RNG.normal(size=(6, 5)) * 2.0
Y = np.array([0, 4, 2, 2, 1, 3])
YT = torch.tensor(Y)
ZT_T = torch.tensor(ZT, dtype=torch.float64)


# ------------------------------------------------------------------------------------- against NumPy


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.4])
def test_label_smoothing_both_conventions(eps):
    check(lambda z: ls_wrong_classes_loss(z, YT, eps), lambda z: np_ls_wrong(z, Y, eps), Z)
    check(lambda z: ls_all_classes_loss(z, YT, eps), lambda z: np_ls_all(z, Y, eps), Z)


def test_label_smoothing_targets_differ_exactly_as_named():
    y = torch.tensor([1])
    wrong = ls_wrong_classes_target(y, 4, 0.3, torch.float64)[0].tolist()
    allc = ls_all_classes_target(y, 4, 0.3, torch.float64)[0].tolist()
    assert wrong == pytest.approx([0.1, 0.7, 0.1, 0.1])  # eps/(K-1) on the 3 wrong classes
    assert allc == pytest.approx([0.075, 0.775, 0.075, 0.075])  # eps/K everywhere, true class included


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_max_entropy(beta):
    def fn(z):
        return sum(max_entropy_terms(z, YT, beta).values())

    check(fn, lambda z: np_ce(z, Y) - beta * np_entropy(z), Z)


def test_dsn_sums_ce_of_every_exit():
    z2 = RNG.normal(size=Z.shape)

    def fn(z):
        return sum(dsn_terms([z, torch.tensor(z2), z * 0.5], YT).values())

    check(fn, lambda z: np_ce(z, Y) + np_ce(z2, Y) + np_ce(z * 0.5, Y), Z)
    assert list(dsn_terms([ZT_T, ZT_T], YT)) == ["ce_0", "ce_1"]


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_cskd_class_wise_and_sample_wise(T):
    zv = RNG.normal(size=Z.shape) * 2

    def fn(z):
        return sum(cskd_terms([z], [ZT_T], YT, 1.5, T).values())

    check(fn, lambda z: np_ce(z, Y) + 1.5 * np_kl_t2(z, ZT, T), Z)

    def fn_e(z):
        return sum(cskd_terms([z], [ZT_T], YT, 1.5, T, view_logits=[torch.tensor(zv)]).values())

    check(fn_e, lambda z: np_ce(z, Y) + 1.5 * np_kl_t2(z, ZT, T) + 1.5 * np_kl_t2(z, zv, T), Z)


def test_cskd_every_exit_and_term_names():
    zs = [torch.tensor(Z), torch.tensor(Z * 0.3)]
    deep = cskd_terms(zs, [ZT_T, ZT_T], YT, 1.0, 4.0, "deepest")
    every = cskd_terms(zs, [ZT_T, ZT_T], YT, 1.0, 4.0, "all")
    assert list(deep) == ["ce", "cskd"]
    assert list(every) == ["ce_0", "cskd_0", "ce_1", "cskd_1"]
    assert every["cskd_0"].item() == pytest.approx(np_kl_t2(Z, ZT, 4.0), rel=1e-12)
    assert deep["cskd"].item() == pytest.approx(np_kl_t2(Z * 0.3, ZT, 4.0), rel=1e-12)
    assert list(cskd_terms(zs, [ZT_T, ZT_T], YT, 1.0, 4.0, "deepest", with_ce=False)) == ["cskd"]


def test_cskd_partner_gets_no_gradient():
    z = torch.tensor(Z, requires_grad=True)
    zp = torch.tensor(ZT, requires_grad=True)
    sum(cskd_terms([z], [zp], YT, 1.0, 4.0).values()).backward()
    assert zp.grad is None and z.grad is not None


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_beta_smoothing(alpha):
    draws = torch.tensor(np.sort(RNG.uniform(size=len(Y))), dtype=torch.float64)

    def fn(z):
        return sum(beta_smoothing_terms(z, ZT_T, YT, alpha, 3.0, draws=draws).values())

    check(fn, lambda z: np_beta(z, ZT, Y, alpha, draws.numpy()), Z)


@pytest.mark.parametrize("scale_student,t_squared", [(False, False), (True, True), (True, False)])
def test_generation_kd(scale_student, t_squared):
    def fn(z):
        return sum(generation_kd_terms(z, ZT_T, YT, 0.4, 4.0, scale_student, t_squared).values())

    check(fn, lambda z: np_generation(z, ZT, Y, 0.4, 4.0, scale_student, t_squared), Z)


def test_hinton_kd():
    def fn(z):
        return sum(hinton_kd_terms(z, ZT_T, YT, 0.9, 4.0).values())

    check(fn, lambda z: 0.1 * np_ce(z, Y) + 0.9 * np_kl_t2(z, ZT, 4.0), Z)


def test_mixup_ce_and_mixing():
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    lam = torch.tensor(0.3, dtype=torch.float64)
    check(lambda z: mixup_ce(z, YT, lam, perm), lambda z: 0.3 * np_ce(z, Y) + 0.7 * np_ce(z, Y[perm.numpy()]), Z)
    x = torch.tensor(RNG.normal(size=(6, 1, 2, 2)))
    np.testing.assert_allclose(mix(x, lam, perm).numpy(), 0.3 * x.numpy() + 0.7 * x.numpy()[perm.numpy()])


def test_half_precision_inputs_are_upcast():
    z16 = torch.tensor(Z, dtype=torch.bfloat16)
    terms = beta_smoothing_terms(z16, ZT_T.to(torch.bfloat16), YT, 0.6, 3.0)
    assert all(t.dtype == torch.float32 for t in terms.values())
    assert cskd_terms([z16], [z16], YT, 1.0, 4.0)["cskd"].dtype == torch.float32


# ------------------------------------------------------------------------------------- by hand, 2 samples x 3 classes
# Sample 1: z = [0, 0, 0], y = 0  -> p = (1/3, 1/3, 1/3).   Sample 2: z = [ln 2, 0, 0], y = 1 -> p = (1/2, 1/4, 1/4).

ZH = torch.tensor([[0.0, 0.0, 0.0], [LN2, 0.0, 0.0]], dtype=torch.float64)
YH = torch.tensor([0, 1])
CE_H = (LN3 + 2 * LN2) / 2  # (ln 3 + ln 4) / 2


def test_hand_label_smoothing():
    # wrong classes, eps 0.3: targets (.7, .15, .15) and (.15, .7, .15);
    #   sample 1 -> ln 3 (uniform p);  sample 2 -> .15 ln 2 + .85 ln 4 = 1.85 ln 2
    assert ls_wrong_classes_loss(ZH, YH, 0.3).item() == pytest.approx((LN3 + 1.85 * LN2) / 2, abs=1e-7)
    # all classes, eps 0.3: sample 2 target (.1, .8, .1) -> .1 ln 2 + .9 ln 4 = 1.9 ln 2
    assert ls_all_classes_loss(ZH, YH, 0.3).item() == pytest.approx((LN3 + 1.9 * LN2) / 2, abs=1e-12)


def test_hand_max_entropy():
    # H1 = ln 3; H2 = .5 ln 2 + 2 * .25 ln 4 = 1.5 ln 2
    assert entropy(ZH).item() == pytest.approx((LN3 + 1.5 * LN2) / 2, abs=1e-12)
    terms = max_entropy_terms(ZH, YH, 0.5)
    assert terms["ce"].item() == pytest.approx(CE_H, abs=1e-12)
    assert terms["entropy"].item() == pytest.approx(-0.5 * (LN3 + 1.5 * LN2) / 2, abs=1e-12)


def test_hand_cskd():
    # partners swap the two rows: KL(q||p) at T = 1
    #   sample 1: q = (1/2, 1/4, 1/4), p uniform -> .5 ln 1.5 + .5 ln .75 = .5 ln 1.125
    #   sample 2: q uniform, p = (1/2, 1/4, 1/4) -> (1/3)(ln(2/3) + 2 ln(4/3)) = (1/3) ln(32/27)
    zp = ZH.flip(0)
    kl = (0.5 * math.log(1.125) + math.log(32 / 27) / 3) / 2
    terms = cskd_terms([ZH], [zp], YH, 2.0, 1.0)
    assert terms["ce"].item() == pytest.approx(CE_H, abs=1e-12)
    assert terms["cskd"].item() == pytest.approx(2.0 * kl, abs=1e-12)
    # T = 2 halves every logit and multiplies by T^2 = 4: the same as T = 1 on ZH/2 times 4
    assert cskd_terms([ZH * 2], [zp * 2], YH, 1.0, 2.0)["cskd"].item() == pytest.approx(4 * kl, abs=1e-12)


def test_hand_beta_smoothing():
    # teacher: sample 1 confident on its class, sample 2 not -> sample 2 gets the smaller draw .6, sample 1 .9
    #   targets (.9, .05, .05) and (.2, .6, .2); sample 1 -> ln 3; sample 2 -> .2 ln 2 + .6 ln 4 + .2 ln 4 = 1.8 ln 2
    teacher = torch.tensor([[5.0, 0.0, 0.0], [3.0, 0.0, 0.0]], dtype=torch.float64)
    terms = beta_smoothing_terms(ZH, teacher, YH, 0.6, 3.0, draws=torch.tensor([0.6, 0.9], dtype=torch.float64))
    assert terms["ce"].item() == pytest.approx(0.4 * CE_H, abs=1e-12)
    assert terms["beta"].item() == pytest.approx(0.6 * (LN3 + 1.8 * LN2) / 2, abs=1e-7)


def test_hand_generation_kd():
    # T = 4, teacher logits 4·[ln 2, 0, 0] and 0 -> targets (1/2, 1/4, 1/4) and uniform; student not scaled:
    #   sample 1 (p uniform) -> ln 3; sample 2 (p = (1/2, 1/4, 1/4), uniform target) -> (1/3)(ln 2 + 2 ln 4) = 5/3 ln 2
    teacher = torch.tensor([[4 * LN2, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    terms = generation_kd_terms(ZH, teacher, YH, 0.4, 4.0)
    assert terms["ce"].item() == pytest.approx(0.6 * CE_H, abs=1e-12)
    assert terms["kd"].item() == pytest.approx(0.4 * (LN3 + 5 / 3 * LN2) / 2, abs=1e-7)
    assert generation_kd_terms(ZH, teacher, YH, 0.4, 4.0, t_squared=True)["kd"].item() == pytest.approx(
        16 * terms["kd"].item(), rel=1e-12)


def test_hand_hinton_kd():
    # T = 1, teacher = rows swapped: the CS-KD KL above; a = .5
    kl = (0.5 * math.log(1.125) + math.log(32 / 27) / 3) / 2
    terms = hinton_kd_terms(ZH, ZH.flip(0), YH, 0.5, 1.0)
    assert terms["ce"].item() == pytest.approx(0.5 * CE_H, abs=1e-12)
    assert terms["kd"].item() == pytest.approx(0.5 * kl, abs=1e-12)


def test_hand_dsn_and_mixup():
    assert sum(dsn_terms([ZH, ZH], YH).values()).item() == pytest.approx(2 * CE_H, abs=1e-12)
    # perm swaps the samples: y[perm] = (1, 0); CE to those: sample 1 -> ln 3, sample 2 -> ln 2
    lam = torch.tensor(0.7, dtype=torch.float64)
    val = mixup_ce(ZH, YH, lam, torch.tensor([1, 0])).item()
    assert val == pytest.approx(0.7 * CE_H + 0.3 * (LN3 + LN2) / 2, abs=1e-12)
