"""Attention fusions on small graphs written in each exporter's form: fires, parity, refusals, masks."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import attention_graphs as ag
from onnxforge.context import PassContext
from onnxforge.model import Model
from onnxforge.passes.registry import resolve

MS_OPS = ("MultiHeadAttention", "GroupQueryAttention", "RotaryEmbedding")


def session(proto: onnx.ModelProto):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def fuse(proto: onnx.ModelProto, pass_name: str):
    model = Model.from_proto(proto)
    ctx = PassContext(model=model)
    result = resolve(pass_name).run(model.graph, ctx)
    return model.to_proto(), result, ctx


def histogram(proto: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in proto.graph.node)


def assert_parity(original, fused, feeds, rtol=1e-4):
    expect = session(original).run(None, feeds)
    got = session(fused).run(None, feeds)
    for e, g in zip(expect, got):
        scale = float(np.abs(e).max())
        assert float(np.abs(g - e).max()) <= rtol * scale, (float(np.abs(g - e).max()), scale)


def assert_dims_kept(original, fused):
    def dims(values):
        return [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values]

    assert dims(fused.graph.input) == dims(original.graph.input)
    assert dims(fused.graph.output) == dims(original.graph.output)


CASES = {
    # name: (builder, pass, rule, hidden, expected contrib ops)
    "bert": (lambda: ag.bert(), "fuse-attention", "bert-attention", 8, {"MultiHeadAttention": 1}),
    "bert-swap-k": (lambda: ag.bert(k_perm="swap"), "fuse-attention", "bert-attention", 8,
                    {"MultiHeadAttention": 1}),
    "whisper-q-scale": (lambda: ag.bert(q_scale=0.5, mask=False), "fuse-attention", "bert-attention", 8,
                        {"MultiHeadAttention": 1}),
    "gpt2": (lambda: ag.gpt2(), "fuse-causal-attention", "causal-attention", 8, {"MultiHeadAttention": 1}),
    "sdpa": (lambda: ag.sdpa(), "fuse-sdpa", "sdpa-attention", 8, {"MultiHeadAttention": 1}),
    "llama": (lambda: ag.llama(), "fuse-gqa-rotary", "gqa-rotary-attention", 32,
              {"GroupQueryAttention": 1, "RotaryEmbedding": 2}),
    "llama-const-half": (lambda: ag.llama(dynamic_half=False), "fuse-gqa-rotary", "gqa-rotary-attention", 32,
                         {"GroupQueryAttention": 1, "RotaryEmbedding": 2}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fires_and_matches(case):
    build, pass_name, rule, hidden, contrib = CASES[case]
    original = build()
    fused, result, ctx = fuse(original, pass_name)
    assert result.stats == {rule: 1}, (result.stats, ctx.refusals)
    hist = histogram(fused)
    assert {op: hist[op] for op in MS_OPS if hist[op]} == contrib
    assert hist["Softmax"] == 0 and hist["Transpose"] == 0
    assert any(i.domain == "com.microsoft" for i in fused.opset_import)
    onnx.checker.check_model(fused)
    assert_dims_kept(original, fused)
    has_mask = any(i.name == "attention_mask" for i in original.graph.input)
    for batch, seq in ((1, 5), (3, 7)):  # dynamic batch and sequence stay dynamic
        feeds = ag.feeds(hidden, batch, seq, mask="ones" if has_mask else None)
        assert_parity(original, fused, feeds)


@pytest.mark.parametrize("case", ["bert", "gpt2", "sdpa", "llama"])
@pytest.mark.parametrize("mask", ["left", "holey"])
def test_mask_semantics_kept(case, mask):
    """Left padding and holes in the mask give the original model's outputs at every position."""
    build, pass_name, _, hidden, _ = CASES[case]
    original = build()
    fused, result, _ = fuse(original, pass_name)
    assert result.changed
    feeds = ag.feeds(hidden, 2, 6, mask=mask)
    assert_parity(original, fused, feeds)
    # the mask really matters here, so the parity above can fail
    plain = session(original).run(None, ag.feeds(hidden, 2, 6, mask="ones"))[0]
    masked = session(fused).run(None, feeds)[0]
    assert float(np.abs(plain - masked).max()) > 1e-3


