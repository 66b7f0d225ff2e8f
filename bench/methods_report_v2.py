"""The numbers of the methods study v2's report (`bench/methods_report_v2_md.py` writes the files).

The primary comparisons are declared here, before any result: each is a paired per-seed difference `a - b`,
oriented so that the paper predicts a positive value, with the settings it holds equal.
"""
from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional

from bench.study_stats import Interval, holm, t_interval, verdict
from engine.evaluate import deepest_key

STEM = "methods_fashion_mnist_v2"
EXIT_KEYS = ("exit0", "exit1", "exit2", "exit3")
# name -> a, a's predictor, b, b's predictor, metric, sign, what is held equal, the claim, the paper's effect
# (a relative reduction of the error of b, applied to b's error here; None where no figure was found)
COMPARISONS: list[dict] = [
    dict(name="byot_vs_dsn_bottleneck", a="byot_iccv", pa="exits_mean", b="dsn", pb="exits_mean", metric="top1",
         sign=1, held="network, bottleneck heads, data, schedule",
         claim="BYOT's distillation improves the exits over deep supervision alone (bottleneck heads)",
         paper=None, source="BYOT reports no DSN row with the same heads"),
    dict(name="byot_vs_dsn_journal", a="byot_journal", pa="exits_mean", b="dsn_journal", pb="exits_mean",
         metric="top1", sign=1, held="network, journal heads, data, schedule",
         claim="BYOT's distillation improves the exits over deep supervision alone (journal heads)",
         paper=None, source="not reported"),
    dict(name="journal_vs_bottleneck_heads", a="dsn_journal", pa="exits_mean", b="dsn", pb="exits_mean",
         metric="top1", sign=1, held="loss (DSN), network, data, schedule",
         claim="attention + SepConv heads beat bottleneck heads (same loss)", paper=None, source="not reported"),
    dict(name="byot_deepest_vs_ce", a="byot_iccv", pa="deepest", b="ce", pb="deepest", metric="top1", sign=1,
         held="backbone, data, schedule", claim="BYOT's deepest exit beats the plain network",
         paper=(78.64 - 77.09) / (100 - 77.09), source="BYOT Table 1, ResNet-18, CIFAR-100: 77.09 -> 78.64"),
    dict(name="byot_ensemble_vs_ce", a="byot_iccv", pa="ens_logits", b="ce", pb="deepest", metric="top1", sign=1,
         held="backbone, data, schedule", claim="BYOT's exit ensemble beats the plain network",
         paper=(79.67 - 77.09) / (100 - 77.09), source="BYOT Table 1, ResNet-18, CIFAR-100: 77.09 -> 79.67"),
    dict(name="cskd_error_vs_ce", a="cskd", pa="deepest", b="ce", pb="deepest", metric="top1", sign=1,
         held="network, data, schedule, steps", claim="CS-KD has lower error than CE",
         paper=(24.71 - 21.99) / 24.71, source="CS-KD, ResNet-18, CIFAR-100: error 24.71 -> 21.99"),
    dict(name="cskd_ece_vs_ce", a="cskd", pa="deepest", b="ce", pb="deepest", metric="ece15", sign=-1,
         held="network, data, schedule, steps", claim="CS-KD has (much) lower ECE than CE",
         paper=None, source="CS-KD's ECE table was not found"),
    dict(name="beta_vs_ls", a="beta", pa="deepest", b="ls", pb="deepest", metric="top1", sign=1,
         held="network, data, schedule", claim="Beta smoothing beats label smoothing",
         paper=None, source="'often outperforms' (Zhang & Sabuncu 2020); no figure found"),
    dict(name="sd_gen1_vs_ce", a="sd_gen1", pa="deepest", b="ce", pb="deepest", metric="top1", sign=1,
         held="network, data, schedule (fresh initialisation)", claim="a second generation beats its teacher",
         paper=None, source="Zhang & Sabuncu 2020; no figure found"),
]
# what the json keeps of each run: the test figures at the best validation epoch (every exit and ensemble), the last
# epoch's test top-1 (where label noise is memorised late, the best epoch hides it), the cost and the commit
PER_SEED = ("test_best", "test_last_top1", "best_epoch", "epochs", "cpu_s", "commit")
# The stress test, declared before it ran: 2 seeds of the family without the journal-head pair (whose claim is about
# heads, not noise). A run is 6,000 steps, 2.6 times a main-study run: one seed of all nine methods would be about
# 2 wall-hours with two runs at a time on 2 cores.
STRESS = {"limit_train": 25600, "label_noise": 0.3, "epochs": 30, "seeds": [0, 1],
          "methods": ["ce", "ls", "dsn", "byot_iccv", "cskd", "beta", "sd_gen1"]}
