"""The numbers of the methods study's report: mean ± std over seeds, paired differences seed by seed (`stat` says
when one is clear), and the papers' claims with a verdict each."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from engine.evaluate import deepest_key


def load(runs: Path, methods: list[str], seeds: list[int]) -> tuple[dict, list]:
    """method -> seed -> study.json, and the (method, seed) pairs without one."""
    paths = {(m, s): runs / m / f"seed{s}" / "study.json" for m in methods for s in seeds}
    found: dict = {}
    for (m, s), p in ((k, p) for k, p in paths.items() if p.is_file()):
        found.setdefault(m, {})[s] = json.loads(p.read_text())
    return found, [k for k, p in paths.items() if not p.is_file()]


def stat(values: list[float]) -> dict:
    """Mean, standard deviation (NaN for one value), n, the values, and whether the mean is clearly non-zero."""
    n = len(values)
    sd = statistics.stdev(values) if n > 1 else float("nan")
    mean = statistics.fmean(values)
    clear = n > 1 and abs(mean) > 2 * sd / math.sqrt(n) and (min(values) > 0 or max(values) < 0)
    return {"mean": mean, "std": sd, "n": n, "values": values, "clear": bool(clear)}


def _value(run: dict, predictor: str, metric: str) -> float:
    res = run["test_best"]
    return res[deepest_key(res) if predictor == "deepest" else predictor][metric]


def summarize(found: dict) -> dict:
    """method -> predictor (exits, ensembles and 'deepest') -> metric -> stat over seeds; '_cost' the CPU time."""
    out: dict = {}
    for m, by_seed in found.items():
        runs = list(by_seed.values())
        first = runs[0]["test_best"]
        keys = {**{p: p for p in first}, "deepest": deepest_key(first)}
        out[m] = {p: {k: stat([_value(r, p, k) for r in runs]) for k in first[key]} for p, key in keys.items()}
        out[m]["_cost"] = {k: stat([r[k] for r in runs]) for k in ("cpu_s", "wall_s")}
    return out


def paired(found: dict, a: str, pa: str, b: str, pb: str, metric: str, sign: float = 1.0) -> dict | None:
    """sign * (a's predictor pa minus b's predictor pb), seed by seed; None when no seed has both."""
    seeds = sorted(set(found.get(a, {})) & set(found.get(b, {})))
    if not seeds:
        return None
    return stat([sign * (_value(found[a][s], pa, metric) - _value(found[b][s], pb, metric)) for s in seeds])


def delta(st: dict | None, fmt: str = "{:+.2f}") -> str:
    if st is None:
        return "not run"
    sd = "" if math.isnan(st["std"]) else " ± " + fmt.format(st["std"]).lstrip("+")
    return f"{fmt.format(st['mean'])}{sd} ({'clear' if st['clear'] else 'inside seed noise'}, n={st['n']})"


def better(st: dict | None) -> str:
    if st is None:
        return "missing"
    return ("better" if st["mean"] > 0 else "worse") if st["clear"] else "noise"


def verdict(st: dict | None) -> str:
    return {"better": "supported", "worse": "contradicted", "noise": "inside seed noise",
            "missing": "not run"}[better(st)]


def _byot(found: dict, v: str, label: str) -> dict:
    exits = [k for k in next(iter(found[v].values()))["test_best"] if k.startswith("exit")]
    preds = [*exits, "ens_logits", "ens_probs"]
    vs_plain = {p: paired(found, v, p, "ce", "deepest", "top1") for p in preds}
    vs_dsn = {p: paired(found, v, p, "dsn", p, "top1") for p in exits}
    groups = {k: ", ".join(p for p in preds if better(vs_plain[p]) == k) or "none"
              for k in ("better", "worse", "noise")}
    every = ("supported" if groups["better"] == ", ".join(preds) else
             "contradicted" if groups["worse"] != "none" else "inside seed noise")
    text = (f"{label}: every exit and the ensemble beat the plain model — {every}. Top-1 against the plain network "
            f"(`ce`): clearly better: {groups['better']}; clearly worse: {groups['worse']}; inside seed noise: "
            f"{groups['noise']}. Deepest exit {delta(vs_plain[exits[-1]])}, ensemble of logits "
            f"{delta(vs_plain['ens_logits'])}.")
    shallow = None
    if all(vs_dsn[p] is not None for p in exits):
        # each exit's gain over the same exit trained without distillation (DSN); shallowest minus deepest gain
        shallow = stat([a - b for a, b in zip(vs_dsn[exits[0]]["values"], vs_dsn[exits[-1]]["values"])])
        gains = [vs_dsn[p]["mean"] for p in exits]
        monotone = all(g1 >= g2 for g1, g2 in zip(gains, gains[1:]))
        says = ("supported" if shallow["clear"] and shallow["mean"] > 0 and monotone else
                "contradicted" if shallow["clear"] and shallow["mean"] < 0 else
                "not supported (the ordering is not monotone)" if shallow["clear"] else "inside seed noise")
        text += (f" Shallow exits gain the most — {says}: gain over the same exit trained by deep supervision alone "
                 "(`dsn`), " + ", ".join(f"{p} {delta(vs_dsn[p])}" for p in exits)
                 + f"; shallowest minus deepest gain {delta(shallow)}.")
    return {"claim": f"{label}: every exit and the ensemble beat the plain model; shallow exits gain the most",
            "text": text, "vs_plain_top1": vs_plain, "vs_dsn_top1": vs_dsn, "shallow_minus_deep_gain": shallow}


def _cskd(found: dict, v: str, label: str) -> dict:
    err = paired(found, v, "deepest", "ce", "deepest", "top1", sign=-1.0)  # error difference = -(top-1 difference)
    ece = paired(found, v, "deepest", "ce", "deepest", "ece15")
    ce_ece = statistics.fmean(_value(r, "deepest", "ece15") for r in found["ce"].values())
    rel = ece["mean"] / ce_ece if ece and ce_ece else float("nan")
    much = ("not run" if ece is None else "inside seed noise" if not ece["clear"] else
            "contradicted (ECE is higher)" if ece["mean"] > 0 else
            "supported" if rel <= -1 / 3 else "partly (lower, but by less than a third)")
    lower = {"better": "contradicted", "worse": "supported"}.get(better(err), verdict(err))  # lower error is better
    text = (f"{label}: lower error than CE — {lower}: error difference {delta(err)} points. Much lower ECE than CE "
            f"— {much}: ECE-15 difference {delta(ece)} points ({100 * rel:+.0f}% of CE's {ce_ece:.2f}%).")
    return {"claim": f"{label}: lower error and much lower ECE than CE", "text": text,
            "error_diff": err, "ece15_diff": ece}


def _pairs(found: dict, claim: str, pairs: list[tuple[str, str, str]]) -> dict:
    """A claim that `a` beats `b` in top-1 for every pair (a, b, how to say it); NLL and ECE shown beside."""
    parts, verdicts = [], []
    for a, b, what in (p for p in pairs if p[0] in found and p[1] in found):
        st = paired(found, a, "deepest", b, "deepest", "top1")
        nll = paired(found, a, "deepest", b, "deepest", "nll")
        verdicts.append(verdict(st))
        parts.append(f"{what}: top-1 {delta(st)}, NLL {delta(nll, '{:+.4f}')}, "
                     f"ECE-15 {delta(paired(found, a, 'deepest', b, 'deepest', 'ece15'))}")
    overall = verdicts[0] if len(set(verdicts)) == 1 else "mixed" if verdicts else "not run"
    return {"claim": claim, "text": f"{claim} (top-1) — {overall}: " + "; ".join(parts) + "."}


def claims(found: dict) -> list[dict]:
    """The papers' claims, each with the paired differences behind it and a plain verdict."""
    if "ce" not in found:
        return []
    out = [_byot(found, v, label) for v, label in (("byot_iccv", "BYOT (ICCV settings)"),
                                                   ("byot_journal", "BYOT (journal settings)")) if v in found]
    out += [_cskd(found, v, label) for v, label in (("cskd", "CS-KD"), ("cskd_e", "CS-KD-E")) if v in found]
    if "beta" in found:
        out.append(_pairs(found, "Beta smoothing beats label smoothing",
                          [("beta", ls, f"against `{ls}`") for ls in ("ls_wrong", "ls_all")]))
    if "sd_gen1" in found:
        out.append(_pairs(found, "Later generations improve",
                          [("sd_gen1", "ce", "generation 1 over generation 0 (`ce`)"),
                           ("sd_gen2", "sd_gen1", "generation 2 over generation 1")]))
    return out
