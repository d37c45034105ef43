"""Streaming histograms of calibrated tensors and the ranges read from them.

Every calibrated tensor keeps a fixed-size histogram over a range symmetric
about zero, [-R, R], plus its exact min and max. R is a power of two strictly
above every |x| seen: when a batch reaches R the range doubles and adjacent
bin pairs merge (with a bin count divisible by 4 the old bins fall exactly
onto the central half of the new ones), so rebinning is exact and needs no
stored samples. Memory is O(tensors x bins), independent of the number of
samples.

Why powers of two: every grid is then the dyadic grid of its R, whose edges
(multiples of 2R/bins) are exact in float32, so a value lands in the half-open
bin [e_i, e_i+1) that contains it whatever grid it was first counted on, and
no value ever sits on the right edge. The final histogram is therefore the
exact per-bin count on the grid of R = the smallest power of two above
max |x|, independent of the order and grouping of the feeds: histograms of
disjoint shards merge (``merge_histograms``: coarsen to the larger R, add the
integer counts, min of mins, max of maxes) to bit for bit what one pass over
all feeds gives. That is what data-parallel calibration relies on.

Ranges from a histogram (``symmetric`` gives (-T, T) with T from |x|):
  * minmax: the exact (min, max);
  * percentile: the p-th percentile of |x| (symmetric) or both tails;
  * entropy: TensorRT's KL-divergence threshold: the clip T whose 128-level
    quantized distribution is closest to the clipped reference;
  * mse: the clip that minimises the expected squared quantization error
    (rounding inside, clipping outside) of the histogram.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping

import numpy as np

from onnxforge.errors import OptionError

METHODS = ("minmax", "entropy", "percentile", "mse")
DEFAULT_BINS = 2048
EMPTY_EDGE = 2.0 ** -30  # the range of a tensor that is all zeros
# float32 holds the dyadic grid's edges exactly between these ranges; outside, bin in float64
FLOAT32_EDGES = (2.0 ** -100, 2.0 ** 126)


def dyadic_edge(need: float) -> float:
    """The smallest power of two strictly above ``need`` (EMPTY_EDGE for 0)."""
    if not need > 0:
        return EMPTY_EDGE
    _mantissa, exponent = math.frexp(need)  # need = m * 2**exponent, 0.5 <= m < 1
    return math.ldexp(1.0, exponent)


@dataclasses.dataclass
class StreamingHistogram:
    """Histogram of a tensor's values over [-edge, edge]; range doubles as needed."""

    bins: int = DEFAULT_BINS
    edge: float = 0.0
    counts: np.ndarray | None = None
    minimum: float = np.inf
    maximum: float = -np.inf

    def update(self, values: np.ndarray) -> None:
        flat = np.asarray(values, dtype=np.float32).ravel()
        flat = flat[np.isfinite(flat)]
        if flat.size == 0:
            return
        low, high = float(flat.min()), float(flat.max())
        self.minimum, self.maximum = min(self.minimum, low), max(self.maximum, high)
        need = max(abs(low), abs(high))
        if self.counts is None:
            if self.bins % 4:
                raise OptionError(f"histogram bins {self.bins}: must be a multiple of 4 (exact rebinning)")
            self.edge = dyadic_edge(need)
            self.counts = np.zeros(self.bins, dtype=np.float64)
        while need >= self.edge:
            self._double()
        if not FLOAT32_EDGES[0] <= self.edge <= FLOAT32_EDGES[1]:
            flat = flat.astype(np.float64)
        hist, _ = np.histogram(flat, bins=self.bins, range=(-self.edge, self.edge))
        self.counts += hist

    def _double(self) -> None:
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        quarter = self.bins // 4
        fresh = np.zeros(self.bins, dtype=np.float64)
        fresh[quarter : quarter + merged.size] = merged
        self.counts, self.edge = fresh, self.edge * 2

    def merged(self, other: "StreamingHistogram") -> "StreamingHistogram":
        """A new histogram of both one's samples: exact (see the module docstring),
        so merging is associative and commutative."""
        if self.bins != other.bins:
            raise ValueError(f"cannot merge histograms of {self.bins} and {other.bins} bins")
        parts = [h for h in (self, other) if h.counts is not None]
        if not parts:
            return StreamingHistogram(self.bins)
        out = StreamingHistogram(self.bins, parts[0].edge, parts[0].counts.copy(), parts[0].minimum, parts[0].maximum)
        for part in parts[1:]:
            counts, edge = part.counts.copy(), part.edge
            coarser = StreamingHistogram(self.bins, edge, counts)
            while coarser.edge < out.edge:
                coarser._double()
            while out.edge < coarser.edge:
                out._double()
            out.counts += coarser.counts
            out.minimum, out.maximum = min(out.minimum, part.minimum), max(out.maximum, part.maximum)
        return out

    @property
    def width(self) -> float:
        return 2 * self.edge / self.bins

    def centers(self) -> np.ndarray:
        return -self.edge + self.width * (np.arange(self.bins) + 0.5)

    def absolute(self) -> np.ndarray:
        """Counts of |x| over [0, edge] in bins/2 bins."""
        half = self.bins // 2
        return self.counts[half:] + self.counts[:half][::-1]


