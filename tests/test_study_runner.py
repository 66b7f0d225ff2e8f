"""bench/study_runner.py: the studies' job queue keeps every slot busy, never starts a student before its teacher
has finished, and skips a student whose teacher failed."""
from __future__ import annotations

import threading
import time

from bench.study_runner import run_queue

TEACHER = {"ce": None, "dsn": None, "gen1": "ce"}


def _queue(tmp_path, todo, seconds, fail=()):
    events, lock = [], threading.Lock()

    def run(job):
        with lock:
            events.append(("start", job))
        time.sleep(seconds[job[0]])
        with lock:
            events.append(("end", job))
        return job not in fail

    done: set = set()
    run_queue(todo, done, [0, 1], TEACHER.get, run, 2, 1, tmp_path)
    return events, done


def test_no_slot_waits_for_the_slow_run_of_the_seed_before(tmp_path):
    todo = [(m, s) for s in (0, 1) for m in ("ce", "dsn", "gen1")]
    events, done = _queue(tmp_path, todo, {"ce": 0.05, "dsn": 0.6, "gen1": 0.05})
    assert done == set(todo) and (tmp_path / "code_commit.txt").is_file()
    order = [job for kind, job in events if kind == "start"]
    assert order[:2] == [("ce", 0), ("dsn", 0)]  # lower seeds first, in the listed order
    ends = [job for kind, job in events if kind == "end"]
    for s in (0, 1):  # a student starts only after its teacher has finished
        assert events.index(("end", ("ce", s))) < events.index(("start", ("gen1", s)))
    # while seed 0's slow dsn runs, the other slot goes on with gen1 of seed 0 and then seed 1's runs
    assert ends.index(("dsn", 0)) > ends.index(("ce", 1))
    assert events.index(("start", ("ce", 1))) < events.index(("end", ("dsn", 0)))


def test_a_student_whose_teacher_failed_is_not_run(tmp_path, capsys):
    todo = [("ce", 0), ("gen1", 0), ("dsn", 0)]
    events, done = _queue(tmp_path, todo, {"ce": 0.01, "dsn": 0.01, "gen1": 0.01}, fail={("ce", 0)})
    assert done == {("dsn", 0)} and ("start", ("gen1", 0)) not in events
    assert "not finished: [('ce', 0), ('gen1', 0)]" in capsys.readouterr().out
