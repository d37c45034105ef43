"""Streaming calibration: the calibrated tensors' histograms (histogram.py: their
grids, exact merging and the range methods) filled in one pass over the data.

The tensors are exposed as extra graph outputs in groups whose estimated size
(shapes inferred from the first feed) stays under ``memory_budget`` bytes, so
a model whose intermediates do not fit at once is calibrated group by group;
usually everything fits in one group and the data is read once.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Mapping

import numpy as np
import onnx

from onnxforge.errors import DataError, OptionError

from .histogram import DEFAULT_BINS, METHODS, StreamingHistogram, compute_range
from .histogram import EMPTY_EDGE, dyadic_edge, merge_histograms  # noqa: F401 - calibrate's names before the split
from .ortsession import infer_shapes, session as ort_session

DEFAULT_MEMORY_BUDGET = 1 << 30


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

    from .proto_graph import with_outputs

    exposed = with_outputs(model, names)
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