def compute_range(hist: StreamingHistogram, method: str, symmetric: bool, percentile: float = 99.999) -> tuple[float, float]:
    """(low, high) quantization range of one tensor; always includes 0."""
    if hist.counts is None:
        return 0.0, 0.0
    low, high = min(hist.minimum, 0.0), max(hist.maximum, 0.0)
    if method == "minmax":
        result = (low, high)
    elif method == "percentile":
        result = _percentile_range(hist, percentile, symmetric)
    elif method == "entropy":
        t = _entropy_threshold(hist)
        result = (max(low, -t), min(high, t))
    elif method == "mse":
        result = _mse_range(hist, symmetric)
    else:
        raise OptionError(f"unknown calibration method {method!r}", hint=f"choose one of {', '.join(METHODS)}")
    low, high = min(result[0], 0.0), max(result[1], 0.0)
    if symmetric:
        bound = max(abs(low), abs(high))
        return -bound, bound
    return low, high


def _percentile_range(hist: StreamingHistogram, percentile: float, symmetric: bool) -> tuple[float, float]:
    fraction = percentile / 100.0
    if symmetric:
        absolute = hist.absolute()
        cdf = np.cumsum(absolute) / absolute.sum()
        index = int(np.searchsorted(cdf, fraction))
        t = min((index + 1) * hist.width, max(abs(hist.minimum), abs(hist.maximum)))
        return -t, t
    cdf = np.cumsum(hist.counts) / hist.counts.sum()
    edges = -hist.edge + hist.width * np.arange(hist.bins + 1)
    low = edges[int(np.searchsorted(cdf, 1.0 - fraction))]
    high = edges[min(int(np.searchsorted(cdf, fraction)) + 1, hist.bins)]
    return max(low, hist.minimum), min(high, hist.maximum)


def _entropy_threshold(hist: StreamingHistogram, levels: int = 128, stride: int = 4) -> float:
    """TensorRT's KL calibration on the |x| histogram."""
    absolute = hist.absolute()
    nbins = absolute.size
    if nbins <= levels or absolute.sum() == 0:
        return max(abs(hist.minimum), abs(hist.maximum))
    best_t, best_kl = nbins, np.inf
    for i in range(levels, nbins + 1, stride):
        kl = _kl_for_clip(absolute, i, levels)
        if kl < best_kl:
            best_kl, best_t = kl, i
    return min(best_t * hist.width, max(abs(hist.minimum), abs(hist.maximum)))


def _kl_for_clip(absolute: np.ndarray, clip: int, levels: int) -> float:
    reference = absolute[:clip].copy()
    reference[clip - 1] += absolute[clip:].sum()
    nonzero = reference > 0
    # Quantize the first `clip` bins into `levels` groups, expand back over the
    # non-empty bins of each group.
    groups = np.minimum((np.arange(clip) * levels) // clip, levels - 1)
    group_sum = np.bincount(groups, weights=absolute[:clip], minlength=levels)
    group_nonzero = np.bincount(groups, weights=nonzero.astype(np.float64), minlength=levels)
    expanded = np.where(nonzero, group_sum[groups] / np.maximum(group_nonzero[groups], 1), 0.0)
    p = reference / reference.sum()
    q_total = expanded.sum()
    if q_total == 0:
        return np.inf
    q = expanded / q_total
    mask = p > 0
    q_safe = np.where(q[mask] > 0, q[mask], 1e-12)
    return float(np.sum(p[mask] * np.log(p[mask] / q_safe)))


def _mse_range(hist: StreamingHistogram, symmetric: bool, steps: int = 64) -> tuple[float, float]:
    centers, weights = hist.centers(), hist.counts
    low, high = min(hist.minimum, 0.0), max(hist.maximum, 0.0)
    if symmetric:
        bound = max(abs(low), abs(high))
        low, high = -bound, bound
    levels = 254 if symmetric else 255
    best, best_err = (low, high), np.inf
    for alpha in np.linspace(1.0 / steps, 1.0, steps):
        lo, hi = low * alpha, high * alpha
        scale = (hi - lo) / levels
        if scale <= 0:
            continue
        clipped = np.clip(centers, lo, hi)
        rounded = np.round((clipped - lo) / scale) * scale + lo
        err = float(np.sum(weights * (centers - rounded) ** 2))
        if err < best_err:
            best_err, best = err, (lo, hi)
    return best


def merge_histograms(parts: Iterable[Mapping[str, StreamingHistogram]]) -> dict[str, StreamingHistogram]:
    """Per tensor, the exact merge of the histograms of disjoint feed shards
    (StreamingHistogram.merged): bit for bit the histogram one pass over all
    the feeds builds, whatever the shards and their order."""
    merged: dict[str, StreamingHistogram] = {}
    for part in parts:
        for name, hist in part.items():
            merged[name] = merged[name].merged(hist) if name in merged else hist.merged(StreamingHistogram(hist.bins))
    return merged
