"""Small models with seeded weights, written the way real exporters write them.

``small_cnn`` looks like a TorchScript/Paddle CNN export (Conv+BatchNorm, Identity,
Dropout, Constant nodes, a Shape->Gather->Unsqueeze->Concat->Reshape flatten, a
duplicated initializer); ``small_encoder`` like a TorchScript BERT export (written
out LayerNorm, Erf GELU, attention with an additive padding mask). Used by
``onnxforge demo``, the tests and the examples; no binary fixtures needed.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def init(self, prefix: str, array) -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, prefix: str, *shape, scale: float = 0.1) -> str:
        return self.init(prefix, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def const(self, prefix: str, array) -> str:
        """A Constant node, as TorchScript exports write small constants."""
        out = self.name(prefix)
        self.nodes.append(helper.make_node("Constant", [], [out], name=out + "_node",
                                           value=numpy_helper.from_array(np.asarray(array))))
        return out

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs):
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(f"/{op_type}"), **attrs))
        return outs[0] if n_out == 1 else outs


def small_cnn(seed: int = 0, classes: int = 10) -> onnx.ModelProto:
    b = _Builder(seed)
    x = "pixel_values"

    def conv_bn_relu(inp, cin, cout, k, group=1, stride=1):
        w = b.weight("conv.weight", cout, cin // group, k, k, scale=(2.0 / (cin * k * k / group)) ** 0.5)
        y = b.op("Conv", [inp, w], kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride] * 2, group=group)
        y = b.op("BatchNormalization", [y, b.init("bn.scale", 1 + 0.1 * b.rng.standard_normal(cout).astype(np.float32)),
                                        b.init("bn.bias", 0.1 * b.rng.standard_normal(cout).astype(np.float32)),
                                        b.init("bn.mean", 0.1 * b.rng.standard_normal(cout).astype(np.float32)),
                                        b.init("bn.var", (0.5 + b.rng.random(cout)).astype(np.float32))], epsilon=1e-5)
        return b.op("Relu", [y])

    h = conv_bn_relu(x, 3, 16, 3, stride=2)
    h = b.op("Identity", [h])
    h = conv_bn_relu(h, 16, 16, 3, group=16)
    h = conv_bn_relu(h, 16, 32, 1)
    h = b.op("Dropout", [h])
    h = b.op("GlobalAveragePool", [h])
    # Flatten written as TorchScript does it: Reshape to (batch, -1) via Shape/Gather.
    shape = b.op("Shape", [h])
    batch = b.op("Gather", [shape, b.const("zero", np.array(0, dtype=np.int64))], axis=0)
    batch = b.op("Unsqueeze", [batch, b.const("axes", np.array([0], dtype=np.int64))])
    target = b.op("Concat", [batch, b.const("minus_one", np.array([-1], dtype=np.int64))], axis=0)
    h = b.op("Reshape", [h, target])
    w = b.rng.standard_normal((32, classes)).astype(np.float32) * 0.2
    h = b.op("MatMul", [h, b.init("fc.weight", w)])
    h = b.op("Add", [h, b.init("fc.bias", (0.1 * b.rng.standard_normal(classes)).astype(np.float32))])
    h = b.op("Mul", [h, b.init("logit_scale", np.array(1.0, np.float32))])
    # The same table stored twice (as exporters do for tied weights).
    extra = b.op("MatMul", [h, b.init("proj.a", np.eye(classes, dtype=np.float32))])
    extra = b.op("MatMul", [extra, b.init("proj.b", np.eye(classes, dtype=np.float32))])
    out = b.op("Softmax", [extra], axis=-1)
    graph = helper.make_graph(
        b.nodes, "small_cnn",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", classes])],
        initializer=b.inits,
    )
    graph.output[0].name = out
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxforge-demo")
    model.ir_version = 8
    return model


def _layer_norm(b: _Builder, x: str, hidden: int) -> str:
    """TorchScript's LayerNorm: ReduceMean, Sub, Pow, ReduceMean, Add eps, Sqrt, Div, Mul, Add."""
    mean = b.op("ReduceMean", [x], axes=[-1], keepdims=1)
    centered = b.op("Sub", [x, mean])
    var = b.op("ReduceMean", [b.op("Pow", [centered, b.const("two", np.array(2.0, np.float32))])], axes=[-1], keepdims=1)
    std = b.op("Sqrt", [b.op("Add", [var, b.const("eps", np.array(1e-12, np.float32))])])
    normed = b.op("Div", [centered, std])
    gamma = b.init("ln.weight", (1 + 0.1 * b.rng.standard_normal(hidden)).astype(np.float32))
    beta = b.init("ln.bias", (0.1 * b.rng.standard_normal(hidden)).astype(np.float32))
    return b.op("Add", [b.op("Mul", [normed, gamma]), beta])


