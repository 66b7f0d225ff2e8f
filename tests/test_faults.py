"""Fault injection on a tiny run: whatever goes wrong, no run is lost or mixed up, and the user reads one line.

Each test provokes one fault as a user or the machine would (a re-run, a kill during a checkpoint write, a full
disk, a corrupt checkpoint, another architecture, a `base:` cycle, a read-only directory) through the `selfdistill`
command, and checks the exit code, the message and every file in the run directory.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from engine.cli import main
from tests.helpers import DIGITS, TINY_MODEL, TINY_RUN, layered, records, tiny_args

ROOT = Path(__file__).resolve().parents[1]
ARGS = [*TINY_MODEL, *DIGITS, *TINY_RUN, "data.limit_train=128", "data.limit_eval=100"]  # 2 epochs of 2 steps


def _train(run: Path, *extra: str) -> int:
    opts = [e for e in extra if "=" in e and not e.startswith("-")]
    flags = [e for e in extra if e not in opts]
    return main(["train", *layered(*ARGS, f"checkpoint.dir={run}", *opts), "--device", "cpu", *flags])


def _files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


def _tmp_files(run: Path) -> list[Path]:
    return list(run.glob("*.tmp")) + list(run.glob(".*.tmp"))


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: 2 epochs of 2 steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("reference") / "run"
    assert _train(run) == 0
    torch.set_num_threads(threads)
    return run


@pytest.fixture
def copy_of(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    return run


pytestmark = pytest.mark.usefixtures("one_thread")


def test_rerun_without_resume_is_refused_and_changes_nothing(copy_of, capsys):
    before = _files(copy_of)
    capsys.readouterr()
    assert _train(copy_of) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(copy_of) in line and "--resume auto" in line and "checkpoint.dir" in line
    assert _files(copy_of) == before


def test_overwrite_replaces_the_run(copy_of, reference):
    (copy_of / "last.pt.tmp").write_bytes(b"left by a kill")
    assert _train(copy_of, "checkpoint.overwrite=true") == 0
    assert records(copy_of) == records(reference)  # one run's records, not two runs mixed
    assert not _tmp_files(copy_of)


KILL_DURING_WRITE = """
import os, sys, time
real = os.fsync
seen = []
def fsync(fd):  # pause inside the second write of last.pt, after its bytes are out, before the rename
    target = os.readlink(f"/proc/self/fd/{fd}")
    if "last.pt" in target and target.endswith(".tmp"):
        seen.append(target)
        if len(seen) == 2:
            open(sys.argv[1], "w").close()
            time.sleep(600)
    return real(fd)
