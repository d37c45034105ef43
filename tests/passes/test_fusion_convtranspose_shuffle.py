"""convtranspose-shuffle: ConvTranspose (kernel == stride) -> 1x1 Conv + DepthToSpace, the
activation moved before the shuffle; one case per refusal reason."""
import numpy as np
import pytest
from fusion_support import fuse_and_compare, rand, refusal_reasons

HEAD = '<ir_version: 8, opset_import: ["" : 17]>'


def _arr(shape, seed):
    v = np.random.default_rng(seed).standard_normal(shape)
    return "{" + ", ".join(f"{x:.4f}" for x in v.reshape(-1)) + "}"


def model(attrs="kernel_shape = [2, 2], strides = [2, 2]", w_shape=(4, 3, 2, 2), tail="y = Relu (t)",
          extra_out="", bias="b", bias_init=True, w_init=True):
    inits = []
    if w_init:
        inits.append(f"float[{', '.join(map(str, w_shape))}] w = {_arr(w_shape, 0)}")
    if bias_init:
        inits.append(f"float[3] b = {_arr(3, 1)}")
    extra_in = ("" if w_init else ", float[4, 3, 2, 2] w") + ("" if bias_init else ", float[3] b")
    return HEAD + f'''
g (float[1, 4, 3, 5] x{extra_in}) => (float[1, C, H, W] y{extra_out}) <{", ".join(inits)}> {{
    t = ConvTranspose <{attrs}> (x, w, {bias})
    {tail}
}}'''


X = {"x": rand(1, 4, 3, 5)}


def test_convtranspose_becomes_conv_shuffle_with_the_activation_before_it():
    result, before, after, _ = fuse_and_compare(model(), "convtranspose-shuffle", X, rtol=1e-5, atol=1e-5)
    assert result.stats == {"convtranspose-as-conv-shuffle": 1, "activation-before-shuffle": 1}
    assert before["ConvTranspose"] == 1 and after == {"Conv": 1, "Relu": 1, "DepthToSpace": 1}


@pytest.mark.parametrize("kwargs, reason", [
    (dict(attrs="kernel_shape = [2, 2], strides = [2, 2], group = 1", tail="y = Relu (t)\n    z = Relu (w)",
          extra_out=", float[4, 3, 2, 2] z"), "the weight is read by other nodes too"),
    (dict(bias_init=False), "bias not constant"),
    (dict(attrs="kernel_shape = [2, 1], strides = [2, 1]", w_shape=(4, 3, 2, 1)), "kernel not square (or not the weight's)"),
    (dict(attrs="kernel_shape = [2, 2], strides = [2, 2], group = 2", w_shape=(4, 1, 2, 2), tail="y = Relu (t)"),
     "grouped"),
    (dict(attrs="kernel_shape = [2, 2], strides = [1, 1]"),
     "strides [1, 1] differ from the kernel: windows overlap or leave gaps"),
    (dict(attrs="kernel_shape = [2, 2], strides = [2, 2], pads = [1, 1, 1, 1]"), "padded"),
    (dict(attrs="kernel_shape = [2, 2], strides = [2, 2], dilations = [2, 2]"), "dilated"),
    (dict(attrs="kernel_shape = [2, 2], strides = [2, 2], output_padding = [1, 1]"), "output_padding or output_shape"),
])
def test_convtranspose_refusals(kwargs, reason):
    assert refusal_reasons(model(**kwargs), "convtranspose-shuffle") == [reason]


def test_activation_stays_after_a_shuffle_read_elsewhere():
    text = model(tail="y = Relu (t)\n    z = Identity (t)", extra_out=", float[1, C, H, W] z")
    result, _, after, ctx = fuse_and_compare(text, "convtranspose-shuffle", X, rtol=1e-5, atol=1e-5)
    assert result.stats == {"convtranspose-as-conv-shuffle": 1}
    assert [r.reason for r in ctx.refusals] == ["the shuffled tensor is read elsewhere too"]


def test_activation_with_a_computed_bound_stays_after_the_shuffle():
    text = HEAD + f'''
g (float[1, 4, 3, 5] x, float lo) => (float[1, C, H, W] y) <float[4, 3, 2, 2] w = {_arr((4, 3, 2, 2), 0)}> {{
    t = ConvTranspose <kernel_shape = [2, 2], strides = [2, 2]> (x, w)
    y = Clip (t, lo)
}}'''
    result, _, _, ctx = fuse_and_compare(text, "convtranspose-shuffle", {**X, "lo": np.array(0.1, np.float32)},
                                         rtol=1e-5, atol=1e-5)
    assert result.stats == {"convtranspose-as-conv-shuffle": 1}
    assert [r.reason for r in ctx.refusals] == ["the op's other inputs are not constants"]
