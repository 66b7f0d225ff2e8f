"""The statistics of the methods study v2: paired t-intervals over seeds, Holm's correction, and one verdict rule.

A comparison is a list of per-seed differences `a - b` (the same seed, so the same data split, for both methods),
oriented so that the paper predicts a positive value. The rule (`verdict`):

- **supported**: the Holm-adjusted p-value is below `alpha`, the mean is positive, and the 95 % interval does not
  lie wholly below the paper's effect (when the paper gives one);
- **contradicted**: the Holm-adjusted p-value is below `alpha` with a negative mean (the effect goes the wrong
  way), or the paper gives an effect and the whole interval lies below it (the effect, if any, is smaller than
  claimed);
- **inconclusive**: anything else, including fewer than two seeds.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

from scipy import stats as sps

ALPHA = 0.05
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    n: int
    mean: float
    sd: float
    lo: float  # the two-sided LEVEL t-interval of the mean
    hi: float
    p: float  # two-sided paired t-test of mean = 0

    def as_dict(self) -> dict:
        """Fewer than two seeds leave no sd or interval: None there, not NaN or infinity, so the json stays strict."""
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(self).items()}


def t_interval(diffs: list[float], level: float = LEVEL) -> Interval:
    """Mean of the paired differences, its t-interval with n - 1 degrees of freedom and the two-sided p-value."""
    n = len(diffs)
    mean = statistics.fmean(diffs) if n else math.nan
    if n < 2:
        return Interval(n, mean, math.nan, -math.inf, math.inf, 1.0)
    sd = statistics.stdev(diffs)
    if sd == 0:  # every seed the same difference: zero width, p 0 unless the difference is 0
        return Interval(n, mean, 0.0, mean, mean, 1.0 if mean == 0 else 0.0)
    se = sd / math.sqrt(n)
    half = float(sps.t.ppf(0.5 + level / 2, n - 1)) * se
    p = float(2 * sps.t.sf(abs(mean) / se, n - 1))
    return Interval(n, mean, sd, mean - half, mean + half, p)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment: the k-th smallest of m p-values times (m - k + 1), made monotone, capped at 1."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def verdict(iv: Interval, p_holm: float, paper_effect: float | None = None, alpha: float = ALPHA) -> str:
    """supported / contradicted / inconclusive for a difference oriented so the paper predicts > 0."""
    if iv.n < 2:
        return "inconclusive"
    significant = p_holm < alpha
    if significant and iv.mean < 0:
        return "contradicted"
    if paper_effect is not None and iv.hi < paper_effect:
        return "contradicted"
    if significant and iv.mean > 0:
        return "supported"
    return "inconclusive"
