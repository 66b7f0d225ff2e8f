"""objective.backend=triton against objective.backend=torch for every objective routed through the fused kernel
(engine/objectives/base.py, TRITON_ROUTED): the same term names in the same order, the same values and the same
gradients w.r.t. the anchors' logits, fp32 to 1e-5, with logits of standard deviation 6 (confident rows, where
log(p + 1e-8) and the exact log-softmax part ways). On CPU the kernels run in the Triton interpreter
(tests/conftest.py). The student is a stub (one linear map per exit) so the logits are plain tensors of known
shape; the partner / EMA / frozen teachers are the objectives' own. Both backends take the same objective.log_eps:
the Beta-smoothing code's log(p + 1e-8) by default for beta, sd_generation and label smoothing's wrong_classes
convention."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from engine.checkpoint import atomic_save
from engine.config import ConfigError, to_dict
from engine.models import create_model
from engine.objectives import OBJECTIVES, TORCH_ONLY, TRITON_ROUTED, build_objective
from engine.objectives.functional import LOG_EPS
from engine.types import Batch, ExitOutputs
from tests.helpers import tiny_config

pytestmark = [pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning:triton.runtime.interpreter"),
              pytest.mark.usefixtures("one_thread")]

DEVICE = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")
B, C, D = 6, 5, 4
LABELS = torch.tensor([0, 1, 2, 3, 4, 0])


class Stub(nn.Module):
    """E exits: logits_e = x.flatten(1) @ W_e (no BN, so the partner forwards are plain), features relu(x @ V_e).
    x has 64 N(0, 1) entries, so 0.75 * N(0, 1) weights give logits of standard deviation 6."""

    def __init__(self, num_exits: int):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(num_exits, 64, C, generator=g) * 0.75)
        self.v = nn.Parameter(torch.randn(num_exits, 64, D, generator=g) * 0.5)
        self.seen: list[ExitOutputs] = []

    def forward(self, x):
        h = x.flatten(1)
        out = ExitOutputs([h @ w for w in self.w.unbind(0)], [(h @ v).relu() for v in self.v.unbind(0)])
        if torch.is_grad_enabled():  # the anchors' forward: keep its logits' gradients for the comparison
            for z in out.logits:
                z.retain_grad()
            self.seen.append(out)
        return out


class FixedTeacher:
    """Stands in for FrozenTeacher: confident, fixed logits (a random-init teacher is close to uniform)."""

    def __init__(self):
        self.logits = (torch.randn(B, C, generator=torch.Generator().manual_seed(5)) * 3).to(DEVICE)

    def __call__(self, images):
        return self.logits


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    cfg = tiny_config(tmp, "objective.name=ce", "model.num_classes=5", "exits.stages=[]")
    path = tmp / "teacher.pt"
    atomic_save({"config": to_dict(cfg), "model": create_model(cfg.model, cfg.exits).state_dict(),
                 "state": {"epoch": 1, "best_epoch": 1}}, path)
    return path


PAIR = ["data.sampler=class_pair"]
CSKD_E = [*PAIR, "data.extra_view=true", "objective.cskd.sample_wise=true", "objective.cskd.lam=0.7",
          "objective.cskd.temperature=3.0"]
# case -> (objective.name, overrides, number of exits)
CASES = {
    "cskd": ("cskd", PAIR, 1),
    "cskd_e_all": ("cskd", [*CSKD_E, "objective.cskd.exits=all"], 3),
    "cskd_e_deepest_frozen_bn": ("cskd", [*CSKD_E, "objective.cskd.partner_updates_bn=false"], 2),
    "byot_cskd": ("byot_cskd", [*CSKD_E, "objective.cskd.exits=all", "objective.byot.beta=0.01"], 3),
    "byot_cskd_deepest": ("byot_cskd", [*PAIR, "objective.byot.hint=l2", "objective.byot.beta=0.1"], 2),
    "beta": ("beta", ["objective.beta.alpha=0.4"], 1),
    "kd": ("kd", ["TEACHER", "objective.teacher.alpha=0.3", "objective.teacher.temperature=2.0"], 1),
    "sd_generation": ("sd_generation", ["TEACHER"], 1),
    "sd_generation_scaled": ("sd_generation", ["TEACHER", "objective.teacher.scale_student=true",
                                               "objective.teacher.t_squared=true"], 2),
    "label_smoothing_wrong": ("label_smoothing", ["objective.label_smoothing.convention=wrong_classes",
                                             "objective.label_smoothing.epsilon=0.2"], 1),
    "label_smoothing_all": ("label_smoothing", ["objective.label_smoothing.convention=all_classes",
                                           "objective.label_smoothing.epsilon=0.3"], 1),
    "label_smoothing_all_2_exits": ("label_smoothing", ["objective.label_smoothing.convention=all_classes"], 2),
    "dsn": ("dsn", [], 3),
    "ce": ("ce", [], 1),
    "mixup_cskd": ("mixup_cskd", [*PAIR, "objective.mixup.alpha=1.0"], 1),
}


def build(case: str, backend: str, tmp_path, ckpt, device: torch.device = DEVICE):
    name, over, num_exits = CASES[case]
    over = [o if o != "TEACHER" else f"objective.teacher.checkpoint={ckpt}" for o in over]
    stages = str(list(range(num_exits - 1)))
    cfg = tiny_config(tmp_path, f"objective.name={name}", f"objective.backend={backend}", "model.num_classes=5",
                      f"exits.stages={stages}", *over)
    obj = build_objective(cfg, num_exits, device)
    if hasattr(obj, "teacher") and not isinstance(obj.teacher, nn.Module):
        obj.teacher = FixedTeacher()
    return obj, Stub(num_exits).to(device)


def batch() -> Batch:
    g = torch.Generator().manual_seed(1)
    x, xp, xv = (torch.randn(B, 1, 8, 8, generator=g) for _ in range(3))
    return Batch(x, LABELS.clone(), {"partner": xp, "view": xv}).to(DEVICE)


def run(obj, model):
    torch.manual_seed(11)  # the same Beta draws / mixup l and permutation on both backends
    loss, _ = obj(model, batch())
    loss.total.backward()
    anchors = model.seen[-1]
    return loss, [z.grad for z in anchors.logits], [p.grad for p in model.parameters()]


@pytest.mark.parametrize("case", list(CASES))
def test_triton_backend_same_terms_values_gradients(case, tmp_path, teacher_ckpt):
    ref_obj, ref_model = build(case, "torch", tmp_path, teacher_ckpt)
    obj, model = build(case, "triton", tmp_path, teacher_ckpt)
    assert ref_obj.backend == "torch" and obj.backend == "triton"
    assert getattr(ref_obj, "log_eps", None) == getattr(obj, "log_eps", None)
    ref, ref_grads, ref_pgrads = run(ref_obj, ref_model)
    got, grads, pgrads = run(obj, model)
    assert list(got.terms) == list(ref.terms)
    for name, value in ref.terms.items():
        assert got.terms[name].dtype == torch.float32 and got.terms[name].shape == ()
        torch.testing.assert_close(got.terms[name], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(got.total, ref.total, rtol=1e-5, atol=1e-6)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        if r is None:
            assert g is None or not g.any(), f"exit {i}"
        else:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7, msg=lambda m: f"d logits[{i}]: {m}")
    for g, r in zip(pgrads, ref_pgrads):  # the gradients reach the student's parameters the same way
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_every_objective_has_a_documented_backend():
    assert set(TRITON_ROUTED) | set(TORCH_ONLY) == set(OBJECTIVES.names())
    assert not set(TRITON_ROUTED) & set(TORCH_ONLY)
    assert {CASES[c][0] for c in CASES} == set(TRITON_ROUTED) - {"byot"}  # byot: tests/test_kernels_objective.py


@pytest.mark.parametrize("case", ["label_smoothing_wrong", "beta", "sd_generation", "dsn", "cskd"])
def test_auto_is_the_unchanged_torch_path_on_cpu(case, tmp_path, teacher_ckpt):
    obj, _ = build(case, "auto", tmp_path, teacher_ckpt, torch.device("cpu"))
    assert obj.backend == "torch"
    assert getattr(obj, "log_eps", LOG_EPS) == LOG_EPS  # the official log(p + 1e-8) stays the CPU default


@pytest.mark.parametrize("case", ["label_smoothing_wrong", "beta", "sd_generation"])
def test_log_eps_switch_is_honoured_by_both_backends(case, tmp_path, teacher_ckpt):
    """log_eps=0 (exact log-softmax) and the official 1e-8 give different values at logit std 6, and each setting
    gives the same value on both backends."""
    values = {}
    for eps in ("0", "1e-8"):
        for backend in ("torch", "triton"):
            name, over, num_exits = CASES[case]
            CASES["_tmp"] = (name, [*over, f"objective.log_eps={eps}"], num_exits)
            try:
                obj, model = build("_tmp", backend, tmp_path, teacher_ckpt)
            finally:
                del CASES["_tmp"]
            assert obj.log_eps == float(eps)
            values[eps, backend] = run(obj, model)[0].total.detach()
        torch.testing.assert_close(values[eps, "triton"], values[eps, "torch"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(values["0", "torch"], values["1e-8", "torch"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("convention, official", [("wrong_classes", LOG_EPS), ("all_classes", 0.0)])
def test_label_smoothing_official_log_eps_follows_the_convention(convention, official, tmp_path):
    """The Beta-smoothing code's log(p + 1e-8) for its wrong_classes convention; PyTorch's exact one for all_classes."""
    cfg = tiny_config(tmp_path, "objective.name=label_smoothing", f"objective.label_smoothing.convention={convention}")
    assert build_objective(cfg, 4, torch.device("cpu")).log_eps == official


def test_log_eps_on_a_method_without_soft_targets_names_the_key(tmp_path):
    cfg = tiny_config(tmp_path, "objective.name=cskd", "objective.log_eps=1e-8", "data.sampler=class_pair")
    with pytest.raises(ConfigError, match="objective.log_eps"):
        build_objective(cfg, 1, DEVICE)
