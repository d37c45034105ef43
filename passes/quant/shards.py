"""Data-parallel calibration and sensitivity scoring on ``onnxforge.workers``.

Calibration: the feed files are cut into contiguous shards, one per worker;
each worker builds the streaming histograms of the same tensors over its
shard (calibrate.collect_histograms) and the shards' histograms are merged
exactly (histogram.merge_histograms). The dyadic grids make the merge exact
and associative, so the ranges are bit for bit those of one process reading
every feed, for any number of workers.

Sensitivity: the end-to-end measurements of the accuracy budget (one node
returned to float, the model scored) are independent per candidate. The
models are built here (the plan's build is a closure over in-memory state)
and shipped as bytes; each worker runs one on the validation feeds and
scores it against the float reference. Scores are the same as in-process
ones when the workers run the same onnxruntime on the same ISA (the step
cache keys on both).

Workers read the feed files themselves (the paths must be visible to them: a
shared folder on a cluster); models travel as serialized bytes (< 2 GB).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx

from onnxforge.errors import DataError, OptionError
from onnxforge.workers import Workers

from .calibrate import DEFAULT_MEMORY_BUDGET, collect_histograms, float_activation_names
from .histogram import DEFAULT_BINS, METHODS, StreamingHistogram, compute_range, merge_histograms


def split(items: Sequence, parts: int) -> list[list]:
    """``items`` cut into at most ``parts`` contiguous, non-empty shards of near-equal size."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(list(items[start:end]))
        start = end
    return out


def _shard_histograms(common: tuple, files: list[str]) -> tuple[dict[str, tuple], int]:
    """A worker's part: the histograms of its feed files, as plain tuples."""
    from onnxforge.inputs import _read_npz

    model_bytes, names, bins, memory_budget = common
    model = onnx.load_from_string(model_bytes)
    feeds = [_read_npz(Path(f)) for f in files]  # a list: re-read per tensor group when there are several
    hists, count = collect_histograms(model, feeds, names, bins=bins, memory_budget=memory_budget)
    return {n: (h.edge, h.counts, h.minimum, h.maximum) for n, h in hists.items()}, count


def collect_histograms_sharded(
    model: onnx.ModelProto, files: Sequence[str | Path], workers: Workers, names: list[str] | None = None, *,
    bins: int = DEFAULT_BINS, memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> tuple[dict[str, StreamingHistogram], int]:
    """collect_histograms over the .npz ``files``, one shard per worker, merged exactly."""
    if not files:
        raise DataError("the calibration data holds no feeds")
    names = list(names if names is not None else float_activation_names(model))
    common = (model.SerializeToString(), names, bins, memory_budget)
    shards = split([str(f) for f in files], workers.count)
    parts, count = [], 0
    for outcome in workers.gather(_shard_histograms, shards, common):
        if not outcome.ok:
            raise DataError(f"calibration on a worker failed: {outcome.error}")
        hists, n = outcome.value
        parts.append({k: StreamingHistogram(bins, edge, np.asarray(counts, np.float64), lo, hi)
                      for k, (edge, counts, lo, hi) in hists.items()})
        count += n
    merged = merge_histograms(parts)
    return {n: merged.get(n, StreamingHistogram(bins)) for n in names}, count


def calibrate_sharded(
    model: onnx.ModelProto, files: Sequence[str | Path], workers: Workers, method: str = "minmax", *,
    symmetric: bool | Mapping[str, bool] = False, names: list[str] | None = None, percentile: float = 99.999,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> tuple[dict[str, tuple[float, float]], dict[str, StreamingHistogram], int]:
    """calibrate() with the feeds split across ``workers``: the same ranges, bit for bit."""
    if method not in METHODS:
        raise OptionError(f"unknown calibration method {method!r}", hint=f"choose one of {', '.join(METHODS)}")
    histograms, count = collect_histograms_sharded(model, files, workers, names, memory_budget=memory_budget)
    ranges = {}
    for name, hist in histograms.items():
        sym = symmetric.get(name, False) if isinstance(symmetric, Mapping) else symmetric
        ranges[name] = compute_range(hist, method, sym, percentile)
    return ranges, histograms, count


def _score(common: tuple, model_bytes: bytes) -> float:
    from .budget import metric_function, run_outputs

    feeds, reference, metric = common
    return metric_function(metric)(reference, run_outputs(onnx.load_from_string(model_bytes), feeds))


def score_models(models: Sequence[onnx.ModelProto], feeds: list[dict], reference, metric: str | Callable,
                 workers: Workers) -> list[float]:
    """The metric of each model against ``reference`` on ``feeds``, one model per task."""
    blobs = [m.SerializeToString() for m in models]
    scores = []
    for outcome in workers.gather(_score, blobs, (feeds, reference, metric)):
        if not outcome.ok:
            raise DataError(f"scoring a candidate on a worker failed: {outcome.error}")
        scores.append(float(outcome.value))
    return scores
