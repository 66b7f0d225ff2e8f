"""The methods study: its configs, the teacher chain, the paired-difference rule and the report, end to end."""
import json
import math
import types

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


def test_clear_needs_one_sign_even_when_the_mean_is_far_from_zero():
    # mean 3.98, standard error 1.02: twice the error is 2.04, so only the sign condition refuses it
    assert not stat([5.0, 5.0, 5.0, 5.0, -0.1])["clear"]
    assert stat([5.0, 5.0, 5.0, 5.0, 0.1])["clear"]


def _claims_text(found: dict) -> dict[str, str]:
    return {c["claim"].split(":")[0]: c["text"] for c in claims(found)}


def test_v1_claims_each_branch():
    """Each verdict of the earlier study's claims, so a flipped sign or a lost branch shows."""
    seeds = (0, 1, 2)
    found = {
        "ce": {s: _run({"exit0": 90.0 + 0.1 * s}, ece=2.0) for s in seeds},
        "dsn": {s: _run({"exit0": 85.0, "exit3": 90.0, "ens_logits": 89.0, "ens_probs": 89.0}) for s in seeds},
        # the shallow exit clearly below the plain network: BYOT's "every exit beats it" is contradicted
        "byot_iccv": {s: _run({"exit0": 80.0 + 0.2 * s, "exit3": 92.0 + 0.2 * s, "ens_logits": 92.0 + s,
                               "ens_probs": 92.0 + s}) for s in seeds},
        # CS-KD clearly better (error lower by 1-1.5 points on every seed)
        "cskd": {s: _run({"exit0": 91.0 + 0.1 * s + 0.25 * s}, ece=1.9) for s in seeds},
        # Beta inside the noise of both label smoothings; the generations clearly worse
        "ls_all": {s: _run({"exit0": 90.0}) for s in seeds},
        "ls_wrong": {s: _run({"exit0": 90.0}) for s in seeds},
        "beta": {s: _run({"exit0": 90.0 + (0.5, -0.5, 0.1)[s]}) for s in seeds},
        "sd_gen1": {s: _run({"exit0": 89.0 + 0.1 * s - 0.1 * s}) for s in seeds},
        "sd_gen2": {s: _run({"exit0": 88.0 - 0.2 * s}) for s in seeds},
    }
    text = _claims_text(found)
    assert "every exit and the ensemble beat the plain model — contradicted" in text["BYOT (ICCV settings)"]
    assert "lower error than CE — supported" in text["CS-KD"]
    assert "Much lower ECE than CE — partly" in text["CS-KD"]  # 1.9 against 2.0-ish: lower, not by a third
    assert "Beta smoothing beats label smoothing (top-1) — inside seed noise" in text["Beta smoothing beats label "
                                                                                       "smoothing"]
    assert "Later generations improve (top-1) — contradicted" in text["Later generations improve"]


# ---- the study v2: its statistics, its verdict rule, its declared comparisons and their held-equal settings ----

def test_t_interval_against_the_closed_form_for_two_degrees_of_freedom():
    from bench.study_stats import t_interval

    iv = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, standard error 1/sqrt(3)
    # Student t with 2 degrees of freedom: F(t) = 1/2 + t / (2 sqrt(2 + t^2)),
    # so its q-quantile is (2q - 1) sqrt(2 / (1 - (2q - 1)^2))
    t975 = 0.95 * math.sqrt(2 / (1 - 0.95 ** 2))
    se = 1 / math.sqrt(3)
    assert (iv.n, iv.mean, iv.sd) == (3, 2.0, 1.0)
    assert iv.lo == pytest.approx(2 - t975 * se, abs=1e-9) and iv.hi == pytest.approx(2 + t975 * se, abs=1e-9)
    t = 2 / se
    assert iv.p == pytest.approx(2 * (0.5 - t / (2 * math.sqrt(2 + t * t))), abs=1e-9)  # 0.0742
    assert t_interval([0.5]).n == 1 and t_interval([0.5]).p == 1.0


def test_holm_by_hand():
    from bench.study_stats import holm

    # sorted 0.01, 0.03, 0.04, 0.2 -> x4, x3, x2, x1 = 0.04, 0.09, 0.08 (raised to 0.09: monotone), 0.2
    assert holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped


