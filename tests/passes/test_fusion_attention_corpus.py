"""Attention fusions on the real exports: every layer fused, dims dynamic, outputs kept
(also with left-padded and holey masks). Skipped when the corpus or shared models are absent."""
from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import corpus_model, shared_model

from onnxforge.context import PassContext
from onnxforge.inputs import seeded_feeds
from onnxforge.io import load, save
from onnxforge.passes.registry import resolve

ATTENTION_PASSES = ("fuse-attention", "fuse-causal-attention", "fuse-sdpa", "fuse-gqa-rotary")

# model: (where, attention rule, layers, contrib ops expected)
MODELS = {
    "minilm_l6_w8": ("shared", "sdpa-attention", 6, {"MultiHeadAttention": 6}),
    "bert_base": ("corpus", "bert-attention", 12, {"MultiHeadAttention": 12}),
    "distilbert_base": ("corpus", "bert-attention", 6, {"MultiHeadAttention": 6}),
    "distilbert_base_dynamo": ("corpus", "sdpa-attention", 6, {"MultiHeadAttention": 6}),
    "minilm_l6_real": ("corpus", "bert-attention", 6, {"MultiHeadAttention": 6}),
    "gpt2_small": ("corpus", "causal-attention", 12, {"MultiHeadAttention": 12}),
    "vit_base16": ("corpus", "bert-attention", 12, {"MultiHeadAttention": 12}),
    "whisper_tiny_encoder": ("corpus", "bert-attention", 4, {"MultiHeadAttention": 4}),
    "llama_570m_seq128_extdata": ("corpus", "gqa-rotary-attention", 18,
                                  {"GroupQueryAttention": 18, "RotaryEmbedding": 36}),
}
FAST = ("minilm_l6_w8",)


def model_path(name: str) -> Path:
    where = MODELS[name][0]
    return shared_model(name) if where == "shared" else corpus_model(name)


def feeds_for(model, batch=2, seq=16) -> list[dict]:
    shapes = {}
    for t in model.graph.inputs:
        if t.name in ("input_ids", "attention_mask", "token_type_ids"):
            shapes[t.name] = (batch, seq)
        elif t.name == "input_features":
            shapes[t.name] = (1, 80, 3000)
        elif t.name == "pixel_values":
            shapes[t.name] = (batch, 3, 224, 224)
    feed = seeded_feeds(model, shapes)
    if "attention_mask" not in feed:
        return [feed]
    left, holey = feed["attention_mask"].copy(), feed["attention_mask"].copy()
    left[0, :4] = 0
    holey[1, 5:8] = 0
    holey[0, -3:] = 0
    return [feed, {**feed, "attention_mask": left}, {**feed, "attention_mask": holey}]


def run(path: Path, feeds: list[dict]) -> list[list[np.ndarray]]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return [sess.run(None, {n: f[n] for n in names if n in f}) for f in feeds]


def dims(values) -> list:
    return [(v.name, list(v.shape) if v.shape else v.shape) for v in values]


def check_model(name: str) -> None:
    _, rule, layers, contrib = MODELS[name]
    path = model_path(name)
    model = load(path)
    inputs_before, outputs_before = dims(model.graph.inputs), dims(model.graph.outputs)
    ctx = PassContext(model=model, provider="cpu")
    counts = collections.Counter()
    for pass_name in ATTENTION_PASSES:
        counts.update(resolve(pass_name).run(model.graph, ctx).stats)
    assert counts == {rule: layers}, (counts, [str(r) for r in ctx.refusals])
    hist = collections.Counter(n.op for n in model.graph.nodes if n.domain == "com.microsoft")
    assert dict(hist) == contrib
    assert collections.Counter(n.op for n in model.graph.nodes)["Softmax"] == 0
    assert dims(model.graph.inputs) == inputs_before and dims(model.graph.outputs) == outputs_before
    feeds = feeds_for(model)
    with tempfile.TemporaryDirectory() as tmp:
        fused = Path(tmp) / "fused.onnx"
        save(model, fused)
        expect, got = run(path, feeds), run(fused, feeds)
    for outs_e, outs_g in zip(expect, got):
        for e, g in zip(outs_e, outs_g):
            assert e.shape == g.shape
            assert float(np.abs(e - g).max()) <= 1e-4 * float(np.abs(e).max())


@pytest.mark.corpus
@pytest.mark.parametrize("name", FAST)
def test_attention_fused_every_layer(name):
    check_model(name)


@pytest.mark.corpus
@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in MODELS if n not in FAST])
def test_attention_fused_every_layer_large(name):
    check_model(name)
