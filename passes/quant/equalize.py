"""Per-channel rescaling before INT8 on a ModelProto: cross-layer equalization (CLE,
data-free) and SmoothQuant-style smoothing (calibrated ranges), both exact in float.
The math, the preconditions and the refusal reasons are those of the rule that does it,
``equalize-input-channels`` of the registered pass ``equalize-channels``
(equalize_rules.py); here: finding its sites, measuring x's per-channel ranges for
smoothing, and running the pass (CLE for several rounds, as chains share layers).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import onnx

from onnxforge.model import Model

from . import equalize_rules as rules
from .equalize_rules import ALPHA, PASS_NAME, EqualizeInputChannels, Site
from .ortsession import session as ort_session


def find_sites(model: onnx.ModelProto) -> list[Site]:
    """Every Conv/MatMul of the main graph whose input chain absorbs a per-channel 1/s
    exactly (the rule's matches; its nodes are graphsurgeon nodes of a copy)."""
    graph = Model.from_proto(model).graph
    rule = EqualizeInputChannels()
    return [m.info for m in (rule.match(graph, n) for n in graph.nodes if n.op in rule.anchor_ops) if m is not None]


def input_channel_range(reader: onnx.NodeProto, weight: np.ndarray, channels: int) -> np.ndarray:
    """max |W2| over everything but input channel i, for i < channels."""
    groups = next((a.i for a in reader.attribute if a.name == "group"), 1)
    return rules.input_channel_range(reader.op_type, groups, weight, channels)


def output_channel_range(end: onnx.NodeProto, weight: np.ndarray) -> np.ndarray:
    return rules.output_channel_range(end.op_type, weight)


def channel_amax(model: onnx.ModelProto, tensors: list[str], feeds: Iterable[Mapping[str, np.ndarray]], axes: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Per-channel max |x| of ``tensors`` over ``feeds``, reduced feed by feed."""
    import onnxruntime as ort

    from .proto_graph import with_outputs

    exposed = with_outputs(model, tensors)

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort_session(exposed, options)
    wanted = {i.name for i in session.get_inputs()}
    amax: dict[str, np.ndarray] = {}
    for feed in feeds:
        values = session.run(tensors, {k: v for k, v in feed.items() if k in wanted})
        for name, value in zip(tensors, values):
            axis = axes[name] % value.ndim
            reduced = np.abs(np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)).max(axis=1)
            amax[name] = reduced if name not in amax else np.maximum(amax[name], reduced)
    return amax


# ------------------------------------------------------------------ entries


def equalize(model: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]] | None = None, *,
             alpha: float = ALPHA, iterations: int = 3) -> tuple[onnx.ModelProto, int]:
    """The rescaled model (``model`` itself when nothing is rescaled) and the number of
    rescaled inputs.

    With ``feeds``: smoothing of every site (activation ranges measured on the float
    model). Without: data-free CLE on sites whose walk ends at a Conv/MatMul, run for
    ``iterations`` rounds as chains share layers."""
    from .registered import apply_passes

    if feeds is None:
        out, fired = apply_passes(model, (PASS_NAME,), max_iterations=iterations)
        return out, fired // iterations  # every site fires in every round (its refusals are structural)
    feeds = list(feeds)
    sites = find_sites(model)
    if not sites or not feeds:
        return model, 0
    amax = channel_amax(model, [s.tensor for s in sites], feeds, {s.tensor: s.axis for s in sites})
    return apply_passes(model, (PASS_NAME,), max_iterations=1, options={PASS_NAME: {"amax": amax, "alpha": alpha}})


# ------------------------------------------------------------------ affine into the next Conv


def fold_affine(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """h -> Mul(a) [-> Add(b)] -> Conv: the affine moves into the Conv (one Q/DQ
    point instead of three, two fewer elementwise kernels). The rewrite is the
    -O2 fusion ``fuse-affine-into-conv`` (passes/fusion/affine_into_conv.py, its math
    and preconditions there); the new model (``model`` itself when nothing folds)
    and the number of folds are returned."""
    from .registered import apply_passes

    return apply_passes(model, ("fuse-affine-into-conv",))
