import numpy as np
import onnx
import onnx.parser
import pytest
from fusion_support import fuse_and_compare, histogram, model_from_text, rand, refusal_reasons, run_pass, session

HEAD = '<ir_version: 8, opset_import: ["" : 17]>'


def _arr(shape, seed, positive=False):
    v = np.random.default_rng(seed).standard_normal(shape)
    v = np.abs(v) + 0.5 if positive else v
    return "{" + ", ".join(f"{x:.4f}" for x in v.reshape(-1)) + "}"


def conv_bn(op="Conv", pads="1, 1, 1, 1", params="scale, b, mean, var", w_shape=(4, 3, 3, 3)):
    dims = ", ".join(map(str, w_shape))
    return HEAD + f'''
g (float[N, 3, 6, 6] x) => (float[N, 4, Y, Z] y) {{
    w = Constant <value = float[{dims}] {_arr(w_shape, 0)}> ()
    scale = Constant <value = float[4] {_arr(4, 1)}> ()
    b = Constant <value = float[4] {_arr(4, 2)}> ()
    mean = Constant <value = float[4] {_arr(4, 3)}> ()
    var = Constant <value = float[4] {_arr(4, 4, True)}> ()
    c = {op} <pads = [{pads}]> (x, w)
    y = BatchNormalization <epsilon = 1e-5> (c, {params})
}}'''


X = {"x": rand(2, 3, 6, 6)}


@pytest.mark.parametrize("op, w_shape", [("Conv", (4, 3, 3, 3)), ("ConvTranspose", (3, 4, 3, 3))])
def test_conv_bn(op, w_shape):
    result, before, after, _ = fuse_and_compare(conv_bn(op, w_shape=w_shape), "fuse-conv-bn", X, rtol=1e-4, atol=1e-4)
    assert result.stats == {"conv-bn": 1}
    assert before["BatchNormalization"] == 1 and after["BatchNormalization"] == 0 and after[op] == 1


def test_conv_bn_refuses_non_constant_params():
    text = conv_bn().replace("(float[N, 3, 6, 6] x)", "(float[N, 3, 6, 6] x, float[4] m2)").replace(
        "(c, scale, b, mean, var)", "(c, scale, b, m2, var)")
    assert refusal_reasons(text, "fuse-conv-bn") == ["BatchNormalization parameters not constant"]


def test_conv_bn_refuses_non_constant_weights():
    text = conv_bn().replace("(float[N, 3, 6, 6] x)", "(float[N, 3, 6, 6] x, float[4, 3, 3, 3] w2)").replace(
        "(x, w)", "(x, w2)")
    assert refusal_reasons(text, "fuse-conv-bn") == ["weights not constant"]


BN_CONV = HEAD + f'''
g (float[N, 3, 6, 6] x) => (float[N, 4, Y, Z] y) {{
    w = Constant <value = float[4, 3, 3, 3] {_arr((4, 3, 3, 3), 0)}> ()
    scale = Constant <value = float[3] {_arr(3, 1)}> ()
    b = Constant <value = float[3] {_arr(3, 2)}> ()
    mean = Constant <value = float[3] {_arr(3, 3)}> ()
    var = Constant <value = float[3] {_arr(3, 4, True)}> ()
    n = BatchNormalization <epsilon = 1e-5> (x, scale, b, mean, var)
    y = Conv <pads = [PADS]> (n, w)
}}'''


def test_standalone_bn_folds_into_unpadded_conv():
    result, _, after, _ = fuse_and_compare(BN_CONV.replace("PADS", "0, 0, 0, 0"), "fuse-conv-bn", X, rtol=1e-4, atol=1e-4)
    assert result.stats == {"bn-conv": 1} and after["BatchNormalization"] == 0


def test_standalone_bn_refuses_padded_conv():
    assert refusal_reasons(BN_CONV.replace("PADS", "1, 1, 1, 1"), "fuse-conv-bn") == [
        "conv pads its input: folding the BN shift is not exact at the borders"]


def test_gemm_bn():
    text = HEAD + f'''
g (float[N, 3] x) => (float[N, 4] y) {{
    w = Constant <value = float[3, 4] {_arr((3, 4), 0)}> ()
    c = Constant <value = float[4] {_arr(4, 5)}> ()
    scale = Constant <value = float[4] {_arr(4, 1)}> ()
    b = Constant <value = float[4] {_arr(4, 2)}> ()
    mean = Constant <value = float[4] {_arr(4, 3)}> ()
    var = Constant <value = float[4] {_arr(4, 4, True)}> ()
    o = Gemm <alpha = 0.5, beta = 2.0> (x, w, c)
    y = BatchNormalization <epsilon = 1e-5> (o, scale, b, mean, var)
}}'''
    result, _, after, _ = fuse_and_compare(text, "fuse-conv-bn", {"x": rand(5, 3)}, rtol=1e-4, atol=1e-4)
    assert result.stats == {"gemm-bn": 1} and after["BatchNormalization"] == 0


AFFINE = HEAD + f'''
g (float[N, 3, 6, 6] x) => (float[N, 4, 6, 6] y) {{
    w = Constant <value = float[4, 3, 3, 3] {_arr((4, 3, 3, 3), 0)}> ()
    k = Constant <value = float[CSHAPE] CVAL> ()
    a = Constant <value = float[1] {{0.25}}> ()
    c = Conv <pads = [1, 1, 1, 1]> (x, w)
    m = Mul (c, k)
    y = Add (m, a)
}}'''


