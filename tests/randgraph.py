"""A seeded generator of random, valid ONNX graphs built from the patterns real
exporters produce (and that onnxforge's passes rewrite): Identity/Dropout, Cast and
Transpose/Reshape chains, Conv+BatchNormalization, constant Add/Mul, MatMul+Add,
written-out LayerNorm/GELU/SiLU/HardSwish, Shape->Gather->Concat->Reshape flattens,
Constant nodes, duplicated initializers and dead branches."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class RandomGraph:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.n = 0
        self.channels, self.side = int(self.rng.choice([3, 4, 8])), int(self.rng.choice([4, 6, 8]))

    def fresh(self, prefix="t"):
        self.n += 1
        return f"{prefix}{self.n}"

    def init(self, array):
        name = self.fresh("w")
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def const_node(self, array):
        out = self.fresh("c")
        self.nodes.append(helper.make_node("Constant", [], [out], value=numpy_helper.from_array(np.asarray(array))))
        return out

    def op(self, op_type, inputs, **attrs):
        out = self.fresh()
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.fresh(op_type), **attrs))
        return out

    def f32(self, *shape, scale=0.5):
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    # --- 4-D (N, C, H, W) blocks -------------------------------------------------
    def conv_bn(self, x):
        c = self.channels
        k = int(self.rng.choice([1, 3]))
        inputs = [x, self.init(self.f32(c, c, k, k, scale=0.3))]
        if self.rng.random() < 0.5:
            inputs.append(self.init(self.f32(c)))
        y = self.op("Conv", inputs, kernel_shape=[k, k], pads=[k // 2] * 4)
        if self.rng.random() < 0.7:
            y = self.op("BatchNormalization", [y, self.init(1 + self.f32(c, scale=0.1)), self.init(self.f32(c, scale=0.1)),
                                               self.init(self.f32(c, scale=0.1)), self.init((0.5 + self.rng.random(c)).astype(np.float32))])
        return y

    def affine(self, x):
        c = self.channels
        shape = [1, c, 1, 1] if self.rng.random() < 0.5 else []
        const = self.f32(*shape) if shape else np.array(float(self.rng.uniform(0.5, 1.5)), np.float32)
        src = self.const_node(const) if self.rng.random() < 0.3 else self.init(const)
        return self.op(str(self.rng.choice(["Add", "Mul", "Sub"])), [x, src])

    def unary(self, x):
        return self.op(str(self.rng.choice(["Relu", "Sigmoid", "Tanh", "Abs", "Neg", "Identity", "Dropout", "Softplus"])), [x])

    def transpose_pair(self, x):
        y = self.op("Transpose", [x], perm=[0, 2, 3, 1])
        if self.rng.random() < 0.5:
            y = self.op("Relu", [y])
        return self.op("Transpose", [y], perm=[0, 3, 1, 2])

    def cast_chain(self, x):
        if self.rng.random() < 0.5:
            return self.op("Cast", [self.op("Cast", [x], to=TensorProto.DOUBLE)], to=TensorProto.FLOAT)
        return self.op("Cast", [x], to=TensorProto.FLOAT)

    def reshape_roundtrip(self, x):
        c, s = self.channels, self.side
        flat = self.op("Reshape", [x, self.init(np.array([-1, c, s * s], np.int64))])
        flat = self.op("Reshape", [flat, self.init(np.array([-1, c * s * s], np.int64))])
        return self.op("Reshape", [flat, self.init(np.array([-1, c, s, s], np.int64))])

    def zero_pad(self, x):
        return self.op("Pad", [x, self.init(np.zeros(8, np.int64))])

    def silu(self, x):
        return self.op("Mul", [x, self.op("Sigmoid", [x])])

    def hardswish(self, x):
        t = self.op("Clip", [self.op("Add", [x, self.init(np.array(3.0, np.float32))]),
                             self.init(np.array(0.0, np.float32)), self.init(np.array(6.0, np.float32))])
        return self.op("Div", [self.op("Mul", [x, t]), self.init(np.array(6.0, np.float32))])

    def residual(self, x):
        return self.op("Add", [x, self.unary(self.conv_bn(x))])

    def dead_branch(self, x):
        self.op("Exp", [self.op("Neg", [x])])  # output unused
        return x

    def duplicate_consts(self, x):
        c = self.f32(1, self.channels, 1, 1)
        return self.op("Mul", [self.op("Add", [x, self.init(c)]), self.init(c.copy())])

    # --- 3-D (N, S, F) blocks ------------------------------------------------------
    def layer_norm(self, h, f):
        mean = self.op("ReduceMean", [h], axes=[-1], keepdims=1)
        d = self.op("Sub", [h, mean])
        var = self.op("ReduceMean", [self.op("Pow", [d, self.init(np.array(2.0, np.float32))])], axes=[-1], keepdims=1)
        std = self.op("Sqrt", [self.op("Add", [var, self.init(np.array(1e-5, np.float32))])])
        return self.op("Add", [self.op("Mul", [self.op("Div", [d, std]), self.init(1 + self.f32(f, scale=0.1))]),
                               self.init(self.f32(f, scale=0.1))])

    def gelu(self, h):
        e = self.op("Erf", [self.op("Div", [h, self.init(np.array(1.4142135, np.float32))])])
        return self.op("Mul", [self.op("Mul", [h, self.op("Add", [e, self.init(np.array(1.0, np.float32))])]),
                               self.init(np.array(0.5, np.float32))])

    def dense(self, h, fin, fout):
        y = self.op("MatMul", [h, self.init(self.f32(fin, fout, scale=fin ** -0.5))])
        return self.op("Add", [y, self.init(self.f32(fout, scale=0.1))])

    def build(self) -> onnx.ModelProto:
        x = "x"
        blocks = [self.conv_bn, self.affine, self.unary, self.transpose_pair, self.cast_chain, self.reshape_roundtrip,
                  self.zero_pad, self.silu, self.hardswish, self.residual, self.dead_branch, self.duplicate_consts]
        h = x
        for _ in range(int(self.rng.integers(3, 9))):
            h = blocks[int(self.rng.integers(len(blocks)))](h)
        outputs = [(h, ["batch", self.channels, self.side, self.side])]
        if self.rng.random() < 0.6:  # a transformer-like head on (N, C, H*W)
            c, f = self.channels, self.side * self.side
            shape = self.op("Shape", [h])
            batch = self.op("Unsqueeze", [self.op("Gather", [shape, self.const_node(np.array(0, np.int64))], axis=0),
                                          self.const_node(np.array([0], np.int64))])
            target = self.op("Concat", [batch, self.const_node(np.array([c, f], np.int64))], axis=0)
            t = self.op("Reshape", [h, target])
            t = self.layer_norm(t, f)
            t = self.dense(self.gelu(self.dense(t, f, 2 * f)), 2 * f, f)
            t = self.op("Softmax", [self.layer_norm(t, f)], axis=-1)
            outputs.append((t, ["batch", c, f]))
        graph = helper.make_graph(
            self.nodes, f"random_{self.n}",
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", self.channels, self.side, self.side])],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
            initializer=self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model


def random_model(seed: int) -> onnx.ModelProto:
    return RandomGraph(seed).build()