def _gelu(b: _Builder, x: str) -> str:
    """Exact GELU as TorchScript writes it: x * 0.5 * (1 + erf(x / sqrt(2)))."""
    erf = b.op("Erf", [b.op("Div", [x, b.const("sqrt2", np.array(1.4142135, np.float32))])])
    return b.op("Mul", [b.op("Mul", [x, b.op("Add", [erf, b.const("one", np.array(1.0, np.float32))])]),
                        b.const("half", np.array(0.5, np.float32))])


def _linear(b: _Builder, x: str, fin: int, fout: int) -> str:
    return b.op("Add", [b.init("linear.bias", (0.02 * b.rng.standard_normal(fout)).astype(np.float32)),
                        b.op("MatMul", [x, b.weight("linear.weight", fin, fout, scale=fin ** -0.5)])])


def _heads(b: _Builder, x: str, shape_src: str, heads: int, head_dim: int) -> str:
    """(batch, seq, hidden) -> (batch, heads, seq, head_dim) with TorchScript's shape chain."""
    shape = b.op("Shape", [shape_src])
    batch = b.op("Unsqueeze", [b.op("Gather", [shape, b.const("i0", np.array(0, np.int64))], axis=0),
                               b.const("ax", np.array([0], np.int64))])
    seq = b.op("Unsqueeze", [b.op("Gather", [shape, b.const("i1", np.array(1, np.int64))], axis=0),
                             b.const("ax", np.array([0], np.int64))])
    target = b.op("Concat", [batch, seq, b.const("hd", np.array([heads, head_dim], np.int64))], axis=0)
    return b.op("Transpose", [b.op("Reshape", [x, target])], perm=[0, 2, 1, 3])


def _attention(b: _Builder, x: str, mask_bias: str, hidden: int, heads: int) -> str:
    head_dim = hidden // heads
    q = _heads(b, _linear(b, x, hidden, hidden), x, heads, head_dim)
    k = _heads(b, _linear(b, x, hidden, hidden), x, heads, head_dim)
    v = _heads(b, _linear(b, x, hidden, hidden), x, heads, head_dim)
    scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])])
    scores = b.op("Div", [scores, b.const("scale", np.array(np.sqrt(head_dim), np.float32))])
    probs = b.op("Softmax", [b.op("Add", [scores, mask_bias])], axis=-1)
    ctx = b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    shape = b.op("Shape", [x])
    bs = b.op("Slice", [shape, b.const("s0", np.array([0], np.int64)), b.const("s2", np.array([2], np.int64))])
    target = b.op("Concat", [bs, b.const("hid", np.array([hidden], np.int64))], axis=0)
    return _linear(b, b.op("Reshape", [ctx, target]), hidden, hidden)


def small_encoder(seed: int = 0, vocab: int = 1000, hidden: int = 64, heads: int = 4, layers: int = 2,
                  max_positions: int = 128) -> onnx.ModelProto:
    b = _Builder(seed)
    ids, mask = "input_ids", "attention_mask"
    emb = b.op("Gather", [b.weight("word_embeddings", vocab, hidden, scale=0.5), ids], axis=0)
    seq_len = b.op("Gather", [b.op("Shape", [ids]), b.const("i1", np.array(1, np.int64))], axis=0)
    positions = b.op("Range", [b.const("start", np.array(0, np.int64)), seq_len, b.const("delta", np.array(1, np.int64))])
    pos = b.op("Gather", [b.weight("position_embeddings", max_positions, hidden, scale=0.5), positions], axis=0)
    h = _layer_norm(b, b.op("Add", [emb, pos]), hidden)
    # Additive mask as BERT exports it: (1 - mask) * -10000, shaped (batch, 1, 1, seq).
    m = b.op("Cast", [b.op("Unsqueeze", [mask, b.const("ax12", np.array([1, 2], np.int64))])], to=TensorProto.FLOAT)
    mask_bias = b.op("Mul", [b.op("Sub", [b.const("one", np.array(1.0, np.float32)), m]),
                             b.const("neg", np.array(-10000.0, np.float32))])
    for _ in range(layers):
        h = _layer_norm(b, b.op("Add", [_attention(b, h, mask_bias, hidden, heads), h]), hidden)
        ffn = _linear(b, _gelu(b, _linear(b, h, hidden, 4 * hidden)), 4 * hidden, hidden)
        h = _layer_norm(b, b.op("Add", [ffn, h]), hidden)
    out = b.op("Identity", [h])
    graph = helper.make_graph(
        b.nodes, "small_encoder",
        [helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info(mask, TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", "sequence", hidden])],
        initializer=b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxforge-demo")
    model.ir_version = 8
    return model
