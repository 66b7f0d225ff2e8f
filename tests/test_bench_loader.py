"""`selfdistill bench loader` end to end at toy sizes: both CPU backends measured, the GPU one reported absent."""
from __future__ import annotations

import json

import pytest
import torch

from bench.loader import NO_GPU, main, make_photo_folder


def test_photo_folder_is_full_size_jpegs_and_cached(tmp_path):
    root = make_photo_folder(tmp_path / "cache", per_class=1)
    files = sorted((root / "train").rglob("*.jpg"))
    assert len(files) == 8 and len({f.parent.name for f in files}) == 8
    stamp = [f.stat().st_mtime_ns for f in files]
    make_photo_folder(tmp_path / "cache", per_class=1)  # second call reuses the folder
    assert [f.stat().st_mtime_ns for f in files] == stamp


def test_bench_writes_json_and_markdown(tmp_path):
    out = tmp_path / "out"
    rc = main(["--cache", str(tmp_path / "cache"), "--per-class", "2", "--backends", "dali-cpu,torch,dali",
               "--workers", "1", "--threads", "1", "--size", "32", "--batch-size", "4", "--batches", "2",
               "--warmup", "1", "--repeats", "2", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    by_name = {r["backend"]: r for r in report["results"]}
    for name in ("dali-cpu", "torch (DataLoader + PIL)"):
        rate = by_name[name]["img_s"]
        assert rate["n"] == 2 and rate["mean"] > 0 and min(rate["values"]) > 0, name
    assert by_name["dali-cpu"]["dtype"] == "float16"  # precision.amp=fp16 by default
    assert report["folder"]["train_images"] == 16 and report["folder"]["classes"] == 8
    if not torch.cuda.is_available():
        assert by_name["dali (mixed)"]["status"] == NO_GPU
        assert NO_GPU in (out / "report.md").read_text()
    assert report["provenance"]["commit"] and {"torch", "nvidia-dali-cuda130"} <= set(report["provenance"]["versions"])


def test_bench_rejects_unknown_backend(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--backends", "dali-gpu", "--cache", str(tmp_path)])
    assert e.value.code == 2 and "--backends: dali-gpu not allowed" in capsys.readouterr().err
