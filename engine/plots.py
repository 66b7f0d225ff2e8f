"""PNG reports written into the run directory at the end of training (matplotlib, Agg backend, no display).

- `reliability.png`: one reliability diagram per predictor (every exit and both ensembles): accuracy per
  equal-width confidence bin against the diagonal, the gap hatched, the bin mass as a grey outline, ECE in the title.
- `exit_accuracy.png`: top-1 per predictor, best-validation checkpoint and last epoch side by side.

Both read only the summary that `engine.train` returns (the `_reliability` bins come from `engine.metrics`).
"""
from __future__ import annotations

import warnings
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _predictors(res: dict) -> list[str]:
    return [k for k in res if not k.startswith("_")]


def reliability_diagram(res: dict, path: str | Path, title: str = "") -> Path:
    """`res` = one `evaluate()` result (with `_reliability`)."""
    plt = _pyplot()
    rel = res["_reliability"]
    names = [n for n in _predictors(res) if n in rel]
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        r = rel[name]
        lo, hi = r["lo"], r["hi"]
        width = [b - a for a, b in zip(lo, hi)]
        total = max(sum(r["count"]), 1)
        filled = [c > 0 for c in r["count"]]
        acc = [a if f else 0.0 for a, f in zip(r["accuracy"], filled)]
        conf = [c if f else (a + b) / 2 for c, f, a, b in zip(r["confidence"], filled, lo, hi)]
        ax.bar(lo, acc, width=width, align="edge", color="#4c72b0", edgecolor="black", linewidth=0.5,
               label="accuracy")
        gap_bottom = [min(a, c) if f else 0 for a, c, f in zip(acc, conf, filled)]
        gap_height = [abs(a - c) if f else 0 for a, c, f in zip(acc, conf, filled)]
        ax.bar(lo, gap_height, bottom=gap_bottom, width=width, align="edge", color="#c44e52", alpha=0.3,
               hatch="//", edgecolor="#c44e52", linewidth=0.5, label="gap to confidence")
        share = [c / total for c in r["count"]]
        ax.stairs(share, [*lo, hi[-1]], color="dimgrey", linewidth=1.2, label="share of samples")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: ECE {res[name]['ece']:.2f}%, top-1 {res[name]['top1']:.1f}%", fontsize=9)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def exit_accuracy_chart(summary: dict, path: str | Path, metric: str = "top1") -> Path:
    """Grouped bars: `metric` per predictor for test_best (best-validation checkpoint) and test_last."""
    plt = _pyplot()
    series = [(k, lbl) for k, lbl in (("test_best", "best-val checkpoint"), ("test_last", "last epoch"))
              if k in summary]
    names = _predictors(summary[series[0][0]])
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 1.5), 3.6))
    width = 0.8 / len(series)
    for j, (key, label) in enumerate(series):
        vals = [summary[key][n][metric] for n in names]
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(xs, vals, width=width, label=label)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel(f"test {metric} (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_run_plots(run_dir: str | Path, summary: dict) -> list[str]:
    """Both PNGs for a finished run; returns the files written (none when there is no test split or matplotlib)."""
    key = "test_best" if "test_best" in summary else "test_last"
    if key not in summary:
        return []
    try:
        _pyplot()
    except ImportError:
        warnings.warn("matplotlib is not installed: no reliability diagram / exit accuracy chart", stacklevel=2)
        return []
    run_dir = Path(run_dir)
    which = "best-validation checkpoint" if key == "test_best" else "last epoch"
    out = [reliability_diagram(summary[key], run_dir / "reliability.png", f"test set, {which}"),
           exit_accuracy_chart(summary, run_dir / "exit_accuracy.png")]
    return [str(p) for p in out]
