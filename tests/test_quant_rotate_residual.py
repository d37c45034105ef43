"""rotate-residual-stream: an orthogonal rotation of a decoder's residual stream, exact in float (issue 18)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.context import PassContext
from onnxforge.model import Model
from onnxforge.passes.quant.rotate_residual import HEAD_BASIS, PASS_NAME, RotateResidual, rotation

D, V, FF = 32, 40, 48


class _G:
    def __init__(self, seed=0):
        self.nodes, self.inits, self.rng, self.k = [], [], np.random.default_rng(seed), 0

    def w(self, *shape, scale=0.3, value=None):
        self.k += 1
        name = f"w{self.k}"
        value = value if value is not None else (self.rng.standard_normal(shape) * scale).astype(np.float32)
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def op(self, op, *inputs, name=None, **attrs):
        self.k += 1
        out = f"t{self.k}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=name or f"{op}_{self.k}", **attrs))
        return out

    def c(self, value):
        return self.w(value=np.asarray(value, np.float32))


def _norm(g: _G, x: str, gamma: np.ndarray | None, name: str, fused=False) -> str:
    if fused:
        return g.op("RMSNormalization", x, g.w(value=gamma), axis=-1, epsilon=1e-5, name=f"{name}/norm")
    x = g.op("Cast", x, to=TensorProto.FLOAT, name=f"{name}/Cast")
    mean = g.op("ReduceMean", g.op("Pow", x, g.c(2.0)), axes=[-1], keepdims=1)
    inv = g.op("Div", g.c(1.0), g.op("Sqrt", g.op("Add", mean, g.c(1e-5))))
    out = g.op("Cast", g.op("Mul", x, inv), to=TensorProto.FLOAT)
    return out if gamma is None else g.op("Mul", g.w(value=gamma), out, name=f"{name}/Mul_gamma")


def decoder(layers=2, tied="copy", fused=False, gamma_zero=False, writer_bias=False, odd_reader=False,
            norm_reader=None, stream_output=False) -> onnx.ModelProto:
    """A Llama-like pre-norm decoder without attention's softmax (the rotation only sees the stream):
    h = x + o(v * sigmoid(q) + k), x' = h + down(silu(gate) * up), logits = norm(x) E^T."""
    g = _G()
    gammas = lambda: (1.0 + 0.5 * g.rng.standard_normal(D)).astype(np.float32)  # noqa: E731
    table = (g.rng.standard_normal((V, D)) * 0.5).astype(np.float32)
    table[:, 3] *= 8.0  # an outlier channel
    x = g.op("Gather", g.w(value=table), "input_ids", axis=0, name="embed")
    stream_shape = g.op("Shape", x)
    for i in range(layers):
        gamma = gammas()
        if gamma_zero and i == 1:
            gamma[5] = 0.0
        n = _norm(g, x, gamma, f"l{i}/in", fused)
        q, k, v = (g.op("MatMul", n, g.w(D, D), name=f"l{i}/{p}") for p in "qkv")
        a = g.op("Add", g.op("Mul", v, g.op("Sigmoid", q)), k)
        # Shape readers of the norm and of the stream (as exporters write them) read no values
        a = g.op("Reshape", g.op("Reshape", a, g.op("Shape", n)), stream_shape)
        o = g.op("MatMul", a, g.w(D, D), name=f"l{i}/o")
        if writer_bias:
            o = g.op("Add", o, g.w(D))
        x = g.op("Add", x, o, name=f"l{i}/res1")
        n = _norm(g, x, gammas(), f"l{i}/post", fused)
        if norm_reader and i == 0:
            n = g.op(norm_reader, n)
        gate, up = (g.op("MatMul", n, g.w(D, FF), name=f"l{i}/{p}") for p in ("gate", "up"))
        hidden = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
        x = g.op("Add", x, g.op("MatMul", hidden, g.w(FF, D), name=f"l{i}/down"), name=f"l{i}/res2")
        if odd_reader and i == 0:
            x = g.op("Relu", x, name="odd")
    n = _norm(g, x, gammas(), "final", fused)
    head = {"copy": lambda: g.w(value=table.T.copy()), "transpose": lambda: g.op("Transpose", g.inits[0].name, perm=[1, 0]),
            "untied": lambda: g.w(D, V)}[tied]()
    g.nodes.append(helper.make_node("MatMul", [n, head], ["logits"], name="lm_head"))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, None, V])]
    if stream_output:
        outputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, None))
    graph = helper.make_graph(g.nodes, "decoder", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None])],
                              outputs, g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23 if fused else 17)],
                             ir_version=11 if fused else 8)


