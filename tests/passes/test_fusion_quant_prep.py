"""The rewrites the quantizer's float baseline runs (passes/quant/prepare.py): global-pool,
gemm-bias-vector, and fuse-hardswish at opset 13 (the baseline raises the opset first)."""
import numpy as np
import onnx
import pytest
from fusion_support import fuse_and_compare, rand, refusal_reasons

from onnxforge.opsets import default_opset
from onnxforge.passes.quant.prepare import fuse_hardswish
from onnxforge.passes.quant.registered import apply_passes

HEAD = '<ir_version: 8, opset_import: ["" : 13]>'


def pool(op="AveragePool", attrs="kernel_shape = [8, 8], strides = [8, 8]", x="float[1, 2, 7, 7]", y="float[1, 2, 1, 1]"):
    return HEAD + f'''
g ({x} x) => ({y} y) {{
    y = {op} <{attrs}> (x)
}}'''


@pytest.mark.parametrize("op", ["AveragePool", "MaxPool"])
def test_whole_window_pool_becomes_global(op):
    result, before, after, _ = fuse_and_compare(pool(op, "kernel_shape = [8, 8], strides = [8, 8], ceil_mode = 1"),
                                                "global-pool", {"x": rand(1, 2, 7, 7)})
    assert result.stats == {"whole-window-pool": 1} and after["Global" + op] == 1 and not after[op]


@pytest.mark.parametrize("attrs, x, y, reason", [
    ("kernel_shape = [7]", "float[1, 2, 7]", "float[1, 2, 1]", "not a 2-D window"),
    ("kernel_shape = [7, 7], pads = [1, 1, 1, 1]", "float[1, 2, 7, 7]", "float[1, 2, 3, 3]", "padded window"),
    ("kernel_shape = [7, 7], dilations = [2, 2]", "float[1, 2, 13, 13]", "float[1, 2, 1, 1]", "dilated window"),
    ("kernel_shape = [7, 7]", "float[1, 2, H, W]", "float[1, 2, A, B]", "input is not 4-D with static height and width"),
    ("kernel_shape = [3, 3]", "float[1, 2, 7, 7]", "float[1, 2, 5, 5]", "the window does not cover the whole input once"),
])
def test_global_pool_refusals(attrs, x, y, reason):
    assert refusal_reasons(pool("MaxPool", attrs, x, y), "global-pool") == [reason]


GEMM = HEAD + '''
g (float[2, 3] x) => (float[2, 4] y{extra_out})
    <float[3, 4] w = {{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}}, float[1, 4] c = {{0.5, -1, 2, 3}}> {{
    y = Gemm (x, w, c){extra}
}}'''


def test_gemm_row_bias_becomes_a_vector():
    model_text = GEMM.format(extra_out="", extra="")
    result, _, _, ctx = fuse_and_compare(model_text, "gemm-bias-vector", {"x": rand(2, 3)}, rtol=0, atol=0)
    assert result.stats == {"gemm-row-bias": 1}
    assert [list(t.shape) for t in ctx.model.graph.nodes[0].inputs[2:]] == [[4]]


def test_gemm_row_bias_refuses_a_shared_bias():
    text = GEMM.format(extra_out=", float[1, 4] z", extra="\n    z = Relu (c)")
    assert refusal_reasons(text, "gemm-bias-vector") == ["bias c is read by other nodes too"]


HARDSWISH = HEAD + '''
g (float[2, 8] x) => (float[2, 8] y) {
    three = Constant <value = float {3}> ()
    zero = Constant <value = float {0}> ()
    six = Constant <value = float {6}> ()
    a = Add (x, three)
    c = Clip (a, zero, six)
    m = Mul (x, c)
    y = Div (m, six)
}'''


def test_baseline_hardswish_raises_the_opset_only_when_it_fuses():
    proto = onnx.parser.parse_model(HARDSWISH)
    fused, count = fuse_hardswish(proto)
    assert count == 1 and default_opset(fused) == 14 and [n.op_type for n in fused.graph.node] == ["HardSwish"]
    feed = {"x": np.linspace(-5, 5, 16, dtype=np.float32).reshape(2, 8)}
    from fusion_support import session

    np.testing.assert_allclose(session(fused).run(None, feed)[0], session(proto).run(None, feed)[0], rtol=1e-5, atol=1e-6)
    relu6 = onnx.parser.parse_model(HARDSWISH.replace("    m = Mul (x, c)\n    y = Div (m, six)", "    y = Clip (a, zero, six)"))
    same, count = fuse_hardswish(relu6)
    assert count == 0 and same is relu6 and default_opset(same) == 13


def test_apply_passes_runs_to_a_fixpoint():
    """Conv -> Mul -> Add: fuse-conv-affine folds one node a round."""
    text = HEAD + '''
g (float[1, 2, 5, 5] x) => (float[1, 3, 5, 5] y) {
    w = Constant <value = float[3, 2, 1, 1] {1, 2, 3, 4, 5, 6}> ()
    s = Constant <value = float[3, 1, 1] {2, 3, 4}> ()
    b = Constant <value = float[3, 1, 1] {1, -1, 0.5}> ()
    c = Conv (x, w)
    m = Mul (c, s)
    y = Add (m, b)
}'''
    proto = onnx.parser.parse_model(text)
    folded, count = apply_passes(proto, ("constant-to-initializer", "fuse-conv-affine"))
    assert [n.op_type for n in folded.graph.node] == ["Conv"] and count >= 2
