"""fuse-affine-into-conv: a constant per-channel Mul [+ Add] before a Conv folded into it."""
import numpy as np
import pytest
from fusion_support import fuse_and_compare, rand, refusal_reasons

HEAD = '<ir_version: 8, opset_import: ["" : 17]>'


def _arr(shape, seed, positive=False):
    v = np.random.default_rng(seed).standard_normal(shape)
    v = np.abs(v) + 0.5 if positive else v
    return "{" + ", ".join(f"{x:.4f}" for x in np.reshape(v, -1)) + "}"


def affine_conv(pads="0, 0, 0, 0", group=1, a_shape="4, 1, 1", a_val=None, with_add=True, kernel=3, extra=""):
    """x -> HardSwish -> Mul(a) [-> Add(b)] -> Conv(group) -> y."""
    per_in = 4 // group
    a_size = int(np.prod([int(d) for d in a_shape.split(",")])) if a_shape else 1
    a_val = a_val or _arr(a_size, 5, positive=True)
    body = "    m = Mul (h, a)\n    u = Add (m, b)\n" if with_add else "    u = Mul (h, a)\n"
    return HEAD + f'''
g (float[N, 4, 6, 6] x) => (float[N, 6, Y, Z] y{extra and ", float[N, 4, 6, 6] m"}) {{
    w = Constant <value = float[6, {per_in}, {kernel}, {kernel}] {_arr((6, per_in, kernel, kernel), 0)}> ()
    bias = Constant <value = float[6] {_arr(6, 1)}> ()
    a = Constant <value = float[{a_shape}] {a_val}> ()
    b = Constant <value = float[4, 1, 1] {_arr(4, 2)}> ()
    h = HardSwish (x)
{body}    y = Conv <pads = [{pads}], group = {group}> (u, w, bias)
}}'''


X = {"x": rand(2, 4, 6, 6) * 4}


@pytest.mark.parametrize("group", [1, 2])
def test_unpadded_conv_absorbs_scale_and_shift(group):
    result, before, after, _ = fuse_and_compare(affine_conv(group=group), "fuse-affine-into-conv", X, rtol=1e-4, atol=1e-4)
    assert result.stats == {"affine-into-conv": 1}
    assert before["Mul"] == 1 and after["Mul"] == 0 and after["Add"] == 0 and after["Conv"] == 1


def test_padded_conv_keeps_one_shift_add():
    result, _, after, _ = fuse_and_compare(affine_conv(pads="1, 1, 1, 1", group=2), "fuse-affine-into-conv", X, rtol=1e-4, atol=1e-4)
    assert result.stats == {"affine-into-conv": 1} and after["Mul"] == 0 and after["Add"] == 1


def test_scale_alone_folds_into_a_padded_conv():
    result, _, after, _ = fuse_and_compare(affine_conv(pads="1, 1, 1, 1", with_add=False, a_shape="1", a_val="{1.7}"),
                                           "fuse-affine-into-conv", X, rtol=1e-4, atol=1e-4)
    assert result.stats == {"affine-into-conv": 1} and after["Mul"] == 0


@pytest.mark.parametrize("text, reason", [
    (affine_conv(a_shape="6", a_val=_arr(6, 9)), "affine constant does not act per input channel"),
    (affine_conv(pads="1, 1, 1, 1", a_shape="4, 1, 1", a_val="{0.0, 1.0, 2.0, 3.0}"),
     "zero scale before a padded Conv (the shift b / a does not exist)"),
    (affine_conv(extra="m"), "intermediate tensor m has other consumers"),
])
def test_refusals(text, reason):
    assert reason in refusal_reasons(text, "fuse-affine-into-conv")


def test_refuses_the_half_of_a_gelu():
    """Whisper's conv stem: x * (1 + erf(x / sqrt 2)) * 0.5 -> Conv: the 0.5 stays for fuse-gelu."""
    text = HEAD + f'''
g (float[N, 4, 6, 6] x) => (float[N, 6, 4, 4] y) {{
    w = Constant <value = float[6, 4, 3, 3] {_arr((6, 4, 3, 3), 0)}> ()
    r2 = Constant <value = float {{1.4142135}}> ()
    one = Constant <value = float {{1.0}}> ()
    half = Constant <value = float {{0.5}}> ()
    d = Div (x, r2)
    e = Erf (d)
    p = Add (e, one)
    q = Mul (x, p)
    m = Mul (q, half)
    y = Conv (m, w)
}}'''
    assert refusal_reasons(text, "fuse-affine-into-conv") == ["the scale belongs to a GELU/HardSwish pattern (kept for the activation fusion)"]
