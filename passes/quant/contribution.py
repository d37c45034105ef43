"""Each quantized node's own contribution to the output error of a QDQ model.

A node is *quantized* when it reads an activation through a QuantizeLinear ->
DequantizeLinear pair (fake quantization). Its contribution is the output error of
the model in which that node alone reads int8 activations and every other node reads
the float tensors (the pairs' inputs), against the model in which no node does:
1 - cosine and the noise-to-signal ratio N/S of all float outputs concatenated,
averaged over the feeds. Ranked by N/S, it says which nodes to keep float; error that
an early node adds and later ones amplify is charged to the early node, which the
local noise at a node's output (budget.node_sensitivity) cannot see.

One model serves every node: each read of a fake-quantized activation by node k goes
through ``Where(which == k, dequantized, float)``, ``which`` an extra int64 scalar
input; ``which = -1`` is the all-float model. The float read is the pair without its
rounding, ``(clip(x / s_q + z_q, qmin, qmax) - z_dq) * s_dq``: it keeps the pair's
range, because quantizers fold Relu/Clip into it (PP-OCRv4's HardSwish clip is the
saturation of its Q), and its rescale where the Q and DQ scales differ (a HardSwish
whose /6 moved into the DQ scale). Reading the bare ``x`` there gives another model
(cosine 0.03 to the float one on PP-OCRv4 det). So a contribution is that of rounding.
So one onnxruntime session (graph optimizations off, so the fake quantization is not
fused into integer kernels) runs N + 1 times per feed; no model is rebuilt per node.

Weights: a weight's DequantizeLinear reads an int8 initializer; its float values are
not in the model, so weights stay at their int8 values in every run. Per-channel
int8 weights add far less noise than activation rounding; the contribution is that
of the node's activation quantization.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

WHICH = "onnxforge_contribution_which"


@dataclasses.dataclass
class Contribution:
    node: str
    op: str
    noise_ratio: float  # N/S of the outputs, mean over feeds
    cosine: float  # cosine of the outputs, mean over feeds

    @property
    def sqnr_db(self) -> float:
        return float("inf") if self.noise_ratio <= 0 else -10.0 * float(np.log10(self.noise_ratio))

    def as_dict(self) -> dict:
        return {"node": self.node, "op": self.op, "noise_ratio": self.noise_ratio,
                "sqnr_db": self.sqnr_db, "cosine": self.cosine}


_QRANGE = {onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT8: (-128, 127),
           onnx.TensorProto.UINT16: (0, 65535), onnx.TensorProto.INT16: (-32768, 32767)}


def _scalar(name: str, inits: dict, default_type: int | None = None):
    """(value as float, onnx type) of a constant scalar initializer; None otherwise."""
    if not name:
        return (0.0, default_type) if default_type is not None else None
    t = inits.get(name)
    if t is None:
        return None
    v = numpy_helper.to_array(t)
    return (float(v.reshape(())), t.data_type) if v.size == 1 else None


def _unrounded(q: onnx.NodeProto, dq: onnx.NodeProto, inits: dict):
    """(1/s_q... as constants): (s_q, z_q, qmin, qmax, z_dq, s_dq) of a per-tensor pair
    with constant scales and zero points; None otherwise."""
    sq, sd = _scalar(q.input[1], inits), _scalar(dq.input[1], inits)
    zq = _scalar(q.input[2] if len(q.input) > 2 else "", inits, onnx.TensorProto.UINT8)
    zd = _scalar(dq.input[2] if len(dq.input) > 2 else "", inits, onnx.TensorProto.UINT8)
    if None in (sq, sd, zq, zd) or zq[1] not in _QRANGE:
        return None
    lo, hi = _QRANGE[zq[1]]
    return sq[0], zq[0], lo, hi, zd[0], sd[0]


def quantized_reads(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, int, str, tuple]]:
    """(node, input index, float tensor, (Q node, DQ node)) for each input a node reads
    through a QuantizeLinear -> DequantizeLinear pair, in graph order (main graph)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    reads = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                reads.append((node, i, q.input[0], (q, dq)))
    return reads


