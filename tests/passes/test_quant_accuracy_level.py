"""matmulnbits-accuracy-level (passes/quant/accuracy_level.py): where it sets MatMulNBits' accuracy_level,
and one case per refusal reason, on an onnx.helper graph."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxforge.context import PassContext
from onnxforge.model import Model
from onnxforge.passes.quant.accuracy_level import PASS_NAME
from onnxforge.passes.registry import resolve

from fusion_support import reasons_by_node, session

RULE = "set-matmulnbits-accuracy-level"
K, N = 32, 8  # one block of 32 per output column


def _model(levels=(0, 4)) -> onnx.ModelProto:
    """x [2, K] -> MatMulNBits nb0, nb1 (4-bit codes, one block per column) at ``levels``."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for i, level in enumerate(levels):
        inits += [numpy_helper.from_array(rng.integers(0, 256, (N, 1, K // 2), dtype=np.uint8), f"B{i}"),
                  numpy_helper.from_array(rng.uniform(0.01, 0.1, N).astype(np.float32), f"S{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"B{i}", f"S{i}"], [f"y{i}"], name=f"nb{i}",
                                      domain="com.microsoft", K=K, N=N, bits=4, block_size=K, accuracy_level=level))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [2, N]) for i in range(len(levels))],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=8)


def _run(proto: onnx.ModelProto, **settings):
    model = Model.from_proto(proto)
    ctx = PassContext(model=model, options={PASS_NAME: settings})
    result = resolve(PASS_NAME).run(model.graph, ctx)
    return model.to_proto(), result, ctx


def _levels(proto: onnx.ModelProto) -> dict[str, int]:
    return {n.name: helper.get_attribute_value(next(a for a in n.attribute if a.name == "accuracy_level"))
            for n in proto.graph.node}


def test_sets_the_level_and_the_model_runs_close_to_before():
    model = _model()
    out, result, ctx = _run(model, level=4)
    assert result.stats == {RULE: 1} and _levels(out) == {"nb0": 4, "nb1": 4}
    onnx.checker.check_model(out)
    x = np.random.default_rng(1).standard_normal((2, K)).astype(np.float32)
    want, got = session(model).run(["y0"], {"x": x})[0], session(out).run(["y0"], {"x": x})[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05
    assert reasons_by_node(ctx, RULE) == {"nb1": "accuracy_level is 4 already"}


def test_refuses_without_a_level():
    out, result, ctx = _run(_model())
    assert result.stats == {} and _levels(out) == {"nb0": 0, "nb1": 4}
    assert reasons_by_node(ctx, RULE) == {"nb0": "no accuracy_level given (option level)",
                                          "nb1": "no accuracy_level given (option level)"}
