"""Helpers for the fusion tests: build, run a pass, compare with the original on ORT CPU."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort

from onnxforge.context import PassContext
from onnxforge.model import Model
from onnxforge.passes.registry import resolve


def model_from_text(text: str) -> Model:
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto, full_check=True)
    return Model.from_proto(proto)


def histogram(model: Model) -> collections.Counter:
    return collections.Counter(n.op for n in model.graph.nodes)


def run_pass(model: Model, name: str, provider: str = "cpu"):
    ctx = PassContext(model=model, provider=provider)
    result = resolve(name).run(model.graph, ctx)
    return result, ctx


def session(proto: onnx.ModelProto):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def fuse_and_compare(text: str, pass_name: str, feeds: dict, provider: str = "cpu", rtol=1e-5, atol=1e-5,
                     checker: bool = True):
    """Run the pass on the model; return (result, before histogram, after histogram, ctx) after
    asserting the output matches the original and the model passes the full checker."""
    model = model_from_text(text)
    original = model.to_proto()
    before = histogram(model)
    result, ctx = run_pass(model, pass_name, provider)
    fused = model.to_proto()
    if checker:
        onnx.checker.check_model(fused, full_check=True)
    expect = session(original).run(None, feeds)
    got = session(fused).run(None, feeds)
    for e, g in zip(expect, got):
        np.testing.assert_allclose(g, e, rtol=rtol, atol=atol)
    return result, before, histogram(model), ctx


def refusal_reasons(text: str, pass_name: str, provider: str = "cpu") -> list[str]:
    model = model_from_text(text)
    result, ctx = run_pass(model, pass_name, provider)
    assert not result.changed, result.stats
    return [r.reason for r in ctx.refusals]


def reasons_by_node(ctx, rule: str) -> dict[str, str]:
    """Each node one rule refused, with the reason it gave (what `--explain` shows)."""
    return {name: r.reason for r in ctx.refusals if r.rule == rule for name in r.nodes}


def rand(*shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)
