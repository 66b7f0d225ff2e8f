"""`selfdistill bench kernels`: a tiny sweep into a temporary folder gives a well-formed report."""
from __future__ import annotations

import json
import os

import pytest
import torch

from bench.kernels import MODES, main, run

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning:triton.runtime.interpreter")


# the CPU path (interpreter) unless a GPU is there to run the kernels for real
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def test_tiny_sweep_report_is_well_formed(tmp_path):
    out = tmp_path / "kernels"
    argv = ["--device", DEVICE, "--exits", "2", "--batch", "4", "--classes", "10", "--dtypes", "fp32,bf16",
            "--feature-dim", "8", "--providers", "eager,compile,liger,fused", "--repeats", "2",
            "--compile-backend", "eager", "--graphs", "--copy-gbps", "123.5", "--out", str(out)]
    payload = run(argv)
    report = json.loads((out / "report.json").read_text())  # strict JSON: no NaN / Infinity
    assert report["provenance"]["commit"] and report["provenance"]["device"]["type"] == DEVICE
    assert {"torch", "triton"} <= set(report["provenance"]["versions"])
    assert report["copy_gbps"] == 123.5 and report["complete"]  # the given copy bandwidth, not a new one
    rows = report["rows"]
    assert len(rows) == 2 * 4 * len(MODES)  # dtypes x providers x modes
    for r in rows:
        if r["provider"] == "liger":
            assert r["status"] in (("ok", "not installed") if DEVICE == "cuda" else
                                   ("n/a: Liger's kernels run on CUDA only",))
            continue
        assert r["status"] == "ok", r
        if DEVICE == "cpu":
            assert r["graph_status"] == "n/a: CUDA graphs need a GPU"
        elif r["mode"] == "bwd":
            assert r["graph_status"] == "n/a: a retained backward is not replayed"
        else:  # the replay is the device time alone: never slower than do_bench's launch-and-run by much
            assert r["graph_status"] == "ok" and 0 < r["graph_ms_p50"] < 1.5 * r["ms_p50"], r
            assert r["host_ms"] == pytest.approx(r["ms_p50"] - r["graph_ms_p50"])
        assert 0 < r["ms_p20"] <= r["ms_p50"] <= r["ms_p80"]
        assert r["gbps"] > 0 and r["copy_fraction"] > 0
        if r["provider"].startswith("fused"):
            assert r["abs_diff_vs_eager"] < 1e-4 and r["speedup_vs_eager"] > 0
            # the forward reads what it must; the backward reads the logits again to recompute the gradient
            assert r["kernel_gbps"] >= r["gbps"] > 0 and (r["kernel_gbps"] > r["gbps"]) == (r["mode"] != "fwd")
    # never judged off a GPU; on a GPU, the target shapes are not in this sweep
    want = "not evaluated: CPU run" if DEVICE == "cpu" else "not measured in this run"
    assert report["targets"] and all(t["status"].startswith(want) for t in report["targets"])
    md = (out / "report.md").read_text()
    assert DEVICE == "cuda" or ("CPU run" in md and "interpreter" in md)
    for mode in MODES:
        assert f"## {mode}: median ms" in md and f"## {mode}: fused kernels" in md
    assert set(report["files"]["plots"]) <= {"time_vs_classes.png", "fused_bandwidth.png"}
    for png in report["files"]["plots"]:
        assert (out / png).stat().st_size > 1000
    assert payload["written"]["json"] == str(out / "report.json")


def test_host_overhead_report(tmp_path):
    """--host-overhead writes host_us and launches (the BYOT objective's fused step: 2 launches + the seed fill)."""
    payload = run(["--device", DEVICE, "--host-overhead", "--host-reps", "20", "--out", str(tmp_path / "host")])
    report = json.loads((tmp_path / "host" / "report.json").read_text())
    assert report["launches"] == payload["launches"] == 3 and report["triton_launches"] == 2
    assert 0 < report["host_us"]["p20"] <= report["host_us"]["median"] <= report["host_us"]["p80"]
    floor = report["torch_floor_us"]["median"]
    assert 0 < floor and report["own_host_us"] == pytest.approx(report["host_us"]["median"] - floor)
    assert report["eager_launches"] > 100
    assert "host us" in (tmp_path / "host" / "report.md").read_text()


def test_host_overhead_is_its_own_subcommand(tmp_path):
    """`selfdistill bench host-overhead` writes the same report; `bench kernels --host-overhead` is its alias."""
    from engine.cli import main as cli

    assert cli(["bench", "host-overhead", "--device", DEVICE, "--reps", "20", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["launches"] == 3 and report["triton_launches"] == 2 and report["host_us"]["reps"] == 20


def test_bad_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--device", "cpu", "--providers", "eager,magic", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--providers: magic not allowed" in capsys.readouterr().err
