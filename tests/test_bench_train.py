"""`selfdistill bench train` with tiny settings on the default device (the GPU where there is one); the matrix plan;
NVML reporting."""
import json
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from bench import train as bench_train
from bench.measure import NvmlSampler, stats
from bench.report import default_out_dir, resolve_device
from engine.config import load_config
from engine.models.exit_flops import count_flops

DEVICE = resolve_device("auto").type  # what the bench picks without --device
TINY = ["--models", "resnet18", "--sizes", "8", "--batch", "4", "--steps", "2", "--warmup", "1", "--repeats", "2",
        "--compile", "eager", "--amp", "fp32", "model.width=0.25", "model.depths=[1,1,1,1]", "model.num_classes=10",
        "model.in_chans=1", "precision.compile_backend=eager"]

# masked-off lanes of the Triton interpreter compute inf - inf (the triton-backend runs on CPU); harmless
pytestmark = [pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning:triton.runtime.interpreter"),
              pytest.mark.usefixtures("one_thread")]


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
    assert rep["provenance"]["commit"] and rep["provenance"]["device"]["type"] == DEVICE
    nvml = rep["nvml"]
    assert nvml["status"] == "ok" or nvml["status"].startswith("unavailable: " if DEVICE == "cuda" else
                                                                "unavailable: not a CUDA device")
    runs = {(r["variant"], r["layout"], r["backend"]): r for r in rep["runs"]}
    assert len(rep["runs"]) == 2 + 3 + 1 + 1
    for r in rep["runs"]:  # the triton backend runs too: compiled on a GPU, in the interpreter on CPU
        assert r["status"] == "ok", r
        for k in ("img_s", "fwd_img_s", "compute_img_s", "step_ms"):
            assert r[k]["mean"] > 0 and r[k]["n"] == 2 and len(r[k]["values"]) == 2, k
        assert r["data_wait_ms_per_step"]["mean"] >= 0 and r["finite"] and r["problems"] == []
        assert len(r["loss"]) == len(r["grad_norm"]) == 2 and all(v > 0 for v in r["loss"] + r["grad_norm"])
        assert r["flops"]["train_per_sample"] > 2 * r["flops"]["fwd_per_image"] > 0
        assert r["images_per_step"] == (8 if r["variant"] == "cskd" else 4) and r["samples_per_step"] == 4
    plain, byot = runs[("plain", "nchw", "torch")], runs[("byot", "nchw", "torch")]
    assert byot["flops"]["fwd_per_image"] > plain["flops"]["fwd_per_image"]  # the exit heads cost FLOPs
    assert runs[("byot", "nchw", "triton")]["flops"] == byot["flops"]  # the loss backend adds no matmul FLOPs
    over = {(o["variant"], o["setting"]["layout"]): o for o in rep["ratios"]["multi_exit_overhead"]}
    o = over[("byot", "nchw")]
    assert o["measured_slowdown"] > 0 and o["flop_predicted_slowdown"] > 1 and o["extra_fwd_flops_pct"] > 0
    assert ("byot", "channels_last") in over
    assert over[("cskd", "nchw")]["extra_fwd_flops_pct"] == 0  # same network, but 2B images a step
    assert over[("cskd", "nchw")]["flop_predicted_slowdown"] > 1
    gains = {(g["variant"], g["axis"]) for g in rep["ratios"]["optimisation_gains"]}
    assert {("plain", "layout"), ("byot", "layout"), ("byot", "backend")} <= gains
    status = {t["target"]: t["status"] for t in rep["targets"]}
    if DEVICE == "cpu":
        assert all(v.startswith("not evaluated: CPU run") for v in status.values())
    else:  # judged on a GPU, from this run's rows: the tiny model is no RN50 and no DALI loader ran
        rn50 = next(k for k in status if k.startswith("plain RN50"))
        assert status[rn50] == "not measured in this run" and status["DALI loader >= 90% of synthetic"] == \
            "not measured in this run"
        assert {v for k, v in status.items() if k.startswith("BYOT")} <= {"pass", "fail"}
    md = (out / "report.md").read_text()
    assert ("CPU run" in md) == (DEVICE == "cpu") and "FLOP prediction" in md
    assert (out / "throughput.png").stat().st_size > 1000


