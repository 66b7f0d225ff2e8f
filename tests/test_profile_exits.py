"""`selfdistill profile exits` with tiny settings on the default device (the GPU where there is one), and the FLOP
counter against hand counts."""
import json

import pytest
import torch
from torch import nn

from bench import profile
from bench.report import resolve_device
from engine.models.exit_flops import count_flops
from engine.models.heads import BottleneckHead

DEVICE = resolve_device("auto").type  # what the profiler picks without --device

TINY = ["model.stem=cifar", "model.width=0.25", "model.depths=[1,1,1,1]", "model.num_classes=10",
        "model.in_chans=1", "data.image_size=8"]
FAST = ["--warmup", "1", "--iters", "2", "--repeats", "2", "--ee-samples", "8", "--no-plots"]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_flops_of_a_linear_layer_match_the_hand_count():
    lin = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    assert count_flops(lin, x) == 2 * 4 * 16 * 8  # 2 FLOPs per multiply-add; the bias add is not counted
    xg = x.clone().requires_grad_(True)
    # backward: grad_input (4x8 @ 8x16) and grad_weight (8x4 @ 4x16), each as large as the forward
    assert count_flops(lambda: lin(xg).sum().backward()) == 3 * 2 * 4 * 16 * 8


@pytest.mark.parametrize("stride, groups", [(1, 1), (2, 1), (1, 3)])
def test_flops_of_a_convolution_match_the_hand_count(stride, groups):
    conv = nn.Conv2d(6, 12, 3, stride=stride, padding=1, groups=groups)
    x = torch.randn(2, 6, 8, 8)
    out_hw = 8 // stride
    assert count_flops(conv, x) == 2 * 2 * out_hw * out_hw * 12 * (6 // groups) * 3 * 3


def test_flops_of_an_exit_head_match_the_hand_count():
    head = BottleneckHead(cin=8, cout=16, k=2, num_classes=10)  # mid = 4
    x = torch.randn(1, 8, 4, 4)
    conv1 = 2 * 4 * 4 * 4 * 8  # 1x1, 8 -> 4 at 4x4
    conv2 = 2 * 2 * 2 * 4 * 4 * 2 * 2  # 2x2 stride 2, 4 -> 4, output 2x2
    conv3 = 2 * 2 * 2 * 16 * 4  # 1x1, 4 -> 16 at 2x2
    fc = 2 * 16 * 10
    assert count_flops(head, x) == conv1 + conv2 + conv3 + fc == 2368


@pytest.mark.parametrize("name, stem, size, gmacs, ratios, heads_pct", [
    ("resnet18", "cifar", 32, 0.5555, (3.64, 1.94, 1.32), 7.2),
    ("resnet18", "imagenet", 224, 1.8141, (3.13, 1.83, 1.29), 6.8),
    ("resnet50", "imagenet", 224, 4.0892, (5.20, 2.25, 1.25), 47.9),
])
def test_flops_reproduce_the_anchor_counts(name, stem, size, gmacs, ratios, heads_pct):
    """performance-anchors.md §4: GMACs and ideal backbone-only speed-ups at exits 1/4, 2/4, 3/4 (counted on the
    meta device: no compute), and the ICCV heads' share: roughly 45% more FLOPs on ResNet-50, a few % on ResNet-18."""
    from engine.config import load_config
    from engine.models import create_model
    from engine.models.early_exit import TruncatedModel

    cfg = load_config(None, [f"model.name={name}", f"model.stem={stem}",
                             f"model.num_classes={100 if stem == 'cifar' else 1000}"])  # CIFAR-100 / ImageNet
    with torch.device("meta"):
        model = create_model(cfg.model, cfg.exits).eval()
        x = torch.empty(1, 3, size, size)
    full = count_flops(model.backbone, x)
    assert full / 2e9 == pytest.approx(gmacs, abs=1e-4)
    stages = model.backbone.forward_intermediates(x)[1]
    backbone_only = [full / (count_flops(TruncatedModel(model, k), x) - count_flops(model.heads[k], stages[k]))
                     for k in range(3)]
    assert [round(r, 2) for r in backbone_only] == list(ratios)
    assert round(100 * (count_flops(model, x) / full - 1), 1) == heads_pct


def _check_common(rep: dict, batch_sizes: list[int], modes: list[str]) -> None:
    for key in ("provenance", "model", "settings", "exits", "all_exits", "speedup_checks", "policy",
                "policy_measured", "nvml_status"):
        assert key in rep, key
    assert rep["provenance"]["commit"] and rep["provenance"]["versions"]["torch"]
    exits = rep["exits"]
    assert [e["stage"] for e in exits] == [0, 1, 2, 3] and [e["depth"] for e in exits][-1] == "4/4"
    for e in exits:
        assert e["params"] > 0 and e["flops_per_image"] > 0 and e["backbone_flops_per_image"] > 0
        for m in modes:
            for bs in batch_sizes:
                lat = e["latency"][m][str(bs)]
                assert lat["status"] == "ok" and lat["ms"]["mean"] > 0 and lat["ms"]["n"] == 2, (m, bs)
                assert e["speedup_vs_full"][m][str(bs)] > 0
        assert e["flop_ratio_vs_full"] >= 1.0 or e["exit"] == 3
    full = exits[-1]
    assert full["flop_ratio_vs_full"] == 1.0 and full["head_flops_per_image"] == 0
    # the training forward = the single-exit network + every shallow head, exactly
    assert rep["all_exits"]["flops_per_image"] == full["flops_per_image"] + sum(
        e["head_flops_per_image"] for e in exits[:-1])
    assert exits[-1]["early_exit_path_flops_per_image"] == rep["all_exits"]["flops_per_image"]
    assert [e["exit"] for e in exits[:-1]] == [1 - 1, 1, 2] and exits[1]["byot_claim"]["speedup"] == 3.16
    assert exits[0]["anchor_ideal_backbone_speedup"] == 3.64  # resnet18, cifar stem (performance-anchors §4)
    pol = {r["threshold"]: r for r in rep["policy"]}
    assert pol[0.0]["exit_fraction"] == [1.0, 0.0, 0.0, 0.0]
    assert pol[1.01]["exit_fraction"] == [0.0, 0.0, 0.0, 1.0]
    assert pol[0.0]["mean_flops_per_image"] == exits[0]["early_exit_path_flops_per_image"]
    meas = rep["policy_measured"]
    assert meas["status"] == "ok" and meas["full_ms_per_image"]["mean"] > 0
    for r in meas["per_threshold"]:
        assert r["agreement_with_simulation"] == 1.0 and r["ms_per_image"]["mean"] > 0
    if DEVICE == "cpu":
        assert rep["nvml_status"] == "unavailable: not a CUDA device"
    else:
        assert rep["nvml_status"] == "ok" or rep["nvml_status"].startswith("unavailable: ")
    assert rep["provenance"]["device"]["type"] == DEVICE


def test_profile_exits_random_init_with_data(tmp_path):
    out = tmp_path / "rep"
    rc = profile.main(["--batch-sizes", "1,3", "--modes", "eager", "--thresholds", "0,0.5,1.01", "--limit-eval",
                       "64", *FAST, "--out", str(out), *TINY, "data.dataset=digits", "data.val_split=100"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    _check_common(rep, [1, 3], ["eager"])
    assert rep["source"]["mode"] == "random-init" and "digits val" in rep["accuracy_source"]
    assert rep["accuracy"]["_count"]["samples"] == 64
    for k in ("exit0", "exit3", "ens_logits", "ens_probs"):
        assert 0 <= rep["accuracy"][k]["top1"] <= 100
    assert all(r["top1"] is not None for r in rep["policy"])
    assert rep["policy"][0]["top1"] == pytest.approx(rep["accuracy"]["exit0"]["top1"])
    md = (out / "report.md").read_text()
    assert "BYOT claim" in md and "Early-exit policy" in md and ("CPU run" in md) == (DEVICE == "cpu")


def test_profile_exits_without_data_and_plots(tmp_path):
    out = tmp_path / "rep"
    args = ["--batch-sizes", "2", "--modes", "eager,cudagraph", "--thresholds", "0,1.01",
            *[a for a in FAST if a != "--no-plots"], "--out", str(out), *TINY]
    assert profile.main(args) == 0
    rep = json.loads((out / "report.json").read_text())
    modes = ["eager", "cudagraph"] if DEVICE == "cuda" else ["eager"]  # cudagraph needs CUDA: dropped on CPU
    _check_common(rep, [2], modes)
    assert rep["settings"]["modes"] == modes
    assert rep["accuracy"] == {} and rep["accuracy_source"].startswith("no data")
    assert all(r["top1"] is None for r in rep["policy"])
    for png in ("latency.png", "speedup.png", "early_exit.png"):
        assert (out / png).stat().st_size > 1000, png
    assert sorted(rep["files"]["plots"]) == ["early_exit.png", "latency.png", "speedup.png"]


def test_compiled_latency_mode():
    """The compiled path of the profiler (torch.compile; the test uses the cheap 'eager' dynamo backend)."""
    from argparse import Namespace

    from engine.config import load_config
    from engine.models import create_model
    from engine.models.early_exit import TruncatedModel

    cfg = load_config(None, [*TINY, "precision.compile_backend=eager"])
    model = create_model(cfg.model, cfg.exits).eval()
    args = Namespace(warmup=1, iters=2, repeats=2)
    fn = profile.prepare(TruncatedModel(model, 1).eval(), "compiled", cfg.precision)
    assert isinstance(fn, torch._dynamo.eval_frame.OptimizedModule)
    ms = profile.latency(fn, torch.randn(2, 1, 8, 8), "compiled", args, torch.device("cpu"), "fp32")
    assert len(ms) == 2 and min(ms) > 0


def test_profile_exits_from_a_checkpoint(tmp_path):
    """Checkpoint mode: the run's own config and weights, accuracy on the run's validation split."""
    from engine.checkpoint import atomic_save
    from engine.config import load_config, to_dict
    from engine.models import create_model

    cfg = load_config(None, TINY + ["data.dataset=digits", "data.val_split=100"])
    model = create_model(cfg.model, cfg.exits)
    ck = tmp_path / "best.pt"
    atomic_save({"model": model.state_dict(), "config": to_dict(cfg)}, ck)
    out = tmp_path / "rep"
    assert profile.main(["--checkpoint", str(ck), "--batch-sizes", "2", "--modes", "eager", "--thresholds",
                         "0,1.01", *FAST, "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    _check_common(rep, [2], ["eager"])
    assert rep["source"] == {"mode": "checkpoint", "checkpoint": str(ck), "weights": "model", "class_names": None}
    assert rep["accuracy"]["_count"]["samples"] == 100 and "digits val" in rep["accuracy_source"]


def test_every_plot_has_a_title_and_the_early_exit_points_name_their_thresholds():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.profile_report import figures

    exit_row = lambda k: {"exit": k, "depth": f"{k + 1}/3", "latency": {"eager": {1: {"status": "ok",  # noqa: E731
                                                                                     "ms_per_image": 1.0 + k}}},
                          "speedup_vs_full": {"eager": {1: 2.0}}, "flop_ratio_vs_full": 2.0, "byot_claim": None}
    policy = [{"threshold": t, "mean_flops_per_image": 1e9 * (1 + t), "top1": 80 + t, "exit_fraction": [0.5, 0.3, 0.2]}
              for t in (0.5, 0.9)]
    p = {"settings": {"modes": ["eager"], "batch_sizes": [1]}, "exits": [exit_row(k) for k in range(3)],
         "policy": policy}
    for name, draw in figures(p).items():
        fig = plt.figure()
        draw(fig)
        ax = fig.axes[0]
        assert ax.get_title(), name
        if name == "early_exit.png":
            assert [t.get_text() for t in ax.texts] == ["t=0.5", "t=0.9"]
        plt.close(fig)
