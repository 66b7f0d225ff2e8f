"""Running a study's training runs: each in a child process with a fixed thread count and its own log, several at
a time, lower seeds first and a teacher before its student. Shared by the methods studies and the pilot."""
from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
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


def run_queue(todo: list[tuple[str, int]], done: set, seeds: list[int], teacher_of: Callable[[str], Optional[str]],
              run: Callable[[tuple[str, int]], bool], jobs: int, threads: int, runs: Path) -> None:
    """Every (method, seed) of `todo`, `jobs` at a time. Whenever a slot is free it takes the first job in (seed,
    generation, listed) order whose teacher is done: lower seeds first, so an interrupted study has whole seeds
    rather than whole methods, yet no slot waits for a slow run of the seed before (waves per seed and generation
    left one of two cores idle behind each seed's slowest run and its lone student). `done` gains each run that
    succeeds; a student whose teacher failed is not run. `runs/code_commit.txt` names the commit the runs were
    trained at."""
    stamp = runs / "code_commit.txt"
    if todo and not stamp.is_file():
        runs.mkdir(parents=True, exist_ok=True)
        stamp.write_text(commit() + "\n")
    print(f"{len(todo)} run(s) to do, {jobs} at a time, {threads} thread(s) each", flush=True)
    rank = {s: i for i, s in enumerate(seeds)}
    pending = sorted(todo, key=lambda job: (rank.get(job[1], len(rank)), generation(job[0], teacher_of)))
    running: dict = {}
    with ThreadPoolExecutor(jobs) as pool:
        while pending or running:
            waiting = set(pending) | set(running.values())
            for job in list(pending):
                teacher = teacher_of(job[0])
                if teacher is not None and (teacher, job[1]) not in done:
                    if (teacher, job[1]) not in waiting:  # its teacher failed: it can never start
                        pending.remove(job)
                    continue
                if len(running) < jobs:
                    pending.remove(job)
                    running[pool.submit(run, job)] = job
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                job = running.pop(f)
                if f.result():
                    done.add(job)
    if missing := [job for job in todo if job not in done]:
        print(f"not finished: {missing}", flush=True)
