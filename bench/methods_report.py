"""The report of `bench/methods_study.py`: mean ± std over seeds, paired differences, the claims, a plot.

Every figure is the test set (10,000 images) evaluated with each run's best-validation checkpoint. A difference
between two methods is taken seed by seed (the same seed gives both the same validation split, training subset
and, for the same network, the same initial weights) and called clear when its mean exceeds twice its standard
error and every seed agrees in sign; otherwise it is inside the seed noise.
"""
from __future__ import annotations

import json
import math
import statistics
import subprocess
from pathlib import Path

METRICS = [("top1", "top-1 (%)", "{:.2f}"), ("nll", "NLL", "{:.4f}"), ("ece15", "ECE-15 (%)", "{:.2f}"),
           ("ece20", "ECE-20 (%)", "{:.2f}"), ("overconf", "conf − acc (pts)", "{:+.2f}"),
           ("recall1", "Recall@1 (%)", "{:.2f}")]
MULTI_EXIT = ("dsn", "byot_iccv", "byot_journal")


def _load(runs: Path, methods: list[str], seeds: list[int]) -> tuple[dict, list]:
    found, missing = {}, []
    for m in methods:
        for s in seeds:
            p = runs / m / f"seed{s}" / "study.json"
            if p.is_file():
                found.setdefault(m, {})[s] = json.loads(p.read_text())
            else:
                missing.append((m, s))
    return found, missing


def _deepest(res: dict) -> str:
    return max((k for k in res if k.startswith("exit")), key=lambda k: int(k[4:]))


def _stat(values: list[float]) -> dict:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return {"mean": statistics.fmean(values), "std": sd, "n": len(values), "values": values}


def _pm(st: dict | None, fmt: str) -> str:
    if st is None:
        return "—"
    sd = "" if math.isnan(st["std"]) else " ± " + fmt.format(st["std"]).lstrip("+")
    return fmt.format(st["mean"]) + sd


def summarize(found: dict) -> dict:
    """method -> predictor ('deepest' added) -> metric -> mean/std/n/values over seeds."""
    out: dict = {}
    for m, by_seed in found.items():
        rows: dict = {}
        for r in by_seed.values():
            res = r["test_best"]
            for name, vals in [*res.items(), ("deepest", res[_deepest(res)])]:
                for k, v in vals.items():
                    rows.setdefault(name, {}).setdefault(k, []).append(v)
        out[m] = {name: {k: _stat(v) for k, v in ms.items()} for name, ms in rows.items()}
        out[m]["_cost"] = {k: _stat([r[k] for r in by_seed.values()]) for k in ("cpu_s", "wall_s")}
    return out


def paired(found: dict, a: str, pa: str, b: str, pb: str, metric: str) -> dict | None:
    """a's predictor pa minus b's predictor pb, seed by seed; None when no seed has both."""
    seeds = sorted(set(found.get(a, {})) & set(found.get(b, {})))
    if not seeds:
        return None

    def val(m, p, s):
        res = found[m][s]["test_best"]
        return res[_deepest(res) if p == "deepest" else p][metric]

    return _clear_stat([val(a, pa, s) - val(b, pb, s) for s in seeds])


def _delta(st: dict | None, fmt: str = "{:+.2f}") -> str:
    if st is None:
        return "not run"
    sd = "" if math.isnan(st["std"]) else " ± " + fmt.format(st["std"]).lstrip("+")
    return f"{fmt.format(st['mean'])}{sd} ({'clear' if st['clear'] else 'inside seed noise'}, n={st['n']})"


def _better(st: dict | None, lower_is_better: bool = False) -> str:
    if st is None:
        return "missing"
    good = st["mean"] < 0 if lower_is_better else st["mean"] > 0
    return ("better" if good else "worse") if st["clear"] else "noise"


def _clear_stat(values: list[float]) -> dict:
    st = _stat(values)
    n = len(values)
    st["clear"] = bool(n > 1 and abs(st["mean"]) > 2 * st["std"] / math.sqrt(n)
                       and (all(x > 0 for x in values) or all(x < 0 for x in values)))
    return st


def _verdict(st: dict | None, lower_is_better: bool = False) -> str:
    return {"better": "supported", "worse": "contradicted", "noise": "inside seed noise",
            "missing": "not run"}[_better(st, lower_is_better)]


