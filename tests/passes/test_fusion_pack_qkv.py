"""pack-qkv: MultiHeadAttention over three projections of one input -> com.microsoft Attention with
packed weights (equal outputs on onnxruntime CPU, checker passes); one case per refusal reason."""
import numpy as np
import pytest
from fusion_support import fuse_and_compare, rand, refusal_reasons

HEAD = '<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>'
D = 8  # hidden size: 2 heads of 4


def _arr(shape, seed, scale=0.3):
    v = np.random.default_rng(seed).standard_normal(shape) * scale
    return "{" + ", ".join(f"{x:.4f}" for x in np.reshape(v, -1)) + "}"


def model(project=("q", "k", "v"), biases=(True, True, False), mha_bias=False, mha_inputs="",
          attrs="num_heads = 2", extra_in="", extra_out="", body="", v_width=D, weight_input=False,
          bias_input=False, shared_input="", hidden=D, extra_init=""):
    """x -> MatMul (+ Add) per name in ``project`` -> MultiHeadAttention; ``mha_inputs`` are its
    inputs after q, k, v (text, starting with a comma)."""
    inits, lines = [], []
    for i, name in enumerate(project):
        width = v_width if name == "v" else hidden
        if weight_input and name == "q":
            extra_in += f", float[{D}, {width}] w{name}"
        else:
            inits.append(f"float[{D}, {width}] w{name} = {_arr((D, width), i)}")
        source = shared_input if (shared_input and name == "k") else "x"
        if biases[i]:
            if bias_input and name == "q":
                extra_in += f", float[{width}] b{name}"
            else:
                inits.append(f"float[{width}] b{name} = {_arr(width, 10 + i)}")
            lines += [f"{name}m = MatMul ({source}, w{name})", f"{name} = Add ({name}m, b{name})"]
        else:
            lines.append(f"{name} = MatMul ({source}, w{name})")
    if extra_init:
        inits.append(extra_init)
    if mha_bias:
        inits.append(f"float[{3 * hidden}] c = {_arr(3 * hidden, 20)}")
    body_lines = "\n    ".join(lines + [f"y = com.microsoft.MultiHeadAttention <{attrs}> (q, k, v{mha_inputs})"]
                                + ([body] if body else []))
    return HEAD + f'''
g (float[2, 3, {D}] x{extra_in}) => (float[2, 3, {hidden}] y{extra_out}) <{", ".join(inits)}> {{
    {body_lines}
}}'''


X = {"x": rand(2, 3, D, seed=1)}
ATTENTION_BIAS = {"ab": rand(1, 2, 3, 3, seed=2)}


@pytest.mark.parametrize("kwargs, feeds", [
    (dict(), X),
    (dict(biases=(False, False, False), mha_bias=True, mha_inputs=", c"), X),  # what fuse-attention emits
    (dict(biases=(True, False, True), mha_bias=True, mha_inputs=", c, , ab", extra_in=", float[1, 2, 3, 3] ab",
          attrs="num_heads = 2, scale = 0.7"), {**X, **ATTENTION_BIAS}),
    # fuse-attention's mask sizes: Shape(q + b) with the bias moved into MHA, and a Shape of k
    (dict(biases=(False, False, False), mha_bias=True, mha_inputs=", c", extra_out=", int64[3] qs, int64[3] ks",
          body="qb = Add (q, bm)\n    qs = Shape (qb)\n    ks = Shape (k)", extra_init=f"float[{D}] bm = {_arr(D, 30)}"), X),
], ids=["projection-biases", "mha-bias", "both-biases-attention-bias-scale", "shape-readers"])
def test_packs_into_attention(kwargs, feeds):
    result, before, after, ctx = fuse_and_compare(model(**kwargs), "pack-qkv", feeds, rtol=1e-4, atol=1e-5)
    assert result.stats == {"pack-qkv-attention": 1}
    assert before["MultiHeadAttention"] == 1 and before["MatMul"] == 3
    shapes = kwargs.get("body", "").count("Shape")  # the Shape readers stay, reading x: the projections go
    assert after == {"Attention": 1, **({"Shape": shapes} if shapes else {})}
    assert not ctx.refusals


@pytest.mark.parametrize("kwargs, provider, reason", [
    (dict(), "tensorrt", "Attention is an onnxruntime op (provider tensorrt)"),
    (dict(shared_input="x2", extra_in=f", float[2, 3, {D}] x2"), "cpu",
     "query, key and value are not projections of one input"),
    (dict(weight_input=True), "cpu", "a projection weight is not a constant float32 2-D matrix"),
    (dict(v_width=4), "cpu", "the query, key and value projections differ in shape"),
    (dict(hidden=4, v_width=4, extra_out=", int64[3] ks", body="ks = Shape (k)"), "cpu",
     "a Shape reads a projection whose width differs from its input's"),
    (dict(bias_input=True), "cpu", "a projection bias is not a constant float32 vector over its output"),
    (dict(mha_inputs=", cin", extra_in=f", float[{3 * D}] cin"), "cpu",
     "MultiHeadAttention's bias is not a constant float32 vector of 3 x the projection width"),
    (dict(mha_inputs=", , mask", extra_in=", int32[2, 3] mask"), "cpu",
     "a key padding mask (Attention's mask_index reads masks differently)"),
    (dict(mha_inputs=", , , , pk, pv", extra_in=", float[2, 2, 1, 4] pk, float[2, 2, 1, 4] pv"), "cpu",
     "a past key/value input (KV cache)"),
    (dict(extra_out=", float[2, 2, 3, 4] present_k", body=""), "cpu",
     "MultiHeadAttention's present key/value or QK output is read (Attention has no such outputs)"),
    (dict(extra_out=", float[2, 3, 8] q"), "cpu", "intermediate tensor q has other consumers"),
], ids=["provider", "cross-attention", "weight-type", "widths", "shape-of-narrower", "bias-not-constant", "mha-bias-not-constant",
        "key-padding-mask", "past", "present-read", "projection-read"])
def test_refusals(kwargs, provider, reason):
    text = model(**kwargs)
    if "present_k" in kwargs.get("extra_out", ""):
        text = text.replace("y = com.microsoft.MultiHeadAttention <num_heads = 2> (q, k, v)",
                            "y, present_k = com.microsoft.MultiHeadAttention <num_heads = 2> (q, k, v)")
    assert refusal_reasons(text, "pack-qkv", provider) == [reason]


def test_not_matched_without_projections():
    text = HEAD + f'''
g (float[2, 3, {D}] x) => (float[2, 3, {D}] y) {{
    y = com.microsoft.MultiHeadAttention <num_heads = 2> (x, x, x)
}}'''
    assert refusal_reasons(text, "pack-qkv") == []
