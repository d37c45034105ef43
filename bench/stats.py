"""Latency statistics and the latency ratio of two models with a confidence interval.

Ratio method (the one the peers' numbers in ANCHORS.md use): models run
interleaved in rounds; in round i each model's latency is the median of its
runs in that round, and r_i = ln(median_variant_i / median_base_i). The ratio
is the geometric mean exp(mean r) and its 95% interval
exp(mean r +- t_{0.975, n-1} * sd(r) / sqrt(n)), a Student t-interval on the
log ratios. Per-round pairing cancels slow drifts (thermal, other tenants)
that hit both models alike; the log makes 0.5x and 2x symmetric.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def summarize(latencies_ms: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99, mean, std, min, max and count of a latency sample (ms)."""
    x = np.asarray(latencies_ms, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no latencies to summarize")
    return {
        "p50": float(np.percentile(x, 50)),
        "p90": float(np.percentile(x, 90)),
        "p99": float(np.percentile(x, 99)),
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "min": float(x.min()),
        "max": float(x.max()),
        "n": int(x.size),
    }


# ------------------------------------------------------------- Student t quantile


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1) * (a + m2)),
                    -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    tail = 0.5 * _betai(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """Inverse Student t CDF by bisection (exact to ~1e-10; df >= 1)."""
    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError("need 0 < p < 1 and df >= 1")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------- ratios


@dataclass(frozen=True)
class RatioCI:
    ratio: float  # geometric mean of per-round ratios (variant / base)
    low: float
    high: float
    rounds: int

    @property
    def verdict(self) -> str:
        """'faster' / 'slower' when the 95% interval excludes 1, else 'same'."""
        if self.high < 1.0:
            return "faster"
        if self.low > 1.0:
            return "slower"
        return "same"

    def __str__(self) -> str:
        return f"{self.ratio:.3f} [{self.low:.3f}, {self.high:.3f}]"


def ratio_ci(base_round_medians: Sequence[float], variant_round_medians: Sequence[float],
             confidence: float = 0.95) -> RatioCI:
    """Latency ratio variant/base with a t-interval on per-round log ratios.

    Both sequences hold one median latency per round, paired by round. With a
    single round the interval is unbounded ([0, inf]): one pair says nothing
    about noise.
    """
    base = np.asarray(base_round_medians, dtype=np.float64)
    variant = np.asarray(variant_round_medians, dtype=np.float64)
    if base.shape != variant.shape or base.size == 0:
        raise ValueError("need the same, non-zero number of rounds for both models")
    if np.any(base <= 0) or np.any(variant <= 0):
        raise ValueError("latencies must be positive")
    logs = np.log(variant / base)
    n = logs.size
    mean = float(logs.mean())
    if n < 2:
        return RatioCI(math.exp(mean), 0.0, math.inf, n)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * float(logs.std(ddof=1)) / math.sqrt(n)
    return RatioCI(math.exp(mean), math.exp(mean - half), math.exp(mean + half), n)