def _overall(verdicts: list[str]) -> str:
    if verdicts and all(v == verdicts[0] for v in verdicts):
        return verdicts[0]
    return "mixed"


def _byot(found: dict, v: str, label: str) -> dict:
    exits = [k for k in next(iter(found[v].values()))["test_best"] if k.startswith("exit")]
    preds = [*exits, "ens_logits", "ens_probs"]
    vs_plain = {p: paired(found, v, p, "ce", "deepest", "top1") for p in preds}
    vs_dsn = {p: paired(found, v, p, "dsn", p, "top1") for p in exits}
    groups = {k: [p for p in preds if _better(vs_plain[p]) == k] for k in ("better", "worse", "noise")}
    every = "supported" if len(groups["better"]) == len(preds) else (
        "contradicted" if groups["worse"] else "inside seed noise")
    text = (f"{label}: every exit and the ensemble beat the plain model — {every}. Top-1 against the plain "
            f"network (`ce`): clearly better: {', '.join(groups['better']) or 'none'}; clearly worse: "
            f"{', '.join(groups['worse']) or 'none'}; inside seed noise: {', '.join(groups['noise']) or 'none'}. "
            f"Deepest exit {_delta(vs_plain[exits[-1]])}, ensemble of logits {_delta(vs_plain['ens_logits'])}.")
    shallow = None
    if all(vs_dsn[p] is not None for p in exits):
        # gain of each exit over the same exit trained without distillation (DSN), and shallowest minus deepest
        shallow = _clear_stat([a - b for a, b in zip(vs_dsn[exits[0]]["values"], vs_dsn[exits[-1]]["values"])])
        gains = [vs_dsn[p]["mean"] for p in exits]
        monotone = all(g1 >= g2 for g1, g2 in zip(gains, gains[1:]))
        verdict = ("supported" if shallow["clear"] and shallow["mean"] > 0 and monotone else
                   "contradicted" if shallow["clear"] and shallow["mean"] < 0 else
                   "not supported (the ordering is not monotone)" if shallow["clear"] else "inside seed noise")
        text += (" Shallow exits gain the most — " + verdict + ": gain over the same exit trained by deep "
                 "supervision alone (`dsn`), " + ", ".join(f"{p} {_delta(vs_dsn[p])}" for p in exits)
                 + f"; shallowest minus deepest gain {_delta(shallow)}.")
    return {"claim": f"{label}: every exit and the ensemble beat the plain model; shallow exits gain the most",
            "text": text, "vs_plain_top1": vs_plain, "vs_dsn_top1": vs_dsn, "shallow_minus_deep_gain": shallow}


def _cskd(found: dict, v: str, label: str) -> dict:
    err = paired(found, v, "deepest", "ce", "deepest", "top1")
    err = None if err is None else {**err, "mean": -err["mean"], "values": [-x for x in err["values"]]}
    ece = paired(found, v, "deepest", "ce", "deepest", "ece15")
    both = sorted(set(found[v]) & set(found["ce"]))
    ce_ece = statistics.fmean(found["ce"][s]["test_best"]["exit0"]["ece15"] for s in both) if both else float("nan")
    rel = ece["mean"] / ce_ece if ece and ce_ece else float("nan")
    if ece is None:
        much = "not run"
    elif not ece["clear"]:
        much = "inside seed noise"
    elif ece["mean"] > 0:
        much = "contradicted (ECE is higher)"
    else:
        much = "supported" if rel <= -1 / 3 else "partly (lower, but by less than a third)"
    text = (f"{label}: lower error than CE — {_verdict(err, lower_is_better=True)}: error difference "
            f"{_delta(err)} points. Much lower ECE than CE — {much}: ECE-15 difference {_delta(ece)} points "
            f"({100 * rel:+.0f}% of CE's {ce_ece:.2f}%).")
    return {"claim": f"{label}: lower error and much lower ECE than CE", "text": text,
            "error_diff": err, "ece15_diff": ece}


