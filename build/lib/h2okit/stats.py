"""Confidence intervals and three-way verdicts (pure: numpy + scipy, no torch).

Everything the kit and the benchmarks compare goes through here, so that one rule decides:
- `mean_ci`: the mean of samples with a 95 % interval, Student's t (the default) or a
  percentile bootstrap (seeded, so an analysis is repeatable);
- `paired_ci`: the same over per-pair differences (quality: per window) or ratios (speed:
  per round, the two runs measured in the same machine phase);
- `verdict`: PASS when the interval lies entirely inside the allowed region, FAIL when entirely
  outside, INCONCLUSIVE otherwise, with an estimate of how many samples would likely decide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats as _scipy_stats

LEVEL = 0.95
METHODS = ("t", "bootstrap")
VERDICTS = ("PASS", "FAIL", "INCONCLUSIVE")
BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class Interval:
    """A mean with its confidence interval over `n` samples (lo = -inf, hi = +inf when n < 2)."""

    mean: float
    lo: float
    hi: float
    n: int
    sd: float
    method: str
    level: float = LEVEL

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def as_dict(self) -> dict:
        return {"mean": self.mean, "ci95": [self.lo, self.hi], "n": self.n, "sd": self.sd, "method": self.method}

    def text(self, fmt: str = "%.2f", unit: str = "") -> str:
        if self.n < 2:
            return f"{fmt % self.mean}{unit} (n={self.n}, no CI)"
        return f"{fmt % self.mean}{unit} [{fmt % self.lo}, {fmt % self.hi}]"


def t_quantile(n: int, level: float = LEVEL) -> float:
    """Two-sided Student t critical value for a mean of n samples."""
    return float(_scipy_stats.t.ppf(0.5 + level / 2, n - 1))


def mean_ci(values: Sequence[float], method: str = "t", level: float = LEVEL, seed: int = 0) -> Interval:
    if method not in METHODS:
        raise ValueError(f"CI method '{method}' unknown; allowed: {', '.join(METHODS)}")
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return Interval(math.nan, -math.inf, math.inf, 0, math.nan, method, level)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, -math.inf, math.inf, n, 0.0, method, level)
    sd = float(x.std(ddof=1))
    if method == "t":
        half = t_quantile(n, level) * sd / math.sqrt(n)
        return Interval(mean, mean - half, mean + half, n, sd, method, level)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))].mean(axis=1)
    lo, hi = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
    return Interval(mean, float(lo), float(hi), n, sd, method, level)


def paired_ci(values: Sequence[float], baseline: Sequence[float], kind: str = "difference",
              method: str = "t", level: float = LEVEL) -> Interval:
    """CI of the per-pair `values[i] - baseline[i]` (difference) or `values[i] / baseline[i]` (ratio).
    Pairs with a NaN on either side are dropped."""
    a, b = np.asarray(values, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    if kind == "difference":
        per_pair = a - b
    elif kind == "ratio":
        with np.errstate(divide="ignore", invalid="ignore"):
            per_pair = np.where(b > 0, a / b, np.nan)
    else:
        raise ValueError(f"paired kind '{kind}' unknown; allowed: difference, ratio")
    return mean_ci(per_pair, method, level)


@dataclass(frozen=True)
class Verdict:
    verdict: str  # PASS | FAIL | INCONCLUSIVE
    more_samples: int | None  # INCONCLUSIVE: about how many more samples would likely decide (None: many)


def verdict(ci: Interval, low: float = -math.inf, high: float = math.inf) -> Verdict:
    """PASS if [lo, hi] lies inside [low, high], FAIL if it lies entirely outside, else INCONCLUSIVE.
    The borders count as inside (a CI ending exactly at the limit passes)."""
    if (ci.n >= 2 or ci.method == "exact") and low <= ci.lo and ci.hi <= high:
        return Verdict("PASS", 0)
    if ci.n >= 1 and (ci.hi < low or ci.lo > high):
        return Verdict("FAIL", 0)
    return Verdict("INCONCLUSIVE", samples_to_decide(ci, low, high))


def samples_to_decide(ci: Interval, low: float, high: float) -> int | None:
    """How many more samples would make the CI clear the nearest limit, if the mean and sd held.
    None when the mean sits on a limit (no sample count decides that) or nothing is known."""
    if ci.n < 2 or not math.isfinite(ci.sd):
        return None if ci.n < 1 else max(0, 3 - ci.n)
    gap = min(abs(ci.mean - limit) for limit in (low, high) if math.isfinite(limit)) if any(
        math.isfinite(v) for v in (low, high)) else math.inf
    if gap == 0 or not math.isfinite(gap):
        return None
    if ci.sd == 0:
        return 0

    def clears(n: int) -> bool:  # the half-width t_n * sd / sqrt(n) falls monotonically with n
        return t_quantile(n, ci.level) * ci.sd / math.sqrt(n) < gap

    hi = max(ci.n, 2)
    while not clears(hi):
        if hi > 10**7:
            return None
        hi *= 2
    lo = 2
    while lo < hi:  # the smallest n that clears
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if not clears(mid) else (lo, mid)
    return max(0, lo - ci.n)


def ci_from_summary(mean: float, sd: float, n: int, level: float = LEVEL) -> Interval:
    """The t interval of a mean reported as mean, sample sd and n (what a `mean ± sd` cell plus a
    count gives; the same interval `mean_ci` computes from the samples)."""
    if n < 2 or not math.isfinite(sd):
        return Interval(mean, -math.inf, math.inf, max(n, 0), sd if n >= 2 else 0.0, "t", level)
    half = t_quantile(n, level) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd, "t", level)


def exact(value: float) -> Interval:
    """A deterministic figure (a ratio computed from sizes): its 'interval' is the point."""
    return Interval(value, value, value, 1, 0.0, "exact")