def _rotate(proto, **options):
    model = Model.from_proto(proto)
    ctx = PassContext(model=model, options={PASS_NAME: options})
    result = RotateResidual().run(model.graph, ctx)
    return model.to_proto(), result.stats, [str(r) for r in ctx.refusals]


def _logits(proto, ids):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input_ids": ids})[0]


IDS = np.array([[1, 5, 7, 39, 0, 22, 13]], np.int64)


@pytest.mark.parametrize("tied,fused,kind", [("copy", False, "hadamard"), ("transpose", False, "orthogonal"),
                                             ("untied", False, "hadamard"), ("copy", True, "hadamard")])
def test_rotation_fires_and_keeps_the_float_model(tied, fused, kind):
    proto = decoder(tied=tied, fused=fused)
    rotated, stats, refusals = _rotate(proto, kind=kind)
    assert stats == {PASS_NAME: 1} and not refusals
    onnx.checker.check_model(rotated)
    ref, out = _logits(proto, IDS), _logits(rotated, IDS)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max() * 10
    ops = [n.op_type for n in rotated.graph.node]
    basis = [n for n in rotated.graph.node if HEAD_BASIS in n.name]
    assert len(basis) == (0 if tied == "untied" else 1)
    before = [n.op_type for n in proto.graph.node]
    gamma_muls = 0 if fused else 2 * 2 + 1  # every norm's Mul by gamma is gone
    assert len(ops) == len(before) - gamma_muls + len(basis)
    inits = {i.name: numpy_helper.to_array(i) for i in rotated.graph.initializer}
    table = inits[next(n.input[0] for n in rotated.graph.node if n.op_type == "Gather")]
    original = numpy_helper.to_array(proto.graph.initializer[0])
    assert table.shape == (V, D) and np.abs(table).max() < 0.6 * np.abs(original).max()  # the outlier is spread
    if tied == "copy":  # the head still reads a copy equal to the table: quantize stores it once
        head = next(n for n in rotated.graph.node if n.name == "lm_head")
        np.testing.assert_array_equal(inits[head.input[1]].T, table)


def test_rotation_is_orthogonal_and_deterministic():
    for kind in ("hadamard", "orthogonal"):
        for d in (32, 576, 24):
            q = rotation(d, kind, 0)
            np.testing.assert_allclose(q @ q.T, np.eye(d), atol=1e-12)
            np.testing.assert_array_equal(q, rotation(d, kind, 0))
    assert not np.array_equal(rotation(32, "hadamard", 0), rotation(32, "hadamard", 1))


@pytest.mark.parametrize("build,reason,node", [
    (dict(odd_reader=True), "is read by Relu, not an RMSNorm", "odd"),
    (dict(writer_bias=True), "residual Add whose other input is not a MatMul", "l0/res1"),
    (dict(gamma_zero=True), "has 1 zero entries: it cannot be folded", "Mul_gamma"),
    (dict(norm_reader="Relu"), "is read by Relu, not a MatMul with a constant weight", "Relu"),
    (dict(stream_output=True), "is a graph output", "rotate-residual-stream"),
])
def test_rotation_refusals(build, reason, node):
    proto = decoder(**build)
    rotated, stats, refusals = _rotate(proto)
    assert not stats and len(refusals) == 1, refusals
    assert reason in refusals[0] and node in refusals[0], refusals
    np.testing.assert_array_equal(_logits(rotated, IDS), _logits(proto, IDS))  # nothing changed


def test_rotation_refuses_an_unknown_kind():
    _rotated, stats, refusals = _rotate(decoder(), kind="spiral")
    assert not stats and "unknown rotation kind 'spiral'" in refusals[0]


def test_rotation_refuses_a_shared_reader_weight():
    proto = decoder()
    q_node = next(n for n in proto.graph.node if n.name == "l0/q")
    k_node = next(n for n in proto.graph.node if n.name == "l0/k")
    k_node.input[1] = q_node.input[1]  # q and k read one weight: rotating it twice is wrong
    _rotated, stats, refusals = _rotate(proto)
    assert not stats and "is shared with other nodes" in refusals[0] and "l0/q" in refusals[0]


