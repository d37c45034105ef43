"""Streaming calibration: per-tensor histograms filled in one pass over the data.

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

The tensors are exposed as extra graph outputs in groups whose estimated size
(shapes inferred from the first feed) stays under ``memory_budget`` bytes, so
a model whose intermediates do not fit at once is calibrated group by group;
usually everything fits in one group and the data is read once.

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
from typing import Iterable, Iterator, Mapping

import numpy as np
import onnx

from onnxforge.errors import DataError, OptionError

from .ortsession import infer_shapes, session as ort_session

METHODS = ("minmax", "entropy", "percentile", "mse")
DEFAULT_BINS = 2048
DEFAULT_MEMORY_BUDGET = 1 << 30
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


# ------------------------------------------------------------------ collection


def float_activation_names(model: onnx.ModelProto) -> list[str]:
    """Float tensors of the main graph that nodes produce or the graph takes as
    input (not initializers): what a QDQ quantizer may need ranges for."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    types = _float_value_names(model)
    names: list[str] = [i.name for i in graph.input if i.name not in initializers and i.name in types]
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        names.extend(out for out in node.output if out and out in types)
    return list(dict.fromkeys(names))


def _float_value_names(model: onnx.ModelProto) -> set[str]:
    inferred = _infer(model)
    floats = set()
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            floats.add(info.name)
    return floats


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return infer_shapes(model)  # past 2 GB too (a weight-less copy)
    except Exception:  # noqa: BLE001 - an uninferable model still calibrates its typed tensors
        return model


def collect_histograms(
    model: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]],
    names: list[str] | None = None,
    *,
    bins: int = DEFAULT_BINS,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
) -> tuple[dict[str, StreamingHistogram], int]:
    """Histograms of ``names`` (default: every float activation) over ``feeds``.

    Returns (histograms, number of feeds). ``feeds`` may be a one-shot iterator:
    when the tensors need several groups the feeds are re-read only if they are
    a re-iterable collection; a one-shot iterator is buffered to the extent
    needed, which is what the caller chose by passing one.
    """
    names = list(names if names is not None else float_activation_names(model))
    histograms = {name: StreamingHistogram(bins) for name in names}
    iterator = iter(feeds)
    first = next(iterator, None)
    if first is None:
        raise DataError("the calibration data holds no feeds")
    groups = _groups_under_budget(model, names, first, memory_budget)
    reusable = not isinstance(feeds, Iterator)
    cached: list | None = None if reusable or len(groups) == 1 else []
    count = 0
    for index, group in enumerate(groups):
        session = session_with_outputs(model, group, providers)
        source = _replay(first, iterator) if index == 0 else (iter(feeds) if reusable else iter(cached))
        count = 0
        for feed in source:
            if cached is not None and index == 0:
                cached.append(feed)
            _update(session, feed, group, histograms)
            count += 1
        del session
    return histograms, count


def _replay(first, rest) -> Iterator:
    yield first
    yield from rest


def _update(session, feed, group: list[str], histograms) -> None:
    wanted = {i.name for i in session.get_inputs()}
    missing = wanted - set(feed)
    if missing:
        raise DataError(f"a calibration feed lacks input(s) {', '.join(sorted(missing))}; it has {', '.join(feed)}")
    outputs = session.run(group, {k: v for k, v in feed.items() if k in wanted})
    for name, value in zip(group, outputs):
        histograms[name].update(value)
    del outputs


def session_with_outputs(model: onnx.ModelProto, names: list[str], providers=("CPUExecutionProvider",)):
    """A session on ``model`` with ``names`` also as outputs, onnxruntime rewrites off."""
    import onnxruntime as ort

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    existing = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in existing:
            exposed.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Basic-level rewrites would fuse calibrated tensors away; keep every one.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort_session(exposed, options, providers)


