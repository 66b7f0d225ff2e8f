"""`selfdistill bench train` on CPU with tiny settings; the matrix plan; NVML reporting; the GPU suite script."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import train as bench_train
from bench.common import NvmlSampler, Stats, count_flops, default_out_dir

REPO = Path(__file__).resolve().parents[1]
TINY = ["--models", "resnet18", "--sizes", "8", "--batch", "4", "--steps", "2", "--warmup", "1", "--repeats", "2",
        "--width", "0.25", "--depths", "1,1,1,1", "--num-classes", "10", "--compile", "eager", "--amp", "fp32",
        "model.in_chans=1"]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_oat_plan_changes_one_axis_at_a_time():
    lists = {"compile": ["compiled", "eager"], "amp": ["bf16", "fp32"], "layout": ["channels_last", "nchw"],
             "backend": ["torch", "triton"], "loader": ["synthetic", "dali"]}
    runs = bench_train.plan_runs(["resnet50"], [224], ["plain", "byot", "cskd"], lists, "oat", ["plain", "byot"])
    plain = [r for r in runs if r.variant == "plain"]
    byot = [r for r in runs if r.variant == "byot"]
    assert len(plain) == 1 + 4 and len(byot) == 1 + 5  # plain has no backend axis (its CE has no kernel)
    assert [r for r in runs if r.variant == "cskd"] == [bench_train.RunSpec("resnet50", 224, "cskd", "compiled",
                                                                           "bf16", "channels_last", "torch",
                                                                           "synthetic")]
    base = byot[0]
    for r in byot[1:]:
        assert sum(getattr(r, a) != getattr(base, a) for a in bench_train.AXES) == 1
    full = bench_train.plan_runs(["resnet18"], [32], ["byot"], lists, "full", [])
    assert len(full) == 2 ** 5 and len(set(full)) == len(full)


def test_bench_train_cpu_report(tmp_path):
    out = tmp_path / "rep"
    rc = bench_train.main([*TINY, "--variants", "plain,byot,cskd,beta", "--layout", "nchw,channels_last",
                           "--backend", "torch,triton", "--loaders", "synthetic", "--ablate", "plain,byot",
                           "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    for key in ("provenance", "settings", "nvml", "runs", "ratios", "targets"):
        assert key in rep, key
    assert rep["provenance"]["commit"] and rep["provenance"]["device"]["type"] == "cpu"
    assert rep["nvml"]["status"].startswith("unavailable")
    runs = {(r["variant"], r["layout"], r["backend"]): r for r in rep["runs"]}
    assert len(rep["runs"]) == 2 + 3 + 1 + 1
    assert runs[("byot", "nchw", "triton")]["status"] == "unavailable"  # no CUDA here
    for r in rep["runs"]:
        if r["backend"] == "triton":
            continue
        if r["status"] == "unavailable":  # CS-KD / Beta may not be registered yet in a partial build
            assert r["variant"] in ("cskd", "beta") and "not registered" in r["reason"]
            continue
        assert r["status"] == "ok", r
        for k in ("img_s", "fwd_img_s", "compute_img_s", "step_ms"):
            assert r[k]["mean"] > 0 and r[k]["n"] == 2 and len(r[k]["values"]) == 2, k
        assert r["data_wait_ms_per_step"]["mean"] >= 0 and r["loss_finite"]
        assert r["flops"]["train_per_sample"] > 2 * r["flops"]["fwd_per_image"] > 0
        assert r["images_per_step"] == (8 if r["variant"] == "cskd" else 4) and r["samples_per_step"] == 4
    plain, byot = runs[("plain", "nchw", "torch")], runs[("byot", "nchw", "torch")]
    assert byot["flops"]["fwd_per_image"] > plain["flops"]["fwd_per_image"]  # the exit heads cost FLOPs
    over = {(o["variant"], o["setting"]["layout"]): o for o in rep["ratios"]["multi_exit_overhead"]}
    o = over[("byot", "nchw")]
    assert o["measured_slowdown"] > 0 and o["flop_predicted_slowdown"] > 1 and o["extra_fwd_flops_pct"] > 0
    assert ("byot", "channels_last") in over
    if "cskd" in {v for v, _ in over}:
        assert over[("cskd", "nchw")]["extra_fwd_flops_pct"] == 0  # same network, but 2B images a step
        assert over[("cskd", "nchw")]["flop_predicted_slowdown"] > 1
    gains = {(g["variant"], g["axis"]) for g in rep["ratios"]["optimisation_gains"]}
    assert {("plain", "layout"), ("byot", "layout")} <= gains
    assert all(t["status"].startswith("not evaluated: CPU run") for t in rep["targets"])
    md = (out / "report.md").read_text()
    assert "CPU run" in md and "FLOP prediction" in md and "unavailable" in md
    assert (out / "throughput.png").stat().st_size > 1000


def test_bench_train_real_loader_and_compiled_path(tmp_path):
    out = tmp_path / "rep"
    args = [a if a != "eager" else "eager,compiled" for a in TINY]  # --compile eager,compiled
    rc = bench_train.main([*args, "--compile-backend", "eager", "--variants", "plain", "--loaders",
                           "synthetic,torch,dali", "--dataset", "digits", "--no-plots", "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    runs = {(r["compile"], r["loader"]): r for r in rep["runs"]}
    assert set(runs) == {("eager", "synthetic"), ("compiled", "synthetic"), ("eager", "torch"), ("eager", "dali")}
    assert runs[("eager", "dali")]["status"] == "unavailable"  # DALI's GPU decoder on a CPU run
    for key in (("eager", "synthetic"), ("compiled", "synthetic"), ("eager", "torch")):
        assert runs[key]["status"] == "ok", runs[key]
    assert runs[("eager", "torch")]["data_wait_ms_per_step"]["mean"] > 0
    lv = rep["ratios"]["loader_vs_synthetic"]
    assert len(lv) == 1 and lv[0]["loader"] == "torch" and lv[0]["ratio"] > 0
    assert any(g["axis"] == "compile" for g in rep["ratios"]["optimisation_gains"])
    assert rep["files"]["plots"] == []


def test_unknown_axis_value_is_rejected():
    with pytest.raises(SystemExit, match="not allowed"):
        bench_train.main([*TINY, "--amp", "fp8"])


def test_train_step_flops_hand_count():
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    # parameters need grads, the input does not: forward + grad_weight only
    assert count_flops(lambda: lin(x).sum().backward()) == 2 * (2 * 4 * 16 * 8)


def test_nvml_missing_or_failing_is_reported_not_raised(monkeypatch):
    assert NvmlSampler(torch.device("cpu")).status == "unavailable: not a CUDA device"
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    s = NvmlSampler(torch.device("cuda"))
    assert s.status.startswith("unavailable: pynvml is not installed")
    with s:
        pass
    assert s.summary()["samples"] == 0 and s.summary()["power_w"] is None
    monkeypatch.delitem(sys.modules, "pynvml")
    try:
        import pynvml  # noqa: F401
    except ImportError:
        return
    if not torch.cuda.is_available():  # the library is there but no driver: NVML init fails, reported
        s = NvmlSampler(torch.device("cuda"))
        assert s.status.startswith("unavailable: NVML failed")


def test_stats_and_out_dir(tmp_path):
    st = Stats([1.0, 2.0, 3.0])
    assert st.mean == 2.0 and st.std == 1.0 and st.to_dict()["n"] == 3
    assert Stats([5.0]).std == 0.0
    first = default_out_dir("train", torch.device("cpu"), root=tmp_path)
    assert first.name.startswith("train-") and first.name.endswith("-cpu")
    first.mkdir()
    assert default_out_dir("train", torch.device("cpu"), root=tmp_path).name == first.name + "-2"


def test_gpu_suite_script(tmp_path):
    script = REPO / "bench" / "gpu_suite.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    dry = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, cwd=REPO)
    assert dry.returncode == 0, dry.stderr
    for part in ("bench kernels", "bench loader --backends dali,dali-cpu,torch",
                 "bench train --models resnet18,resnet50 --sizes 224,32 --variants plain,byot,cskd,beta",
                 "profile exits model.name=resnet18", "profile exits model.name=resnet50", "data.image_size=224"):
        assert part in dry.stdout, part
    # a fake GPU and a no-op CLI: the suite must write its index with every step's status
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text('#!/bin/sh\ncase "$*" in *query-gpu*) echo "NVIDIA Test GPU";; *) echo "fake -q";; esac\n')
    smi.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", SELFDISTILL="true",
               BENCH_RESULTS=str(tmp_path / "results"))
    run = subprocess.run(["bash", str(script), "--quick"], capture_output=True, text=True, cwd=REPO, env=env)
    assert run.returncode == 0, run.stderr
    (suite,) = (tmp_path / "results").iterdir()
    assert suite.name.endswith("-nvidia-test-gpu")
    meta = json.loads((suite / "suite.json").read_text())
    names = [s["name"] for s in meta["steps"]]
    assert names == ["kernels", "loader", "train", "exits-resnet18-224", "exits-resnet50-224"]
    assert meta["provenance"]["commit"] and (suite / "suite.md").is_file()
