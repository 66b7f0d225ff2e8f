"""Bad input exits non-zero with the path or key named, and leaves no checkpoint behind."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import layered

ROOT = Path(__file__).resolve().parents[1]
BASE = ["model.stem=cifar", "model.width=0.125", "model.depths=[1,1,1,1]", "model.num_classes=2",
        "data.dataset=imagefolder", "data.image_size=16", "data.augment=crop_flip", "data.batch_size=4",
        "data.workers=0", "schedule.epochs=1", "logging.progress=false"]


def _run(tmp_path, *overrides):
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "engine.cli", "train",
                        *layered(*BASE, f"checkpoint.dir={run_dir}", *overrides)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    return r, run_dir


def _folder(root: Path, classes=("a", "b"), n=6) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def _no_checkpoint(run_dir: Path) -> bool:
    return not run_dir.exists() or not (list(run_dir.glob("*.pt")) + list(run_dir.glob(".*tmp")))


def test_missing_data_path(tmp_path):
    r, run_dir = _run(tmp_path, f"data.root={tmp_path / 'nowhere'}")
    assert r.returncode != 0 and str(tmp_path / "nowhere") in r.stderr
    assert _no_checkpoint(run_dir)


def test_empty_class_folder(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "train" / "c").mkdir()
    r, run_dir = _run(tmp_path, f"data.root={root}", "model.num_classes=3")
    assert r.returncode != 0 and str(root / "train" / "c") in r.stderr
    assert _no_checkpoint(run_dir)


@pytest.mark.parametrize("workers", [0, 2])  # 2: decoded in DataLoader worker processes (the default is 4)
def test_corrupt_image(tmp_path, workers):
    root = _folder(tmp_path / "data")
    bad = root / "train" / "a" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    r, run_dir = _run(tmp_path, f"data.root={root}", f"data.workers={workers}")
    assert r.returncode == 2 and str(bad) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr  # one line
    assert _no_checkpoint(run_dir)


def test_corrupt_image_skipped_when_asked(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "train" / "a" / "broken.jpg").write_bytes(b"not an image")
    (root / "val" / "b" / "broken.png").write_bytes(b"not an image either")
    r, run_dir = _run(tmp_path, f"data.root={root}", "data.skip_corrupt=true", "data.workers=2")
    assert r.returncode == 0, r.stderr
    assert (run_dir / "last.pt").is_file()
    assert "skipped 2 unreadable image file(s)" in r.stdout
    assert json.loads((run_dir / "summary.json").read_text())["skipped_files"] == [
        str(root / "train" / "a" / "broken.jpg"), str(root / "val" / "b" / "broken.png")]


def test_unknown_config_key(tmp_path):
    r, run_dir = _run(tmp_path, "optim.momentun=0.9")
    assert r.returncode == 2 and "optim.momentun" in r.stderr
    assert _no_checkpoint(run_dir)


def test_wrong_class_count_names_the_key(tmp_path):
    root = _folder(tmp_path / "data")
    r, run_dir = _run(tmp_path, f"data.root={root}", "model.num_classes=5")
    assert r.returncode == 2 and "model.num_classes" in r.stderr
    assert _no_checkpoint(run_dir)


@pytest.mark.parametrize("cmd", [["bench"], ["profile", "nothing"]])
def test_subcommand_usage(cmd):
    r = subprocess.run([sys.executable, "-m", "engine.cli", *cmd], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "usage" in r.stderr


@pytest.mark.parametrize("lr", ["0.05", "1e6"])
def test_skipped_batches_still_end_the_epoch_with_a_checked_window(tmp_path, lr):
    """Most of train unreadable, so whole batches are skipped and the loader yields fewer than planned: every epoch
    still logs its train record, and a diverged window stops the run (exit 4) before a checkpoint holds it."""
    root = _folder(tmp_path / "data", n=2)
    for c in ("a", "b"):
        for i in range(10):
            (root / "train" / c / f"broken{i}.png").write_bytes(b"not an image")
    r, run_dir = _run(tmp_path, f"data.root={root}", "data.skip_corrupt=true", "schedule.epochs=2",
                      "logging.log_every=1000", f"optim.lr={lr}", "data.augment=none")
    if lr == "0.05":
        assert r.returncode == 0, r.stderr
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [row["epoch"] for row in rows if row["kind"] == "train"] == [0, 1]
    else:
        assert r.returncode == 4 and "non-finite" in r.stderr and "epoch 0" in r.stderr, r.stderr
    import torch

    for ck in run_dir.glob("*.pt"):
        state = torch.load(ck, weights_only=False)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()), ck
