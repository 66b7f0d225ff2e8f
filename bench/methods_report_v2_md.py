"""The methods study v2's report files: `methods_fashion_mnist_v2.json` from the runs, then `.md` and `.png` from
the json alone, so `--report-only` needs nothing but the committed json."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from bench.methods_report_v2 import COMPARISONS, EXIT_KEYS, METRIC_NAMES, STEM, STRESS, value
from bench.report import commit
from bench.study_stats import ALPHA, LEVEL
from engine.evaluate import deepest_key

PREDICTORS = (*EXIT_KEYS, "ens_logits")
MULTI_EXIT = ("dsn", "dsn_journal", "byot_iccv", "byot_journal")
RESULTS = Path(__file__).resolve().parent / "results"
STRESS_HEAD = "Its label-noise stress test"  # the README summary's second heading
STRESS_PLAN = (f" Declared: {STRESS['label_noise']:.0%} symmetric label noise on {STRESS['limit_train']:,} training "
               f"images (validation and test clean), {STRESS['epochs']} epochs, seeds "
               f"{', '.join(map(str, STRESS['seeds']))}, methods {', '.join(f'`{m}`' for m in STRESS['methods'])} "
               "(the journal-head pair left out: its claim is about heads, not noise); the comparisons between these "
               "methods, Holm-corrected together.")


def write_report(out: Path, key: str, sec: dict | None) -> str:
    """Store `sec` as the json's `key` section (None: keep the json as it is), then write md and png from it."""
    path = out / f"{STEM}.json"
    doc = json.loads(path.read_text()) if path.is_file() else {"alpha": ALPHA, "level": LEVEL}
    out.mkdir(parents=True, exist_ok=True)
    if sec is not None:
        doc[key] = sec
        doc["report_commit"] = commit()
        path.write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown(doc)
    (out / f"{STEM}.md").write_text(md)
    if out.resolve() == RESULTS:  # the repository's own report: its README summary follows
        update_readme(RESULTS.parents[1] / "README.md", doc)
    plot(doc, out / f"{STEM}.png")
    return md


def _ms(values: list[float], fmt: str = "{:.2f}") -> str:
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    return fmt.format(statistics.fmean(values)) + ("" if math.isnan(sd) else " ± " + fmt.format(sd).lstrip("+"))


def _runs_of(sec: dict) -> dict[str, list[dict]]:
    return {m: list(sec["per_seed"].get(m, {}).values()) for m in sec["methods"]}


def _every_run_has_last(runs_of: dict[str, list[dict]]) -> bool:
    """Whether every run keeps its last epoch's test top-1 (older json entries lack it)."""
    return all("test_last_top1" in r for runs in runs_of.values() for r in runs)


def _last_top1(r: dict, predictor: str = "deepest") -> float:
    return r["test_last_top1"][deepest_key(r["test_last_top1"]) if predictor == "deepest" else predictor]


def _method_rows(sec: dict) -> list[str]:
    runs_of = _runs_of(sec)
    last = _every_run_has_last(runs_of)  # the last epoch's deepest top-1 beside the best epoch's
    rows = ["| method | seeds | deepest top-1 | " + ("last epoch top-1 | " if last else "") +
            "ECE-15 | NLL | conf − acc | best epoch | per exit top-1 (0 / 1 / 2 / 3 / ensemble) |",
            "|---" * (8 + last) + "|"]
    for m, what in sec["methods"].items():
        runs = runs_of[m]
        if not runs:
            rows.append(f"| `{m}` ({what}) | 0 | not run |" + " |" * (5 + last))
            continue
        exits = " / ".join(_ms([value(r, p, "top1") for r in runs]) for p in PREDICTORS) if m in MULTI_EXIT else ""
        at_last = (_ms([_last_top1(r) for r in runs]) + " | ") if last else ""
        rows.append(f"| `{m}` ({what}) | {len(runs)} | {_ms([value(r, 'deepest', 'top1') for r in runs])} | "
                    f"{at_last}{_ms([value(r, 'deepest', 'ece15') for r in runs])} | "
                    f"{_ms([value(r, 'deepest', 'nll') for r in runs], '{:.3f}')} | "
                    f"{_ms([value(r, 'deepest', 'overconf') for r in runs], '{:+.2f}')} | "
                    f"{_ms([r['best_epoch'] for r in runs], '{:.0f}')} / {runs[0]['epochs']} | {exits} |")
    return rows


def _commits(sec: dict) -> str:
    """The commits the runs were trained at: each run's own (its meta.json), else the study's first stamp."""
    if not sec.get("run_commits"):
        return f"Runs trained at commit `{sec['runs_commit'][:12]}`"
    parts = [f"`{c[:12]}{'-dirty' if c.endswith('-dirty') else ''}` ({n} run{'s' * (n > 1)})"
             for c, n in sec["run_commits"].items()]
    return "Runs trained at commits " + ", ".join(parts) + " (each run's last start, from its meta.json)"