def test_other_passes_leave_foreign_forms_alone():
    """Each pass owns one exporter form; the BERT pass does not touch GPT-2, dynamo or Llama."""
    for build in (ag.gpt2, ag.sdpa, ag.llama):
        _, result, _ = fuse(build(), "fuse-attention")
        assert not result.changed


def test_scale_folds_query_factor():
    """Whisper's q * 0.5 and the scores' 1/sqrt(D) end up in the one MHA scale."""
    fused, _, _ = fuse(ag.bert(q_scale=0.5, mask=False), "fuse-attention")
    node = next(n for n in fused.graph.node if n.op_type == "MultiHeadAttention")
    scale = next(a.f for a in node.attribute if a.name == "scale")
    assert scale == pytest.approx(0.5 / 2.0)


REFUSALS = {
    "softmax axis not last": (lambda: ag.bert(softmax_axis=2), "fuse-attention"),
    "scale not constant": (lambda: ag.bert(scale_input=True), "fuse-attention"),
    "num_heads not derivable from reshape constant": (lambda: ag.bert(heads_entry="input"), "fuse-attention"),
    "head-split reshape does not keep batch and sequence": (lambda: ag.bert(swap_batch=True), "fuse-attention"),
    "output reshape does not merge heads to [B, S, N*D]": (lambda: ag.bert(merge_rank3=False), "fuse-attention"),
    "intermediate result used outside the attention block": (lambda: ag.bert(probs_output=True), "fuse-attention"),
    "cast after softmax changes precision": (lambda: ag.bert(cast_fp16=True), "fuse-attention"),
    "NaN guard kept: mask is not a Where of finite constants": (lambda: ag.sdpa(mask_from_input=True), "fuse-sdpa"),
    "rotate_half slices are not [0, D/2) and [D/2, D)": (lambda: ag.llama(half_offset=1), "fuse-gqa-rotary"),
    "cos/sin halves not provably equal (interleaved or partial rotary)": (lambda: ag.llama(unequal_cos=True),
                                                                          "fuse-gqa-rotary"),
}


@pytest.mark.parametrize("reason", sorted(REFUSALS))
def test_refusal(reason):
    build, pass_name = REFUSALS[reason]
    original = build()
    fused, result, ctx = fuse(original, pass_name)
    assert not result.changed, result.stats
    assert [r.reason for r in ctx.refusals] == [reason]
    assert ctx.refusals[0].nodes, "refusals name the nodes"
    assert histogram(fused) == histogram(original)


def test_gqa_refused_for_float32_on_cuda():
    """onnxruntime's CUDA GroupQueryAttention has no float32 kernel: the CUDA profile keeps the graph."""
    model = Model.from_proto(ag.llama())
    ctx = PassContext(model=model, provider="cuda")
    result = resolve("fuse-gqa-rotary").run(model.graph, ctx)
    assert not result.changed
    assert [r.reason for r in ctx.refusals] == ["CUDA GroupQueryAttention runs float16/bfloat16 only"]


def test_projection_biases_move_into_mha():
    """Q/K/V bias Adds become MHA's bias input (K has none here: zeros in its slot)."""
    original = ag.bert(mask=False)
    fused, _, _ = fuse(original, "fuse-attention")
    node = next(n for n in fused.graph.node if n.op_type == "MultiHeadAttention")
    assert len(node.input) == 4 and node.input[3]
    bias = next(t for t in fused.graph.initializer if t.name == node.input[3])
    assert list(bias.dims) == [24]
    assert histogram(fused)["Add"] == 0
    assert_parity(original, fused, ag.feeds(8, 2, 5, mask=None))


def test_mask_sizes_read_the_bias_free_projection():
    """The mask's Shape nodes read MatMul(x, Wq), which has the shape of MatMul(x, Wq) + bq:
    the bias Add, now inside MHA, does not stay alive only to give its shape."""
    original = ag.bert()
    fused, _, _ = fuse(original, "fuse-attention")
    made_by = {o: n.op_type for n in fused.graph.node for o in n.output}
    shapes = [n for n in fused.graph.node if n.op_type == "Shape"]
    assert len(shapes) == 2 and all(made_by[n.input[0]] == "MatMul" for n in shapes)
    assert histogram(fused)["Add"] == 0 and histogram(original)["Add"] == 3
    onnx.checker.check_model(fused)
    assert_parity(original, fused, ag.feeds(8, 2, 5))