@pytest.mark.parametrize("diffs, p_holm, paper, expected", [
    ([1.0, 1.2, 0.8, 1.1, 0.9], 0.01, None, "supported"),
    ([1.0, 1.2, 0.8, 1.1, 0.9], 0.20, None, "inconclusive"),  # the same interval, but not after Holm
    ([-1.0, -1.2, -0.8, -1.1, -0.9], 0.01, None, "contradicted"),  # significant, the wrong way
    ([-1.0, -1.2, -0.8, -1.1, -0.9], 0.20, None, "inconclusive"),
    ([0.2, 0.3, 0.25, 0.2, 0.3], 0.01, 1.5, "contradicted"),  # real, but the interval lies below the paper's effect
    ([0.2, 0.3, 0.25, 0.2, 0.3], 0.01, 0.26, "supported"),  # the paper's effect inside the interval
    ([0.5, -0.4, 0.3, -0.2, 0.1], 0.90, 0.1, "inconclusive"),
    ([1.0], 0.0, None, "inconclusive"),
])
def test_verdict_rule(diffs, p_holm, paper, expected):
    from bench.study_stats import t_interval, verdict

    assert verdict(t_interval(diffs), p_holm, paper) == expected


def _v2_run(top1: dict[str, float], ece: float = 5.0) -> dict:
    return {"test_best": {k: {"top1": v, "ece15": ece, "nll": 0.4, "overconf": 3.0} for k, v in top1.items()},
            "best_epoch": 30, "epochs": 60, "cpu_s": 10.0}


def test_v2_comparisons_from_hand_made_runs():
    """Differences are a - b seed by seed, oriented by the declared sign, then Holm over the declared family."""
    from bench.methods_report_v2 import compare

    seeds = [str(s) for s in range(5)]
    jit = [0.0, 0.1, -0.1, 0.05, -0.05]
    ex = lambda base, d: {"exit0": base - 4 + d, "exit1": base - 2 + d, "exit2": base - 1 + d, "exit3": base + d,
                          "ens_logits": base + 0.5 + d}
    per_seed = {
        "ce": {s: _v2_run({"exit0": 88.0 + j}, ece=8.0) for s, j in zip(seeds, jit)},
        "ls": {s: _v2_run({"exit0": 88.0 + j}) for s, j in zip(seeds, jit)},
        "dsn": {s: _v2_run(ex(88.0, j)) for s, j in zip(seeds, jit)},
        "dsn_journal": {s: _v2_run(ex(88.0, j)) for s, j in zip(seeds, jit)},
        "byot_iccv": {s: _v2_run(ex(87.0, 1.1 * j)) for s, j in zip(seeds, jit)},  # 1 point below DSN: worse
        "byot_journal": {s: _v2_run(ex(88.0, -j)) for s, j in zip(seeds, jit)},  # noise around DSN
        "cskd": {s: _v2_run({"exit0": 89.5 + 1.1 * j}, ece=2.0) for s, j in zip(seeds, jit)},  # better, calibrated
        "beta": {s: _v2_run({"exit0": 88.0 - j}) for s, j in zip(seeds, jit)},
        "sd_gen1": {s: _v2_run({"exit0": 88.0 - j}) for s, j in zip(seeds, jit)},
    }
    rows = {r["name"]: r for r in compare(per_seed)}
    assert rows["cskd_error_vs_ce"]["diffs"] == pytest.approx([1.5 + 0.1 * j for j in jit])
    assert rows["cskd_ece_vs_ce"]["diffs"] == pytest.approx([6.0] * 5)  # ce's 8 minus cskd's 2: lower is better
    assert rows["byot_vs_dsn_bottleneck"]["diffs"] == pytest.approx([-1.0 + 0.1 * j for j in jit])
    verdicts = {k: r["verdict"] for k, r in rows.items()}
    assert verdicts == {"byot_vs_dsn_bottleneck": "contradicted", "byot_vs_dsn_journal": "inconclusive",
                        "journal_vs_bottleneck_heads": "inconclusive", "byot_deepest_vs_ce": "contradicted",
                        "byot_ensemble_vs_ce": "contradicted", "cskd_error_vs_ce": "supported",
                        "cskd_ece_vs_ce": "supported", "beta_vs_ls": "inconclusive", "sd_gen1_vs_ce": "inconclusive"}
    # the paper's effect, as a share of the baseline's error here: CS-KD's 11.0 % of ce's 12 points = 1.32
    assert rows["cskd_error_vs_ce"]["paper_effect_here"] == pytest.approx((24.71 - 21.99) / 24.71 * 12.0)
    ps = sorted(r["interval"]["p"] for r in rows.values())
    assert min(r["p_holm"] for r in rows.values()) == pytest.approx(min(1.0, 9 * ps[0]))