def switch_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[onnx.NodeProto]]:
    """A copy of ``model`` with the ``which`` input described above; the quantized
    nodes in the order of their ``which`` index."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    reads = quantized_reads(out)
    order: list[onnx.NodeProto] = []
    index: dict[int, int] = {}
    for node, *_rest in reads:
        if id(node) not in index:
            index[id(node)] = len(order)
            order.append(node)
    graph.input.append(helper.make_tensor_value_info(WHICH, onnx.TensorProto.INT64, []))
    added = []
    inits = {t.name: t for t in graph.initializer}
    unrounded: dict[str, str] = {}  # DQ output -> the same pair without rounding

    def float_read(src: str, pair) -> str:
        q, dq = pair
        if dq.output[0] not in unrounded:
            consts = _unrounded(q, dq, inits)
            if consts is None:  # not constant per-tensor: the bare tensor
                unrounded[dq.output[0]] = src
            else:
                base = f"{WHICH}_u{len(unrounded)}"
                sq, zq, lo, hi, zd, sd = consts
                vals = {"sq": sq, "zq": zq, "lo": lo, "hi": hi, "zd": zd, "sd": sd}
                graph.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), f"{base}_{k}")
                                         for k, v in vals.items())
                steps = [("Div", "sq"), ("Add", "zq"), ("Clip", None), ("Sub", "zd"), ("Mul", "sd")]
                prev = src
                for j, (op, c) in enumerate(steps):
                    out = f"{base}_{j}"
                    ins = [prev, f"{base}_lo", f"{base}_hi"] if op == "Clip" else [prev, f"{base}_{c}"]
                    added.append(helper.make_node(op, ins, [out], name=f"{out}_node"))
                    prev = out
                unrounded[dq.output[0]] = prev
        return unrounded[dq.output[0]]

    for k, node in enumerate(order):
        graph.initializer.append(numpy_helper.from_array(np.array(k, np.int64), f"{WHICH}_{k}"))
        cond = f"{WHICH}_is_{k}"
        added.append(helper.make_node("Equal", [WHICH, f"{WHICH}_{k}"], [cond], name=f"{cond}_node"))
        for m, (reader, i, src, pair) in enumerate(r for r in reads if id(r[0]) == id(node)):
            picked = f"{WHICH}_{k}_in{m}"
            added.append(helper.make_node("Where", [cond, reader.input[i], float_read(src, pair)], [picked],
                                          name=f"{picked}_node"))
            reader.input[i] = picked
    # the switches read only the new input: put them first (the graph stays topologically sorted)
    ordered = []
    for node in _before_readers(list(graph.node), added):
        copy = onnx.NodeProto()
        copy.CopyFrom(node)  # detached before the field is cleared
        ordered.append(copy)
    del graph.node[:]
    graph.node.extend(ordered)
    return out, order


def _before_readers(nodes, added) -> list:
    """``nodes`` with each Where (and the unrounded chain it reads, once) right before
    its reader, the Equals first."""
    heads = [n for n in added if n.op_type == "Equal"]
    wheres = {n.output[0]: n for n in added if n.op_type == "Where"}
    chain = {n.output[0]: n for n in added if n.op_type not in ("Equal", "Where")}
    result, placed = list(heads), set()

    def place(name: str) -> None:
        node = chain.get(name)
        if node is None or name in placed:
            return
        place(node.input[0])
        placed.add(name)
        result.append(node)

    for node in nodes:
        for i in node.input:
            if i in wheres:
                place(wheres[i].input[2])
                result.append(wheres[i])
        result.append(node)
    return result


def _outputs_flat(outputs: Sequence[np.ndarray]) -> np.ndarray:
    parts = [np.asarray(o, np.float64).ravel() for o in outputs if np.issubdtype(np.asarray(o).dtype, np.floating)]
    return np.concatenate(parts) if parts else np.zeros(0)


def _errors(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    signal = float(np.dot(ref, ref))
    noise = float(np.dot(ref - got, ref - got))
    ratio = noise / signal if signal > 0 else (0.0 if noise == 0 else 1.0)
    norms = float(np.linalg.norm(ref) * np.linalg.norm(got))
    cosine = float(np.dot(ref, got) / norms) if norms > 0 else (1.0 if noise == 0 else 0.0)
    return ratio, cosine


def node_contributions(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]], *,
                       nodes: set[str] | None = None) -> list[Contribution]:
    """Contributions of the quantized nodes of ``model`` (``nodes``: only these),
    largest N/S first. Runs N + 1 times per feed in one session."""
    import onnxruntime as ort

    from .ortsession import return_freed_memory, session as ort_session

    switched, order = switch_model(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort_session(switched, options)
    del switched
    names = {i.name for i in sess.get_inputs()}

    def run(k: int, feed) -> np.ndarray:
        inputs = {n: v for n, v in feed.items() if n in names}
        inputs[WHICH] = np.array(k, np.int64)
        return _outputs_flat(sess.run(None, inputs))

    base = [run(-1, feed) for feed in feeds]  # no node reads int8 activations
    result = []
    for k, node in enumerate(order):
        if nodes is not None and node.name not in nodes:
            continue
        ratios, cosines = [], []
        for f, feed in enumerate(feeds):
            ratio, cosine = _errors(base[f], run(k, feed))
            ratios.append(ratio)
            cosines.append(cosine)
        result.append(Contribution(node.name, node.op_type, float(np.mean(ratios)), float(np.mean(cosines))))
    del sess
    return_freed_memory()
    result.sort(key=lambda c: -c.noise_ratio)
    return result


def ranked_by_contribution(model: onnx.ModelProto, names, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[str]:
    """The quantized nodes among ``names``, largest contribution first (quantize's
    fallback order; nodes that read no int8 activation are left out)."""
    return [c.node for c in node_contributions(model, feeds, nodes=set(names))]
