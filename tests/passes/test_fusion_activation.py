import pytest
from fusion_support import fuse_and_compare, rand, refusal_reasons

HEAD = '<ir_version: 8, opset_import: ["" : {opset}]>'

GELU_ERF = HEAD + '''
g (float[B, 8] a) => (float[B, 8] y) {{
    bias = Constant <value = float[8] {{0.1, -0.2, 0.3, 0.0, 0.5, -0.6, 0.7, 0.8}}> ()
    x = Add (a, bias)
    s = Constant <value = float {scale}> ()
    one = Constant <value = float {{1.0}}> ()
    half = Constant <value = float {{0.5}}> ()
    d = Div (x, s)
    e = Erf (d)
    p = Add (e, one)
    m = Mul (x, p)
    y = Mul (m, half)
}}'''

GELU_TANH = HEAD + '''
g (float[B, 8] x) => (float[B, 8] y) {{
    three = Constant <value = float {{3.0}}> ()
    c = Constant <value = float {{0.044715}}> ()
    k = Constant <value = float {{0.7978845608}}> ()
    one = Constant <value = float {{1.0}}> ()
    half = Constant <value = float {{0.5}}> ()
    hx = Mul (x, half)
    p3 = Pow (x, three)
    c3 = Mul (p3, c)
    inner = Add (x, c3)
    arg = Mul (inner, k)
    t = Tanh (arg)
    t1 = Add (t, one)
    y = Mul (hx, t1)
}}'''

SILU = HEAD + '''
g (float[B, 3, 4, 4] x) => (float[B, 3, 4, 4] y) {{
    {pre}
    s = Sigmoid ({sin})
    y = Mul (x, s)
}}'''

HARDSWISH = HEAD + '''
g (float[B, 3, 4, 4] x) => (float[B, 3, 4, 4] y) {{
    three = Constant <value = float {{3.0}}> ()
    lo = Constant <value = float {{0.0}}> ()
    hi = Constant <value = float {{6.0}}> ()
    six = Constant <value = float {{6.0}}> ()
    a = Add (x, three)
    c = Clip (a, lo, hi)
    m = Mul (x, c)
    y = Div (m, six)
}}'''

HARDSIGMOID = HEAD + '''
g (float[B, 3, 4, 4] x) => (float[B, 3, 4, 4] y) {{
    a = Constant <value = float {{0.2}}> ()
    b = Constant <value = float {{0.5}}> ()
    lo = Constant <value = float {{0.0}}> ()
    hi = Constant <value = float {{1.0}}> ()
    ax = Mul (x, a)
    axb = Add (ax, b)
    y = Clip (axb, lo, {hi})
}}'''

X8 = {"a": rand(2, 8, scale=2.0)}


def test_gelu_erf_with_bias_becomes_biasgelu():
    text = GELU_ERF.format(opset=17, scale="{1.4142135}")
    result, before, after, _ = fuse_and_compare(text, "fuse-gelu", X8, rtol=1e-4)
    assert result.stats == {"gelu-erf": 1}
    assert before["Erf"] == 1 and after["Erf"] == 0
    assert after["BiasGelu"] == 1 and after["Add"] == 0 and after["Mul"] == 0


def test_gelu_erf_refuses_wrong_scale():
    assert refusal_reasons(GELU_ERF.format(opset=17, scale="{1.5}"), "fuse-gelu")[0].startswith(
        "erf argument is not x / sqrt(2)")


def test_gelu_erf_refuses_when_intermediate_escapes():
    text = GELU_ERF.format(opset=17, scale="{1.4142135}").replace(
        "(float[B, 8] y)", "(float[B, 8] y, float[B, 8] e)", 1)
    reasons = refusal_reasons(text, "fuse-gelu")
    assert reasons and "has other consumers" in reasons[0]


def test_gelu_tanh_becomes_fastgelu():
    result, before, after, _ = fuse_and_compare(GELU_TANH.format(opset=17), "fuse-gelu",
                                                {"x": rand(3, 8, scale=2.0)}, rtol=1e-4, atol=1e-5)
    assert result.stats == {"gelu-tanh": 1}
    assert after["FastGelu"] == 1 and after["Tanh"] == 0 and after["Pow"] == 0


