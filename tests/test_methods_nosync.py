"""No host read inside a step: every method's forward, loss and after_step run with every Python-level way of
reading a tensor back to the host (.item, .tolist, .cpu, .numpy, bool/float/int) made to raise."""
from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch

from engine.checkpoint import atomic_save
from engine.config import to_dict
from engine.models import create_model
from engine.objectives import build_objective
from engine.types import Batch
from tests.helpers import tiny_config

# masked-off lanes of the Triton interpreter compute inf - inf (the *_triton cases); harmless
pytestmark = [pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning:triton.runtime.interpreter"),
              pytest.mark.usefixtures("one_thread")]

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextmanager
def no_host_reads(monkeypatch):
    def refuse(name):
        def f(*a, **k):
            raise AssertionError(f"host read Tensor.{name} inside the step")
        return f

    with monkeypatch.context() as m:
        for name in HOST_READS:
            m.setattr(torch.Tensor, name, refuse(name))
        yield


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    cfg = tiny_config(tmp, "objective.name=ce", "model.name=resnet34", "exits.stages=[]")
    model = create_model(cfg.model, cfg.exits)
    path = tmp / "teacher.pt"
    atomic_save({"config": to_dict(cfg), "model": model.state_dict(), "state": {"epoch": 1, "best_epoch": 1}}, path)
    return path


CASES = {
    "cskd": ["data.sampler=class_pair"],
    "cskd_e_all_frozen_bn": ["objective.name=cskd", "data.sampler=class_pair", "data.extra_view=true",
                             "objective.cskd.sample_wise=true", "objective.cskd.exits=all",
                             "objective.cskd.partner_updates_bn=false"],
    "byot_cskd": ["data.sampler=class_pair", "objective.backend=torch"],
    "beta": [],
    "label_smoothing_wrong": ["objective.name=label_smoothing", "objective.label_smoothing.convention=wrong_classes"],
    "label_smoothing_all": ["objective.name=label_smoothing", "objective.label_smoothing.convention=all_classes"],
    "max_entropy": [],
    "dsn": [],
    "mixup": ["objective.mixup.alpha=1.0"],
    "mixup_cskd": ["objective.mixup.alpha=1.0", "data.sampler=class_pair"],
    "kd": ["TEACHER"],
    "sd_generation": ["TEACHER"],
}
# the same steps through the fused kernel (objective.backend=triton; the Triton interpreter on CPU)
TRITON = ["objective.backend=triton"]
CASES.update({
    "cskd_e_all_triton": [*CASES["cskd_e_all_frozen_bn"], *TRITON],
    "byot_cskd_triton": ["objective.name=byot_cskd", "data.sampler=class_pair", *TRITON],
    "beta_triton": ["objective.name=beta", *TRITON],
    "label_smoothing_wrong_triton": [*CASES["label_smoothing_wrong"], *TRITON],
    "dsn_triton": ["objective.name=dsn", *TRITON],
    "mixup_cskd_triton": ["objective.name=mixup_cskd", "objective.mixup.alpha=1.0", "data.sampler=class_pair",
                          *TRITON],
    "kd_triton": ["objective.name=kd", "TEACHER", *TRITON],
    "sd_generation_triton": ["objective.name=sd_generation", "TEACHER", *TRITON],
})


@pytest.mark.parametrize("case", list(CASES))
def test_step_has_no_host_read(tmp_path, monkeypatch, teacher_ckpt, case):
    over = [o if o != "TEACHER" else f"objective.teacher.checkpoint={teacher_ckpt}" for o in CASES[case]]
    if not any(o.startswith("objective.name=") for o in over):
        over.append(f"objective.name={case}")
    cfg = tiny_config(tmp_path, *over)
    # the Triton cases run on CUDA where there is one (CPU tensors only work in the interpreter, tests/conftest.py)
    cuda = case.endswith("_triton") and os.environ.get("TRITON_INTERPRET") != "1"
    device = torch.device("cuda" if cuda else "cpu")
    model = create_model(cfg.model, cfg.exits).train().to(device)
    obj = build_objective(cfg, model.num_exits, device)
    x = torch.randn(6, 1, 8, 8)
    batch = Batch(x, torch.tensor([0, 1, 2, 0, 1, 2]), {"partner": x.flip(0), "view": x + 0.1}).to(device)
    if obj.kernel_checks is not None:  # the fused call's check at first use reads its verdict once per plan
        obj(model, batch)
        assert obj.kernel_checks and all(c["ok"] for c in obj.kernel_checks), obj.kernel_checks
    with no_host_reads(monkeypatch):
        loss, out = obj(model, batch)
        loss.total.backward()
        obj.after_step(model, 0)
    assert torch.isfinite(loss.total).all()
    assert set(loss.terms) and out.logits[-1].shape == (6, 10)
