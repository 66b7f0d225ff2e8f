"""End to end on scikit-learn digits: learning, eval reproducing the run, exact resume, divergence handling."""
import json

import pytest
import torch

from engine.evaluate_cli import evaluate_checkpoint
from engine.train import TrainingDiverged, train
from tests.helpers import records, tiny_args, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


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
    for name in ("config.yaml", "meta.json", "metrics.jsonl", "metrics.csv", "metrics_eval.csv", "last.pt", "best.pt",
                 "summary.json", "curves.png"):
        assert (run / name).is_file(), name
    evals = [r for r in records(run) if r["kind"] == "eval"]
    rows = records(run, "metrics_eval.csv")  # one row per validation, a column per exit and metric
    assert len(rows) == len(evals) and float(rows[-1]["val_exit0_top1"]) == evals[-1]["select"]["exit0"]["top1"]
    meta = json.loads((run / "meta.json").read_text())
    assert "torch" in meta["versions"] and meta["commit"]
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))


def test_eval_reproduces_logged_accuracy(trained):
    cfg, summary = trained
    res = evaluate_checkpoint(str(cfg.checkpoint.dir + "/last.pt"), "test", device="cpu")
    for k in ("exit0", "exit3", "ens_logits"):
        assert res[k]["top1"] == pytest.approx(summary["test_last"][k]["top1"], abs=1e-9)
        assert res[k]["nll"] == pytest.approx(summary["test_last"][k]["nll"], rel=1e-5)


# Mixup draws its Beta(1, 1) weight and its permutation from the global RNG, and crop+flip augments every batch:
# a resume that lost the RNG state or the cut logging window would log different records. 4 steps per epoch.
RESUME = ("objective.name=mixup", "objective.mixup.alpha=1.0", "exits.stages=[]", "data.augment=crop_flip",
          "data.limit_train=256", "data.val_split=100", "data.limit_eval=100", "logging.log_every=3")


def test_resume_gives_identical_records_and_weights(tmp_path):
    train(tiny_config(tmp_path / "a", *RESUME), device="cpu")
    stop_at = 5  # mid-epoch 1, and mid-way through the logging window of steps 5-6
    s = train(tiny_config(tmp_path / "b", *RESUME), on_step=lambda step: step == stop_at, device="cpu")
    assert s["interrupted"] and s["step"] == stop_at
    # as a checkpoint saved before objective.mixup.alpha moved and checkpoint.keep_last went: it resumes all the same
    last = tmp_path / "b" / "run" / "last.pt"
    ck = torch.load(last, weights_only=False)
    ck["config"]["objective"]["mixup_alpha"] = ck["config"]["objective"].pop("mixup")["alpha"]
    ck["config"]["checkpoint"]["keep_last"] = True
    torch.save(ck, last)
    train(tiny_config(tmp_path / "b", *RESUME, "checkpoint.resume=auto"), device="cpu")
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    assert [r["step"] for r in records(a) if r["kind"] == "train"] == [3, 4, 6, 8]
    assert records(b) == records(a)
    assert records(b, "metrics.csv") == records(a, "metrics.csv")
    assert records(b, "metrics_eval.csv") == records(a, "metrics_eval.csv") and records(a, "metrics_eval.csv")
    wa, wb = (torch.load(r / "last.pt", weights_only=False)["model"] for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_divergence_is_caught_before_any_checkpoint_holds_it(tmp_path, monkeypatch):
    import engine.step as engine_step

    real = engine_step.lr_at
    # One step per epoch. Step 2 is taken at an infinite LR: its loss (computed before the update) is finite, the
    # weights it leaves are not, and the end of epoch 2 would checkpoint them.
    monkeypatch.setattr(engine_step, "lr_at", lambda step, *a: float("inf") if step == 1 else real(step, *a))
    cfg = tiny_config(tmp_path, "schedule.epochs=3", "data.limit_train=64")
    with pytest.raises(TrainingDiverged, match="non-finite parameters at epoch 1, step 2") as e:
        train(cfg, device="cpu")
    run = tmp_path / "run"
    assert f"{run / 'last.pt'} (epoch 1, step 1)" in str(e.value)
    for name in ("last.pt", "best.pt"):
        ck = torch.load(run / name, weights_only=False)
        assert ck["state"]["step"] == 1, name
        tensors = list(ck["model"].values()) + [t for s in ck["optimizer"]["state"].values() for t in s.values()
                                                if isinstance(t, torch.Tensor)]
        assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), name
    rows = records(run)
    assert rows[-1]["kind"] == "eval" and rows[-1]["step"] == 1  # nothing logged from the bad step