os.fsync = fsync
from engine.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_during_a_checkpoint_write_loses_nothing(reference, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "writing"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILL_DURING_WRITE, str(marker), "train", *ARGS,
                             f"checkpoint.dir={run}", "--device", "cpu"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[1]
    proc.kill()
    proc.communicate()
    assert _tmp_files(run), "the kill should have caught a write in flight"
    previous = torch.load(run / "last.pt", weights_only=False)
    assert previous["state"]["step"] == 2  # epoch 1's checkpoint, intact
    assert max(r["step"] for r in records(run) if "step" in r) == 4  # epoch 2 was logged before the kill
    assert _train(run, "--resume", "auto") == 0
    assert not _tmp_files(run)
    assert records(run) == records(reference)  # no record repeated or lost
    assert records(run, "metrics.csv") == records(reference, "metrics.csv")
    assert records(run, "metrics_eval.csv") == records(reference, "metrics_eval.csv")


class _FullDisk:
    """A file that takes 4 KiB and then reports ENOSPC, as a filling disk does."""

    def __init__(self, f):
        self._f, self._n = f, 0

    def write(self, data):
        self._n += len(data)
        if self._n > 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_fdopen = os.fdopen
    kept: dict[str, bytes] = {}

    def fdopen(fd, mode="r", *args, **kwargs):
        f = real_fdopen(fd, mode, *args, **kwargs)
        if "w" in mode and (run / "last.pt").is_file():  # the disk fills up after epoch 1's checkpoints
            kept.update({n: (run / n).read_bytes() for n in ("last.pt", "best.pt") if (run / n).is_file()})
            return _FullDisk(f)
        return f

    monkeypatch.setattr(os, "fdopen", fdopen)
    capsys.readouterr()
    assert _train(run) == 2
    line = _one_line(capsys.readouterr().err)
    assert "No space left on device" in line and str(run) in line and ".pt" in line
    assert kept and {n: (run / n).read_bytes() for n in kept} == kept
    assert not _tmp_files(run)
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert torch.load(run / "last.pt", weights_only=False)["state"]["step"] == 2


def test_full_disk_during_the_final_plots_names_the_file(tmp_path, monkeypatch, capsys):
    """The checkpoints and summary are written; the PNGs come last, and a full disk there still names its file."""
    from matplotlib.figure import Figure

    def savefig(self, path, *args, **kwargs):
        with _FullDisk(open(path, "wb")) as f:
            f.write(b"\0" * 8192)

    monkeypatch.setattr(Figure, "savefig", savefig)
    run = tmp_path / "run"
    assert _train(run) == 2
    line = _one_line(capsys.readouterr().err)
    assert "No space left on device" in line and str(run / "reliability.png") in line, line
    assert torch.load(run / "best.pt", weights_only=False)["state"]["step"] == 4


def test_corrupt_checkpoint_one_line_everywhere_and_the_run_untouched(copy_of, capsys, monkeypatch):
    ck = copy_of / "last.pt"
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    before = _files(copy_of)
    capsys.readouterr()
    assert _train(copy_of, "--resume", "auto") == 2
    assert str(ck) in _one_line(capsys.readouterr().err)
    assert _files(copy_of) == before  # config.yaml and meta.json still describe the checkpoints
    for cmd in (["eval", "--checkpoint", str(ck), "--device", "cpu"],
                ["export", "--checkpoint", str(ck), "--exit", "0", "--out", str(copy_of / "m.pt2")]):
        assert main(cmd) == 2, cmd
        assert str(ck) in _one_line(capsys.readouterr().err), cmd
    monkeypatch.setenv("SELFDISTILL_DEBUG", "1")
    assert main(["eval", "--checkpoint", str(ck), "--device", "cpu"]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.delenv("SELFDISTILL_DEBUG")
    assert main(["--debug", "eval", "--checkpoint", str(ck), "--device", "cpu"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_architecture_mismatch_lists_the_keys(copy_of, capsys):
    before = _files(copy_of)
    capsys.readouterr()
    assert _train(copy_of, "--resume", "auto", "model.width=0.5", "optim.lr=0.1") == 2
    line = _one_line(capsys.readouterr().err)
    assert "model.width 0.25 vs 0.5" in line and "optim.lr 0.05 vs 0.1" in line
    assert _files(copy_of) == before
    assert main(["eval", "--checkpoint", str(copy_of / "best.pt"), "--device", "cpu", "model.width=0.5"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "model.width 0.25 vs 0.5" in line and str(copy_of / "best.pt") in line


def test_base_cycle_is_a_config_error(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("base: b.yaml\noptim:\n  lr: 0.1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    assert main(["train", "--config", str(tmp_path / "a.yaml"), "--print-config"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "cycle" in line and "a.yaml" in line and "b.yaml" in line


def _no_root_override():
    """As root, drop the capabilities that ignore file permissions, so a read-only directory is read-only."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_read_only_directory(tmp_path):
    parent = Path(tempfile.mkdtemp(dir=tmp_path))
    parent.chmod(0o555)
    try:
        r = subprocess.run([sys.executable, "-m", "engine.cli", "train", *ARGS, f"checkpoint.dir={parent / 'run'}",
                            "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           preexec_fn=_no_root_override if os.geteuid() == 0 else None)
    finally:
        parent.chmod(0o755)
    assert r.returncode == 2, r.stderr
    line = _one_line(r.stderr)
    assert str(parent / "run") in line and "not writable" in line


def test_stop_exit_code_is_3(tmp_path, capsys, monkeypatch):
    import engine.step as engine_step

    real = engine_step.lr_at

    def lr_at(step, *args):
        if step == 2:  # SIGTERM arrives during the third step
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, *args)

    monkeypatch.setattr(engine_step, "lr_at", lr_at)
    run = tmp_path / "run"
    assert _train(run) == 3
    out = capsys.readouterr().out
    assert out.count("--resume auto") == 1
    assert torch.load(run / "last.pt", weights_only=False)["state"]["step"] == 3


def test_stopped_generation_chain_exits_3_and_resumes(tmp_path, capsys, monkeypatch):
    import engine.step as engine_step

    real, calls = engine_step.lr_at, []

    def lr_at(step, *args):
        calls.append(step)
        if len(calls) == 6:  # generation 0 took 4 steps; SIGTERM during generation 1's second step
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, *args)

    monkeypatch.setattr(engine_step, "lr_at", lr_at)
    run = tmp_path / "run"
    chain = ["--generations", "2", "objective.name=sd_generation", "exits.stages=[]"]
    assert _train(run, *chain) == 3
    assert "generation 1" in capsys.readouterr().out
    assert not (run / "summary.json").exists()  # the chain is not finished
    assert _train(run, *chain) == 0
    assert json.loads((run / "summary.json").read_text())["generations"][0]["skipped"]


def test_a_second_process_in_the_same_run_directory_is_refused(tmp_path, capsys):
    """One writer per run directory: while a run holds it, a second `train` or `--resume auto` stops at once."""
    from engine.rundir import run_lock

    args = tiny_args(tmp_path, "exits.stages=[]", "objective.name=ce", "data.limit_train=64", "schedule.epochs=1")
    run = tmp_path / "run"
    with run_lock(run):  # as a first run would hold it
        for extra in ([], ["--resume", "auto"]):
            assert main(["train", *args, *extra, "--device", "cpu"]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"run directory {run} is in use by another run (pid {os.getpid()})" in err[0]
        assert not (run / "metrics.jsonl").exists() and not (run / "config.yaml").exists()
    assert main(["train", *args, "--device", "cpu"]) == 0  # released: the run goes ahead


def test_ctrl_c_while_starting_exits_130_with_one_line(tmp_path):
    """Ctrl-C while the command imports torch: exit 130, one line, no traceback, nothing written. The import is
    made slow on purpose (a marker, then a sleep where the imports run), so the signal always lands there."""
    marker = tmp_path / "starting"
    code = (f"import sys, time, pathlib; from engine import cli; real = cli._train\n"
            f"def slow(args):\n    pathlib.Path({str(marker)!r}).touch(); time.sleep(60); return real(args)\n"
            f"cli._train = slow; sys.exit(cli.main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "train", *ARGS, f"checkpoint.dir={tmp_path / 'run'}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["interrupted while starting; nothing was written"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, names", [
    (["train", "optim.lr=0.1", "optim.lr=0.2", "--print-config"], "optim.lr: given twice"),
    (["train", "--generations", "0", "--print-config"], "generations: 0 is out of range"),
    (["train", "seed=1180591620717411303424", "--print-config"], "seed: 1180591620717411303424 is out of range"),
    (["train", "optim.name=adamw", "optim.betas=[2,3]", "--print-config"], "optim.betas: expected 2 values in [0, 1)"),
    (["train", "model.name=nosuchnet", "--print-config"], "model.name: 'nosuchnet' is not a registered model"),
])
def test_bad_values_are_refused_with_one_line(capsys, argv, names):
    assert main(argv) == 2
    assert names in _one_line(capsys.readouterr().err)


def test_eval_bins_and_export_threshold_are_checked(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "any.pt"), "--bins", "0"]) == 2
    assert "--bins 0: the ECE needs at least 1 bin" in _one_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as e:  # argparse's own usage error: exit 2
        main(["export", "--checkpoint", str(tmp_path / "any.pt"), "--early-exit", "nan", "--out", str(tmp_path / "m")])
    assert e.value.code == 2 and "--early-exit nan: the threshold must be a finite number" in capsys.readouterr().err


def test_a_stale_hidden_temp_file_does_not_block_a_resume(tmp_path):
    """A kill during a write can leave `.last.pt.<random>.tmp`; the next run removes it and goes on."""
    run = tmp_path / "run"
    assert main(["train", *ARGS, f"checkpoint.dir={run}", "--device", "cpu"]) == 0
    (run / ".last.pt.abcd1234.tmp").write_bytes(b"")
    assert main(["train", *ARGS, f"checkpoint.dir={run}", "--resume", "auto", "--device", "cpu"]) == 0
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))


def test_a_second_ctrl_c_during_a_checkpoint_write_waits_for_the_file(tmp_path, monkeypatch):
    """The second Ctrl-C arrives inside torch.save: the write finishes, the file loads, then the interrupt
    (KeyboardInterrupt, exit 130) goes ahead instead of torch's RuntimeError (exit 1)."""
    from engine import checkpoint
    from engine.monitor import StopFlag

    real = checkpoint.torch.save

    def save_with_ctrl_c(obj, f):
        os.kill(os.getpid(), signal.SIGINT)  # delivered while the write is under way
        time.sleep(0.05)
        real(obj, f)
    monkeypatch.setattr(checkpoint.torch, "save", save_with_ctrl_c)
    target = tmp_path / "last.pt"
    with StopFlag() as stop:
        stop.requested = True  # the first Ctrl-C asked for a stop; this is the second
        with pytest.raises(KeyboardInterrupt):
            checkpoint.atomic_save({"w": torch.arange(1000)}, target)
    assert torch.equal(torch.load(target)["w"], torch.arange(1000))
