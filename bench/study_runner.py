"""Running a study's training runs: each in a child process with a fixed thread count and its own log, several at
a time, seed by seed and a teacher before its student. Shared by the methods studies and the pilot."""
from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

from bench.report import commit


def launch(cmd: list[str], log: Path, threads: int, label: str) -> int:
    """Run `cmd` with `threads` intra-op threads, appending its output to `log`; print one line when it ends."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.strftime("%H:%M:%S")
    with open(log, "a") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    print(f"[{t0} -> {time.strftime('%H:%M:%S')}] {label}: exit {rc}", flush=True)
    return rc


def generation(method: str, teacher_of: Callable[[str], Optional[str]]) -> int:
    """How many teachers stand before the method (ce -> sd_gen1 -> sd_gen2)."""
    teacher = teacher_of(method)
    return 0 if teacher is None else 1 + generation(teacher, teacher_of)


def run_waves(todo: list[tuple[str, int]], done: set, seeds: list[int], teacher_of: Callable[[str], Optional[str]],
              run: Callable[[tuple[str, int]], bool], jobs: int, threads: int, runs: Path) -> None:
    """Every (method, seed) of `todo`, `jobs` at a time: seed by seed (an interrupted study has whole seeds rather
    than whole methods), and within a seed one generation after another, so that a teacher is done before its
    student. `done` gains each run that succeeds. `runs/code_commit.txt` names the commit the runs were trained at."""
    stamp = runs / "code_commit.txt"
    if todo and not stamp.is_file():
        runs.mkdir(parents=True, exist_ok=True)
        stamp.write_text(commit() + "\n")
    print(f"{len(todo)} run(s) to do, {jobs} at a time, {threads} thread(s) each", flush=True)
    depth = max((generation(m, teacher_of) for m, _ in todo), default=0)
    with ThreadPoolExecutor(jobs) as pool:
        for seed in seeds:
            for g in range(1 + depth):
                wave = [(m, s) for m, s in todo if s == seed and generation(m, teacher_of) == g
                        and (teacher_of(m) is None or (teacher_of(m), s) in done)]
                done |= {job for job, ok in zip(wave, pool.map(run, wave)) if ok}
    if missing := [job for job in todo if job not in done]:
        print(f"not finished: {missing}", flush=True)
