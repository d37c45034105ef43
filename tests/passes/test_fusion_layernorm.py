import numpy as np
import pytest
from fusion_support import fuse_and_compare, model_from_text, rand, refusal_reasons, run_pass, session

HEAD = '<ir_version: 8, opset_import: ["" : {opset}]>'

# TorchScript / paddle2onnx LayerNorm form.
LAYERNORM = HEAD + '''
g (float[B, S, 8] x) => (float[B, S, 8] y) {{
    two = Constant <value = float {{2.0}}> ()
    eps = Constant <value = float {{1e-5}}> ()
    gamma = Constant <value = float[8] {{1, 2, 3, 4, 5, 6, 7, 8}}> ()
    beta = Constant <value = float[8] {{0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8}}> ()
    mean = ReduceMean <axes = [{axes}]> (x)
    d = Sub (x, mean)
    sq = Pow (d, two)
    var = ReduceMean <axes = [{axes}]> (sq)
    ve = Add (var, eps)
    std = Sqrt (ve)
    n = Div (d, std)
    m = Mul (n, gamma)
    y = Add (m, beta)
}}'''

# Llama's RMSNorm as TorchScript writes it (no-op Casts to float32, 1/sqrt then Mul).
RMSNORM = HEAD + '''
g (float[B, S, 8] a, float[B, S, 8] b) => (float[B, S, 8] y, float[B, S, 8] res) {{
    two = Constant <value = float {{2.0}}> ()
    eps = Constant <value = float {{1e-6}}> ()
    one = Constant <value = float {{1.0}}> ()
    w = Constant <value = float[8] {{1, 2, 3, 4, 5, 6, 7, 8}}> ()
    s = Add (a, b)
    x = Cast <to = 1> (s)
    res = Identity (x)
    sq = Pow (x, two)
    ms = ReduceMean <axes = [-1]> (sq)
    me = Add (ms, eps)
    r = Sqrt (me)
    inv = Div (one, r)
    n = Mul (x, inv)
    nc = Cast <to = 1> (n)
    y = Mul (w, nc)
}}'''

FEEDS = {"x": rand(2, 3, 8, scale=3.0) + 1.0}


def test_layernorm_fuses_at_opset_17():
    result, before, after, _ = fuse_and_compare(LAYERNORM.format(opset=17, axes="-1"), "fuse-layernorm", FEEDS)
    assert result.stats == {"layernorm": 1}
    assert before["ReduceMean"] == 2 and after["ReduceMean"] == 0
    assert after["LayerNormalization"] == 1 and sum(after.values()) == 1


def test_layernorm_refuses_below_opset_17():
    assert refusal_reasons(LAYERNORM.format(opset=12, axes="-1"), "fuse-layernorm") == [
        "opset < 17 has no LayerNormalization"]


def test_layernorm_ort_variant_fuses_below_17():
    # onnxruntime's own pre-17 LayerNormalization: onnxruntime runs it, onnx.checker does not know it.
    result, _, after, _ = fuse_and_compare(LAYERNORM.format(opset=12, axes="-1"), "fuse-layernorm-ort", FEEDS,
                                           checker=False)
    assert result.stats == {"layernorm-ort": 1} and after["LayerNormalization"] == 1


def test_layernorm_refuses_non_last_axis():
    assert refusal_reasons(LAYERNORM.format(opset=17, axes="1"), "fuse-layernorm") == [
        "mean axes (1,) are not the last axes"]


def test_layernorm_refuses_non_constant_epsilon():
    text = LAYERNORM.format(opset=17, axes="-1").replace("(float[B, S, 8] x)", "(float[B, S, 8] x, float e)")
    text = text.replace("ve = Add (var, eps)", "ve = Add (var, e)")
    assert refusal_reasons(text, "fuse-layernorm") == ["epsilon not a constant"]


def test_layernorm_refuses_escaping_intermediate():
    text = LAYERNORM.format(opset=17, axes="-1").replace("=> (float[B, S, 8] y)", "=> (float[B, S, 8] y, float[B, S, 1] var)")
    assert "var has other consumers" in refusal_reasons(text, "fuse-layernorm")[0]


