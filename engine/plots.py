"""PNG reports written into the run directory at the end of training (matplotlib, Agg backend, no display).

- `reliability.png`: one reliability diagram per predictor (every exit and both ensembles): accuracy per
  equal-width confidence bin against the diagonal, the gap hatched, the bin mass as a grey outline, ECE in the title.
- `exit_accuracy.png`: top-1 per predictor, best-validation checkpoint and last epoch side by side; for a
  multi-exit model a second panel plots top-1 against GFLOPs per image (each exit at the cost of stopping there,
  the ensembles at the cost of the whole model): the trade-off a user picks an exit from. The GFLOPs come from the
  run's `config.yaml` (`engine.models.exit_flops`) and are also written to `exit_gflops.json`.

- `curves.png`: the training loss per logging window and every exit's validation top-1 per epoch, from
  `metrics.jsonl`.

The first two read the summary that `engine.train` returns (the `_reliability` bins come from `engine.metrics`).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from engine.config import load_config
from engine.models import create_model
from engine.models.exit_flops import exit_gflops


def _pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use: it takes 0.6 s to import, and a run without
    matplotlib still trains (`write_run_plots` warns and writes no PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # before pyplot is imported: no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    """savefig, with the file named when it fails: a full disk's OSError names none."""
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
    finally:
        _pyplot().close(fig)


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
    _save(fig, path)
    return path


def exit_accuracy_chart(summary: dict, path: str | Path, metric: str = "top1",
                        gflops: dict[str, float] | None = None) -> Path:
    """Grouped bars: `metric` per predictor for test_best (best-validation checkpoint) and test_last; with
    `gflops` (per exit and "all_exits") a second panel: `metric` against GFLOPs per image."""
    plt = _pyplot()
    series = [(k, lbl) for k, lbl in (("test_best", "best-val checkpoint"), ("test_last", "last epoch"))
              if k in summary]
    names = _predictors(summary[series[0][0]])
    exits = [n for n in names if n.startswith("exit")]
    tradeoff = gflops is not None and len(exits) > 1 and all(n in gflops for n in exits)
    width_bars = max(4.0, 1.1 * len(names) + 1.5)
    fig, axes = plt.subplots(1, 2 if tradeoff else 1, figsize=(width_bars + (4.6 if tradeoff else 0), 3.6),
                             squeeze=False, gridspec_kw={"width_ratios": [width_bars, 4.6] if tradeoff else [1]})
    ax = axes[0, 0]
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
    if tradeoff:
        _tradeoff(axes[0, 1], summary, series, exits, [n for n in names if n.startswith("ens")], gflops, metric)
    fig.tight_layout()
    path = Path(path)
    _save(fig, path)
    return path


def _tradeoff(ax, summary: dict, series: list, exits: list[str], ensembles: list[str], gflops: dict,
              metric: str) -> None:
    for j, (key, label) in enumerate(series):
        xs, ys = [gflops[n] for n in exits], [summary[key][n][metric] for n in exits]
        line, = ax.plot(xs, ys, "o-", label=label)
        for n, x, y in zip(exits, xs, ys) if j == 0 else ():
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for n, marker in zip(ensembles, ("s", "D")):
            ax.plot([gflops["all_exits"]], [summary[key][n][metric]], marker, color=line.get_color(),
                    mfc="none", label=f"{n} ({label})")
    ax.xaxis.set_major_locator(_pyplot().MaxNLocator(4))
    ax.set_xlabel("GFLOPs per image (forward, batch 1)")
    ax.set_ylabel(f"test {metric} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")


def run_gflops(run_dir: str | Path) -> dict[str, float] | None:
    """Per-exit GFLOPs of the run's model, built (no weights needed) from its config.yaml; None when the run has
    no config or its backbone cannot be truncated (e.g. a timm model)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    cfg = load_config(path)
    if not cfg.exits.stages:
        return None
    try:
        return exit_gflops(create_model(cfg.model, cfg.exits), cfg.model.in_chans, cfg.data.image_size)
    except NotImplementedError as e:
        warnings.warn(f"no accuracy/GFLOPs panel: {e}", stacklevel=2)
        return None


def curves(run_dir: Path, path: Path) -> Path | None:
    """Training loss (per logged window) and validation top-1 of every predictor (per epoch) over the steps."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval" and r.get("select")]
    if not train:
        return None
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(*zip(*train))
    a.set(xlabel="step", ylabel="training loss", title="Training loss per logging window")
    for name in (evals[0]["select"] if evals else {}):
        b.plot([r["step"] for r in evals], [r["select"][name]["top1"] for r in evals], "o-", ms=3, label=name)
    b.set(xlabel="step", ylabel="validation top-1 (%)", title="Validation top-1 per epoch")
    if evals:
        b.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
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
    gflops = run_gflops(run_dir)
    out = [reliability_diagram(summary[key], run_dir / "reliability.png", f"test set, {which}"),
           exit_accuracy_chart(summary, run_dir / "exit_accuracy.png", gflops=gflops)]
    if gflops is not None:
        (run_dir / "exit_gflops.json").write_text(json.dumps(gflops, indent=2))
        out.append(run_dir / "exit_gflops.json")
    if (run_dir / "metrics.jsonl").is_file() and (c := curves(run_dir, run_dir / "curves.png")) is not None:
        out.append(c)
    return [str(p) for p in out]
