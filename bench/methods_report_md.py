"""Markdown and PNG of the methods study (the numbers come from `bench/methods_report.py`)."""
from __future__ import annotations

from pathlib import Path

from bench.methods_report import METRICS, MULTI_EXIT, _pm

PREDICTORS = ("exit0", "exit1", "exit2", "exit3", "ens_logits", "ens_probs")


def _row(label: str, stats: dict, extra: str = "") -> str:
    cells = [_pm(stats.get(k), fmt) for k, _, fmt in METRICS]
    return f"| {label} | " + " | ".join(cells) + f" |{extra}"


def markdown(meta: dict, summ: dict, cl: list[dict], table: dict, methods: list[str]) -> str:
    s = meta["schedule"]
    hdr = "| " + " | ".join(h for _, h, _ in METRICS) + " |"
    sep = "|---" * (len(METRICS) + 1) + "|"
    lines = [
        "# Methods study on Fashion-MNIST",
        "",
        "Written by `python -m bench.methods_study` (resumable: it skips finished runs; `--report-only` rewrites "
        f"this file from them). The runs were trained at commit `{meta['commit'][:12]}`.",
        "",
        "**Setup.** The demo's network: CIFAR-stem ResNet-18, width 0.25 (16-32-64-128 channels), one block per "
        "stage, 28-px grey input; single-exit methods train the plain backbone, DSN and BYOT add exits after "
        f"stages 1-3. Training subset: the first {s['limit_train']:,} of the 55,000 training images left after "
        "5,000 are carved out for validation (the carve depends on the seed); pad-4 random crop + flip; "
        f"{s['epochs']} epochs of batch {s['batch_size']} (the subset is a multiple of the batch, so plain and "
        "class-pair runs take the same steps); SGD 0.1, momentum 0.9, Nesterov, weight decay 5e-4 (none on BN and "
        "biases), cosine schedule with 0.2 epochs of warm-up; identical for every method. Each method's own "
        "hyper-parameters are its papers' defaults (table below). "
        f"Seeds: {', '.join(map(str, meta['seeds']))}. Every figure: the **test set (10,000 images) with the "
        "best-validation checkpoint**, mean ± standard deviation over seeds. *conf − acc* is the mean confidence "
        "minus the accuracy, in points: positive is over-confident, negative under-confident (ECE measures the "
        "size of the miscalibration, this its direction).",
        "",
        f"**Cost.** {meta['runs_finished']} runs, {meta['cpu_s_total'] / 3600:.2f} CPU-hours in total "
        f"({meta['run_wall_s_total'] / 3600:.2f} h of run wall time, {meta['threads_per_run']} torch thread(s) per "
        f"run, two runs at a time); the study took {meta['study_wall_s'] / 3600:.2f} h of wall time on the 2-core "
        "machine it shared with other work (wall time is longer than CPU time for that reason; the runs are "
        "deterministic per seed, so the load does not change the figures).",
        "",
    ]
    if meta["missing"]:
        lines += [f"**Missing runs** ({len(meta['missing'])}): " + ", ".join(meta["missing"]) + ".", ""]
    lines += ["## Deepest exit", "", "| method " + hdr, sep, *[
        _row(f"`{m}`", summ[m]["deepest"], "") for m in methods if m in summ], ""]
    lines += ["## Every exit and the ensembles (multi-exit methods)", "",
              "exit0..exit2 are the heads after stages 1-3, exit3 the backbone's own head; `ens_logits` averages "
              "the logits of the four exits, `ens_probs` their probabilities. The plain model (`ce`) has only "
              "its deepest exit.", ""]
    for m in [m for m in MULTI_EXIT if m in summ]:
        lines += [f"**`{m}`**", "", "| predictor " + hdr, sep,
                  *[_row(p, summ[m][p]) for p in PREDICTORS if p in summ[m]], ""]
    if "ce" in summ:
        lines += ["**`ce`** (plain model)", "", "| predictor " + hdr, sep, _row("exit0", summ["ce"]["exit0"]),
                  ""]
    lines += ["## Methods and cost", "", "| method | what | CPU s per run | seeds |", "|---|---|---|---|"]
    for m in methods:
        if m in summ:
            c = summ[m]["_cost"]["cpu_s"]
            lines.append(f"| `{m}` | {table[m][0]} | {c['mean']:.0f} | {c['n']} |")
    lines += ["", "## What this data supports, claim by claim", "",
              "A difference is taken seed by seed (same seed: same validation split, training subset and, for the "
              "same network, initial weights) and called *clear* when its mean exceeds twice its standard error and "
              "every seed agrees in sign; otherwise it is *inside seed noise*. Differences are in percentage points "
              "(NLL in nats).", ""]
    lines += [f"{i}. {c['text']}" for i, c in enumerate(cl, 1)]
    lines += ["", _calibration_reading(summ, methods)]
    lines += ["", f"Scope: one small network, a {s['limit_train']:,}-image subset of Fashion-MNIST and {s['epochs']} "
              "epochs on CPU; the papers' claims are about CIFAR-100 / ImageNet-scale networks trained for 150-300 "
              "epochs. What fails to show here is not shown to be false there, and what shows here need not carry "
              "over. Two readings of the claims are ours: \"every exit beats the plain model\" is taken literally "
              "(the BYOT paper's own ResNet-18 table has its 1/4 and 2/4 exits below the baseline), and \"shallow "
              "exits gain the most\" is measured against the same exits trained without distillation (DSN), since "
              "the plain model has no shallow exits.", ""]
    return "\n".join(lines)