def test_v2_report_says_why_a_claim_is_contradicted_and_shows_the_last_epoch_where_every_run_has_it():
    from bench.methods_report_v2 import compare
    from bench.methods_report_v2_md import markdown

    jit = [0.0, 0.1, -0.1, 0.05, -0.05]
    ex = lambda base, d: {"exit0": base - 4 + d, "exit1": base - 2 + d, "exit2": base - 1 + d, "exit3": base + d,
                          "ens_logits": base + 0.5 + d}
    per_seed = {"ce": {str(s): _v2_run({"exit0": 88.0 + j}) for s, j in enumerate(jit)},
                "cskd": {str(s): _v2_run({"exit0": 88.4 + 1.1 * j}) for s, j in enumerate(jit)},  # +0.4 < 1.32
                "dsn": {str(s): _v2_run(ex(88.0, j)) for s, j in enumerate(jit)},
                "byot_iccv": {str(s): _v2_run(ex(87.0, 1.1 * j)) for s, j in enumerate(jit)}}  # 1 point worse
    rows = {r["name"]: r for r in compare(per_seed)}
    sec = {"scope": "s", "runs_commit": "abc", "cpu_hours": 0.1, "per_seed": per_seed,
           "comparisons": list(rows.values()), "methods": {m: m.upper() for m in per_seed}}
    lines = {ln.split(" (`")[0].lstrip("| "): ln for ln in markdown({"main": sec}).splitlines()}
    assert rows["cskd_error_vs_ce"]["verdict"] == rows["byot_vs_dsn_bottleneck"]["verdict"] == "contradicted"
    assert lines["CS-KD has lower error than CE"].endswith("**contradicted** (an effect, smaller than the paper's) |")
    assert lines["BYOT's distillation improves the exits over deep supervision alone (bottleneck heads)"].endswith(
        "**contradicted** (wrong sign) |")
    assert "last epoch top-1" not in markdown({"main": sec})  # no run has it
    for m, runs in per_seed.items():
        for r in runs.values():
            r["test_last_top1"] = {k: v["top1"] - (1.0 if m == "ce" else 2.0 if (m, k) == ("dsn", "ens_logits") else
                                                   0.0) for k, v in r["test_best"].items()}
    md = markdown({"main": sec})
    assert "| deepest top-1 | last epoch top-1 |" in md and "| `ce` (CE) | 5 | 88.00 ± 0.08 | 87.00 ± 0.08 |" in md
    # the stress test, and only it, says how far each method falls from its best-validation epoch to the last
    assert "Not declared" not in md
    assert markdown({"stress": sec}).rstrip().endswith(
        "(points, mean over seeds): `ce` 1.00, `cskd` 0.00, `dsn` 0.00 (its exit ensemble 2.00), `byot_iccv` 0.00 "
        "(its exit ensemble 0.00).")
    per_seed["ce"]["0"].pop("test_last_top1")  # one run without it: no column, rather than a mean over the rest
    assert "last epoch top-1" not in markdown({"main": sec})


