"""Second moments H = X^T X / n of MatMul inputs over calibration feeds, for GPTQ and AWQ.

X stacks the input rows (one per token: every leading dimension flattened) the MatMul sees over all
feeds; positions a feed's ``attention_mask`` marks 0 (padding) are left out when the activation's
leading dims are [batch, sequence] like the mask's. H is accumulated in float64, one feed at a time.

Memory stays bounded: the tensors are exposed as outputs of an onnxruntime session a group at a time,
the groups sized by ``calibrate._groups_under_budget`` (bytes of one feed's activations), the feeds
re-read per group (from the folder, one file at a time), so only one group's activations of one feed
and the [K, K] accumulators are held at once, whatever the model or data size.

Sequential calibration (``collect_moments``): the quantizable weights become graph inputs
(``weights_as_inputs``), so one session runs the float model and the partly quantized one; the graph is cut
to what the stage's tensors need (``prefix``: later layers and the LM head are not run). Per stage it
returns H = Xq^T Xq / n of the quantized model's inputs and the cross moment C = Xq^T Xf / n with the
float model's inputs at the same tokens: with both, a layer can be solved for what the float model
computed, ||Xq W^ - Xf W||^2, rather than for its own drifted inputs.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import numpy as np
import onnx

from onnxforge.errors import DataError

from .calibrate import _groups_under_budget, session_with_outputs
from .proto_graph import outer_names, upstream_of

MEMORY_BUDGET = 256 << 20


def collect_hessians(model: onnx.ModelProto, feeds: Callable[[], Iterable[Mapping[str, np.ndarray]]],
                     names: list[str], *, memory_budget: int = MEMORY_BUDGET,
                     log: Callable[[str], None] | None = None) -> tuple[dict[str, np.ndarray], int]:
    """({name: H [K, K] float64}, tokens seen per tensor). ``feeds()`` gives a fresh iterator each call."""
    first = next(iter(feeds()), None)
    if first is None:
        raise DataError("the calibration data holds no feeds")
    groups = _groups_under_budget(model, names, first, memory_budget)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for index, group in enumerate(groups):
        if log:
            log(f"int4: calibration group {index + 1}/{len(groups)} ({len(group)} MatMul inputs)")
        session = session_with_outputs(model, group)
        wanted = {i.name for i in session.get_inputs()}
        for feed in feeds():
            missing = wanted - set(feed)
            if missing:
                raise DataError(f"a calibration feed lacks input(s) {', '.join(sorted(missing))}")
            outputs = session.run(group, {k: v for k, v in feed.items() if k in wanted})
            mask = feed.get("attention_mask")
            for name, value in zip(group, outputs):
                rows = _rows(np.asarray(value), mask)
                acc = sums.setdefault(name, np.zeros((rows.shape[1], rows.shape[1])))
                rows = rows.astype(np.float32)
                acc += rows.T @ rows  # float32 products of one feed, summed in float64 across feeds
                counts[name] = counts.get(name, 0) + rows.shape[0]
            del outputs
        del session
    tokens = min(counts.values()) if counts else 0
    return {name: acc / max(counts[name], 1) for name, acc in sums.items()}, tokens


def _rows(value: np.ndarray, mask) -> np.ndarray:
    """The activation as [tokens, K], padded positions dropped."""
    if mask is not None and value.ndim == 3 and value.shape[:2] == np.shape(mask):
        return value[np.asarray(mask).astype(bool)]
    return value.reshape(-1, value.shape[-1])


def weights_as_inputs(model: onnx.ModelProto, names: set[str]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """(a copy of ``model`` whose initializers ``names`` are graph inputs instead, {name: value}): one session
    then runs the float model and any quantized version of it, the weights given with each feed."""
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept, values = [], {}
    for init in out.graph.initializer:
        if init.name in names:
            values[init.name] = numpy_helper.to_array(init)
            out.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            kept.append(init)
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out, values


def collect_moments(model: onnx.ModelProto, feeds: Callable[[], Iterable[Mapping[str, np.ndarray]]],
                    names: list[str], float_weights: Mapping[str, np.ndarray],
                    quantized_weights: Mapping[str, np.ndarray] | None, *, cross: bool = True
                    ) -> tuple[dict, dict, int]:
    """For the quantized model (``weights_as_inputs`` ``model`` fed ``quantized_weights``), H = Xq^T Xq / n of
    each tensor in ``names`` and the cross moment C = Xq^T Xf / n with the float model's Xf at the same
    tokens: ({name: H}, {name: C}, tokens). ``quantized_weights`` None: nothing quantized yet, C = H.
    ``cross`` False: C is not wanted ({} in its place), so the float model is not run (one session run per
    feed instead of two)."""
    session = session_with_outputs(prefix(model, names), names)
    wanted = {i.name for i in session.get_inputs()}
    float_weights = {k: v for k, v in float_weights.items() if k in wanted}
    hs: dict[str, np.ndarray] = {}
    cs: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for feed in feeds():
        data = {k: v for k, v in feed.items() if k in wanted}
        missing = wanted - set(data) - set(float_weights)
        if missing:
            raise DataError(f"a calibration feed lacks input(s) {', '.join(sorted(missing))}")
        mask = feed.get("attention_mask")
        quantized = {k: v for k, v in (quantized_weights or {}).items() if k in wanted}
        xq = session.run(names, {**data, **float_weights, **quantized})
        xf = session.run(names, {**data, **float_weights}) if cross and quantized else xq
        for name, f, q in zip(names, xf, xq):
            q = _rows(np.asarray(q), mask).astype(np.float32)
            h = hs.setdefault(name, np.zeros((q.shape[1], q.shape[1])))
            h += q.T @ q
            if cross:
                f = _rows(np.asarray(f), mask).astype(np.float32)
                c = cs.setdefault(name, np.zeros((q.shape[1], q.shape[1])))
                c += q.T @ f
            counts[name] = counts.get(name, 0) + q.shape[0]
        del xf, xq
    del session
    tokens = min(counts.values()) if counts else 0
    return ({n: h / max(counts[n], 1) for n, h in hs.items()}, {n: c / max(counts[n], 1) for n, c in cs.items()},
            tokens)


def prefix(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """``model`` cut to the nodes ``names`` depend on (the later layers and the LM head are not run), with
    ``names`` as its outputs and only the graph inputs those nodes read (the weights are inputs here:
    ``weights_as_inputs``)."""
    out = upstream_of(model, names)
    read = {name for n in out.graph.node for name in list(n.input) + outer_names(n)} | set(names)
    inputs = [i for i in out.graph.input if i.name in read]
    del out.graph.input[:]
    out.graph.input.extend(inputs)
    return out