METRIC_NAMES = {"top1": "top-1 (points)", "ece15": "ECE-15 (points)"}
SCOPE = ("Fashion-MNIST, CIFAR-stem ResNet-18 at width 0.25 (one block per stage), {images:,} class-balanced "
         "training images{noise}, no augmentation, {epochs} epochs: the papers ran 150-300 epochs on CIFAR-100 and "
         "ImageNet with wider networks, so a figure here tests the mechanism at this scale, not the papers' numbers.")


def value(run: dict, predictor: str, metric: str) -> float:
    res = run["test_best"]
    if predictor == "exits_mean":
        return statistics.fmean(res[k][metric] for k in EXIT_KEYS)
    if predictor == "deepest":
        predictor = deepest_key(res)
    return res[predictor][metric]


def compare(per_seed: dict[str, dict[str, dict]], family: Optional[Iterable[str]] = None) -> list[dict]:
    """Every declared comparison over the seeds both sides have: differences, interval, Holm p, verdict. With a
    `family` of methods (the stress test's), only the comparisons between two of them, Holm-corrected together."""
    rows = []
    for c in COMPARISONS if family is None else [c for c in COMPARISONS if {c["a"], c["b"]} <= set(family)]:
        a, b = per_seed.get(c["a"], {}), per_seed.get(c["b"], {})
        seeds = sorted(set(a) & set(b), key=int)
        diffs = [c["sign"] * (value(a[s], c["pa"], c["metric"]) - value(b[s], c["pb"], c["metric"])) for s in seeds]
        # no paired seed yet: no baseline error to scale the paper's effect by (None, not NaN: the json stays strict)
        effect = (c["paper"] * statistics.fmean(100 - value(b[s], c["pb"], "top1") for s in seeds)
                  if c["paper"] is not None and seeds else None)
        rows.append({**{k: c[k] for k in ("name", "claim", "a", "pa", "b", "pb", "metric", "sign", "held",
                                          "source")}, "seeds": [int(s) for s in seeds], "diffs": diffs,
                     "interval": t_interval(diffs).as_dict(), "paper_rel_error_reduction": c["paper"],
                     "paper_effect_here": effect})
    for row, p in zip(rows, holm([r["interval"]["p"] for r in rows])):
        row["p_holm"] = p
    for row in rows:
        row["verdict"] = verdict(Interval(**row["interval"]), row["p_holm"], row["paper_effect_here"])
    return rows


def load_runs(runs: Path) -> dict[str, dict[str, dict]]:
    out: dict = {}
    for p in sorted(runs.glob("*/seed*/study.json")):
        r = json.loads(p.read_text())
        meta = p.with_name("meta.json")  # the commit of the run's last start
        if meta.is_file():
            r.setdefault("commit", json.loads(meta.read_text()).get("commit"))
        out.setdefault(r["method"], {})[str(r["seed"])] = r
    return out


def committed(path: Path, key: str) -> dict[str, dict[str, dict]]:
    """method -> seed -> result already in the committed json's `key` section: the runs folder is not committed,
    so a later session finds the earlier seeds here."""
    if not path.is_file():
        return {}
    return json.loads(path.read_text()).get(key, {}).get("per_seed", {})


def section(runs: Path, methods: dict[str, str], images: int, epochs: int, noise: float,
            earlier: dict | None = None, earlier_commit: str | None = None) -> dict:
    """One section of the json (the main study or the stress test): scope, per-seed results, comparisons. The
    `earlier` results (from the committed json) are kept; the runs in `runs` add the seeds they lack."""
    per_seed = {m: dict(v) for m, v in (earlier or {}).items()}
    for m, v in load_runs(runs).items():  # a committed result stays (a teacher trained again does not replace it)
        for seed, r in v.items():
            old = per_seed.setdefault(m, {}).get(seed)
            if old is None or old["test_best"] == r["test_best"]:  # the same run: its fields fill what the json lacks
                per_seed[m][seed] = {**(old or {}), **r}
    noise_text = f" with {noise:.0%} symmetric label noise" if noise else ""
    code = (runs / "code_commit.txt").read_text().strip() if (runs / "code_commit.txt").is_file() else "unknown"
    if earlier_commit and code not in earlier_commit:
        code = f"{earlier_commit}, then {code}"
    elif earlier_commit:
        code = earlier_commit
    cpu_h = sum(r["cpu_s"] for m in per_seed.values() for r in m.values()) / 3600
    commits = Counter(r["commit"] for m in per_seed.values() for r in m.values() if r.get("commit"))
    return {"scope": SCOPE.format(images=images, noise=noise_text, epochs=epochs), "runs_commit": code,
            "train_images": images, "epochs": epochs, "label_noise": noise, "methods": methods,
            "cpu_hours": round(cpu_h, 2), "run_commits": dict(commits.most_common()),
            "per_seed": {m: {s: {k: r[k] for k in PER_SEED if k in r}
                             for s, r in sorted(v.items(), key=lambda kv: int(kv[0]))} for m, v in per_seed.items()},
            "comparisons": compare(per_seed, family=methods)}
