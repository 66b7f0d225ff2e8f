"""End to end on scikit-learn digits: learning, eval reproducing the run, exact resume, divergence handling."""
import json

import pytest
import torch

from engine.evaluate_cli import evaluate_checkpoint
from engine.train import TrainingDiverged, train
from tests.helpers import tiny_config


def _train_losses(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = tiny_config(tmp, "schedule.epochs=4", "optim.lr=0.1", "schedule.name=cosine", "logging.log_every=10")
    return cfg, train(cfg, device="cpu")


def test_run_learns_digits(trained):
    _, summary = trained
    last = summary["test_last"]
    assert last["exit3"]["top1"] > 60.0  # chance is 10%
    assert {"exit0", "exit1", "exit2", "exit3", "ens_logits", "ens_probs"} <= set(last)
    assert 1 <= summary["best_epoch"] <= 4 and "test_best" in summary


def test_run_directory_contents(trained):
    cfg, _ = trained
    run = cfg.checkpoint.dir
    from pathlib import Path

    run = Path(run)
    for name in ("config.yaml", "meta.json", "metrics.jsonl", "metrics.csv", "last.pt", "best.pt", "summary.json"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "meta.json").read_text())
    assert "torch" in meta["versions"] and meta["commit"]
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))


def test_eval_reproduces_logged_accuracy(trained):
    cfg, summary = trained
    res = evaluate_checkpoint(str(cfg.checkpoint.dir + "/last.pt"), "test", device="cpu")
    for k in ("exit0", "exit3", "ens_logits"):
        assert res[k]["top1"] == pytest.approx(summary["test_last"][k]["top1"], abs=1e-9)
        assert res[k]["nll"] == pytest.approx(summary["test_last"][k]["nll"], rel=1e-5)


def test_resume_gives_identical_losses(tmp_path):
    full = tiny_config(tmp_path / "a", "data.limit_train=640")
    train(full, device="cpu")
    stop_at = 13  # mid-epoch 1 (10 steps per epoch)
    part = tiny_config(tmp_path / "b", "data.limit_train=640")
    s = train(part, on_step=lambda step: step == stop_at, device="cpu")
    assert s["interrupted"] and s["step"] == stop_at
    resumed = tiny_config(tmp_path / "b", "data.limit_train=640", "checkpoint.resume=auto")
    train(resumed, device="cpu")
    a, b = _train_losses(tmp_path / "a" / "run"), _train_losses(tmp_path / "b" / "run")
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-7), step


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, "schedule.epochs=1", "data.limit_train=256")
    train(cfg, device="cpu")
    ck = tmp_path / "run" / "last.pt"
    before = ck.read_bytes()
    bad = tiny_config(tmp_path, "schedule.epochs=3", "data.limit_train=256", "optim.lr=1e30",
                      "checkpoint.resume=auto")
    with pytest.raises(TrainingDiverged, match="non-finite"):
        train(bad, device="cpu")
    assert ck.read_bytes() == before
    assert torch.load(ck, weights_only=False)["state"]["epoch"] == 1


def test_sigterm_writes_checkpoint_and_resumes(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tests.helpers import DIGITS, TINY_MODEL

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    args = [sys.executable, "-m", "engine.cli", "train", *TINY_MODEL, *DIGITS, "schedule.milestones=[1000]",
            "logging.log_every=1", "logging.progress=false", f"checkpoint.dir={run}", "--device", "cpu"]
    proc = subprocess.Popen([*args, "schedule.epochs=100"], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and
                                          (run / "metrics.jsonl").read_text().count('"train"') >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "resume" in out
    state = torch.load(run / "last.pt", weights_only=False)["state"]
    assert state["step"] >= 3
    done = subprocess.run([*args, f"schedule.epochs={state['epoch'] + 1}", "--resume", "auto"], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "train"]
    assert steps == list(range(1, steps[-1] + 1))  # no step lost or repeated across the interruption
