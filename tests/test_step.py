"""`selfdistill bench train` times the step that `selfdistill train` runs (engine/step.py): for the same config,
seed and steps, the bench's per-repeat losses and gradient norms equal the training loop's logged ones, bit for bit."""
import json

import pytest

from bench import train as bench_train
from engine.config import load_config
from engine.train import train
from tests.helpers import records

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--models", "resnet18", "--sizes", "8", "--batch", "4", "--compile", "eager", "--amp", "fp32", "--loaders",
        "synthetic", "--layout", "nchw", "--backend", "torch", "--device", "cpu", "--no-plots"]
# The LR warms up over the epoch and the clipping threshold is below the gradient norms, so a step without the LR
# schedule or the clipping gives other losses from the second step on; Beta's EMA teacher moves in `after_step`.
SETTINGS = ["model.width=0.25", "model.depths=[1,1,1,1]", "model.num_classes=10", "model.in_chans=1",
            "schedule.warmup_epochs=1", "optim.clip_grad_norm=0.05", "ema.enabled=true"]


@pytest.mark.parametrize("variant", ["byot", "beta"])
def test_bench_train_and_train_take_the_same_steps(tmp_path, variant):
    out = tmp_path / "bench"
    assert bench_train.main([*TINY, "--variants", variant, "--warmup", "2", "--steps", "2", "--repeats", "2",
                             "--out", str(out), *SETTINGS]) == 0
    (row,) = json.loads((out / "report.json").read_text())["runs"]
    assert row["status"] == "ok" and row["finite"], row
    # The same config through `selfdistill train`, logging every 2 steps: windows of steps 1-2 (the bench's warm-up),
    # 3-4 and 5-6 (its two repeats).
    cfg = load_config(None, [*row["overrides"], f"checkpoint.dir={tmp_path / 'run'}", "logging.log_every=2"])
    assert train(cfg, on_step=lambda step: step == 6, device="cpu")["step"] == 6
    logged = [r for r in records(tmp_path / "run") if r["kind"] == "train"]
    assert [r["step"] for r in logged] == [2, 4, 6]
    assert [r["loss"] for r in logged[1:]] == row["loss"]
    assert [r["grad_norm"] for r in logged[1:]] == row["grad_norm"]
    assert row["grad_norm"][0] > 0.05  # the clipping acted
