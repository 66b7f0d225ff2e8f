"""The methods study's report files: `methods_fashion_mnist.json`, `.md` and `.png` (numbers from
`bench/methods_report.py`)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from bench.methods_report import claims, load, summarize
from bench.report import commit, md_table, write_report
from engine.evaluate import deepest_key

METRICS = [("top1", "top-1 (%)", "{:.2f}"), ("nll", "NLL", "{:.4f}"), ("ece15", "ECE-15 (%)", "{:.2f}"),
           ("ece20", "ECE-20 (%)", "{:.2f}"), ("overconf", "conf − acc (pts)", "{:+.2f}"),
           ("recall1", "Recall@1 (%)", "{:.2f}")]
MULTI_EXIT = ("dsn", "byot_iccv", "byot_journal")
PREDICTORS = ("exit0", "exit1", "exit2", "exit3", "ens_logits", "ens_probs")
HEAD = [h for _, h, _ in METRICS]
STEM = "methods_fashion_mnist"


def _row(label: str, stats: dict) -> list[str]:
    """mean ± std of each metric; — where a predictor has none (Recall@1 of an ensemble)."""
    return [label, *("—" if (st := stats.get(k)) is None else fmt.format(st["mean"]) + (
        "" if math.isnan(st["std"]) else " ± " + fmt.format(st["std"]).lstrip("+")) for k, _, fmt in METRICS)]


def regime_note(runs: dict, summ: dict) -> str:
    """The banner that labels this study's regime, from its runs: how many peaked at their last epoch, CE's ECE."""
    every = [r for by_seed in runs.values() for r in by_seed.values()]
    at_last = sum(r["best_epoch"] == r["schedule"]["epochs"] for r in every)
    ce = summ.get("ce", {})
    ece = f"CE's test ECE is {ce[deepest_key(ce)]['ece15']['mean']:.2f} %" if ce else "CE was not run"
    return (f"> **The under-fit regime.** In {at_last} of {len(every)} runs the best validation epoch is the last one "
            f"and {ece}: the networks are still learning and CE is already calibrated, so the papers' "
            "regularisation and calibration effects cannot appear here. Its *clear* rule (mean beyond 2 standard "
            "errors, every seed agreeing) is too loose for 3 seeds, and its journal-BYOT gain over DSN compares "
            "different heads. The [methods study v2](methods_fashion_mnist_v2.md), in the memorisation regime, "
            "replaces it; this report is kept as the record of that regime.")


def markdown(meta: dict, summ: dict, cl: list[dict], table: dict, methods: list[str], runs: dict) -> str:
    s, ms = meta["schedule"], [m for m in methods if m in summ]
    text = [
        "# Methods study on Fashion-MNIST", "", regime_note(runs, summ), "",
        "Written by `python -m bench.methods_study` (resumable: it skips finished runs; `--report-only` rewrites "
        f"this file from them). The runs were trained at commit `{meta['commit'][:12]}`.", "",
        "**Setup.** The demo's network: CIFAR-stem ResNet-18, width 0.25 (16-32-64-128 channels), one block per "
        "stage, 28-px grey input; single-exit methods train the plain backbone, DSN and BYOT add exits after "
        f"stages 0-2 (0-based). Training subset: the first {s['limit_train']:,} of the 55,000 training images left "
        "after 5,000 are carved out for validation (the carve depends on the seed); pad-4 random crop + flip; "
        f"{s['epochs']} epochs of batch {s['batch_size']} (the subset is a multiple of the batch, so plain and "
        "class-pair runs take the same steps); SGD 0.1, momentum 0.9, Nesterov, weight decay 5e-4 (none on BN and "
        "biases), cosine schedule with 0.2 epochs of warm-up; identical for every method. Each method's own "
        f"hyper-parameters are its papers' defaults (table below). Seeds: {', '.join(map(str, meta['seeds']))}. "
        "Every figure: the **test set (10,000 images) with the best-validation checkpoint**, mean ± standard "
        "deviation over seeds. *conf − acc* is the mean confidence minus the accuracy, in points: positive is "
        "over-confident, negative under-confident (ECE measures the size of the miscalibration, this its "
        "direction).", "",
        f"**Cost.** {meta['runs_finished']} runs, {meta['cpu_s_total'] / 3600:.2f} CPU-hours in total "
        f"({meta['run_wall_s_total'] / 3600:.2f} h of run wall time, {meta['threads_per_run']} torch thread(s) per "
        f"run, two runs at a time); the study took {meta['study_wall_s'] / 3600:.2f} h of wall time on the 2-core "
        "machine it shared with other work (wall time is longer than CPU time for that reason; the runs are "
        "deterministic per seed, so the load does not change the figures).", ""]
    if meta["missing"]:
        text += [f"**Missing runs** ({len(meta['missing'])}): " + ", ".join(meta["missing"]) + ".", ""]
    text += ["## Deepest exit", "", md_table(["method", *HEAD], [_row(f"`{m}`", summ[m]["deepest"]) for m in ms]),
             "## Every exit and the ensembles (multi-exit methods)", "",
             "exit0..exit2 are the heads after stages 0-2, exit3 the backbone's own head; `ens_logits` averages "
             "the logits of the four exits, `ens_probs` their probabilities. The plain model (`ce`) has only its "
             "deepest exit.", ""]
    for m in [m for m in (*MULTI_EXIT, "ce") if m in summ]:
        text += [f"**`{m}`**" + (" (plain model)" if m == "ce" else ""), "",
                 md_table(["predictor", *HEAD], [_row(p, summ[m][p]) for p in PREDICTORS if p in summ[m]])]
    text += ["## Methods and cost", "", md_table(["method", "what", "CPU s per run", "seeds"], [
        [f"`{m}`", table[m][0], f"{summ[m]['_cost']['cpu_s']['mean']:.0f}", summ[m]["_cost"]["cpu_s"]["n"]]
        for m in ms]), "## What this data supports, claim by claim", "",
        "A difference is taken seed by seed (same seed: same validation split, training subset and, for the same "
        "network, initial weights) and called *clear* when its mean exceeds twice its standard error and every seed "
        "agrees in sign; otherwise it is *inside seed noise*. Differences are in percentage points (NLL in nats).",
        "", *[f"{i}. {c['text']}" for i, c in enumerate(cl, 1)]]
    if "ce" in summ:
        ce = summ["ce"]["deepest"]
        under = [(m, summ[m]["deepest"]["overconf"]["mean"]) for m in ms
                 if summ[m]["deepest"]["overconf"]["mean"] < -1.0]
        text += ["", f"Calibration, read with the *conf − acc* column: the plain model `ce` ends "
                 f"{'over' if ce['overconf']['mean'] > 0 else 'under'}-confident by only "
                 f"{abs(ce['overconf']['mean']):.2f} points (ECE-15 {ce['ece15']['mean']:.2f}%), so at this schedule "
                 "there is little over-confidence for a regulariser to remove." + (
                     " The methods that end clearly under-confident (more than 1 point) are "
                     + ", ".join(f"`{m}` ({oc:+.1f})" for m, oc in under)
                     + "; that under-confidence accounts for most of their ECE." if under else "")]
    text += ["", f"Scope: one small network, a {s['limit_train']:,}-image subset of Fashion-MNIST and {s['epochs']} "
             "epochs on CPU; the papers' claims are about CIFAR-100 / ImageNet-scale networks trained for 150-300 "
             "epochs. What fails to show here is not shown to be false there, and what shows here need not carry "
             "over. Two readings of the claims are ours: \"every exit beats the plain model\" is taken literally "
             "(the BYOT paper's own ResNet-18 table has its 1/4 and 2/4 exits below the baseline), and \"shallow "
             "exits gain the most\" is measured against the same exits trained without distillation (DSN), since "
             "the plain model has no shallow exits.", ""]
    return "\n".join(text)


def plot(summ: dict, methods: list[str]) -> Callable[[Any], None]:
    """Deepest-exit top-1 and ECE per method, and every exit of the multi-exit methods against the plain model."""
    def draw(fig: Any) -> None:
        ms = [m for m in methods if m in summ]
        fig.set_size_inches(16, 4.6)
        axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [5, 5, 4]})
        for ax, key, label in ((axes[0], "top1", "deepest-exit test top-1 (%)"),
                               (axes[1], "ece15", "deepest-exit ECE-15 (%)")):
            mean = [summ[m]["deepest"][key]["mean"] for m in ms]
            std = [0.0 if math.isnan(x) else x for x in (summ[m]["deepest"][key]["std"] for m in ms)]
            ax.bar(range(len(ms)), mean, yerr=std, capsize=3,
                   color=["#dd8452" if m in MULTI_EXIT else "#4c72b0" for m in ms])
            ax.set_xticks(range(len(ms)), ms, rotation=60, ha="right", fontsize=8)
            ax.set(ylabel=label)
            if key == "top1":
                ax.set_ylim(max(0.0, min(a - b for a, b in zip(mean, std)) - 1.0), min(100.0, max(mean) + 0.8))
            ax.grid(axis="y", alpha=0.3)
        ax = axes[2]
        if "ce" in summ:  # the plain model has one exit: a line across, its seed spread as a band
            st = summ["ce"]["deepest"]["top1"]
            sd = 0.0 if math.isnan(st["std"]) else st["std"]
            ax.axhline(st["mean"], color="black", linestyle="--", linewidth=1, label="ce (plain model)")
            ax.axhspan(st["mean"] - sd, st["mean"] + sd, color="black", alpha=0.08)
        for m in [m for m in MULTI_EXIT if m in summ]:
            preds = [p for p in PREDICTORS if p in summ[m]]
            ax.errorbar([PREDICTORS.index(p) for p in preds], [summ[m][p]["top1"]["mean"] for p in preds],
                        yerr=[summ[m][p]["top1"]["std"] for p in preds], marker="o", capsize=3, label=m)
        ax.set_xticks(range(len(PREDICTORS)), PREDICTORS, rotation=30, fontsize=8)
        ax.set(ylabel="test top-1 (%)")
        ax.set_title("every exit and the ensembles, against the plain model", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.suptitle("Fashion-MNIST methods study: best-validation checkpoint, mean ± std over seeds", fontsize=10)

    return draw


def _span(runs: Path, found: dict) -> float:
    """Seconds from the first run's start (its config.yaml) to the last run's end of training (its summary.json)."""
    dirs = [runs / m / f"seed{s}" for m, by_seed in found.items() for s in by_seed]
    if not dirs:
        return 0.0
    return max((d / "summary.json").stat().st_mtime for d in dirs) - min((d / "config.yaml").stat().st_mtime
                                                                         for d in dirs)


def write_study_report(runs: Path, out: Path, table: dict, methods: list[str], seeds: list[int],
                       schedule: dict) -> dict[str, str]:
    found, missing = load(runs, methods, seeds)
    summ, cl = summarize(found), claims(found)
    every = [r for by in found.values() for r in by.values()]
    stamp = runs / "code_commit.txt"  # the commit the runs were trained at, when the study recorded it
    meta = {"commit": stamp.read_text().strip() if stamp.is_file() else commit(), "schedule": schedule,
            "seeds": seeds, "methods": methods, "missing": [f"{m} seed {s}" for m, s in missing],
            "runs_finished": len(every), "cpu_s_total": round(sum(r["cpu_s"] for r in every), 1),
            "run_wall_s_total": round(sum(r["wall_s"] for r in every), 1), "study_wall_s": round(_span(runs, found), 1),
            "threads_per_run": sorted({r["threads"] for r in every})}
    return write_report(out, {**meta, "summary": summ, "claims": cl, "runs": found},
                        markdown(meta, summ, cl, table, methods, found), {f"{STEM}.png": plot(summ, methods)}, STEM)
