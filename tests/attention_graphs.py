"""Small self-attention graphs written the way each exporter writes them (onnx.helper, no fixtures).

Every builder takes X float [B, S, H*D] (dynamic B and S) and, when ``mask`` is set, an
int64 attention_mask [B, S] turned into the additive mask Where(keep, 0, finfo.min) as
HF models do. Options switch single details so each refusal can be provoked.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F32_MIN = float(np.finfo(np.float32).min)


class G:
    """A tiny graph writer: ``g.op("MatMul", a, b)`` returns the output name."""

    def __init__(self, prefix: str = ""):
        self.nodes, self.inits, self.count, self.prefix = [], [], 0, prefix

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{self.prefix}{hint}_{self.count}"

    def const(self, value, dtype=np.float32, hint="c") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def ints(self, *values) -> str:
        return self.const(list(values), np.int64, "i")

    def op(self, op: str, *inputs, outputs: int = 1, domain: str = "", **attrs):
        outs = [self.name(op.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.name(op), domain=domain, **attrs))
        return outs[0] if outputs == 1 else outs

    def dim(self, tensor: str, axis: int) -> str:
        """Unsqueeze(Gather(Shape(t), axis)) as TorchScript writes it."""
        gathered = self.op("Gather", self.op("Shape", tensor), self.const(axis, np.int64), axis=0)
        return self.op("Unsqueeze", gathered, self.ints(0))


def weights(rng, rows, cols, scale=0.3):
    return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)


def model(g: G, inputs, outputs, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, "attention", inputs, outputs, initializer=g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(proto)
    return proto


def x_input(hidden: int):
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", hidden])


def mask_input():
    return helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])


def y_output(name="y", rank=3):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"{name}_d{i}" for i in range(rank)])


def padding_bias(g: G, causal: bool = False) -> str:
    """Additive mask [B, 1, 1|S, S] = Where(keep, 0, min) with keep = mask (& causal)."""
    keep = g.op("Cast", g.op("Unsqueeze", "attention_mask", g.ints(1, 2)), to=TensorProto.BOOL)
    if causal:
        length = g.op("Gather", g.op("Shape", "attention_mask"), g.const(1, np.int64), axis=0)
        pos = g.op("Range", g.const(0, np.int64), length, g.const(1, np.int64))
        rows = g.op("Unsqueeze", pos, g.ints(1))
        cols = g.op("Unsqueeze", pos, g.ints(0))
        keep = g.op("And", keep, g.op("LessOrEqual", cols, rows))
    return g.op("Where", keep, g.const(0.0), g.const(F32_MIN))


def split_heads(g: G, x3: str, heads, head_size, perm=(0, 2, 1, 3), shape=None) -> str:
    shape = shape or g.op("Concat", g.dim(x3, 0), g.dim(x3, 1), g.ints(heads), g.ints(head_size), axis=0)
    return g.op("Transpose", g.op("Reshape", x3, shape), perm=list(perm))


def merge_heads(g: G, context: str, ref: str, hidden, out="y", rank3=True) -> str:
    moved = g.op("Transpose", context, perm=[0, 2, 1, 3])
    if rank3:
        shape = g.op("Concat", g.dim(ref, 0), g.dim(ref, 1), g.ints(hidden), axis=0)
    else:
        shape = g.op("Concat", g.dim(ref, 0), g.ints(-1), axis=0)  # [B, S*N*D]: heads not merged back
    g.nodes.append(helper.make_node("Reshape", [moved, shape], [out], name=g.name("merge")))
    return out


def projection(g: G, rng, x: str, hidden: int, out: int, bias: bool = True) -> str:
    y = g.op("MatMul", x, g.const(weights(rng, hidden, out)))
    return g.op("Add", y, g.const(rng.standard_normal(out).astype(np.float32) * 0.1)) if bias else y


def bert(heads=2, head_size=4, mask=True, k_perm="direct", heads_entry=None, softmax_axis=-1,
         scale_input=False, q_scale=None, swap_batch=False, merge_rank3=True, probs_output=False,
         cast_fp16=False, seed=0) -> onnx.ModelProto:
    """TorchScript BERT/ViT/Whisper self-attention (separate Q, K, V projections)."""
    rng = np.random.default_rng(seed)
    hidden = heads * head_size
    g = G()
    q3 = projection(g, rng, "x", hidden, hidden)
    if q_scale is not None:  # Whisper scales the projected query
        q3 = g.op("Mul", q3, g.const(q_scale))
    k3 = projection(g, rng, "x", hidden, hidden, bias=False)
    v3 = projection(g, rng, "x", hidden, hidden)
    entry = heads if heads_entry is None else heads_entry
    q_shape = None
    if swap_batch:
        q_shape = g.op("Concat", g.dim(q3, 1), g.dim(q3, 0), g.ints(entry), g.ints(head_size), axis=0)
    elif entry == "input":
        q_shape = "q_shape"
    q4 = split_heads(g, q3, entry, head_size, shape=q_shape)
    if k_perm == "direct":
        kt = split_heads(g, k3, entry if entry != "input" else heads, head_size, perm=(0, 2, 3, 1))
    else:
        kt = g.op("Transpose", split_heads(g, k3, heads, head_size), perm=[0, 1, 3, 2])
    v4 = split_heads(g, v3, heads, head_size)
    scores = g.op("MatMul", q4, kt)
    factor = "scale" if scale_input else g.const(1.0 / np.sqrt(head_size))
    scores = g.op("Div" if scale_input else "Mul", scores, factor)
    if mask:
        scores = g.op("Add", scores, padding_bias(g))
    probs_name = "probs" if probs_output else g.name("softmax")
    g.nodes.append(helper.make_node("Softmax", [scores], [probs_name], name=g.name("Softmax"), axis=softmax_axis))
    probs = probs_name
    if cast_fp16:
        probs = g.op("Cast", g.op("Cast", probs, to=TensorProto.FLOAT16), to=TensorProto.FLOAT)
    merge_heads(g, g.op("MatMul", probs, v4), q3, hidden, rank3=merge_rank3)
    inputs = [x_input(hidden)] + ([mask_input()] if mask else [])
    if scale_input:
        inputs.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, []))
    if entry == "input":
        inputs.append(helper.make_tensor_value_info("q_shape", TensorProto.INT64, [4]))
    outputs = [y_output(rank=3 if merge_rank3 else 2)] + ([y_output("probs", 4)] if probs_output else [])
    return model(g, inputs, outputs)


def gpt2(heads=2, head_size=4, seed=0) -> onnx.ModelProto:
    """GPT-2 (TorchScript): packed Conv1D projection split into Q, K, V; causal + padding mask."""
    rng = np.random.default_rng(seed)
    hidden = heads * head_size
    g = G()
    flat = g.op("Reshape", "x", g.ints(-1, hidden))
    packed = g.op("Gemm", flat, g.const(weights(rng, hidden, 3 * hidden)),
                  g.const(rng.standard_normal(3 * hidden).astype(np.float32) * 0.1))
    packed = g.op("Reshape", packed, g.op("Concat", g.dim("x", 0), g.dim("x", 1), g.ints(3 * hidden), axis=0))
    q3, k3, v3 = g.op("Split", packed, g.ints(hidden, hidden, hidden), outputs=3, axis=2)
    q4 = split_heads(g, q3, -1, head_size)
    kt = split_heads(g, k3, -1, head_size, perm=(0, 2, 3, 1))
    v4 = split_heads(g, v3, -1, head_size)
    scores = g.op("Mul", g.op("MatMul", q4, kt), g.const(1.0 / np.sqrt(head_size)))
    probs = g.op("Softmax", g.op("Add", scores, padding_bias(g, causal=True)), axis=-1)
    merge_heads(g, g.op("MatMul", probs, v4), q3, hidden)
    return model(g, [x_input(hidden), mask_input()], [y_output()])


def dynamo_key_transpose(g: G, k4: str) -> str:
    """K^T as dynamo writes it: Reshape(Transpose(Reshape(K, [-1, T, D]), [0, 2, 1]), [..., D, T])."""
    k_shape = g.op("Shape", k4, start=0)
    last = g.op("Slice", k_shape, g.ints(-1), g.ints(np.iinfo(np.int64).max))
    second = g.op("Slice", k_shape, g.ints(-2), g.ints(-1))
    lead = g.op("Slice", k_shape, g.ints(np.iinfo(np.int64).min), g.ints(-2))
    flat = g.op("Reshape", k4, g.op("Concat", g.ints(-1), second, last, axis=0))
    return g.op("Reshape", g.op("Transpose", flat, perm=[0, 2, 1]), g.op("Concat", lead, last, second, axis=0))


def sdpa(heads=2, head_size=4, mask_from_input=False, seed=0) -> onnx.ModelProto:
    """torch.onnx dynamo: sqrt(scale) on Q and K, K^T through Reshape/Transpose/Reshape, NaN guard."""
    rng = np.random.default_rng(seed)
    hidden = heads * head_size
    g = G()
    root = float(np.sqrt(1.0 / np.sqrt(head_size)))
    q3, k3, v3 = (projection(g, rng, "x", hidden, hidden) for _ in range(3))

    def heads_of(x3):
        shape = g.op("Concat", g.op("Shape", x3, start=0, end=1), g.op("Shape", x3, start=1, end=2),
                     g.ints(-1), g.ints(head_size), axis=0)
        return g.op("Transpose", g.op("Reshape", x3, shape, allowzero=1), perm=[0, 2, 1, 3])

    q4, k4, v4 = heads_of(q3), heads_of(k3), heads_of(v3)
    qs = g.op("Mul", q4, g.const(root))
    ks = g.op("Mul", dynamo_key_transpose(g, k4), g.const(root))
    scores = g.op("MatMul", qs, ks)
    bias = "float_mask" if mask_from_input else padding_bias(g)
    probs = g.op("Softmax", g.op("Add", scores, bias), axis=-1)
    guarded = g.op("Where", g.op("IsNaN", probs), g.const(0.0), probs)
    merge_heads(g, g.op("MatMul", guarded, v4), q3, hidden)
    extra = [helper.make_tensor_value_info("float_mask", TensorProto.FLOAT, ["batch", 1, 1, "sequence"])] \
        if mask_from_input else [mask_input()]
    return model(g, [x_input(hidden)] + extra, [y_output()], opset=18)


def rotate_half(g: G, x4: str, cos: str, sin: str, head_size: int, dynamic_half=True, half_offset=0) -> str:
    """x4 * cos + Concat(-x4[..., D/2:], x4[..., :D/2]) * sin, with D/2 read from Shape(x4) like TorchScript."""
    if dynamic_half:
        d = g.op("Gather", g.op("Shape", x4), g.const(3, np.int64), axis=0)
        half = g.op("Unsqueeze", g.op("Cast", g.op("Div", d, g.const(2, np.int64)), to=TensorProto.INT64),
                    g.ints(0))
    else:
        half = g.ints(head_size // 2)
    if half_offset:
        half = g.op("Add", half, g.ints(half_offset))
    first = g.op("Slice", x4, g.ints(0), half, g.ints(3), g.ints(1))
    second = g.op("Slice", x4, half, g.ints(np.iinfo(np.int64).max), g.ints(3), g.ints(1))
    rotated = g.op("Concat", g.op("Neg", second), first, axis=-1)
    return g.op("Add", g.op("Mul", x4, cos), g.op("Mul", rotated, sin))


def repeat_kv(g: G, x4: str, rep: int, heads: int) -> str:
    """HF repeat_kv: Reshape(Expand(Unsqueeze(x4, 2), [B, Nkv, r, T, D]), [B, N, T, D])."""
    up = g.op("Unsqueeze", x4, g.ints(2))
    target = g.op("Concat", g.dim(x4, 0), g.dim(x4, 1), g.ints(rep), g.dim(x4, 2), g.dim(x4, 3), axis=0)
    wide = g.op("Expand", up, target)
    merged = g.op("Concat", g.dim(x4, 0), g.ints(heads), g.dim(x4, 2), g.dim(x4, 3), axis=0)
    return g.op("Reshape", wide, merged)


def llama(heads=4, kv_heads=2, head_size=8, dynamic_half=True, half_offset=0, unequal_cos=False,
          seed=0) -> onnx.ModelProto:
    """Llama (TorchScript): rotate_half rotary on Q and K, repeat_kv, causal + padding mask."""
    rng = np.random.default_rng(seed)
    hidden, kv_hidden, rep = heads * head_size, kv_heads * head_size, heads // kv_heads
    g = G()
    # rotary tables [1, S, D] from positions 0..S-1 as HF computes them
    length = g.op("Gather", g.op("Shape", "x"), g.const(1, np.int64), axis=0)
    pos = g.op("Cast", g.op("Range", g.const(0, np.int64), length, g.const(1, np.int64)), to=TensorProto.FLOAT)
    inv_freq = (1.0 / (10000 ** (np.arange(0, head_size, 2) / head_size))).astype(np.float32)
    freqs = g.op("Mul", g.op("Unsqueeze", g.op("Unsqueeze", pos, g.ints(0)), g.ints(2)), g.const(inv_freq))
    other = g.op("Mul", freqs, g.const(1.5)) if unequal_cos else freqs
    emb = g.op("Concat", freqs, other, axis=-1)
    cos = g.op("Unsqueeze", g.op("Mul", g.op("Cos", emb), g.const(1.0)), g.ints(1))
    sin = g.op("Unsqueeze", g.op("Mul", g.op("Sin", emb), g.const(1.0)), g.ints(1))

    q3 = projection(g, rng, "x", hidden, hidden, bias=False)
    k3 = projection(g, rng, "x", hidden, kv_hidden, bias=False)
    v3 = projection(g, rng, "x", hidden, kv_hidden, bias=False)

    def rotate(x4):
        return rotate_half(g, x4, cos, sin, head_size, dynamic_half, half_offset)

    q4 = rotate(split_heads(g, q3, -1, head_size))
    k4 = repeat_kv(g, rotate(split_heads(g, k3, -1, head_size)), rep, heads)
    v4 = repeat_kv(g, split_heads(g, v3, -1, head_size), rep, heads)
    scores = g.op("Mul", g.op("MatMul", q4, g.op("Transpose", k4, perm=[0, 1, 3, 2])),
                  g.const(1.0 / np.sqrt(head_size)))
    probs = g.op("Softmax", g.op("Add", scores, padding_bias(g, causal=True)), axis=-1)
    merge_heads(g, g.op("MatMul", probs, v4), q3, hidden)
    return model(g, [x_input(hidden), mask_input()], [y_output()])


def feeds(hidden: int, batch=2, seq=6, seed=1, mask: str | None = "ones") -> dict:
    rng = np.random.default_rng(seed)
    out = {"x": rng.standard_normal((batch, seq, hidden)).astype(np.float32)}
    if mask is not None:
        m = np.ones((batch, seq), np.int64)
        if mask == "left":
            m[0, :2] = 0
            m[1, :1] = 0
        elif mask == "holey":
            m[0, 2:4] = 0
            m[1, 1] = 0
        out["attention_mask"] = m
    return out
