"""Empirical bias correction of a QDQ model, layer by layer.

Rounding weights and activations shifts the mean of each convolution's output
channels (the error has a mean, not only a variance: saturating activations,
constant shifts rounded to the grid, HardSwish's clipped factor). For a Conv
``y = W * x + b`` the shift of channel c is removed exactly by

    b_c += E[y_c(float)] - E[y_c(int8)]

measured over calibration feeds on the model as quantized *so far*. The order
matters: a layer's measured shift includes what every earlier layer passed on,
so layers are corrected one at a time in graph order and each measurement runs
the model with the earlier corrections applied (correcting all at once counts
the upstream shift once per layer and overshoots; measured on PP-OCRv4 rec:
cosine 0.98 -> 0.58 at once, 0.98 -> 0.99 layer by layer).

Convolutions neither of which feeds the other are measured in the same run, and each
run holds only the part of the model upstream of what it measures (proto_graph.py).
The int8 model's conv outputs are read with onnxruntime's optimizations off, so
DequantizeLinear -> Conv runs as the float emulation of the integer kernel
(same products, exact int32 sums up to float rounding). The int32 biases are
graph inputs of the measuring session, so one session serves every step.
The corrections are returned as float deltas per bias initializer, to be added
to the float model the QDQ model is built from (rebuilds keep them).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .calibrate import session_with_outputs
from .proto_graph import graph_maps, independent_groups, upstream_of


def correct_biases(
    float_model: onnx.ModelProto,
    qdq_model: onnx.ModelProto,
    feeds: Sequence[Mapping[str, np.ndarray]],
    stop: Callable[[], bool] | None = None,
) -> dict[str, np.ndarray]:
    """Float bias deltas (bias initializer name -> delta per channel) for the
    quantized convolutions of ``qdq_model``, in graph order; ``stop()`` True ends
    it early (a time limit: the caller reports the result as not reproducible)."""
    sites = _sites(float_model, qdq_model)
    if not sites or not feeds:
        return {}
    reference = _channel_means(_session(float_model, [s.output for s in sites], {}), [s.output for s in sites], feeds, {})
    biases = {s.int_name: s.int_value.copy() for s in sites}
    deltas: dict[str, np.ndarray] = {}
    # layers neither of which feeds the other are measured in one run, on the model cut above them
    for group in independent_groups(qdq_model, [(s.output, s.output) for s in sites]):
        if stop is not None and stop():
            break
        outputs = [sites[i].output for i in group]
        upstream = upstream_of(qdq_model, outputs)
        read = {t.name for t in upstream.graph.initializer}
        current = {k: v for k, v in biases.items() if k in read}  # the cut's biases, corrected so far
        session = _session(upstream, outputs, current)
        measured = _channel_means(session, outputs, feeds, current)
        for i, got in zip(group, measured):
            site, want = sites[i], reference[i]
            if got.shape != want.shape or got.shape != site.scale.shape:  # e.g. a Gemm with a 3-D output
                continue
            step = np.round((want - got) / site.scale).astype(np.int64)
            biases[site.int_name] = np.clip(biases[site.int_name].astype(np.int64) + step, -(2**31), 2**31 - 1).astype(np.int32)
            deltas[site.float_name] = ((biases[site.int_name].astype(np.float64) - site.int_value) * site.scale).astype(np.float32)
    return deltas


def apply_deltas(model: onnx.ModelProto, deltas: Mapping[str, np.ndarray]) -> int:
    """Add ``deltas`` to the named float bias initializers of ``model`` (in place) through the
    registered pass bias-correction (bias_rules.py); the number of biases changed."""
    from .bias_rules import PASS_NAME
    from .registered import apply_passes

    if not deltas:
        return 0
    out, changed = apply_passes(model, (PASS_NAME,), max_iterations=1, options={PASS_NAME: {"deltas": dict(deltas)}})
    if changed:
        model.CopyFrom(out)
    return changed


# Output channels on axis 1: Conv, ConvTranspose (N, C, ...) and 2-D Gemm (N, C).
CORRECTED_OPS = ("Conv", "ConvTranspose", "Gemm")


class _Site:
    def __init__(self, output, float_name, int_name, int_value, scale):
        self.output, self.float_name, self.int_name = output, float_name, int_name
        self.int_value, self.scale = int_value, scale


def _sites(float_model, qdq_model) -> list[_Site]:
    """Quantized Conv/ConvTranspose/Gemm whose bias is DQ(int32 initializer) and whose
    float twin (same op, same output name) has that float bias initializer, in graph order."""
    producers, _readers, inits, _outputs = graph_maps(qdq_model)
    float_inits = {t.name for t in float_model.graph.initializer}
    # A Relu the quantizer folded into its Conv's Q range leaves the Conv writing
    # the Relu's tensor name: only a Conv in both models is the same tensor.
    float_convs = {n.output[0]: n for n in float_model.graph.node if n.op_type in CORRECTED_OPS and len(n.input) > 2}
    sites = []
    for node in qdq_model.graph.node:
        twin = float_convs.get(node.output[0]) if node.op_type in CORRECTED_OPS and len(node.input) > 2 else None
        if twin is None or twin.op_type != node.op_type or twin.input[2] != node.input[2]:
            continue
        dq = producers.get(node.input[2])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or dq.input[1] not in inits:
            continue
        if node.input[2] not in float_inits or inits[dq.input[0]].data_type != onnx.TensorProto.INT32:
            continue
        value = numpy_helper.to_array(inits[dq.input[0]]).astype(np.int32)
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
        scale = np.broadcast_to(scale, value.shape).copy() if scale.size == 1 else scale
        sites.append(_Site(node.output[0], node.input[2], dq.input[0], value, scale))
    return sites


def _session(model, outputs: list[str], inputs: Mapping[str, np.ndarray]):
    """calibrate's exposing session; ``inputs`` (int32 biases, int8 weight codes) become
    graph inputs, so one session serves every step with new values per run."""
    if inputs:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        graph = copy.graph
        keep = [t for t in graph.initializer if t.name not in inputs]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        for name, value in inputs.items():
            elem = onnx.helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype)
            graph.input.append(onnx.helper.make_tensor_value_info(name, elem, list(np.shape(value))))
        model = copy
    return session_with_outputs(model, outputs)


def _channel_means(session, names: list[str], feeds, extra: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    wanted = {i.name for i in session.get_inputs()}
    sums = None
    for feed in feeds:
        run_feed = {k: v for k, v in feed.items() if k in wanted}
        run_feed.update(extra)
        outs = session.run(names, run_feed)
        means = [o.mean(axis=tuple(i for i in range(o.ndim) if i != 1), dtype=np.float64) if o.ndim >= 2 else o.astype(np.float64) for o in outs]
        sums = means if sums is None else [a + b for a, b in zip(sums, means)]
    return [s / len(feeds) for s in sums]
