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
input; ``which = -1`` is the all-float model. So one onnxruntime session (graph
optimizations off, so the fake quantization is not fused into integer kernels) runs
N + 1 times per feed; no model is rebuilt per node.

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


def quantized_reads(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, int, str]]:
    """(node, input index, float tensor) for each input a node reads through a
    QuantizeLinear -> DequantizeLinear pair, in graph order (main graph)."""
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
                reads.append((node, i, q.input[0]))
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
    for node, _i, _src in reads:
        if id(node) not in index:
            index[id(node)] = len(order)
            order.append(node)
    graph.input.append(helper.make_tensor_value_info(WHICH, onnx.TensorProto.INT64, []))
    added = []
    for k, node in enumerate(order):
        graph.initializer.append(numpy_helper.from_array(np.array(k, np.int64), f"{WHICH}_{k}"))
        cond = f"{WHICH}_is_{k}"
        added.append(helper.make_node("Equal", [WHICH, f"{WHICH}_{k}"], [cond], name=f"{cond}_node"))
        for m, (reader, i, src) in enumerate(r for r in reads if id(r[0]) == id(node)):
            picked = f"{WHICH}_{k}_in{m}"
            added.append(helper.make_node("Where", [cond, reader.input[i], src], [picked], name=f"{picked}_node"))
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
    """``nodes`` with each Where right before its reader, the Equals first."""
    heads = [n for n in added if n.op_type == "Equal"]
    wheres = {n.output[0]: n for n in added if n.op_type == "Where"}
    result = list(heads)
    for node in nodes:
        result.extend(wheres[i] for i in node.input if i in wheres)
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