def test_window_flags_each_kind_of_non_finite_value():
    from engine.distributed import DistInfo
    from engine.monitor import Window
    from engine.types import LossOutput

    def reading(loss, grad_norm, param, scaler_skips=False):
        w = Window(scaler_skips)
        w.add(LossOutput(torch.tensor(loss), {"ce": torch.tensor(loss)}), torch.tensor(grad_norm))
        w.add(LossOutput(torch.tensor(1.0), {"ce": torch.tensor(1.0)}), torch.tensor(2.0))
        return w.read([torch.tensor([param, 0.0])], DistInfo(), False)

    ok = reading(3.0, 4.0, 1.0)
    assert ok.problems == [] and ok.values == {"loss": 2.0, "ce": 2.0, "grad_norm": 3.0} and not ok.stop
    assert reading(float("nan"), 4.0, 1.0).problems == ["loss (loss)", "loss (ce)"]
    assert reading(3.0, float("inf"), 1.0).problems == ["gradient norm"]
    assert reading(3.0, float("inf"), 1.0, scaler_skips=True).problems == []  # fp16: the scaler skipped that step
    assert reading(3.0, float("inf"), 1.0, scaler_skips=True).values["grad_norm"] == 2.0
    assert reading(3.0, 4.0, float("-inf")).problems == ["parameters"]


def test_sigterm_writes_checkpoint_and_resumes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tests.helpers import DIGITS, TINY_MODEL

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    args = [sys.executable, "-m", "engine.cli", "train", *TINY_MODEL, *DIGITS, "schedule.milestones=[1000]",
            "data.limit_train=256", "data.limit_eval=100", "logging.log_every=1", "logging.progress=false",
            f"checkpoint.dir={run}", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*args, "schedule.epochs=100"], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and
                                          (run / "metrics.jsonl").read_text().count('"train"') >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err  # stopped, resumable: `train && eval` must not go on
    assert "--resume auto" in out
    state = torch.load(run / "last.pt", weights_only=False)["state"]
    assert state["step"] >= 3
    done = subprocess.run([*args, f"schedule.epochs={state['epoch'] + 1}", "--resume", "auto"], cwd=root,
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "train"]
    assert steps == list(range(1, steps[-1] + 1))  # no step lost or repeated across the interruption


