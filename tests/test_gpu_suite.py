"""The GPU check (bench/gpu_suite.sh): its CPU rehearsal end to end, and the tests its `tests` step adds on the GPU
(each also runs here, in its CPU form, and the rehearsal runs them once more through the suite)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from tests.helpers import tiny_config
from tests.test_methods_nosync import no_host_reads

REPO = Path(__file__).resolve().parents[1]
STEPS = ["env", "loss", "train", "exits", "large", "stress", "tests", "dali"]
CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = torch.device("cuda" if CUDA else "cpu")

# masked-off lanes of the Triton interpreter compute inf - inf; harmless
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning:triton.runtime.interpreter")


@contextlib.contextmanager
def sync_errors():
    """Every synchronizing CUDA call (a device-to-host read, a blocking copy, synchronize) raises."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_training_loop_never_waits_for_the_device(tmp_path, monkeypatch, backend):
    """Steps 2-4 of the real loop (engine.train: forward, backward, optimizer, after_step, loss accumulation) run
    with every host sync made an error: on CUDA the sync debug mode, on CPU (where nothing syncs) every Python-level
    read of a tensor. Step 1 runs unchecked: first calls may upload constants once."""
    from engine.train import train

    cfg = tiny_config(tmp_path, "objective.name=byot", f"objective.backend={backend}", "data.dataset=synthetic",
                      "precision.amp=bf16", "logging.log_every=1000")
    checked = []
    with contextlib.ExitStack() as checks:
        def on_step(step: int) -> bool:
            if step == 1:
                checks.enter_context(sync_errors() if CUDA else no_host_reads(monkeypatch))
                with pytest.raises((RuntimeError, AssertionError)):  # the check is live
                    torch.ones(2, device=DEVICE).sum().item()
            checked.append(step)
            if step == 4:
                checks.close()
                return True
            return False

        summary = train(cfg, on_step=on_step, device=DEVICE.type)
    assert summary["interrupted"] and summary["step"] == 4 and checked == [1, 2, 3, 4]