def _groups_under_budget(model, names: list[str], feed, budget: int) -> list[list[str]]:
    sizes = _estimated_bytes(model, names, feed)
    known = [s for s in sizes.values() if s is not None]
    fallback = max(known) if known else budget // 64
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        size = sizes.get(name) or fallback
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def _estimated_bytes(model: onnx.ModelProto, names: list[str], feed) -> dict[str, int | None]:
    """Byte size of each tensor with the graph inputs pinned to the first feed's shapes."""
    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    for inp in pinned.graph.input:
        if inp.name in feed and inp.type.HasField("tensor_type"):
            shape = np.shape(feed[inp.name])
            dims = inp.type.tensor_type.shape
            dims.ClearField("dim")
            for d in shape:
                dims.dim.add().dim_value = int(d)
    del pinned.graph.value_info[:]
    inferred = _infer(pinned)
    sizes: dict[str, int | None] = {}
    infos = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
    for name in names:
        info = infos.get(name)
        sizes[name] = _static_bytes(info) if info is not None else None
    return sizes


def _static_bytes(info: onnx.ValueInfoProto) -> int | None:
    dims = info.type.tensor_type.shape.dim
    if not info.type.tensor_type.HasField("shape") or any(not d.HasField("dim_value") for d in dims):
        return None
    return 4 * int(np.prod([d.dim_value for d in dims], dtype=np.int64))


def calibrate(
    model: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]],
    method: str = "minmax",
    *,
    symmetric: bool | Mapping[str, bool] = False,
    names: list[str] | None = None,
    percentile: float = 99.999,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> tuple[dict[str, tuple[float, float]], dict[str, StreamingHistogram], int]:
    """Ranges (low, high) per tensor, the histograms, and the number of feeds used."""
    if method not in METHODS:
        raise OptionError(f"unknown calibration method {method!r}", hint=f"choose one of {', '.join(METHODS)}")
    histograms, count = collect_histograms(model, feeds, names, memory_budget=memory_budget)
    ranges = {}
    for name, hist in histograms.items():
        sym = symmetric.get(name, False) if isinstance(symmetric, Mapping) else symmetric
        ranges[name] = compute_range(hist, method, sym, percentile)
    return ranges, histograms, count


# ------------------------------------------------------------------ ranges the readers saturate

HARDSWISH_FLOOR = -3.0  # hardswish(x) = 0 for every x <= -3


def saturated_by_readers(model: onnx.ModelProto, ranges: Mapping[str, tuple[float, float]], levels: int = 255) -> dict[str, tuple[float, float]]:
    """Ranges narrowed where every reader of the tensor saturates below a bound.

    HardSwish maps every x <= -3 to 0, so a tensor read only by HardSwish needs
    no grid below -3: its range starts two grid steps under -3 (the lowest
    representable value must be <= -3 however the zero point rounds), which
    spends the 8 bits on the part of the range that changes the result. Exact:
    values that now saturate would all have produced 0. (PP-OCRv4: conv outputs
    in [-296, 226] feeding HardSwish.)"""
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    outputs = {o.name for o in model.graph.output}
    narrowed = dict(ranges)
    for name, (low, high) in ranges.items():
        if readers.get(name) != {"HardSwish"} or name in outputs or high <= 0:
            continue
        floor = HARDSWISH_FLOOR - 2 * (high - HARDSWISH_FLOOR) / levels
        if low < floor:
            narrowed[name] = (floor, high)
    return narrowed


def merge_histograms(parts: Iterable[Mapping[str, StreamingHistogram]]) -> dict[str, StreamingHistogram]:
    """Per tensor, the exact merge of the histograms of disjoint feed shards
    (StreamingHistogram.merged): bit for bit the histogram one pass over all
    the feeds builds, whatever the shards and their order."""
    merged: dict[str, StreamingHistogram] = {}
    for part in parts:
        for name, hist in part.items():
            merged[name] = merged[name].merged(hist) if name in merged else hist.merged(StreamingHistogram(hist.bins))
    return merged