def _calibration_reading(summ: dict, methods: list[str]) -> str:
    """Why calibration claims can or cannot show: the plain model's own miscalibration, and its direction in the
    methods that train on soft targets."""
    if "ce" not in summ:
        return ""
    ce = summ["ce"]["deepest"]
    under = [(m, summ[m]["deepest"]["overconf"]["mean"]) for m in methods
             if m in summ and summ[m]["deepest"]["overconf"]["mean"] < -1.0]
    state = "over-confident" if ce["overconf"]["mean"] > 0 else "under-confident"
    text = (f"Calibration, read with the *conf − acc* column: the plain model `ce` ends {state} by only "
            f"{abs(ce['overconf']['mean']):.2f} points (ECE-15 {ce['ece15']['mean']:.2f}%), so at this schedule "
            "there is little over-confidence for a regulariser to remove.")
    if under:
        text += (" The methods that end clearly under-confident (more than 1 point) are "
                 + ", ".join(f"`{m}` ({oc:+.1f})" for m, oc in under)
                 + "; that under-confidence accounts for most of their ECE.")
    return text


def plot(summ: dict, methods: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ms = [m for m in methods if m in summ]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), gridspec_kw={"width_ratios": [5, 5, 4]})
    panels = (("top1", "deepest-exit test top-1 (%)"), ("ece15", "deepest-exit ECE-15 (%)"))
    for ax, (key, label) in zip(axes[:2], panels):
        mean = [summ[m]["deepest"][key]["mean"] for m in ms]
        std = [summ[m]["deepest"][key]["std"] for m in ms]
        ax.bar(range(len(ms)), mean, yerr=[0 if s != s else s for s in std], capsize=3,
               color=["#4c72b0" if m not in MULTI_EXIT else "#dd8452" for m in ms])
        ax.set_xticks(range(len(ms)))
        ax.set_xticklabels(ms, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel(label)
        if key == "top1":
            lo = min(m - (s if s == s else 0) for m, s in zip(mean, std))
            ax.set_ylim(max(0.0, lo - 1.0), 100 if max(mean) > 99 else max(mean) + 0.8)
        ax.grid(axis="y", alpha=0.3)
    ax = axes[2]
    if "ce" in summ:  # the plain model has one exit: a line across, its seed spread as a band
        mean, std = summ["ce"]["exit0"]["top1"]["mean"], summ["ce"]["exit0"]["top1"]["std"]
        ax.axhline(mean, color="black", linestyle="--", linewidth=1, label="ce (plain model)")
        if std == std:
            ax.axhspan(mean - std, mean + std, color="black", alpha=0.08)
    for m in [m for m in MULTI_EXIT if m in summ]:
        preds = [p for p in PREDICTORS if p in summ[m]]
        ax.errorbar([PREDICTORS.index(p) for p in preds], [summ[m][p]["top1"]["mean"] for p in preds],
                    yerr=[summ[m][p]["top1"]["std"] for p in preds], marker="o", capsize=3, label=m)
    ax.set_xticks(range(len(PREDICTORS)))
    ax.set_xticklabels(PREDICTORS, rotation=30, fontsize=8)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("every exit and the ensembles, against the plain model", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle("Fashion-MNIST methods study: best-validation checkpoint, mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