def test_a_non_finite_batchnorm_statistic_is_divergence_too(tmp_path, monkeypatch):
    """Parameters finite, one BatchNorm running variance inf after step 2: the run stops before a checkpoint
    holds it (a checkpoint saves buffers as well as parameters)."""
    import engine.train as engine_train

    real = engine_train.build_components

    def build(cfg, *a, **k):
        c = real(cfg, *a, **k)
        bn = next(m for m in c.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        calls = []

        def poison(module, inputs):  # before the second training forward: it updates the statistic from inf
            if module.training:
                calls.append(1)
                if len(calls) == 2:
                    with torch.no_grad():
                        module.running_var[0] = float("inf")
        bn.register_forward_pre_hook(poison)
        return c
    monkeypatch.setattr(engine_train, "build_components", build)
    cfg = tiny_config(tmp_path, "schedule.epochs=3", "data.limit_train=64")
    with pytest.raises(TrainingDiverged, match=r"non-finite buffers \(BatchNorm running statistics\) at epoch 1"):
        train(cfg, device="cpu")
    for name in ("last.pt", "best.pt"):
        ck = torch.load(tmp_path / "run" / name, weights_only=False)
        assert all(torch.isfinite(t).all() for t in ck["model"].values() if t.is_floating_point()), name


def test_each_epoch_prints_one_line_and_tensorboard_is_one_line_when_missing(tmp_path, capsys):
    """With logging.progress=false (a batch job's log) every epoch still prints its validation top-1 per exit."""
    from engine.cli import main

    args = ["train", *tiny_args(tmp_path, "schedule.epochs=2", "data.limit_train=64", "data.val_split=64",
                                "logging.progress=false"), "--device", "cpu"]
    assert main(args) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch ")]
    assert [ln.split("  ")[0] for ln in lines] == ["epoch 1/2", "epoch 2/2"]
    assert all("val top-1 exit0 " in ln and "exit3 " in ln and "best " in ln for ln in lines), lines
    assert all(" img/s" in ln and "loss " in ln and " elapsed, " in ln and " left" in ln for ln in lines), lines
    assert lines[-1].endswith("0:00:00 left")
    try:
        import tensorboard  # noqa: F401
        has_tb = True
    except ImportError:
        has_tb = False
    tb_args = ["train", *tiny_args(tmp_path / "tb", "schedule.epochs=1", "data.limit_train=64",
                                   "data.val_split=64", "logging.tensorboard=true"), "--device", "cpu"]
    rc = main(tb_args)
    err = capsys.readouterr().err.strip().splitlines()
    if has_tb:  # eval records arrive flattened: select/exit0/top1
        assert rc == 0 and list((tmp_path / "tb" / "run" / "tb").glob("events.*"))
    else:
        assert rc == 2 and len(err) == 1 and "pip install tensorboard" in err[0]


def test_every_steps_checkpoint_survives_a_crash_and_resumes_exactly(tmp_path, monkeypatch):
    """checkpoint.every_steps=2 writes last.pt mid-epoch (4 steps per epoch: steps 2 and 6); a crash at step 7
    (nothing saved by it) resumes from step 6, mid-epoch, and ends with the uninterrupted run's records and
    weights."""
    over = (*RESUME, "checkpoint.every_steps=2")
    train(tiny_config(tmp_path / "a", *over), device="cpu")

    def crash(step):
        if step == 7:
            raise RuntimeError("simulated crash")
        return False
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_config(tmp_path / "b", *over), on_step=crash, device="cpu")
    b = tmp_path / "b" / "run"
    state = torch.load(b / "last.pt", weights_only=False)["state"]
    assert (state["step"], state["epoch"], state["batch"]) == (6, 1, 2)
    train(tiny_config(tmp_path / "b", *over, "checkpoint.resume=auto"), device="cpu")
    a = tmp_path / "a" / "run"
    assert records(b) == records(a)
    wa, wb = (torch.load(r / "last.pt", weights_only=False)["model"] for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ranks_that_read_different_checkpoints_stop_the_resume(monkeypatch):
    """Several nodes: one that cannot see checkpoint.dir would start afresh while the others resume."""
    import engine.train as engine_train
    from engine.checkpoint import CheckpointError
    from engine.distributed import DistInfo

    info = DistInfo(0, 2, 0, torch.device("cpu"))
    ck = {"state": {"step": 4}, "model": {"w": torch.arange(6.0)}}
    mine = (4, engine_train._digest(ck["model"]))
    monkeypatch.setattr(engine_train, "all_gather_object", lambda obj, i: [obj, mine])
    engine_train.same_start(ck, info)  # the same checkpoint on both ranks
    monkeypatch.setattr(engine_train, "all_gather_object", lambda obj, i: [obj, None])
    with pytest.raises(CheckpointError, match=r"rank 0: step 4, rank 1: no checkpoint.*shared storage"):
        engine_train.same_start(ck, info)
    other = {"state": {"step": 4}, "model": {"w": torch.arange(6.0) + 1}}
    monkeypatch.setattr(engine_train, "all_gather_object",
                        lambda obj, i: [obj, (4, engine_train._digest(other["model"]))])
    with pytest.raises(CheckpointError, match="different checkpoints"):
        engine_train.same_start(ck, info)
