"""The fused loss's check at first use (engine/objectives/self_check.py), with a wrong kernel result injected: auto
falls back to PyTorch for that plan, an explicit triton stops, DDP ranks agree; a right kernel keeps its 3 launches."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import engine.objectives.fused as fused_mod
from bench.host_overhead import byot_step, count
from engine.config import ConfigError, load_config
from engine.objectives import build_objective
from engine.objectives.base import objective_class
from engine.objectives.self_check import SelfCheckedCall, arm
from engine.types import Batch, ExitOutputs
from tests.helpers import tiny_config

pytestmark = [pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning:triton.runtime.interpreter"),
              pytest.mark.usefixtures("one_thread")]
# with a GPU (and no interpreter) the compiled kernels are checked; the DDP test stays on CPU (gloo)
DEVICE = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")
CPU = torch.device("cpu")


def wrong_kernel(monkeypatch, factor: float = 1.01):
    """Every fused result 1 % off (terms and, through the total, the gradients): a kernel that is silently wrong."""
    real = fused_mod.fused_loss

    def off(*args, **kwargs):
        total, losses = real(*args, **kwargs)
        return total * factor, losses * factor
    monkeypatch.setattr(fused_mod, "fused_loss", off)


def _inputs(B=6, C=5, D=4, E=3, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    logits = [(torch.randn(B, C, generator=g) * 2).to(device).requires_grad_() for _ in range(E)]
    feats = [torch.randn(B, D, generator=g).relu().to(device).requires_grad_() for _ in range(E)]
    return ExitOutputs(logits, feats), Batch(torch.empty(0), torch.randint(0, C, (B,), generator=g).to(device))


def _byot(backend_seen_by_check: str, device=DEVICE):
    cfg = load_config(None, ["objective.backend=triton", "objective.self_check=false"])
    obj = objective_class(cfg)(cfg, num_exits=3, device=device)  # the fused call, as on CUDA
    report = arm(obj, backend_seen_by_check, True)
    return obj, report


def test_auto_falls_back_for_that_plan_and_says_so(monkeypatch, capsys):
    wrong_kernel(monkeypatch)
    obj, report = _byot("auto")
    out, batch = _inputs()
    loss = obj.loss(out, batch)
    ref_total, ref_terms = obj.torch_terms(out.logits, batch.labels, out.features)
    assert torch.equal(loss.total, ref_total) and loss.terms.keys() == ref_terms.keys()  # PyTorch's result
    line = capsys.readouterr().out.strip()
    assert line.startswith("objective.backend=auto: the fused BYOT loss disagrees with PyTorch on 6 float inputs")
    assert "off by" in line and "tolerance" in line and line.endswith("PyTorch computes this plan from now on")
    assert len(report) == 1 and not report[0]["ok"] and report[0]["backend"] == "torch"
    assert report[0]["error"] > report[0]["tolerance"] > 0
    obj.loss(out, batch)  # the verdict is kept: no second check, no second line
    assert len(report) == 1 and capsys.readouterr().out == ""
    monkeypatch.undo()  # a right kernel: a new plan (another batch size) gets its own check and passes
    out2, batch2 = _inputs(B=7)
    total2 = obj.loss(out2, batch2).total
    assert [e["ok"] for e in report] == [False, True]
    torch.testing.assert_close(total2, obj.torch_terms(out2.logits, batch2.labels, out2.features)[0], rtol=1e-5,
                               atol=1e-6)


def test_explicit_triton_stops_with_one_clear_error(monkeypatch):
    wrong_kernel(monkeypatch)
    obj, _ = _byot("triton")
    out, batch = _inputs()
    with pytest.raises(ConfigError, match=r"^objective.backend=triton: the fused BYOT loss disagrees .* use "
                                          r"objective.backend=auto or torch$"):
        obj.loss(out, batch)


def test_small_errors_pass_and_the_check_bites_at_its_tolerance(monkeypatch):
    """1e-5 relative (fp32 rounding noise, well inside the term tolerance) passes; 1e-2 fails."""
    for factor, ok in ((1 + 1e-5, True), (1 + 1e-2, False)):
        monkeypatch.undo()
        wrong_kernel(monkeypatch, factor)
        obj, report = _byot("auto")
        obj.loss(*_inputs())
        assert report[0]["ok"] is ok, (factor, report)


def test_every_routed_objective_is_armed_and_passes_with_the_real_kernel(tmp_path):
    for name, extra in (("byot", []), ("dsn", []), ("ce", ["exits.stages=[]"]),
                        ("label_smoothing", ["exits.stages=[]"])):
        cfg = tiny_config(tmp_path, f"objective.name={name}", "objective.backend=triton", *extra)
        obj = build_objective(cfg, 1 + len(cfg.exits.stages), DEVICE)
        assert isinstance(obj.compute, SelfCheckedCall) and obj.kernel_checks == [], name
        out, batch = _inputs(E=1 + len(cfg.exits.stages), C=10)
        obj.loss(out, batch)
        assert [e["ok"] for e in obj.kernel_checks] == [True], (name, obj.kernel_checks)
    off = build_objective(tiny_config(tmp_path, "objective.backend=triton", "objective.self_check=false"), 4, DEVICE)
    assert off.kernel_checks is None and not isinstance(off.compute, SelfCheckedCall)
    torch_only = build_objective(tiny_config(tmp_path, "objective.backend=torch"), 4, DEVICE)
    assert torch_only.kernel_checks is None


def test_steady_state_is_still_three_launches_with_the_check_on():
    step = byot_step(num_exits=4, batch=8, classes=16, dim=8, dtype=torch.float32, device=DEVICE, self_check=True)
    step()  # the first call checks the plan with the real kernels
    got = count(step)
    assert (got["triton"], got["aten"], got["launches"]) == (2, ["ones_like"], 3)


def test_run_records_the_checks_in_summary_and_meta(tmp_path):
    from engine.train import train

    cfg = tiny_config(tmp_path, "objective.name=byot", "objective.backend=triton", "schedule.epochs=1",
                      "data.limit_train=64", "data.limit_eval=64")
    summary = train(cfg, device=DEVICE.type)
    checks = summary["kernel_self_check"]
    assert checks and all(c["ok"] and c["backend"] == "triton" for c in checks)
    meta = json.loads((Path(cfg.checkpoint.dir) / "meta.json").read_text())
    assert meta["kernel_self_check"] == checks and "versions" in meta  # added to, not replaced


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, tmp: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        if rank == 1:  # only one rank's kernel is wrong: both must leave it
            real = fused_mod.fused_loss
            fused_mod.fused_loss = lambda *a, **k: tuple(t * 1.01 for t in real(*a, **k))
        obj, report = _byot("auto", CPU)
        obj.loss(*_inputs(seed=rank, device=CPU))
        with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_agree_on_the_backend(tmp_path):
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r[0]["backend"] for r in reports] == ["torch", "torch"]
    assert [r[0]["ok"] for r in reports] == [False, False]
    assert reports[0][0]["error"] <= reports[0][0]["tolerance"]  # rank 0's own kernel was right: it followed rank 1


def test_each_cuda_stream_gets_its_own_scratch_and_ticket(monkeypatch):
    """Plan.scratch keys the reduction's buffers by the current stream: the first stream keeps the plan's own, every
    other gets a fresh pair (ticket at 0), and a stream seen again gets the same pair back."""
    import dataclasses

    import kernels.multi_exit.op as mel

    opts = mel.LossOptions(teacher="none")
    base = mel.plan_for(opts, [torch.zeros(3, 5)], torch.zeros(3, dtype=torch.long), [], None, None)
    assert base.scratch() == (base.part, base.ticket)  # CPU: one pair, the interpreter runs launches in turn
    fake = dataclasses.replace(base, device=torch.device("cuda", 0), per_stream={})
    current = {"stream": 11}
    monkeypatch.setattr(mel, "current_stream_handle", lambda index: current["stream"])
    first = fake.scratch()
    assert first[0] is base.part and first[1] is base.ticket
    current["stream"] = 22
    second = fake.scratch()
    assert second[0] is not base.part and second[1] is not base.ticket and int(second[1]) == 0
    assert second[0].shape == base.part.shape
    current["stream"] = 11
    assert fake.scratch()[0] is first[0]
    current["stream"] = 22
    assert fake.scratch()[1] is second[1]