def test_conv_affine_per_channel_then_scalar():
    text = AFFINE.replace("CSHAPE", "4, 1, 1").replace("CVAL", _arr(4, 7))
    result, _, after, _ = fuse_and_compare(text, "fuse-conv-affine", X, rtol=1e-4, atol=1e-5)
    assert result.stats == {"conv-affine": 2} and after["Mul"] == 0 and after["Add"] == 0 and after["Conv"] == 1


def test_conv_affine_refuses_spatial_constant():
    text = AFFINE.replace("CSHAPE", "6").replace("CVAL", _arr(6, 7)).replace("    y = Add (m, a)\n", "    y = Identity (m)\n")
    assert refusal_reasons(text, "fuse-conv-affine") == ["constant of shape [6] does not act per output channel"]


PAD = HEAD + f'''
g (float[N, 3, 6, 6] x) => (float[N, C, Y, Z] y) {{
    w = Constant <value = float[4, 3, 3, 3] {_arr((4, 3, 3, 3), 0)}> ()
    p = Constant <value = int64[8] {{PADS}}> ()
    v = Constant <value = float {{VALUE}}> ()
    xp = Pad <mode = "MODE"> (x, p, v)
    y = CONSUMER
}}'''


@pytest.mark.parametrize("consumer", ["Conv <pads = [1, 0, 1, 0]> (xp, w)",
                                      "AveragePool <kernel_shape = [3, 3]> (xp)"])
def test_pad_folds(consumer):
    text = PAD.replace("PADS", "0, 0, 1, 2, 0, 0, 1, 2").replace("VALUE", "0.0").replace("MODE", "constant")
    result, _, after, _ = fuse_and_compare(text.replace("CONSUMER", consumer), "fuse-pad", X)
    assert result.stats == {"pad-into-conv-pool": 1} and after["Pad"] == 0


@pytest.mark.parametrize("pads, value, mode, consumer, reason", [
    ("0, 0, 1, 1, 0, 0, 1, 1", "0.0", "reflect", "Conv (xp, w)", "pad mode reflect is not constant"),
    ("0, 1, 1, 1, 0, 0, 1, 1", "0.0", "constant", "Conv (xp, w)", "pads negative or on the batch/channel axes"),
    ("0, 0, 1, 1, 0, 0, 1, 1", "1.0", "constant", "Conv (xp, w)", "pad value is not 0"),
    ("0, 0, 1, 1, 0, 0, 1, 1", "0.0", "constant", "MaxPool <kernel_shape = [3, 3]> (xp)",
     "MaxPool pad value is neither -inf nor 0 after a Relu"),
    ("0, 0, 1, 1, 0, 0, 1, 1", "0.0", "constant", "AveragePool <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (xp)",
     "pool excludes its own padding from the average"),
])
def test_pad_refusals(pads, value, mode, consumer, reason):
    text = PAD.replace("PADS", pads).replace("VALUE", value).replace("MODE", mode).replace("CONSUMER", consumer)
    assert refusal_reasons(text, "fuse-pad") == [reason]


DECONV_AFFINE = HEAD + f'''
g (float[N, 4, 5, 5] x) => (float[N, 6, Y, Z] y) {{
    w = Constant <value = float[4, 3, 2, 2] {_arr((4, 3, 2, 2), 0)}> ()
    k = Constant <value = float[6, 1, 1] {_arr(6, 7)}> ()
    a = Constant <value = float[1, 6, 1, 1] {_arr(6, 8)}> ()
    c = ConvTranspose <group = 2, strides = [2, 2], kernel_shape = [2, 2]> (x, w)
    m = Mul (c, k)
    y = Add (m, a)
}}'''


def test_conv_affine_folds_into_grouped_conv_transpose():
    result, _, after, _ = fuse_and_compare(DECONV_AFFINE, "fuse-conv-affine", {"x": rand(2, 4, 5, 5)},
                                           rtol=1e-4, atol=1e-5)
    assert result.stats == {"conv-affine": 2} and after["Mul"] == 0 and after["Add"] == 0
    assert after["ConvTranspose"] == 1


def test_conv_transpose_bias_add_then_bn_fuses_away():
    """Paddle's ConvTranspose + Add(bias) + BatchNormalization: the Add folds first, then the BN."""
    text = DECONV_AFFINE.replace("    m = Mul (c, k)\n    y = Add (m, a)\n", f'''    m = Add (c, a)
    s = Constant <value = float[6] {_arr(6, 1)}> ()
    b = Constant <value = float[6] {_arr(6, 2)}> ()
    mean = Constant <value = float[6] {_arr(6, 3)}> ()
    var = Constant <value = float[6] {_arr(6, 4, True)}> ()
    y = BatchNormalization <epsilon = 1e-5> (m, s, b, mean, var)
''')
    model = model_from_text(text)
    for name in ("fuse-conv-affine", "fuse-conv-bn"):
        run_pass(model, name)
    assert histogram(model) == {"ConvTranspose": 1}
    feeds = {"x": rand(2, 4, 5, 5)}
    expect = session(onnx.parser.parse_model(text)).run(None, feeds)[0]
    np.testing.assert_allclose(session(model.to_proto()).run(None, feeds)[0], expect, rtol=1e-4, atol=1e-4)


def test_conv_affine_refuses_constant_along_conv_transpose_width():
    text = DECONV_AFFINE.replace("float[6, 1, 1]", "float[1, 1, 10]").replace(_arr(6, 7), _arr(10, 7)).replace(
        "    y = Add (m, a)\n", "    y = Identity (m)\n")
    assert refusal_reasons(text, "fuse-conv-affine") == ["constant of shape [1, 1, 10] does not act per output channel"]