def test_timm_backbone_with_byot_exits_forward_backward(tmp_path):
    """A timm ResNet as the backbone, BYOT exits after stages 0-2: every exit's logits, every head gets a gradient."""
    from engine.models import create_model
    from engine.objectives import build_objective
    from engine.precision import autocast
    from engine.types import Batch

    cfg = tiny_config(tmp_path, "model.name=timm:resnet18", "model.in_chans=3", "exits.stages=[0,1,2]",
                      "objective.name=byot")
    model = create_model(cfg.model, cfg.exits).to(DEVICE).train()
    objective = build_objective(cfg, model.num_exits, DEVICE)
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 10, (4,), generator=g)).to(DEVICE)
    with autocast(DEVICE, "bf16"):
        loss, out = objective(model, batch)
    loss.total.backward()
    assert [tuple(z.shape) for z in out.logits] == [(4, 10)] * 4 and torch.isfinite(loss.total)
    for k, head in enumerate(model.heads):
        grads = [p.grad for p in head.parameters()]
        assert grads and all(gr is not None and torch.isfinite(gr).all() for gr in grads), k
        assert any(gr.abs().sum() > 0 for gr in grads), k
    first = next(model.backbone.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_commit_stamp_is_read_where_there_is_no_git(tmp_path, monkeypatch):
    from bench import report

    stamp = tmp_path / "COMMIT"
    stamp.write_text("0123abcd\n")
    assert report.commit(stamp) != "0123abcd (stamped by make gpu-prep)"  # git wins where there is a .git
    monkeypatch.setattr("bench.report.git_commit", lambda: "unknown")
    assert report.commit(stamp) == "0123abcd (stamped by make gpu-prep)"
    assert report.commit(tmp_path / "missing") == "unknown"


def _suite(out: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    run = subprocess.run(["bash", "bench/gpu_suite.sh", "--rehearse", *args], cwd=REPO, capture_output=True,
                         text=True, timeout=900, env={**os.environ, "OUT": str(out), **env})
    summary = json.loads((out / "summary.json").read_text())
    return run, summary


def test_rehearsal_runs_every_step_and_returns_at_most_8_files(tmp_path):
    out = tmp_path / "out"
    run, summary = _suite(out)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["results.tgz", "summary.json", "summary.md"]
    steps = {s["name"]: s for s in summary["steps"]}
    assert [s["name"] for s in summary["steps"]] == STEPS
    try:
        import nvidia.dali  # noqa: F401
        dali = True
    except ImportError:
        dali = False
    for s in summary["steps"]:
        assert s["status"] == "ok" or (s["name"] == "dali" and not dali and s["status"].startswith("skipped")), s
    # the GPU's limits stay under 9 minutes; the rehearsal's own are far from what its steps take
    assert summary["suite"]["rehearsal"] and summary["suite"]["gpu_budget_s"] < 540
    assert all(s["limit_s"] >= 300 for s in summary["steps"] if s["status"] == "ok"), summary["steps"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert summary["suite"]["commit"].startswith(head)
    # real numbers from every step, not placeholders
    assert steps["env"]["report"]["copy_gbps"] > 0
    for name in ("loss", "large"):
        rows = {r["provider"]: r for r in steps[name]["report"]["rows"]}
        assert rows["eager"]["ms_p50"] > 0 and rows["fused"]["ms_p50"] > 0 and rows["fused"]["gbps"] > 0, name
        assert rows["fused"]["abs_diff_vs_eager"] < 1e-2, name
    loss = {r["provider"]: r for r in steps["loss"]["report"]["rows"]}
    assert {"compile", "compile-ro", "liger"} <= set(loss) and loss["compile"]["ms_p50"] > 0
    assert loss["fused"]["graph_status"] == "n/a: CUDA graphs need a GPU"
    assert steps["large"]["report"]["copy_gbps"] == steps["env"]["report"]["copy_gbps"]  # step env's copy
    runs = {(r["variant"], r["backend"], r["compile"]): r for r in steps["train"]["report"]["runs"]}
    assert set(runs) == {("plain", "triton", "compiled"), ("byot", "triton", "compiled"),
                         ("byot", "torch", "compiled"), ("byot", "triton", "compiled-ro")}
    assert all(r["status"] == "ok" and r["img_s"]["mean"] > 0 for r in runs.values()), runs
    over = steps["train"]["report"]["ratios"]["multi_exit_overhead"]
    assert len(over) == 2 and all(o["extra_fwd_flops_pct"] > 0 for o in over)
    gains = steps["train"]["report"]["ratios"]["optimisation_gains"]
    assert any(g["with"] == "compiled-ro" and g["without"] == "compiled" and g["gain"] > 0 for g in gains)
    stress = steps["stress"]["report"]
    assert stress["configs"] >= 4 and stress["bitwise_repeats"] and stress["max_err_over_tol"] <= 1
    assert stress["grid_programs"]["max"] > 1 and len(stress["dtypes"]) >= 2 and not stress["failures"]
    exits = steps["exits"]["report"]["exits"]
    assert len(exits) == 4 and all(e["latency"]["eager"][b]["ms"]["mean"] > 0 for e in exits for b in ("1", "8"))
    tests = steps["tests"]["report"]
    assert tests["passed"] >= 2 and tests["failures"] == tests["errors"] == 0
    if dali:
        assert {r["backend"]: r for r in steps["dali"]["report"]["results"]}["dali-cpu"]["img_s"]["mean"] > 0
    md = (out / "summary.md").read_text()
    for i, name in enumerate(STEPS, 1):
        assert f"| {i} {name} | {steps[name]['status']} |" in md
    assert "CPU rehearsal" in md and f"{steps['env']['report']['copy_gbps']:.1f} GB/s" in md
    with tarfile.open(out / "results.tgz") as tgz:
        names = set(tgz.getnames())
    assert {f"./{s}/log.txt" for s in STEPS if s != "dali" or dali} <= names
    assert {"./loss/report.json", "./train/report.json", "./exits/report.json", "./tests/junit.xml"} <= names


def test_rehearsal_killed_midway_still_returns_the_finished_steps(tmp_path):
    """A step over its own limit is recorded as such, and a command killed (as the device tool does at its limit)
    while a later step runs still leaves the summary of every step before it. The train step is made slow on
    purpose (a 60 s delay against a 2 s limit), so the outcome does not depend on the machine's speed."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "TIMEOUT_TRAIN": "2", "REHEARSE_DELAY_TRAIN": "60",
           "REHEARSE_DELAY_EXITS": "600", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(["bash", "bench/gpu_suite.sh", "--rehearse", "--steps", "env,train,exits"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            status = {s["name"]: s["status"] for s in _read_summary(out)}
            if status.get("train", "").startswith("timeout"):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the summary must be written after each step, not only at the end"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and {"summary.json", "summary.md", "results.tgz"} <= {p.name for p in files}
    steps = _read_summary(out)
    assert [(s["name"], s["status"]) for s in steps] == [
        ("env", "ok"), ("train", "timeout after 2 s"), ("exits", gpu_check.NOT_RUN)]
    assert steps[0]["report"]["copy_gbps"] > 0
    assert json.loads((out / "summary.json").read_text())["suite"]["budget_s"] == 600 + 2 + 600
    with tarfile.open(out / "results.tgz") as tgz:
        assert "./env/report.json" in tgz.getnames()


def _read_summary(out: Path) -> list[dict]:
    path = out / "summary.json"
    return json.loads(path.read_text())["steps"] if path.is_file() else []


def test_dali_parts_rejoin_only_when_every_part_arrived(tmp_path):
    """bench/dali_parts.sh install: the parts carried one per call are checked against MANIFEST, rejoined and
    unpacked; a missing part stops with exit 2 and names it."""
    payload = tmp_path / "src" / "nvidia" / "dali" / "__init__.py"
    payload.parent.mkdir(parents=True)
    payload.write_bytes(os.urandom(200_000))  # incompressible: several parts
    parts = tmp_path / "parts"
    parts.mkdir()
    archive = subprocess.run(["bash", "-c", f"tar -C {tmp_path / 'src'} -cf - . | xz"], capture_output=True,
                             check=True).stdout
    chunk = 64_000
    names = []
    for i in range(0, len(archive), chunk):
        names.append(f"part-{i // chunk:02d}")
        (parts / names[-1]).write_bytes(archive[i:i + chunk])
    import hashlib
    (parts / "MANIFEST").write_text("".join(f"{n} {hashlib.sha256((parts / n).read_bytes()).hexdigest()}\n"
                                            for n in names))
    assert len(names) >= 3
    env = {**os.environ, "DALI_PARTS_DIR": str(parts)}
    ok = subprocess.run(["bash", "bench/dali_parts.sh", "install", str(tmp_path / "site")], cwd=REPO, env=env,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "site" / "nvidia" / "dali" / "__init__.py").read_bytes() == payload.read_bytes()
    (parts / names[1]).unlink()
    bad = subprocess.run(["bash", "bench/dali_parts.sh", "install", str(tmp_path / "site2")], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and f"{names[1]} is missing" in bad.stderr and not (tmp_path / "site2").exists()
