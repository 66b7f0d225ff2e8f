"""Installing: a non-editable `pip install .` carries the recipes and runs from any directory; recipes are found by
name; triton is needed only where the fused loss is asked for."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, load_config
from engine.config_files import find_config
from engine.objectives.base import resolve_backend

REPO = Path(__file__).resolve().parents[1]


def test_a_wheel_install_runs_a_recipe_by_name_from_another_directory(tmp_path):
    """The wheel, not the checkout: a venv that sees this machine's torch (system site-packages) gets the package
    with `pip install --no-deps .`, then `selfdistill train --config demo --print-config` runs in an empty folder."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py, elsewhere = venv / "bin" / "python", tmp_path / "elsewhere"
    src = tmp_path / "src"  # a copy: the build writes build/ into the tree it builds, and stale files would travel
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "runs", "results", "*.egg-info",
                                                             "__pycache__", ".whl", ".dali"))
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(src)],
                   check=True, capture_output=True, cwd=tmp_path, timeout=600)
    shutil.rmtree(src)
    elsewhere.mkdir()
    where = subprocess.run([str(py), "-c", "import engine.config as c; print(c.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(venv)), where  # the installed copy, not the checkout
    run = subprocess.run([str(venv / "bin" / "selfdistill"), "train", "--config", "demo", "--print-config"],
                         cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "name: resnet18" in run.stdout and "dataset: fashion_mnist" in run.stdout
    assert not list(elsewhere.iterdir())  # --print-config writes nothing


def test_recipes_are_found_by_name_and_a_path_wins(tmp_path, monkeypatch):
    assert find_config("demo") == find_config("demo.yaml") == REPO / "configs" / "demo.yaml"
    assert load_config("cifar_resnet18_dsn").objective.name == "dsn"  # its `base:` resolved beside it
    mine = tmp_path / "demo"
    mine.write_text("seed: 7\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("demo").seed == 7  # a file of that name in the working directory comes first
    with pytest.raises(ConfigError, match="config file not found: nosuch .*shipped recipe: .*imagenet_resnet50_byot"):
        find_config("nosuch")
    with pytest.raises(ConfigError, match="config file not found: sub/demo$"):
        load_config("sub/demo")  # a path is never looked up among the recipes


def test_without_triton_auto_is_pytorch_and_an_explicit_triton_is_a_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    cuda = torch.device("cuda")  # resolving only: nothing runs on it
    assert resolve_backend("auto", cuda) == "torch" and resolve_backend("torch", cuda) == "torch"
    with pytest.raises(ConfigError, match="objective.backend=triton needs triton"):
        resolve_backend("triton", cuda)
    monkeypatch.undo()
    assert resolve_backend("auto", cuda) == "triton" and resolve_backend("auto", torch.device("cpu")) == "torch"


def test_an_explicit_triton_on_cpu_needs_the_interpreter(monkeypatch):
    """On CPU the kernels run only in Triton's interpreter: without TRITON_INTERPRET=1, objective.backend=triton is
    a config error naming both ways out (a kernel launched for CPU would fail mid-step with a traceback)."""
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", cpu) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match=r"needs a CUDA device \(this run is on cpu\).*TRITON_INTERPRET=1.*"
                                          r"objective.backend=torch or auto runs here"):
        resolve_backend("triton", cpu)
    assert resolve_backend("triton", torch.device("cuda")) == "triton"  # resolving only: nothing runs on it
