"""`selfdistill bench loader` end to end at toy sizes: both CPU backends measured, the GPU one reported absent."""
from __future__ import annotations

import json

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
               "--threads", "1", "--size", "32", "--batch-size", "4", "--batches", "2", "--warmup", "1",
               "--repeats", "1", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "results.json").read_text())
    by_name = {r["backend"]: r for r in report["results"]}
    assert by_name["dali-cpu"]["img_per_s"] > 0 and by_name["torch (DataLoader + PIL)"]["img_per_s"] > 0
    assert by_name["dali-cpu"]["dtype"] == "float16"  # precision.amp=fp16 by default
    if not torch.cuda.is_available():
        assert by_name["dali (mixed)"]["status"] == NO_GPU
        assert NO_GPU in (out / "results.md").read_text()
    env = report["environment"]
    assert {"git_commit", "torch", "nvidia_dali", "cpu_count", "date"} <= set(env)


def test_bench_rejects_unknown_backend(tmp_path, capsys):
    assert main(["--backends", "dali-gpu", "--cache", str(tmp_path)]) == 2
    assert "dali-gpu" in capsys.readouterr().err