def test_gelu_tanh_refuses_wrong_coefficient():
    text = GELU_TANH.format(opset=17).replace("0.044715", "0.05")
    assert refusal_reasons(text, "fuse-gelu") == ["cubic coefficient is not 0.044715"]


@pytest.mark.parametrize("pre, sin, alpha", [("", "x", 1.0),
                                             ("k = Constant <value = float {1.702}> ()\n xs = Mul (x, k)", "xs", 1.702)])
def test_silu_and_quickgelu(pre, sin, alpha):
    text = SILU.format(opset=17, pre=pre, sin=sin)
    result, _, after, ctx = fuse_and_compare(text, "fuse-silu", {"x": rand(2, 3, 4, 4)}, rtol=1e-4)
    assert result.stats == {"silu-quickgelu": 1}
    assert after["QuickGelu"] == 1 and after["Sigmoid"] == 0
    node = next(n for n in ctx.model.graph.nodes if n.op == "QuickGelu")
    assert node.attrs["alpha"] == pytest.approx(alpha) and node.domain == "com.microsoft"


def test_silu_refuses_non_constant_scale():
    text = HEAD.format(opset=17) + '''
g (float[B, 3] x, float[1] k) => (float[B, 3] y) {
    xs = Mul (x, k)
    s = Sigmoid (xs)
    y = Mul (x, s)
}'''
    assert refusal_reasons(text, "fuse-silu") == ["sigmoid scale is not a constant scalar"]


@pytest.mark.parametrize("opset, op", [(17, "HardSwish"), (12, "HardSigmoid")])
def test_hardswish(opset, op):
    result, before, after, _ = fuse_and_compare(HARDSWISH.format(opset=opset), "fuse-hardswish",
                                                {"x": rand(2, 3, 4, 4, scale=4.0)})
    assert result.stats == {"hardswish-clip": 1}
    assert after[op] == 1 and after["Clip"] == 0 and after["Div"] == 0


def test_hardswish_refuses_other_constants():
    text = HARDSWISH.format(opset=17).replace("float {3.0}", "float {2.0}")
    assert refusal_reasons(text, "fuse-hardswish") == ["not x * clip(x + 3, 0, 6) / 6"]


def test_hardsigmoid():
    result, _, after, ctx = fuse_and_compare(HARDSIGMOID.format(opset=17, hi="hi"), "fuse-hardswish",
                                             {"x": rand(2, 3, 4, 4, scale=4.0)})
    assert result.stats == {"hardsigmoid-clip": 1} and after["HardSigmoid"] == 1 and after["Clip"] == 0


def test_hardsigmoid_refuses_non_constant_bound():
    text = HARDSIGMOID.format(opset=17, hi="hi").replace("(float[B, 3, 4, 4] x)", "(float[B, 3, 4, 4] x, float lo2)")
    text = text.replace("y = Clip (axb, lo, hi)", "y = Clip (axb, lo2, hi)")
    assert refusal_reasons(text, "fuse-hardswish") == ["not clip(a*x + b, 0, h) / h with constant a, b, h"]


def test_hardswish_from_hardsigmoid():
    text = HEAD.format(opset=17) + '''
g (float[B, 3] x) => (float[B, 3] y) {
    h = HardSigmoid <alpha = 0.16666667, beta = 0.5> (x)
    y = Mul (x, h)
}'''
    result, _, after, _ = fuse_and_compare(text, "fuse-hardswish", {"x": rand(4, 3, scale=4.0)})
    assert result.stats == {"hardswish-hardsigmoid": 1} and after["HardSwish"] == 1


def test_hardswish_from_hardsigmoid_refuses_other_alpha():
    text = HEAD.format(opset=17) + '''
g (float[B, 3] x) => (float[B, 3] y) {
    h = HardSigmoid <alpha = 0.2, beta = 0.5> (x)
    y = Mul (x, h)
}'''
    assert refusal_reasons(text, "fuse-hardswish") == ["hard sigmoid is not alpha=1/6, beta=1/2"]