def claims(found: dict) -> list[dict]:
    """The four claims of the papers, each with the paired differences behind it and a plain verdict."""
    out = [_byot(found, v, label) for v, label in (("byot_iccv", "BYOT (ICCV settings)"),
                                                   ("byot_journal", "BYOT (journal settings)"))
           if v in found and "ce" in found]
    out += [_cskd(found, v, label) for v, label in (("cskd", "CS-KD"), ("cskd_e", "CS-KD-E"))
            if v in found and "ce" in found]
    if "beta" in found:
        parts, verdicts = [], []
        for ls in ("ls_wrong", "ls_all"):
            st = paired(found, "beta", "deepest", ls, "deepest", "top1")
            nll = paired(found, "beta", "deepest", ls, "deepest", "nll")
            ece = paired(found, "beta", "deepest", ls, "deepest", "ece15")
            verdicts.append(_verdict(st))
            parts.append(f"against `{ls}`: top-1 {_delta(st)}, NLL {_delta(nll, '{:+.4f}')}, ECE-15 {_delta(ece)}")
        out.append({"claim": "Beta smoothing beats label smoothing",
                    "text": f"Beta smoothing beats label smoothing (top-1) — {_overall(verdicts)}: "
                            + "; ".join(parts) + "."})
    if "sd_gen1" in found and "ce" in found:
        parts, verdicts = [], []
        for a, b, what in (("sd_gen1", "ce", "generation 1 over generation 0 (`ce`)"),
                           ("sd_gen2", "sd_gen1", "generation 2 over generation 1")):
            if a in found and b in found:
                st = paired(found, a, "deepest", b, "deepest", "top1")
                nll = paired(found, a, "deepest", b, "deepest", "nll")
                ece = paired(found, a, "deepest", b, "deepest", "ece15")
                verdicts.append(_verdict(st))
                parts.append(f"{what}: top-1 {_delta(st)}, NLL {_delta(nll, '{:+.4f}')}, ECE-15 {_delta(ece)}")
        out.append({"claim": "Multi-generation self-distillation: later generations improve",
                    "text": f"Later generations improve (top-1) — {_overall(verdicts)}: " + "; ".join(parts) + "."})
    return out


def _finite(x):
    """NaN / inf (a standard deviation over one seed) become null: the JSON stays standard."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _commit(runs: Path) -> str:
    p = runs / "code_commit.txt"
    if p.is_file():
        return p.read_text().strip()
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def _span(runs: Path, found: dict) -> float:
    """Seconds from the first run's start (its config.yaml) to the last run's end of training (its summary.json;
    the test evaluation of best.pt adds seconds, and --reevaluate rewrites study.json later)."""
    starts, ends = [], []
    for m, by_seed in found.items():
        for s in by_seed:
            d = runs / m / f"seed{s}"
            starts.append((d / "config.yaml").stat().st_mtime)
            ends.append((d / "summary.json").stat().st_mtime)
    return max(ends) - min(starts) if starts else 0.0


def write_report(runs: Path, out: Path, methods_table: dict, methods: list[str], seeds: list[int],
                 schedule: dict) -> list[Path]:
    found, missing = _load(runs, methods, seeds)
    summ = summarize(found)
    cl = claims(found)
    cpu = sum(r["cpu_s"] for by in found.values() for r in by.values())
    wall = sum(r["wall_s"] for by in found.values() for r in by.values())
    meta = {"commit": _commit(runs), "schedule": schedule, "seeds": seeds, "methods": methods,
            "missing": [f"{m} seed {s}" for m, s in missing], "runs_finished": sum(len(v) for v in found.values()),
            "cpu_s_total": round(cpu, 1), "run_wall_s_total": round(wall, 1),
            "study_wall_s": round(_span(runs, found), 1),
            "threads_per_run": sorted({r["threads"] for by in found.values() for r in by.values()})}
    out.mkdir(parents=True, exist_ok=True)
    js = out / "methods_fashion_mnist.json"
    js.write_text(json.dumps(_finite({**meta, "summary": summ, "claims": cl,
                                      "runs": {m: {str(s): r for s, r in by.items()} for m, by in found.items()}}),
                             indent=1, allow_nan=False))
    md = out / "methods_fashion_mnist.md"
    md.write_text(_markdown(meta, summ, cl, methods_table, methods))
    paths = [js, md]
    try:
        paths.append(_plot(summ, methods, out / "methods_fashion_mnist.png"))
    except ImportError:
        pass
    return paths


def _markdown(meta: dict, summ: dict, cl: list[dict], table: dict, methods: list[str]) -> str:
    from bench.methods_report_md import markdown

    return markdown(meta, summ, cl, table, methods)


def _plot(summ: dict, methods: list[str], path: Path) -> Path:
    from bench.methods_report_md import plot

    return plot(summ, methods, path)
