"""`selfdistill data fashion-mnist` and `selfdistill data check`."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_fashion_mnist
from pipelines.prepare import main
from tests.photo_folder import write_photo_folder

needs_fmnist = pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(),
                                  reason=f"Fashion-MNIST IDX files not installed ({FASHION_MNIST_DIR})")


def _tree(root: Path) -> dict[str, list[str]]:
    return {s: sorted(str(p.relative_to(root / s)) for p in (root / s).rglob("*.*")) for s in ("train", "val", "test")}


@needs_fmnist
@pytest.mark.parametrize("fmt,ext", [("png", "png"), ("jpeg", "jpg")])
def test_fashion_mnist_tree_pixels_labels_and_deterministic_val(tmp_path, fmt, ext):
    args = ["--val", "20", "--limit-train", "60", "--limit-test", "30", "--format", fmt]
    assert main(["fashion-mnist", "--out", str(tmp_path / "a")] + args) == 0
    a = tmp_path / "a"
    tree = _tree(a)
    assert [len(tree[s]) for s in ("train", "val", "test")] == [40, 20, 30]
    assert sorted(p.name for p in (a / "train").iterdir()) == sorted(FASHION_MNIST_CLASSES)  # even if empty
    assert not set(tree["train"]) & set(tree["val"])
    data = load_fashion_mnist(None)
    x, y = data["test"]
    for rel in tree["test"][:5]:  # file name = index in the IDX file, folder = its class, pixels = its pixels
        cls, name = rel.split("/")
        i = int(name.split(".")[0])
        assert FASHION_MNIST_CLASSES[int(y[i])] == cls
        pixels = np.asarray(Image.open(a / "test" / rel))
        assert pixels.shape == (28, 28)
        err = np.abs(pixels.astype(int) - x[i, 0].numpy().astype(int)).max()
        assert err == 0 if fmt == "png" else err < 40
    assert main(["fashion-mnist", "--out", str(tmp_path / "b")] + args) == 0
    assert _tree(tmp_path / "b") == tree  # the val carve is seed-fixed
    assert main(["check", str(a)]) == 0


@needs_fmnist
def test_fashion_mnist_refuses_existing_output(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    assert main(["fashion-mnist", "--out", str(tmp_path), "--limit-train", "5", "--limit-test", "5"]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_photo_folder(tmp_path / "photos", {"train": 3, "val": 2, "test": 2})


def test_check_clean_folder_reports_counts(folder, capsys):
    assert main(["check", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "astronaut" in out and "no problems found" in out


def test_check_finds_every_kind_of_problem(folder, capsys):
    (folder / "train" / "chelsea" / "001.jpg").write_bytes(b"\xff\xd8\xff garbage")  # corrupt JPEG
    (folder / "train" / "coffee" / "notes.txt").write_text("hello")  # non-image file
    (folder / "train" / "empty").mkdir()  # empty class folder
    shutil.rmtree(folder / "val" / "coffee")  # class missing from val
    assert main(["check", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "train/chelsea/001.jpg" in out and "notes.txt" in out and "train/empty" in out
    assert "val/ lacks 2 class(es) present in train/: coffee, empty" in out


def test_check_quick_mode_and_missing_dir(folder, tmp_path, capsys):
    victim = folder / "val" / "chelsea" / "000.jpg"
    victim.write_bytes(victim.read_bytes()[:200])  # truncated: caught by the quick (end marker) test too
    assert main(["check", "--quick", str(folder)]) == 1
    assert "val/chelsea/000.jpg" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
