"""`selfdistill export`: artefacts (torch.export and TorchScript) reproduce the training model's outputs."""
import json
import sys

import pytest
import torch
import torch.nn.functional as F

from engine import export as export_cmd
from engine.checkpoint import atomic_save
from engine.config import ConfigError, load_config, to_dict
from engine.models import create_model
from engine.models.early_exit import exit_index_for_threshold

# 2 exits (one shallow): each exit adds a torch.cond level to the early-exit export, so this keeps it fast.
OVERRIDES = ["model.stem=cifar", "model.width=0.25", "model.depths=[1,1,1,1]", "model.num_classes=10",
             "model.in_chans=1", "data.dataset=digits", "data.image_size=8", "exits.stages=[2]"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = load_config(None, OVERRIDES)
    torch.manual_seed(0)
    model = create_model(cfg.model, cfg.exits).eval()
    with torch.no_grad():  # sharper heads: confidences spread over (0, 1)
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(30)
        for m in model.modules():  # non-trivial BN statistics, so eval-mode BN is really exercised
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("ck") / "best.pt"
    atomic_save({"model": model.state_dict(), "config": to_dict(cfg), "class_names": [str(i) for i in range(10)]},
                path)
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    return path, model, x


def _load(path, fmt):
    return torch.export.load(str(path)).module() if fmt == "export" else torch.jit.load(str(path))


@pytest.mark.parametrize("exit_k, fmt", [(0, "export"), (-1, "torchscript")])
def test_truncated_artefact_matches_training_model(checkpoint, tmp_path, exit_k, fmt):
    ck, model, x = checkpoint
    out = tmp_path / f"exit{exit_k}.{'pt2' if fmt == 'export' else 'ts'}"
    assert export_cmd.main(["--checkpoint", str(ck), "--exit", str(exit_k), "--format", fmt, "--out", str(out)]) == 0
    meta = json.loads((tmp_path / (out.name + ".json")).read_text())
    assert meta["verification"]["ok"] and meta["format"] == fmt and meta["kind"] == "truncated"
    assert meta["exit"] == exit_k % 2 and meta["exit_stage"] == [2, 3][exit_k] and meta["num_classes"] == 10
    assert meta["input_shape"] == ["batch", 1, 8, 8] and meta["provenance"]["commit"]
    # a checkpoint that does not record its loader's normalisation says so rather than inventing one
    assert meta["normalisation"]["mean"] is None and "not recorded" in meta["normalisation"]["note"]
    loaded = _load(out, fmt)
    with torch.no_grad():
        ref = model(x).logits[exit_k]
        torch.testing.assert_close(loaded(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(x[:1]), ref[:1], rtol=1e-5, atol=1e-5)  # dynamic batch, down to 1
    assert export_cmd.load_artifact(out)(x).shape == (5, 10)  # format from the sidecar


def test_early_exit_artefacts_match_training_model(checkpoint, tmp_path):
    ck, model, x = checkpoint
    with torch.no_grad():
        ref = model(x).logits
    conf = F.softmax(ref[0], 1).amax(1).sort().values
    thr = ((conf[1] + conf[2]) / 2).item()  # between two samples: no sample sits on the boundary (ONNX rounds apart)
    expected_idx = exit_index_for_threshold(ref, thr)
    assert (expected_idx == 0).any() and (expected_idx > 0).any()
    expected = torch.stack(ref)[expected_idx, torch.arange(5)]
    for fmt, threshold in (("export", thr), ("torchscript", thr), ("torchscript", 1.5), ("onnx", thr)):
        out = tmp_path / f"ee-{fmt}-{threshold}.bin"
        assert export_cmd.main(["--checkpoint", str(ck), "--early-exit", str(threshold), "--format", fmt,
                                "--out", str(out)]) == 0
        meta = json.loads((tmp_path / (out.name + ".json")).read_text())
        assert meta["verification"]["ok"] and meta["kind"] == "early_exit" and meta["threshold"] == threshold
        loaded = export_cmd.load_artifact(out)
        with torch.no_grad():
            logits, idx = loaded(x)
        if threshold > 1:
            assert idx.tolist() == [1] * 5
            torch.testing.assert_close(logits, ref[-1], rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(idx, expected_idx)
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)


def test_onnx_of_an_exit_runs_in_onnxruntime_and_is_checked_without_it(checkpoint, tmp_path, monkeypatch):
    ck, model, x = checkpoint
    out = tmp_path / "exit0.onnx"
    assert export_cmd.main(["--checkpoint", str(ck), "--exit", "0", "--format", "onnx", "--out", str(out)]) == 0
    meta = json.loads((tmp_path / "exit0.onnx.json").read_text())
    assert meta["verification"]["ok"] and meta["verification"]["max_abs_diff"] < 1e-4 and meta["format"] == "onnx"
    with torch.no_grad():
        torch.testing.assert_close(export_cmd.load_artifact(out)(x), model(x).logits[0], rtol=1e-5, atol=1e-5)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed: onnx.checker alone, and it says so
    assert export_cmd.main(["--checkpoint", str(ck), "--exit", "0", "--format", "onnx", "--out",
                            str(tmp_path / "b.onnx")]) == 0
    v = json.loads((tmp_path / "b.onnx.json").read_text())["verification"]
    assert v["ok"] and v["ran"] is False and "onnx.checker passed" in v["note"]
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ConfigError, match="--format onnx needs onnx and onnxscript"):
        export_cmd.main(["--checkpoint", str(ck), "--exit", "0", "--format", "onnx", "--out", str(tmp_path / "c")])


def test_export_rejects_an_exit_out_of_range(checkpoint, tmp_path, capsys):
    ck, _, _ = checkpoint
    with pytest.raises(SystemExit) as e:
        export_cmd.main(["--checkpoint", str(ck), "--exit", "2", "--out", str(tmp_path / "x.pt2")])
    assert e.value.code == 2 and "the model has 2 exits" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["export", "torchscript"])
def test_an_unwritable_out_folder_is_one_line(checkpoint, tmp_path, fmt):
    """Read-only (as a non-root user sees it) and blocked by a file: exit 2, one line naming --out."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_faults import _no_root_override

    ck, _, _ = checkpoint
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    (tmp_path / "afile").write_text("")
    root = Path(__file__).resolve().parents[1]
    try:
        for out in (locked / "m.pt2", tmp_path / "afile" / "m.pt2"):
            r = subprocess.run([sys.executable, "-m", "engine.cli", "export", "--checkpoint", str(ck), "--exit", "0",
                                "--format", fmt, "--out", str(out)], cwd=root, capture_output=True, text=True,
                               timeout=300, preexec_fn=_no_root_override if os.geteuid() == 0 else None)
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            assert r.returncode == 2 and len(lines) == 1 and f"--out {out}" in lines[0], r.stderr
    finally:
        locked.chmod(0o755)
