from fusion_support import fuse_and_compare, rand, refusal_reasons

HEAD = '<ir_version: 8, opset_import: ["" : 17]>'
W = "{" + ", ".join(str((i * 5 % 7) / 7 - 0.4) for i in range(12)) + "}"

MATMUL_ADD = HEAD + '''
g (float[N, 3] x) => (float[N, 4] y) {
    w = Constant <value = float[3, 4] WVAL> ()
    b = Constant <value = float[4] {0.1, 0.2, 0.3, 0.4}> ()
    m = MatMul (x, w)
    y = Add (m, b)
}'''.replace("WVAL", W)


def test_matmul_add_to_gemm():
    result, _, after, _ = fuse_and_compare(MATMUL_ADD, "fuse-matmul-add", {"x": rand(5, 3)})
    assert result.stats == {"matmul-add": 1} and after["Gemm"] == 1 and after["MatMul"] == 0


def test_matmul_add_refuses_3d():
    text = MATMUL_ADD.replace("float[N, 3] x", "float[N, S, 3] x").replace("float[N, 4] y", "float[N, S, 4] y")
    assert refusal_reasons(text, "fuse-matmul-add") == ["MatMul inputs are not known to be 2-D"]


def test_matmul_add_refuses_non_constant_bias():
    text = MATMUL_ADD.replace("(float[N, 3] x)", "(float[N, 3] x, float[4] b2)").replace("Add (m, b)", "Add (m, b2)")
    assert refusal_reasons(text, "fuse-matmul-add") == ["bias not constant"]


def test_gemm_transpose():
    text = HEAD + '''
g (float[3, N] xt) => (float[N, 4] y) {
    w = Constant <value = float[3, 4] WVAL> ()
    x = Transpose <perm = [1, 0]> (xt)
    y = Gemm (x, w)
}'''.replace("WVAL", W)
    result, _, after, _ = fuse_and_compare(text, "fuse-matmul-add", {"xt": rand(3, 5)})
    assert result.stats == {"gemm-transpose": 1} and after["Transpose"] == 0


SCALE = HEAD + '''
g (float[N, S, 3] x) => (float[N, S, 4] y) {
    w = Constant <value = float[3, 4] WVAL> ()
    s = Constant <value = float SVAL> ()
    m = MatMul (x, w)
    y = Div (m, s)
}'''.replace("WVAL", W)


def test_matmul_scale_folds():
    result, _, after, _ = fuse_and_compare(SCALE.replace("SVAL", "{8.0}"), "fold-matmul-scale", {"x": rand(2, 5, 3)})
    assert result.stats == {"matmul-scale": 1} and after["Div"] == 0


def test_matmul_scale_refuses_vector():
    text = SCALE.replace("float SVAL", "float[4] {1.0, 2.0, 3.0, 4.0}")
    assert refusal_reasons(text, "fold-matmul-scale") == ["scale is not a constant scalar"]


PRE_SCALE = HEAD + '''
g (float[N, S, 3] x) => (float[N, S, 4] y) {
    w = Constant <value = float[3, 4] WVAL> ()
    half = Constant <value = float {0.5}> ()
    ACT
    h = Mul (a, half)
    y = MatMul (h, w)
}'''.replace("WVAL", W)
GELU_BODY = '''r2 = Constant <value = float {1.4142135}> ()
    one = Constant <value = float {1.0}> ()
    d = Div (x, r2)
    e = Erf (d)
    p = Add (e, one)
    a = Mul (x, p)'''


def test_matmul_scale_folds_a_plain_prescale():
    result, _, after, _ = fuse_and_compare(PRE_SCALE.replace("ACT", "a = Relu (x)"), "fold-matmul-scale",
                                           {"x": rand(2, 5, 3)})
    assert result.stats == {"matmul-scale": 1} and after["Mul"] == 0


def test_matmul_scale_keeps_gelu_half_for_the_gelu_fusion():
    text = PRE_SCALE.replace("ACT", GELU_BODY)
    assert refusal_reasons(text, "fold-matmul-scale") == [
        "the scale belongs to a GELU/HardSwish pattern (kept for the activation fusion)"]
    result, _, after, _ = fuse_and_compare(text, "fuse-gelu", {"x": rand(2, 5, 3)}, rtol=1e-4, checker=False)
    assert after["Gelu"] == 1 and after["Erf"] == 0


ZERO_BIAS = HEAD + '''
g (float[N, S, 3] x) => (float[N, S, 4] y) {
    w = Constant <value = float[3, 4] WVAL> ()
    b = Constant <value = float[BSHAPE] BVAL> ()
    m = MatMul (x, w)
    y = Add (m, b)
}'''.replace("WVAL", W)


def test_matmul_zero_bias_dropped_at_any_rank():
    text = ZERO_BIAS.replace("BSHAPE", "4").replace("BVAL", "{0.0, 0.0, 0.0, -0.0}")
    result, _, after, _ = fuse_and_compare(text, "fuse-matmul-add", {"x": rand(2, 5, 3)})
    assert result.stats == {"matmul-zero-bias": 1} and after["Add"] == 0 and after["MatMul"] == 1


def test_matmul_nonzero_bias_kept():
    text = ZERO_BIAS.replace("BSHAPE", "4").replace("BVAL", "{0.0, 0.0, 0.0, 1e-30}")
    assert refusal_reasons(text, "fuse-matmul-add") == ["MatMul inputs are not known to be 2-D"]


def test_matmul_zero_bias_refuses_enlarging_broadcast():
    text = ZERO_BIAS.replace("BSHAPE", "7, 1, 1").replace("BVAL", "{" + ", ".join(["0.0"] * 7) + "}").replace(
        "float[N, S, 4] y", "float[7, S, 4] y")
    assert refusal_reasons(text, "fuse-matmul-add") == ["MatMul inputs are not known to be 2-D",
                                                       "zero broadcasts beyond the MatMul output"]
