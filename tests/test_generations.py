"""Multi-generation self-distillation: a 2-generation chain on digits, the teacher it used, and resuming."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError
from engine.generations import train_generations
from engine.objectives.teacher import weights_digest
from tests.helpers import tiny_args, tiny_config

OVER = ["generations=2", "objective.name=sd_generation", "exits.stages=[]", "data.limit_train=128",
        "data.limit_eval=120"]  # 2 epochs x 2 steps per generation


def _train_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chain")
    cfg = tiny_config(tmp, *OVER)
    return cfg, train_generations(cfg, device="cpu")


def test_chain_writes_one_run_per_generation(chain):
    cfg, summary = chain
    from pathlib import Path

    base = Path(cfg.checkpoint.dir)
    for g, objective in ((0, "ce"), (1, "sd_generation")):
        d = base / f"gen{g}"
        for name in ("config.yaml", "summary.json", "best.pt", "last.pt", "generation.json", "reliability.png"):
            assert (d / name).is_file(), (g, name)
        assert f"name: {objective}" in (d / "config.yaml").read_text()
    assert [g["generation"] for g in summary["generations"]] == [0, 1]
    assert {"test_best", "test_last"} <= set(summary) and summary["test_best"] == summary["generations"][1][
        "test_best"]
    assert json.loads((base / "summary.json").read_text())["generations"][1]["objective"] == "sd_generation"


def test_generation_1_used_generation_0_best_checkpoint(chain):
    cfg, summary = chain
    from pathlib import Path

    base = Path(cfg.checkpoint.dir)
    best0 = torch.load(base / "gen0" / "best.pt", weights_only=False)
    digest = weights_digest(best0["model"])
    record = json.loads((base / "gen1" / "generation.json").read_text())["teacher"]
    assert record["path"] == str((base / "gen0" / "best.pt").resolve())
    assert record["sha256"] == digest and record["best_epoch"] == best0["state"]["best_epoch"]
    # what the objective actually loaded travels in every gen1 checkpoint
    loaded = torch.load(base / "gen1" / "last.pt", weights_only=False)["objective"]["_extra_state"]["teacher"]
    assert loaded["sha256"] == digest
    assert summary["generations"][0]["teacher"] is None


def test_interrupted_chain_resumes_where_it_stopped(tmp_path, chain):
    ref_cfg, _ = chain
    cfg = tiny_config(tmp_path, *OVER)
    stopped = train_generations(cfg, device="cpu", on_step=lambda g, step: g == 1 and step == 3)
    assert stopped["interrupted"] and stopped["generation"] == 1 and stopped["step"] == 3
    gen0_summary = (tmp_path / "run" / "gen0" / "summary.json").read_text()
    done = train_generations(cfg, device="cpu")
    assert [g["skipped"] for g in done["generations"]] == [True, False]  # gen0 not retrained
    assert (tmp_path / "run" / "gen0" / "summary.json").read_text() == gen0_summary
    ref = _train_losses(Path(ref_cfg.checkpoint.dir) / "gen1")
    got = _train_losses(tmp_path / "run" / "gen1")
    assert [s for s, _ in got] == list(range(1, 5))  # steps 1-3, then step 4 after the resume
    for (s, a), (_, b) in zip(ref, got):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6), s
    again = train_generations(cfg, device="cpu")  # a finished chain only re-reads its summaries
    assert all(g["skipped"] for g in again["generations"])


def test_chain_needs_a_validation_split(tmp_path):
    with pytest.raises(ConfigError, match="val_split"):
        train_generations(tiny_config(tmp_path, *OVER, "data.val_split=0"), device="cpu")


def test_chain_into_a_finished_single_run_is_refused(tmp_path):
    """A chain would add gen0/ and gen1/ beside the run and replace its summary.json: refused, nothing touched."""
    from engine.cli import main
    from engine.train import train

    cfg = tiny_config(tmp_path, "exits.stages=[]", "objective.name=ce", "data.limit_train=64", "data.limit_eval=64",
                      "schedule.epochs=1")
    train(cfg, device="cpu")
    run = Path(cfg.checkpoint.dir)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    args = tiny_args(tmp_path, *OVER)
    assert main(["train", *args, "--generations", "2", "--device", "cpu"]) == 2
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert not (run / "gen0").exists()