def test_bench_train_real_loader_and_compiled_path(tmp_path, monkeypatch):
    out = tmp_path / "rep"
    args = [a if a != "eager" else "eager,compiled" for a in TINY]  # --compile eager,compiled
    compiled, real_compile = [], torch.compile

    def spy(model, **kw):  # the compiled run compiles through the config, as training does
        compiled.append(kw)
        return real_compile(model, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    rc = bench_train.main([*args, "--variants", "plain", "--loaders",
                           "synthetic,torch,dali", "--dataset", "digits", "--no-plots", "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    runs = {(r["compile"], r["loader"]): r for r in rep["runs"]}
    assert set(runs) == {("eager", "synthetic"), ("compiled", "synthetic"), ("eager", "torch"), ("eager", "dali")}
    dali = runs[("eager", "dali")]
    if DEVICE == "cpu":
        assert dali["status"] == "unavailable" and "decodes on the GPU" in dali["reason"]
    elif _importable("nvidia.dali"):  # DALI reads image folders, not the in-memory digits
        assert dali["status"] == "error" and "reads image folders" in dali["reason"]
    else:
        assert dali["status"] == "unavailable" and "DALI is not installed" in dali["reason"]
    for key in (("eager", "synthetic"), ("compiled", "synthetic"), ("eager", "torch")):
        assert runs[key]["status"] == "ok", runs[key]
    assert runs[("eager", "torch")]["data_wait_ms_per_step"]["mean"] > 0
    lv = rep["ratios"]["loader_vs_synthetic"]
    assert len(lv) == 1 and lv[0]["loader"] == "torch" and lv[0]["ratio"] > 0
    assert any(g["axis"] == "compile" for g in rep["ratios"]["optimisation_gains"])
    assert compiled == [{"mode": None, "backend": "eager"}]  # once: the compiled synthetic run
    assert rep["files"]["plots"] == []


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    spec = bench_train.RunSpec("resnet18", 8, "byot", "eager", "fp32", "nchw", "triton", "synthetic")
    args = SimpleNamespace(data=None)
    cfg = load_config(None, bench_train.run_overrides(spec, SimpleNamespace(batch=4, overrides=[]), "unused"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in bench_train.unavailable_reason(spec, cfg, args, torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert bench_train.unavailable_reason(spec, cfg, args, torch.device("cpu")) is None


def test_unknown_axis_value_is_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        bench_train.main([*TINY, "--amp", "fp8"])
    assert e.value.code == 2 and "--amp: fp8 not allowed" in capsys.readouterr().err


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
    s = NvmlSampler(torch.device("cuda"))
    if not torch.cuda.is_available():  # the library is there but no driver: NVML init fails, reported
        assert s.status.startswith("unavailable: NVML failed")
        return
    if s.status.startswith("unavailable: NVML failed"):  # a driver that refuses NVML queries: reported, no crash
        return
    assert s.status == "ok" and s.static["name"], s.status  # a GPU with its driver: sampled for real
    with s:
        time.sleep(0.35)
    summary = s.summary()
    assert summary["samples"] >= 2 and summary["sm_clock_mhz"]["max"] > 0 and summary["memory_used_gib"]["max"] > 0


def test_stats_and_out_dir(tmp_path):
    st = stats([1.0, 2.0, 3.0])
    assert st["mean"] == 2.0 and st["std"] == 1.0 and st["n"] == 3 and st["values"] == [1.0, 2.0, 3.0]
    assert stats([5.0])["std"] == 0.0
    first = default_out_dir("train", torch.device("cpu"), root=tmp_path)
    assert first.name.startswith("train-") and first.name.endswith("-cpu")
    first.mkdir()
    assert default_out_dir("train", torch.device("cpu"), root=tmp_path).name == first.name + "-2"


def test_reports_default_to_the_working_directory(tmp_path, monkeypatch):
    """After a pip install the package sits in site-packages: reports go under the user's ./bench/results."""
    monkeypatch.chdir(tmp_path)
    assert default_out_dir("exits", torch.device("cpu")).parent == tmp_path / "bench" / "results"