def test_quantize_int4_rotates_first_and_keeps_the_head_basis_float():
    from onnxforge.passes.quant.int4 import quantize_int4

    proto = decoder()
    model, report = quantize_int4(Model.from_proto(proto), None, method="rtn", block_size=16, rotate=True, check=False)
    out = model.to_proto()
    onnx.checker.check_model(out)
    ops = [n.op_type for n in out.graph.node]
    assert report.rotation.startswith("hadamard") and report.quantized == ops.count("MatMulNBits") == 2 * 7 + 1
    assert ops.count("GatherBlockQuantized") == 1 and report.tied_embeddings  # the rotated table stored once
    assert [why for key, why in report.kept_float.items()] == [
        "the residual rotation's basis change before the tied LM head (d x d, kept exact)"]
    ref, got = _logits(proto, IDS), _logits(out, IDS)
    cos = (ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
    assert cos.mean() > 0.85  # INT4 at block 16 on a random toy: a working model, not an exact one
    _m, plain = quantize_int4(Model.from_proto(decoder(odd_reader=True)), None, method="rtn", block_size=16,
                              rotate=True, check=False)
    assert plain.rotation.startswith("none: ") and "is read by Relu" in plain.rotation


def _node(proto, name):
    return next(n for n in proto.graph.node if n.name == name)


def test_rotation_refuses_a_shared_writer_weight():
    proto = decoder()
    _node(proto, "l1/o").input[1] = _node(proto, "l0/o").input[1]  # rotating one weight twice is wrong
    _rotated, stats, refusals = _rotate(proto)
    assert not stats and "with 2 readers, not float32 with 32 outputs read once" in refusals[0] and "l0/o" in refusals[0]


def test_rotation_refuses_a_norm_output_that_is_a_graph_output():
    proto = decoder()
    q = _node(proto, "l0/q")
    proto.graph.output.append(helper.make_tensor_value_info(q.input[0], TensorProto.FLOAT, None))
    _rotated, stats, refusals = _rotate(proto)
    assert not stats and f"the RMSNorm output {q.input[0]} is a graph output" in refusals[0]


def test_rotation_refuses_a_reader_weight_it_cannot_rotate():
    proto = decoder()
    name = _node(proto, "l0/k").input[1]
    init = next(i for i in proto.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), name))
    _rotated, stats, refusals = _rotate(proto)  # (not a valid model: only the refusal is looked at)
    assert not stats and f"reader weight {name} is float16 (32, 32), not float32 with 32 inputs" in refusals[0]
    assert "l0/k" in refusals[0]


def test_cli_quantize_bits4_rotate(tmp_path, capsys):
    from onnxforge.cli import main

    onnx.save(decoder(), tmp_path / "m.onnx")
    code = main(["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"), "--bits", "4", "--weight-method",
                 "rtn", "--block-size", "16", "--calib", "random", "--rotate"])
    assert code == 0 and "residual stream rotation: hadamard, seed 0" in capsys.readouterr().out
    ops = [n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node]
    assert ops.count("MatMulNBits") == 15 and ops.count("MatMul") == 1  # the head basis stays float


def test_quantize_int4_gptq_rotates_by_default_and_calibrates_the_rotated_model(tmp_path):
    from onnxforge.passes.quant.int4 import quantize_int4

    rng = np.random.default_rng(1)
    for i in range(4):
        np.savez(tmp_path / f"{i}.npz", input_ids=rng.integers(0, V, (1, 12)))
    proto = decoder()
    model, report = quantize_int4(Model.from_proto(proto), str(tmp_path), method="gptq", block_size=16)
    assert report.rotated and report.calibration_tokens == 48 and report.quantized == 15
    assert report.metrics["cosine_mean"] > 0.85  # judged against the model as given (not rotated)
    _m, off = quantize_int4(Model.from_proto(proto), str(tmp_path), method="gptq", block_size=16, rotate=False,
                            check=False)
    _m, rtn = quantize_int4(Model.from_proto(proto), None, method="rtn", block_size=16, check=False)
    assert not off.rotated and not off.rotation and not rtn.rotated  # RTN loses with it: off unless asked
