"""A tiny Llama-like decoder with a KV cache, written the way the TorchScript exporter writes HF models.

I/O as Optimum / onnxruntime-genai (and the corpus' smollm2_135m_kv) name them:
  inputs   input_ids [B, S], attention_mask [B, P+S], position_ids [B, S] (int64),
           past_key_values.{i}.key / .value [B, Nkv, P, D]
  outputs  logits [B, S, V], present.{i}.key / .value [B, Nkv, P+S, D]
Each layer: rotary from position_ids (cos/sin shared by the layers), K/V appended to the past,
repeat_kv, scores + the additive causal/padding mask [B, 1, S, P+S], o_proj and a residual.
``dynamo=True`` writes the layer as torch.onnx's dynamo exporter does (opset 18): head splits with
allowzero=1 from Shape(x, start, end), sqrt(scale) on Q and on K^T (Reshape/Transpose/Reshape), repeat_kv
targets computed from other tensors' dims (batch of the last layer's past, T = its past length + S), the
NaN guard.
Options switch single details so each refusal of the cache fusion can be provoked.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from attention_graphs import (F32_MIN, G, dynamo_key_transpose, merge_heads, model, repeat_kv, rotate_half,
                              split_heads, weights)


def _causal_padding_mask(g: G) -> str:
    """Where(mask[b, t] & (t <= P + s), 0, min) as [B, 1, S, T], P = T - S."""
    total = g.op("Gather", g.op("Shape", "attention_mask"), g.const(1, np.int64), axis=0)
    seq = g.op("Gather", g.op("Shape", "input_ids"), g.const(1, np.int64), axis=0)
    rows = g.op("Unsqueeze", g.op("Range", g.op("Sub", total, seq), total, g.const(1, np.int64)), g.ints(1))
    cols = g.op("Unsqueeze", g.op("Range", g.const(0, np.int64), total, g.const(1, np.int64)), g.ints(0))
    causal = g.op("LessOrEqual", cols, rows)  # [S, T]
    padding = g.op("Cast", g.op("Unsqueeze", "attention_mask", g.ints(1, 2)), to=TensorProto.BOOL)
    return g.op("Where", g.op("And", padding, causal), g.const(0.0), g.const(F32_MIN))


def _dynamo_split(g: G, x3: str, head_size: int) -> str:
    shape = g.op("Concat", g.op("Shape", x3, start=0, end=1), g.op("Shape", x3, start=1, end=2), g.ints(-1),
                 g.ints(head_size), axis=0)
    return g.op("Transpose", g.op("Reshape", x3, shape, allowzero=1), perm=[0, 2, 1, 3])


def _dynamo_repeat(g: G, x4: str, other_past: str, kv_heads: int, rep: int, heads: int, head_size: int) -> str:
    """Targets from other tensors' dims, as dynamo's symbolic sizes: B of some past input, T = P + S."""
    batch = g.op("Shape", other_past, start=0, end=1)
    sizes = [g.op("Squeeze", g.op("Shape", t, start=k, end=k + 1)) for t, k in ((other_past, 2), ("input_ids", 1))]
    total = g.op("Reshape", g.op("Add", *sizes), g.ints(-1))
    wide = g.op("Expand", g.op("Unsqueeze", x4, g.ints(2)),
                g.op("Concat", batch, g.ints(kv_heads), g.ints(rep), total, g.ints(head_size), axis=0))
    return g.op("Reshape", wide, g.op("Concat", batch, g.ints(heads), total, g.ints(head_size), axis=0),
                allowzero=1)


def decoder(layers=2, heads=4, kv_heads=2, head_size=8, vocab=48, seed=0, mask=True, concat_axis=2,
            leak_rotary=False, dynamo=False, wrong_repeat=False, past_name="past_key_values.{i}.{kv}", present_name="present.{i}.{kv}",
            ) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    hidden, kv_hidden, rep = heads * head_size, kv_heads * head_size, heads // kv_heads
    g = G()
    x = g.op("Gather", g.const(weights(rng, vocab, hidden, 1.0)), "input_ids", axis=0)
    inv_freq = (1.0 / (10000 ** (np.arange(0, head_size, 2) / head_size))).astype(np.float32)
    freqs = g.op("Mul", g.op("Cast", g.op("Unsqueeze", "position_ids", g.ints(2)), to=TensorProto.FLOAT),
                 g.const(inv_freq))
    emb = g.op("Concat", freqs, freqs, axis=-1)
    cos = g.op("Unsqueeze", g.op("Mul", g.op("Cos", emb), g.const(1.0)), g.ints(1))
    sin = g.op("Unsqueeze", g.op("Mul", g.op("Sin", emb), g.const(1.0)), g.ints(1))
    bias = _causal_padding_mask(g) if mask else None
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab])]
    extra = []
    for i in range(layers):
        past = {kv: past_name.format(i=i, kv=kv) for kv in ("key", "value")}
        present = {kv: present_name.format(i=i, kv=kv) for kv in ("key", "value")}
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(past[kv], TensorProto.FLOAT,
                                                        ["batch_size", kv_heads, "past_sequence_length", head_size]))
            outputs.append(helper.make_tensor_value_info(
                present[kv], TensorProto.FLOAT, ["batch_size", kv_heads, "total_sequence_length", head_size]))
        q3 = g.op("MatMul", x, g.const(weights(rng, hidden, hidden)))
        k3 = g.op("MatMul", x, g.const(weights(rng, hidden, kv_hidden)))
        v3 = g.op("MatMul", x, g.const(weights(rng, hidden, kv_hidden)))
        split = (lambda x3: _dynamo_split(g, x3, head_size)) if dynamo else \
            (lambda x3: split_heads(g, x3, -1, head_size))
        q4 = rotate_half(g, split(q3), cos, sin, head_size)
        k_new = rotate_half(g, split(k3), cos, sin, head_size)
        if leak_rotary and i == 0:
            g.nodes.append(helper.make_node("Identity", [k_new], ["leaked_key"], name=g.name("leak")))
            extra.append(helper.make_tensor_value_info("leaked_key", TensorProto.FLOAT,
                                                       ["batch_size", kv_heads, "sequence_length", head_size]))
        for kv, new in (("key", k_new), ("value", split(v3))):
            g.nodes.append(helper.make_node("Concat", [past[kv], new], [present[kv]], name=g.name("cache"),
                                            axis=concat_axis if kv == "key" else 2))
        if dynamo:
            other = past_name.format(i=layers - 1, kv="value")
            k4, v4 = (_dynamo_repeat(g, present[kv], other, kv_heads, rep + wrong_repeat, heads, head_size)
                      for kv in ("key", "value"))
            root = g.const(float(np.sqrt(1.0 / np.sqrt(head_size))))
            scores = g.op("MatMul", g.op("Mul", q4, root), g.op("Mul", dynamo_key_transpose(g, k4), root))
        else:
            k4, v4 = (repeat_kv(g, present[kv], rep, heads) for kv in ("key", "value"))
            scores = g.op("Mul", g.op("MatMul", q4, g.op("Transpose", k4, perm=[0, 1, 3, 2])),
                          g.const(1.0 / np.sqrt(head_size)))
        if bias is not None:
            scores = g.op("Add", scores, bias)
        probs = g.op("Softmax", scores, axis=-1)
        if dynamo:
            probs = g.op("Where", g.op("IsNaN", probs), g.const(0.0), probs)
        context = merge_heads(g, g.op("MatMul", probs, v4), q3, hidden, out=g.name("context"))
        x = g.op("Add", x, g.op("MatMul", context, g.const(weights(rng, hidden, hidden))))
    g.nodes.append(helper.make_node("MatMul", [x, g.const(weights(rng, hidden, vocab))], ["logits"],
                                    name=g.name("lm_head")))
    return model(g, inputs, outputs + extra, opset=18 if dynamo else 17)


def feeds(proto: onnx.ModelProto, batch=2, seq=5, past=0, left_pad=(0, 2), seed=1) -> dict:
    """Prefill (past=0) or a step with ``past`` cached positions; row b has ``left_pad[b]`` pads."""
    rng = np.random.default_rng(seed)
    vocab = int(proto.graph.output[0].type.tensor_type.shape.dim[2].dim_value)
    total = past + seq
    mask = np.ones((batch, total), np.int64)
    for b, pads in enumerate(left_pad[:batch]):
        mask[b, :pads] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    positions[mask == 0] = 1
    out = {"input_ids": rng.integers(0, vocab, (batch, seq)).astype(np.int64), "attention_mask": mask,
           "position_ids": positions[:, past:].astype(np.int64)}
    for info in proto.graph.input[3:]:
        dims = [d.dim_value for d in info.type.tensor_type.shape.dim]
        out[info.name] = rng.standard_normal((batch, dims[1], past, dims[3])).astype(np.float32)
    return out
