"""The methods study: its configs, the teacher chain, the paired-difference rule and the report, end to end."""
import json
import math

import pytest

from bench import methods_study as study
from bench.methods_report import claims, paired, stat, summarize


def test_every_method_config_is_valid_and_names_what_it_trains(tmp_path):
    cfgs = {m: study.run_config(m, 1, tmp_path, study.SCHEDULE) for m in study.METHODS}
    assert {m for m, c in cfgs.items() if c.exits.stages} == {"dsn", "byot_iccv", "byot_journal"}
    assert all(c.exits.stages == [0, 1, 2] for c in cfgs.values() if c.exits.stages)
    assert {m for m, c in cfgs.items() if c.data.sampler == "class_pair"} == {"cskd", "cskd_e", "mixup_cskd"}
    assert cfgs["ls_all"].objective.label_smoothing.convention == "all_classes"
    assert cfgs["ls_wrong"].objective.label_smoothing.convention == "wrong_classes"
    assert cfgs["sd_gen2"].objective.teacher.checkpoint == str(tmp_path / "sd_gen1" / "seed1" / "best.pt")
    # identical schedules: only the method's own keys differ
    assert {(c.schedule.epochs, c.data.batch_size, c.data.limit_train, c.optim.lr, c.seed) for c in cfgs.values()} \
        == {(8, 128, 25600, 0.1, 1)}
    assert [study.generation(m) for m in ("ce", "sd_gen1", "sd_gen2", "cskd")] == [0, 1, 2, 0]


def test_clear_needs_twice_the_standard_error_and_one_sign():
    st = stat([1.0, 2.0, 3.0])  # mean 2, sd 1, standard error 1/sqrt(3) = 0.577 -> 2 > 1.155
    assert (st["mean"], st["std"], st["clear"]) == (2.0, 1.0, True)
    assert not stat([3.0, -0.1, 3.0])["clear"]  # the mean is large, but one seed disagrees in sign
    assert not stat([0.1, 1.0, 2.0])["clear"]  # mean 1.03, standard error 0.55: less than twice
    assert not stat([5.0])["clear"] and math.isnan(stat([5.0])["std"])


def _run(top1: dict[str, float], ece: float = 1.0) -> dict:
    return {"test_best": {k: {"top1": v, "nll": 0.3, "ece15": ece} for k, v in top1.items()}, "cpu_s": 1.0,
            "wall_s": 1.0}


def test_claims_from_hand_made_runs():
    seeds = (0, 1, 2)
    found = {
        "ce": {s: _run({"exit0": 90.0 + 0.1 * s}, ece=2.0) for s in seeds},
        "dsn": {s: _run({"exit0": 85.0, "exit1": 88.0, "exit3": 90.0 + 0.1 * s,
                         "ens_logits": 89.0, "ens_probs": 89.0}) for s in seeds},
        # every BYOT exit above the plain model and above DSN, the shallowest by the most
        "byot_iccv": {s: _run({"exit0": 91.0 + s, "exit1": 91.5 + s, "exit3": 91.0 + 0.1 * s + 0.5 * s,
                               "ens_logits": 92.0, "ens_probs": 92.0}) for s in seeds},
        # CS-KD: error inside the noise (+0.3, -0.3, 0), ECE halved on every seed
        "cskd": {s: _run({"exit0": 90.0 + 0.1 * s + (0.3, -0.3, 0.0)[s]}, ece=1.0) for s in seeds},
    }
    assert paired(found, "byot_iccv", "exit0", "dsn", "exit0", "top1")["values"] == [6.0, 7.0, 8.0]
    assert summarize(found)["byot_iccv"]["deepest"]["top1"]["mean"] == pytest.approx(91.6)
    text = {c["claim"].split(":")[0]: c["text"] for c in claims(found)}
    assert "every exit and the ensemble beat the plain model — supported" in text["BYOT (ICCV settings)"]
    assert "Shallow exits gain the most — supported" in text["BYOT (ICCV settings)"]
    assert "lower error than CE — inside seed noise" in text["CS-KD"]
    assert "Much lower ECE than CE — supported" in text["CS-KD"] and "-50% of CE's 2.00%" in text["CS-KD"]


def test_study_end_to_end_teacher_first_resumable(tmp_path, capsys):
    """Two tiny runs (a teacher and its student) through the committed script, then a re-run that trains nothing."""
    args = ["--methods", "ce", "sd_gen1", "--seeds", "0", "--jobs", "1", "--epochs", "1", "--limit-train", "256",
            "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    assert study.main(args) == 0
    logs = capsys.readouterr().out
    assert logs.index("ce seed 0: exit 0") < logs.index("sd_gen1 seed 0: exit 0")
    result = json.loads((tmp_path / "runs" / "sd_gen1" / "seed0" / "study.json").read_text())
    assert set(result["test_best"]["exit0"]) >= {"top1", "nll", "ece15", "ece20", "recall1", "overconf"}
    report = json.loads((tmp_path / "out" / "methods_fashion_mnist.json").read_text())
    assert report["runs_finished"] == 2 and report["claims"][0]["claim"] == "Later generations improve"
    assert study.main(args) == 0
    assert "0 run(s) to do" in capsys.readouterr().out
    assert (tmp_path / "out" / "methods_fashion_mnist.md").read_text().count("| `ce` |") == 2
