"""Bring a model into the form the channel analysis reads best.

onnxforge's cleanup and fusion pipeline (-O2) runs first when its passes are
registered; then Constant nodes become initializers and constant subgraphs
(e.g. exporter-written Pad arithmetic) are folded, so weights are gs.Constant
and pads/shapes are literal. Folding is exact: it evaluates what the runtime
would evaluate anyway.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxforge.context import PassContext
from onnxforge.model import Model
from onnxforge.passes.base import name_nodes

from .flops import infer_shapes

ANALYSIS_BATCH = 2  # a batch of 2 keeps batch and channel dims apart in reshape analysis


def prepare(model: Model, ctx: PassContext | None = None) -> Model:
    model = model.copy()
    ctx = ctx or PassContext(model=model)
    _run_pipeline(model, ctx)
    _inline_constant_nodes(model.graph)
    try:
        model.graph.fold_constants()
    except Exception as exc:  # folding is an aid, not a requirement
        ctx.warn(f"prune: constant folding skipped ({exc})")
    model.graph.cleanup().toposort()
    name_nodes(model.graph.nodes)  # pruning finds its edit sites in graph copies by name
    return model


def _run_pipeline(model: Model, ctx: PassContext) -> None:
    from onnxforge.passes.registry import level_pipeline, resolve

    try:
        names = level_pipeline(2, ctx.provider)
    except Exception as exc:
        ctx.warn(f"prune: -O2 pipeline unavailable ({exc})")
        return
    for name in names:
        try:
            resolve(name).run(model.graph, ctx)
        except Exception as exc:  # a pass in progress elsewhere must not stop pruning
            ctx.warn(f"prune: pass {name} failed during preparation ({exc}); continuing without it")


def _inline_constant_nodes(graph: gs.Graph) -> None:
    """Constant nodes with a tensor value -> initializers (weights of Paddle exports live there)."""
    for node in list(graph.nodes):
        if node.op != "Constant" or not isinstance(node.attrs.get("value"), gs.Constant):
            continue
        out = node.outputs[0]
        if out in graph.outputs:
            continue
        const = gs.Constant(out.name, node.attrs["value"].values)
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = const
        node.outputs.clear()
    graph.cleanup()


def analysis_shapes(model: Model, feed_shapes: dict[str, tuple] | None = None) -> dict[str, tuple | None]:
    """Static shapes of every tensor, with dynamic batch dims pinned to ANALYSIS_BATCH."""
    pinned: dict[str, tuple] = {}
    for inp in model.graph.inputs:
        shape = list(feed_shapes[inp.name]) if feed_shapes and inp.name in feed_shapes else None
        if shape is None:
            from onnxforge.inputs import resolve_shape

            shape = list(resolve_shape(inp, None))
        if inp.shape and len(inp.shape) == len(shape) and not isinstance(inp.shape[0], int):
            shape[0] = ANALYSIS_BATCH
        pinned[inp.name] = tuple(shape)
    return infer_shapes(model, pinned, probe=True)

