"""Small helpers for the cleanup pass tests: text models, sessions, parity, histograms."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx.parser

from onnxforge.context import PassContext
from onnxforge.model import Model, iter_graphs
from onnxforge.passes.registry import resolve


def model_from_text(text: str) -> Model:
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto, full_check=True)
    return Model.from_proto(proto)


def session(model: Model | onnx.ModelProto):
    import onnxruntime as ort

    proto = model.to_proto() if isinstance(model, Model) else model
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_pass(name: str, model: Model, **settings):
    """Run one registered pass on ``model`` in place; return (PassResult, ctx)."""
    ctx = PassContext(model=model, **settings)
    result = resolve(name).run(model.graph, ctx)
    return result, ctx


def histogram(model: Model) -> collections.Counter:
    return collections.Counter(node.op for g in iter_graphs(model.graph) for node in g.nodes)


def node_count(model: Model) -> int:
    return sum(len(g.nodes) for g in iter_graphs(model.graph))


def assert_valid(model: Model) -> onnx.ModelProto:
    proto = model.to_proto()
    onnx.checker.check_model(proto, full_check=True)
    return proto


def assert_parity(before: onnx.ModelProto, after: Model, feeds: dict, rtol: float = 0.0, atol: float = 0.0) -> None:
    """Same output names (in order) and the same values on onnxruntime CPU."""
    proto = assert_valid(after)
    assert [o.name for o in proto.graph.output] == [o.name for o in before.graph.output]
    assert [i.name for i in proto.graph.input] == [i.name for i in before.graph.input]
    expected = session(before).run(None, feeds)
    got = session(proto).run(None, feeds)
    for e, g in zip(expected, got):
        assert e.dtype == g.dtype and e.shape == g.shape
        if rtol == 0 and atol == 0:
            assert e.tobytes() == g.tobytes()
        else:
            np.testing.assert_allclose(g, e, rtol=rtol, atol=atol)


def refusal_reasons(ctx: PassContext) -> list[str]:
    return [r.reason for r in ctx.refusals]