def test_layernorm_refuses_pow_3():
    text = LAYERNORM.format(opset=17, axes="-1").replace("float {2.0}", "float {3.0}")
    assert refusal_reasons(text, "fuse-layernorm") == ["variance is not a mean of squares (Pow exponent is not 2)"]


RMS_FEEDS = {"a": rand(2, 3, 8), "b": rand(2, 3, 8, seed=1)}


def test_rmsnorm_then_skip():
    model = model_from_text(RMSNORM.format(opset=17))
    original = model.to_proto()
    result, _ = run_pass(model, "fuse-rmsnorm")
    assert result.stats == {"rmsnorm": 1}
    result, ctx = run_pass(model, "fuse-skip-layernorm")
    assert result.stats == {"skip-layernorm": 1}, ctx.refusals
    ops = [n.op for n in model.graph.nodes]
    assert ops.count("SkipSimplifiedLayerNormalization") == 1 and "ReduceMean" not in ops and "Add" not in ops
    # SimplifiedLayerNormalization/Skip* are onnxruntime ops: parity on onnxruntime itself.
    expect = session(original).run(None, RMS_FEEDS)
    got = session(model.to_proto()).run(None, RMS_FEEDS)
    for e, g in zip(expect, got):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_rmsnorm_refuses_for_tensorrt():
    assert refusal_reasons(RMSNORM.format(opset=17), "fuse-rmsnorm", provider="tensorrt") == [
        "SimplifiedLayerNormalization is an onnxruntime op (provider tensorrt)"]


SKIP = HEAD + '''
g (float[B, S, 8] a, float[B, S, 8] h) => (float[B, S, 8] y, float[B, S, 8] s) {{
    w = Constant <value = float[8, 8] {dense}> ()
    bias = Constant <value = float[8] {{0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8}}> ()
    gamma = Constant <value = float[8] {{1, 2, 3, 4, 5, 6, 7, 8}}> ()
    beta = Constant <value = float[8] {{0, 1, 0, 1, 0, 1, 0, 1}}> ()
    mm = MatMul (h, w)
    hb = Add (mm, bias)
    s = Add ({left}, hb)
    y = LayerNormalization <axis = -1, epsilon = 1e-5> (s, gamma, beta)
}}'''


def _skip(left="a", head='["" : 17]'):
    dense = "{" + ", ".join(str((i * 7 % 11) / 10) for i in range(64)) + "}"
    return SKIP.format(opset=17, dense=dense, left=left)


def test_skip_layernorm_with_bias_and_kept_sum():
    feeds = {"a": rand(2, 3, 8), "h": rand(2, 3, 8, seed=2)}
    result, _, after, _ = fuse_and_compare(_skip(), "fuse-skip-layernorm", feeds, rtol=1e-4)
    assert result.stats == {"skip-layernorm": 1}
    assert after["SkipLayerNormalization"] == 1 and after["Add"] == 0 and after["LayerNormalization"] == 0


def test_skip_layernorm_refuses_broadcast_residual():
    text = _skip().replace("(float[B, S, 8] a, float[B, S, 8] h)", "(float[1, S, 8] a, float[B, S, 8] h)")
    assert refusal_reasons(text, "fuse-skip-layernorm")[0].startswith(
        "residual inputs do not surely have the same 3-D shape")


@pytest.mark.parametrize("provider", ["cpu", "cuda"])
def test_norm_fusions_run_before_attention(provider):
    """SkipLayerNormalization proves equal residual shapes by onnx shape inference, which cannot
    see through the fused attention ops: run after attention it refuses every layer (measured on
    minilm_l6_real: 0 of 12 fused). The norm and embedding fusions must come first."""
    from onnxforge.runtime.providers import provider_fusions

    order = list(provider_fusions(provider))
    attention = [i for i, name in enumerate(order) if "attention" in name or name in ("fuse-sdpa", "fuse-gqa-rotary")]
    norms = [i for i, name in enumerate(order) if "layernorm" in name or name in ("fuse-rmsnorm", "fuse-gelu")]
    assert norms and attention and max(norms) < min(attention), order
