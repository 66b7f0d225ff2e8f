"""Under real torchrun: two agents on localhost as two "nodes" (c10d rendezvous, gloo, one worker each). A SIGTERM
to one worker stops both ranks with exit 3 and one line each; `--resume auto` on both nodes then ends exactly where
an uninterrupted two-node run ends."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.helpers import records, tiny_args

OVERRIDES = ("schedule.epochs=6", "data.limit_train=512", "data.batch_size=32", "data.val_split=64",
             "optim.lr=0.05", "logging.log_every=1")  # 8 steps per epoch and rank


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agents(tmp: Path, name: str, run: Path, *flags: str) -> list[subprocess.Popen]:
    """Two torchrun agents of one job; each worker's output lands in logs/<name>/node<i>/."""
    port, argv = _port(), ["train", *tiny_args(tmp, *OVERRIDES, f"checkpoint.dir={run}"), "--device", "cpu", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", name,
                              "--log-dir", str(tmp / "logs" / name / f"node{i}"), "--redirects", "3",
                              "-m", "engine.cli", *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for i in range(2)]


def _wait(agents: list[subprocess.Popen], limit_s: float = 400) -> list[int]:
    deadline = time.monotonic() + limit_s
    for a in agents:
        a.wait(timeout=max(1.0, deadline - time.monotonic()))
    return [a.returncode for a in agents]


def _worker_logs(tmp: Path, name: str, stream: str) -> list[str]:
    return [p.read_text() for p in sorted((tmp / "logs" / name).rglob(f"{stream}.log"))]


def _workers(agent: subprocess.Popen) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_two_torchrun_nodes_stop_together_and_resume_exactly(tmp_path):
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    assert _wait(_agents(tmp_path, "ref", ref_run)) == [0, 0]

    agents = _agents(tmp_path, "stop", run)
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.is_file() and '"kind": "train"' in metrics.read_text()):  # training has started
        assert time.monotonic() < deadline and all(a.poll() is None for a in agents)
        time.sleep(0.2)
    os.kill(_workers(agents[1])[0], signal.SIGTERM)  # one worker of one node, as a preemption would
    codes = _wait(agents)
    assert codes[0] != 0 and codes[1] != 0  # torchrun reports its workers' exit 3 as its own failure
    assert not any(_worker_logs(tmp_path, "stop", "stderr"))  # no traceback, no warning
    lasts = []
    for out in _worker_logs(tmp_path, "stop", "stdout"):  # rank 0 may have printed epoch lines before the stop
        lines = out.strip().splitlines()
        assert all(line.startswith("epoch ") for line in lines[:-1]) and "exit code 3" in lines[-1], out
        lasts.append(lines[-1].split(":")[0])
    assert sorted(lasts) == ["rank 0", "rank 1"]  # one stop line from each rank
    assert all("exitcode  : 3" in a.stdout.read() for a in agents)  # both workers, per torchrun's summary
    stopped = torch.load(run / "last.pt", weights_only=False)["state"]["step"]
    assert 0 < stopped < 48

    assert _wait(_agents(tmp_path, "resume", run, "--resume", "auto")) == [0, 0]
    a, b = (torch.load(r / "last.pt", weights_only=False) for r in (ref_run, run))
    assert a["state"]["step"] == b["state"]["step"] == 48
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert records(run) == records(ref_run) and records(run, "metrics_eval.csv") == records(ref_run, "metrics_eval.csv")