def test_v2_stress_family_compares_only_its_own_methods_holm_over_them():
    from bench.methods_report_v2 import COMPARISONS, compare
    from bench.methods_study_v2 import METHODS, STRESS

    family = STRESS["methods"]
    assert all(METHODS[m][2] in (None, *family) for m in family)  # every student's teacher is in the family
    jit = [0.0, 0.1, -0.1]
    per_seed = {m: {str(s): _v2_run({"exit0": 88.0 + j * (i + 1), "exit1": 88.0, "exit2": 88.0, "exit3": 88.0 + j,
                                     "ens_logits": 88.0}) for s, j in enumerate(jit)} for i, m in enumerate(family)}
    rows = compare(per_seed, family=family)
    names = {c["name"] for c in COMPARISONS if {c["a"], c["b"]} <= set(family)}
    assert {r["name"] for r in rows} == names and "journal_vs_bottleneck_heads" not in names and len(names) == 7
    ps = sorted(r["interval"]["p"] for r in rows)
    assert min(r["p_holm"] for r in rows) == pytest.approx(min(1.0, len(names) * ps[0]))  # m = 7, not 9
    assert len(compare(per_seed)) == len(COMPARISONS)


def _flat(cfg) -> dict:
    import dataclasses

    def walk(prefix, obj):
        for k, v in dataclasses.asdict(obj).items() if dataclasses.is_dataclass(obj) else obj.items():
            if isinstance(v, dict):
                yield from walk(f"{prefix}{k}.", v)
            else:
                yield f"{prefix}{k}", v
    return dict(walk("", cfg))


# what each comparison may change; everything else (network, data, split, subset, schedule, optimizer, epochs,
# batch, precision) must be the same on both sides
ALLOWED = {
    "byot_vs_dsn_bottleneck": ("objective.",),
    "byot_vs_dsn_journal": ("objective.", "exits.hint_adapter"),
    "journal_vs_bottleneck_heads": ("exits.head",),
    "byot_deepest_vs_ce": ("objective.", "exits."),
    "byot_ensemble_vs_ce": ("objective.", "exits."),
    "cskd_error_vs_ce": ("objective.", "data.sampler"),
    "cskd_ece_vs_ce": ("objective.", "data.sampler"),
    "beta_vs_ls": ("objective.",),
    "sd_gen1_vs_ce": ("objective.", "seed"),
}