def _why(c: dict) -> str:
    """What made a comparison contradicted: the wrong sign, or an effect whose whole interval is below the paper's."""
    if c["verdict"] != "contradicted":
        return ""
    return " (wrong sign)" if c["interval"]["mean"] < 0 else " (an effect, smaller than the paper's)"


def _comparison_rows(sec: dict) -> list[str]:
    rows = [f"| comparison | held equal | n | mean difference | {LEVEL:.0%} interval | p | Holm p | paper's effect "
            "here | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for c in sec["comparisons"]:
        iv = c["interval"]
        if iv["n"] < 2:  # one seed: its difference, no interval
            diff = f"{c['diffs'][0]:+.2f} (one seed)" if c["diffs"] else "—"
            rows.append(f"| {c['claim']} | {c['held']} | {iv['n']} | {diff} | — | — | — | — | **{c['verdict']}** |")
            continue
        eff = "—" if c["paper_effect_here"] is None else f"{c['paper_effect_here']:+.2f}"
        rows.append(f"| {c['claim']} (`{c['a']}` {c['pa']} − `{c['b']}` {c['pb']}, {METRIC_NAMES[c['metric']]}"
                    f"{', sign flipped: lower is better' if c['sign'] < 0 else ''}) | {c['held']} | {iv['n']} | "
                    f"{iv['mean']:+.2f} | [{iv['lo']:+.2f}, {iv['hi']:+.2f}] | {iv['p']:.3f} | {c['p_holm']:.3f} | "
                    f"{eff} | **{c['verdict']}**{_why(c)} |")
    return rows


def readme_summary(doc: dict) -> str:
    """The README's summary of the study, one line per declared comparison of the main study and then of the stress
    test where it has run, from the json alone (a test holds the README to it)."""
    sec = doc["main"]
    lines = [f"Its verdicts at {_seed_span(sec)} seeds per method ({sec['cpu_hours']:.1f} CPU-hours; Fashion-MNIST, "
             f"width-0.25 ResNet-18, {sec['epochs']} epochs on {sec['train_images']:,} images, against the papers' "
             "150-300 epochs on CIFAR-100 and ImageNet), paired difference in points with its 95 % interval:",
             *_summary_lines(sec)]
    if "stress" in doc:
        sec = doc["stress"]
        done, planned = sum(map(len, sec["per_seed"].values())), len(sec["methods"]) * len(STRESS["seeds"])
        lines += [f"{STRESS_HEAD} at {_seed_span(sec)} seed(s) per method ({done} of {planned} runs, "
                  f"{sec['cpu_hours']:.1f} CPU-hours; {sec['label_noise']:.0%} of the {sec['train_images']:,} "
                  f"training labels moved to another class at random, {sec['epochs']} epochs), its declared "
                  "comparisons:",
                  *_summary_lines(sec)]
    return "\n".join(lines)


def _seed_span(sec: dict) -> str:
    seeds = sorted({len(v) for v in sec["per_seed"].values()})
    return f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"


def _summary_lines(sec: dict) -> list[str]:
    lines = []
    for c in sec["comparisons"]:
        iv = c["interval"]
        eff = "" if c["paper_effect_here"] is None else f"; the paper's effect here {c['paper_effect_here']:+.2f}"
        diff = (f"{iv['mean']:+.2f} [{iv['lo']:+.2f}, {iv['hi']:+.2f}]" if iv["n"] >= 2 else
                f"{c['diffs'][0]:+.2f}, one seed" if c["diffs"] else "no seed yet")
        flip = ", sign flipped: lower is better" if c["sign"] < 0 else ""
        lines.append(f"- {c['claim']} ({METRIC_NAMES[c['metric']].split(' (')[0]}{flip}): **{c['verdict']}**"
                     f"{_why(c)}, {diff}{eff}")
    return lines


def update_readme(readme: Path, doc: dict) -> bool:
    """Replace the README's summary block (its first line starts "  Its verdicts at"; "  - " lines and the stress
    test's heading follow) with the json's; False where the README has no such block."""
    if "main" not in doc or not readme.is_file():
        return False
    lines = readme.read_text().split("\n")
    start = next((i for i, ln in enumerate(lines) if ln.startswith("  Its verdicts at ")), None)
    if start is None:
        return False
    end = start + 1
    while end < len(lines) and lines[end].startswith(("  - ", f"  {STRESS_HEAD} at ")):
        end += 1
    lines[start:end] = ["  " + ln for ln in readme_summary(doc).splitlines()]
    readme.write_text("\n".join(lines))
    return True


def markdown(doc: dict) -> str:
    text = ["# Methods study v2 on Fashion-MNIST: the memorisation regime", "",
            "Written by `python -m bench.methods_study_v2` (resumable; `--report-only` rewrites this file and the "
            "plot from `methods_fashion_mnist_v2.json` alone). The earlier study, "
            "[methods_fashion_mnist.md](methods_fashion_mnist.md), ran in an **under-fit regime** (8 epochs, CE "
            "already calibrated) where the papers' effects cannot appear; it is kept as that record.", "",
            "## Declared before the results", "",
            "The regime is the pilot's ([methods_pilot.md](methods_pilot.md)): plain CE fits the training subset "
            "and ends over-confident. Every method shares the network, data (seed s fixes the validation carve and "
            "the training subset for every method), optimizer (SGD 0.1, momentum 0.9, Nesterov, weight decay 5e-4, "
            "none on BN and biases), batch 128 and cosine schedule; each method's own settings are its paper's or "
            "official code's, except Beta smoothing's EMA decay, rescaled so its horizon is the same 1.28 % of the "
            "run as 0.999 is of the official 200-epoch CIFAR run. The second generation starts from a fresh "
            "initialisation and batch order (seed s + 1000) on seed s's data, as the official code's new model "
            "does. Multi-exit comparisons hold the heads equal (distillation against DSN with the same heads; heads "
            "against heads with the same loss).", "",
            f"**Rule** (`bench/study_stats.py`, tested): each comparison is a paired per-seed difference, oriented "
            f"so the paper predicts > 0, with its {LEVEL:.0%} t-interval and a two-sided paired t-test; the p-values "
            f"of the primary comparisons are Holm-corrected together. **supported**: Holm p < {ALPHA} and the mean "
            "is positive (and the interval does not lie wholly below the paper's effect); **contradicted**: Holm "
            f"p < {ALPHA} with a negative mean, or the whole interval below the paper's effect; otherwise "
            "**inconclusive**. A paper's effect is its relative reduction of the baseline's error, applied to the "
            "baseline's error here.", "",
            "| comparison | a − b | metric | held equal | paper's figure |", "|---|---|---|---|---|"]
    for c in COMPARISONS:
        share = "" if c["paper"] is None else f" ({c['paper']:.1%} of the error)"
        lower = " (lower is better)" if c["sign"] < 0 else ""
        text.append(f"| {c['claim']} | `{c['a']}` {c['pa']} − `{c['b']}` {c['pb']} | {METRIC_NAMES[c['metric']]}"
                    f"{lower} | {c['held']} | {c['source']}{share} |")
    for key, title in (("main", "Results"), ("stress", "Stress test: label noise (shown separately)")):
        sec = doc.get(key)
        if sec is None:
            text += ["", f"## {title}", "", "Not run yet." + (STRESS_PLAN if key == "stress" else "")]
            continue
        text += ["", f"## {title}", "", f"**Scope.** {sec['scope']}", "",
                 f"{_commits(sec)}; {sec['cpu_hours']:.1f} CPU-hours in the finished runs' last attempts.", "",
                 *_method_rows(sec), "", *_comparison_rows(sec), *(_memorisation(sec) if key == "stress" else [])]
    return "\n".join(text) + "\n"


def _memorisation(sec: dict) -> list[str]:
    """The stress test's loss from training on to the last epoch, per method: descriptive, not a declared
    comparison, so it gets no verdict."""
    runs_of = {m: runs for m, runs in _runs_of(sec).items() if runs}
    if not runs_of or not _every_run_has_last(runs_of):
        return []

    def drop(runs: list[dict], predictor: str) -> str:
        best = statistics.fmean(value(r, predictor, "top1") for r in runs)
        return f"{best - statistics.fmean(_last_top1(r, predictor) for r in runs):.2f}"

    drops = ", ".join(f"`{m}` {drop(runs, 'deepest')}" + (f" (its exit ensemble {drop(runs, 'ens_logits')})"
                                                          if m in MULTI_EXIT else "") for m, runs in runs_of.items())
    return ["", "**Not declared, so no verdict.** The best-validation checkpoint is chosen on clean validation "
            "images, so it stops before the noise is memorised; how much the deepest exit's test top-1 falls from "
            f"there to the last epoch (points, mean over seeds): {drops}."]


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    secs = [(k, doc[k]) for k in ("main", "stress") if k in doc]
    fig, axes = plt.subplots(1, max(1, len(secs)), figsize=(7 * max(1, len(secs)), 4.5), squeeze=False)
    for ax, (key, sec) in zip(axes[0], secs):
        comps = [c for c in sec["comparisons"] if c["interval"]["n"] >= 1]
        for i, c in enumerate(comps):
            iv = c["interval"]
            color = {"supported": "tab:green", "contradicted": "tab:red"}.get(c["verdict"], "tab:gray")
            if iv["n"] >= 2:
                ax.errorbar(iv["mean"], i, xerr=[[iv["mean"] - iv["lo"]], [iv["hi"] - iv["mean"]]], fmt="o",
                            color=color, capsize=3)
            else:  # one seed: its difference, hollow, no interval
                ax.plot(iv["mean"], i, "o", mfc="none", color=color)
            if c["paper_effect_here"] is not None:
                ax.plot(c["paper_effect_here"], i, marker="x", color="black")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(comps)), [c["name"] for c in comps], fontsize=8)
        ax.set_xlabel("paired difference, oriented so the paper predicts > 0 (points)")
        ax.set_title(f"{'main study' if key == 'main' else 'label-noise stress test'}: {LEVEL:.0%} t-intervals "
                     "(hollow: one seed, no interval; x = paper's effect)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