@pytest.mark.parametrize("stress", [False, True])
def test_v2_compared_methods_share_every_setting_but_the_compared_one(tmp_path, stress):
    from bench import methods_study_v2 as v2
    from bench.methods_report_v2 import COMPARISONS

    assert {c["name"] for c in COMPARISONS} == set(ALLOWED)
    for c in COMPARISONS:
        a, b = (_flat(v2.run_config(m, 3, tmp_path, stress)) for m in (c["a"], c["b"]))
        differ = {k for k in a if a[k] != b[k] and k != "checkpoint.dir"}
        assert differ, c["name"]
        assert all(k.startswith(ALLOWED[c["name"]]) for k in differ), (c["name"], differ)
        assert a["data.split_seed"] == b["data.split_seed"] == 3
    ce, gen = v2.run_config("ce", 3, tmp_path, stress), v2.run_config("sd_gen1", 3, tmp_path, stress)
    assert gen.seed != ce.seed and gen.objective.teacher.checkpoint == str(tmp_path / "ce" / "seed3" / "best.pt")
    beta = v2.run_config("beta", 0, tmp_path, stress)
    steps = beta.schedule.epochs * (beta.data.limit_train // beta.data.batch_size)
    assert 1 / (1 - beta.objective.beta.ema_decay) / steps == pytest.approx(1000 / (200 * 391), rel=0.01)
    assert (beta.data.label_noise > 0) == stress and beta.data.balanced_subset


def test_v2_report_only_rewrites_the_md_from_the_json(tmp_path):
    from bench.methods_report_v2 import compare
    from bench.methods_report_v2_md import STEM, write_report

    per_seed = {m: {str(s): _v2_run({"exit0": 88.0 + s * 0.1, "exit1": 88, "exit2": 88, "exit3": 88,
                                     "ens_logits": 88}) for s in range(2)} for m in ("ce", "cskd", "dsn")}
    sec = {"scope": "test scope", "runs_commit": "abc", "methods": {"ce": "CE", "cskd": "CS-KD", "dsn": "DSN"},
           "cpu_hours": 0.1, "per_seed": per_seed, "comparisons": compare(per_seed)}
    first = write_report(tmp_path, "main", sec)
    (tmp_path / f"{STEM}.md").unlink()
    assert write_report(tmp_path, "main", None) == first == (tmp_path / f"{STEM}.md").read_text()
    assert "test scope" in first and "Stress test" in first and (tmp_path / f"{STEM}.png").is_file()


def test_v2_runs_a_teacher_and_a_fresh_student_then_reports_from_the_json(tmp_path, monkeypatch):
    """Two tiny v2 runs in this process (ce, then sd_gen1 from a fresh seed), their study.json, the report's
    section, and --report-only rebuilding the md from the json alone."""
    from bench import methods_study_v2 as v2
    from bench.methods_report_v2 import section
    from bench.methods_report_v2_md import STEM

    monkeypatch.setattr(v2, "EPOCHS", 1)
    monkeypatch.setattr(v2, "TRAIN_IMAGES", 260)  # 26 per class, 2 steps of 128
    monkeypatch.setattr(v2, "COMMON", [*v2.COMMON, "data.val_split=500", "data.limit_eval=500"])
    runs, out = tmp_path / "runs", tmp_path / "out"
    for method in ("ce", "sd_gen1"):
        v2.run_one(method, 0, runs, stress=False)
    ce, gen = (json.loads((runs / m / "seed0" / "study.json").read_text()) for m in ("ce", "sd_gen1"))
    assert (ce["model_seed"], gen["model_seed"]) == (0, 1000) and ce["train_images"] == 260
    assert set(ce["test_best"]["exit0"]) >= {"top1", "ece15", "nll", "overconf"}
    sec = section(runs, {m: w for m, (w, _, _) in v2.METHODS.items()}, 260, 1, 0.0)
    assert set(sec["per_seed"]) == {"ce", "sd_gen1"} and sec["per_seed"]["ce"]["0"]["epochs"] == 1
    gen_vs_ce = {c["name"]: c for c in sec["comparisons"]}["sd_gen1_vs_ce"]
    assert gen_vs_ce["diffs"] == [pytest.approx(gen["test_best"]["exit0"]["top1"] - ce["test_best"]["exit0"]["top1"])]
    assert gen_vs_ce["verdict"] == "inconclusive"  # one seed
    unpaired = [c for c in sec["comparisons"] if not c["seeds"]]  # e.g. BYOT against CE: no byot run
    assert unpaired and all(c["paper_effect_here"] is None for c in unpaired)
    json.dumps(sec, allow_nan=False)  # strict json: no NaN where a comparison has no seed
    assert v2.main(["--report-only", "--out", str(out)]) == 0  # no json yet: every section says not run
    assert "Not run yet." in (out / f"{STEM}.md").read_text()
    from bench.methods_report_v2_md import write_report
    md = write_report(out, "main", sec)
    (out / f"{STEM}.md").unlink()
    assert v2.main(["--report-only", "--out", str(out)]) == 0 and (out / f"{STEM}.md").read_text() == md


def test_v2_resumes_from_the_committed_json_in_a_new_checkout(tmp_path, monkeypatch):
    """The runs folder is not committed: a later session counts the json's seeds as done, trains a student's
    teacher again when its checkpoint is gone, and keeps the committed results in the report."""
    from bench import methods_study_v2 as v2
    from bench.methods_report_v2 import section

    launched = []
    monkeypatch.setattr(v2, "_launch", lambda job, args: launched.append(job) or True)
    earlier = {"ce": {"0": _v2_run({"exit0": 88.0})}, "ls": {"0": _v2_run({"exit0": 87.0})}}
    args = types.SimpleNamespace(seeds=[0, 1], methods=["ce", "ls", "sd_gen1"], runs=tmp_path / "runs", jobs=1,
                                 threads=1)
    v2.run_all(args, earlier)
    # seed 0: ce again (the student's teacher, its best.pt is gone), then sd_gen1; ls is done. seed 1: all three.
    assert launched == [("ce", 0), ("sd_gen1", 0), ("ce", 1), ("ls", 1), ("sd_gen1", 1)]
    launched.clear()
    (tmp_path / "runs" / "ce" / "seed0").mkdir(parents=True, exist_ok=True)
    (tmp_path / "runs" / "ce" / "seed0" / "best.pt").write_bytes(b"")
    v2.run_all(types.SimpleNamespace(**{**vars(args), "seeds": [0]}), earlier)
    assert launched == [("sd_gen1", 0)]  # the teacher's checkpoint is there: only the student
    retrained = {"method": "ce", "seed": 0, **_v2_run({"exit0": 50.0})}
    (tmp_path / "runs" / "ce" / "seed0" / "study.json").write_text(json.dumps(retrained))
    sec = section(tmp_path / "runs", {"ce": "CE"}, 100, 1, 0.0, earlier, "abc")
    assert sec["per_seed"]["ce"]["0"]["test_best"]["exit0"]["top1"] == 88.0  # the committed result stays


def test_the_earlier_report_is_labelled_the_under_fit_regime_from_its_own_json():
    """The committed v1 report carries the banner its writer makes from the committed json: 37 of 42 runs peaked at
    their last epoch, CE's ECE 0.60 %, and it points to the study v2."""
    import json
    from pathlib import Path

    from bench.methods_report_md import regime_note

    res = Path(__file__).resolve().parents[1] / "bench" / "results"
    doc = json.loads((res / "methods_fashion_mnist.json").read_text())
    note = regime_note(doc["runs"], doc["summary"])
    assert "In 37 of 42 runs" in note and "CE's test ECE is 0.60 %" in note and "methods_fashion_mnist_v2.md" in note
    assert (res / "methods_fashion_mnist.md").read_text().startswith(f"# Methods study on Fashion-MNIST\n\n{note}\n")


def test_readme_summary_of_the_study_v2_agrees_with_the_committed_json():
    """The README's verdict lines are what the json gives, for the main study and the stress test, so a new seed
    that changes a verdict changes both."""
    import json
    from pathlib import Path

    from bench.methods_report_v2_md import STEM, STRESS_HEAD, readme_summary

    root = Path(__file__).resolve().parents[1]
    doc = json.loads((root / "bench" / "results" / f"{STEM}.json").read_text())
    block = readme_summary(doc).splitlines()
    sections = [k for k in ("main", "stress") if k in doc]
    assert len(block) == sum(1 + len(doc[k]["comparisons"]) for k in sections)
    assert "\n".join("  " + ln for ln in block) in (root / "README.md").read_text()
    md = (root / "bench" / "results" / f"{STEM}.md").read_text()
    for key, part in zip(sections, md.split("\n## Results\n")[1].split("\n## Stress test")):
        at = 0 if key == "main" else next(i for i, ln in enumerate(block) if ln.startswith(STRESS_HEAD))
        assert block[at].startswith(STRESS_HEAD if key == "stress" else "Its verdicts at")
        for c, line in zip(doc[key]["comparisons"], block[at + 1:]):  # README and md give each claim one verdict
            assert line.startswith(f"- {c['claim']} (") and f"**{c['verdict']}**" in line
            assert f"**{c['verdict']}**" in next(ln for ln in part.splitlines() if ln.startswith(f"| {c['claim']} "))
    # the README's prose on the stress test quotes the md's best-to-last-epoch drops, not figures of its own
    import re
    prose = " ".join((root / "README.md").read_text().split()).split("from there to the last epoch")[1].split(". ")[0]
    quoted = re.findall(r"\d+\.\d\d", prose)
    assert len(quoted) == 7 and set(quoted) <= set(re.findall(r"\d+\.\d\d", md.split("**Not declared")[1]))


def test_update_readme_replaces_only_the_summary_block(tmp_path):
    import json
    from pathlib import Path

    from bench.methods_report_v2_md import STEM, readme_summary, update_readme

    doc = json.loads((Path(__file__).resolve().parents[1] / "bench" / "results" / f"{STEM}.json").read_text())
    readme = tmp_path / "README.md"
    readme.write_text("intro\n- v2:\n  Its verdicts at 1 seed (stale):\n  - old claim: **supported**\n  - another\n"
                      "  Its label-noise stress test at 1 seed (stale):\n  - old noise claim\n- The earlier study\n")
    assert update_readme(readme, doc)
    block = "\n".join("  " + ln for ln in readme_summary(doc).splitlines())
    assert readme.read_text() == f"intro\n- v2:\n{block}\n- The earlier study\n"
    readme.write_text("no block here\n")
    assert not update_readme(readme, doc) and readme.read_text() == "no block here\n"
