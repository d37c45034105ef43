"""``onnxforge quantize`` / ``convert-fp16`` through the CLI on models that used to
fail: reused int8 weights on CPUs with and without VNNI, If branches and float-only
contrib ops under fp16, duplicated default-domain opset entries."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.cli import main
from onnxforge.passes.quant import formats


def _calib(folder, feeds: list[dict]) -> str:
    folder.mkdir(exist_ok=True)
    for i, feed in enumerate(feeds):
        np.savez(folder / f"{i}.npz", **feed)
    return str(folder)


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _inits(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


# ------------------------------------------------------------------ A: reused int8 weights, VNNI or not


def _weight_only_model() -> onnx.ModelProto:
    """x[2,4] @ (Cast(wq int8, full range) * 0.02): test_quant's model, another seed."""
    from test_quant import _weight_only_model as build

    return build(seed=3)


def test_quantize_cli_reuses_int8_weights_on_this_cpu(tmp_path, capsys):
    model = _weight_only_model()
    onnx.save(model, tmp_path / "w.onnx")
    rng = np.random.default_rng(0)
    calib = _calib(tmp_path / "calib", [{"x": np.abs(rng.standard_normal((2, 4))).astype(np.float32) * 3} for _ in range(4)])
    code, out, err = _run(["quantize", str(tmp_path / "w.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib", calib,
                           "--no-latency", "--report", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["int8_nodes"] == ["matmul"] and not report["float_nodes"] and report["score"] > 0.999
    proto = onnx.load(tmp_path / "q.onnx")
    node = next(n for n in proto.graph.node if n.op_type == "DynamicQuantizeMatMul")
    inits = _inits(proto)
    stored, zero = inits[node.input[1]], inits[node.input[3]]
    original = numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_array_equal(stored.astype(np.int32) - zero.astype(np.int32), original)
    if formats.cpu_has_vnni():
        assert stored.dtype == np.int8 and not zero.any()
    else:
        assert stored.dtype == np.uint8 and (zero == 128).all() and "no VNNI" in out


# ------------------------------------------------------------------ B: convert-fp16 on If bodies and float-only contrib ops


def _vi(name: str, shape=(2, 3)) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _if_model() -> onnx.ModelProto:
    """a = x * w (float16-able) is read inside both branches of an If, next to the
    branches' own float initializer and Constant; the else branch nests another If
    reading the outer x and a. The If's output feeds float16-able nodes again."""
    then = helper.make_graph([helper.make_node("Add", ["a", "c_then"], ["t_out"], name="then_add")], "then", [],
                             [_vi("t_out")], [numpy_helper.from_array(np.full((2, 3), 0.5, np.float32), "c_then")])
    inner_then = helper.make_graph([helper.make_node("Sub", ["a", "x"], ["n_out"], name="inner_sub")], "inner_then", [], [_vi("n_out")])
    inner_else = helper.make_graph([helper.make_node("Mul", ["a", "w"], ["m_out"], name="inner_mul")], "inner_else", [], [_vi("m_out")])
    els = helper.make_graph([
        helper.make_node("Constant", [], ["c_else"], name="else_const", value=numpy_helper.from_array(np.full(3, 2.0, np.float32))),
        helper.make_node("Mul", ["a", "c_else"], ["e_mid"], name="else_mul"),
        helper.make_node("If", ["cond"], ["e_if"], name="inner_if", then_branch=inner_then, else_branch=inner_else),
        helper.make_node("Add", ["e_mid", "e_if"], ["e_out"], name="else_add"),
    ], "else", [], [_vi("e_out")])
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["a"], name="mul"),
        helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["i_out"], name="if", then_branch=then, else_branch=els),
        helper.make_node("Relu", ["i_out"], ["r"], name="relu"),
        helper.make_node("Add", ["r", "a"], ["y"], name="add"),
    ]
    graph = helper.make_graph(nodes, "g", [_vi("x")], [_vi("y")], [
        numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3) / 3, "w"),
        numpy_helper.from_array(np.array(0, np.float32), "zero")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _max_rel_error(original: str, converted: str, feeds: list[dict], fp16_inputs: bool = False) -> float:
    import onnxruntime as ort

    a = ort.InferenceSession(original, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(converted, providers=["CPUExecutionProvider"])
    worst = 0.0
    for feed in feeds:
        ya = a.run(None, feed)[0]
        yb = b.run(None, {k: v.astype(np.float16) if fp16_inputs else v for k, v in feed.items()})[0].astype(np.float32)
        worst = max(worst, float(np.abs(ya - yb).max() / np.abs(ya).max()))
    return worst


@pytest.mark.parametrize("extra", [[], ["--fp16-io"], ["--calib", "CALIB"]])
def test_convert_fp16_cli_if_bodies_read_float32(tmp_path, capsys, extra):
    onnx.save(_if_model(), tmp_path / "if.onnx")
    rng = np.random.default_rng(0)
    feeds = [{"x": (np.abs(rng.standard_normal((2, 3))) * sign).astype(np.float32)} for sign in (1, -1, 1, -1)]
    extra = [_calib(tmp_path / "calib", feeds) if a == "CALIB" else a for a in extra]
    code, out, err = _run(["convert-fp16", str(tmp_path / "if.onnx"), "-o", str(tmp_path / "h.onnx"),
                           "--report", str(tmp_path / "r.json"), *extra], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["float32_nodes"]) == {"if"} and "subgraph" in report["float32_nodes"]["if"]
    converted = onnx.load(tmp_path / "h.onnx")
    assert {t.data_type for t in converted.graph.initializer} >= {TensorProto.FLOAT16}  # the rest did convert
    # both branches (sum > 0 and < 0) within fp16 rounding of the float32 model
    assert _max_rel_error(str(tmp_path / "if.onnx"), str(tmp_path / "h.onnx"), feeds, "--fp16-io" in extra) < 2e-3


def _lstm_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    hidden, size = 8, 4
    nodes = [
        helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y", "Yh"], name="lstm", hidden_size=hidden),
        helper.make_node("Squeeze", ["Yh", "axes"], ["h"], name="squeeze"),
        helper.make_node("MatMul", ["h", "wo"], ["y"], name="head"),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, size)).astype(np.float32) * 0.3, "W"),
        numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32) * 0.3, "R"),
        numpy_helper.from_array(np.zeros((1, 8 * hidden), np.float32), "B"),
        numpy_helper.from_array(np.array([0], np.int64), "axes"),
        numpy_helper.from_array(rng.standard_normal((hidden, 3)).astype(np.float32), "wo"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_convert_fp16_cli_keeps_float_only_contrib_ops_float32(tmp_path, capsys):
    """DynamicQuantizeLSTM (com.microsoft) takes float X only: it stays float32 with the
    reason, the nodes around it convert; `quantize` refuses the model (already quantized)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx.save(_lstm_model(), tmp_path / "lstm.onnx")
    quantize_dynamic(str(tmp_path / "lstm.onnx"), str(tmp_path / "q.onnx"), op_types_to_quantize=["LSTM"],
                     weight_type=QuantType.QInt8)
    assert any(n.op_type == "DynamicQuantizeLSTM" for n in onnx.load(tmp_path / "q.onnx").graph.node)
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((5, 1, 4)).astype(np.float32)} for _ in range(3)]
    calib = _calib(tmp_path / "calib", feeds)
    code, _, err = _run(["quantize", str(tmp_path / "q.onnx"), "-o", str(tmp_path / "qq.onnx"), "--calib", calib], capsys)
    assert code == 2 and "already quantized" in err
    code, out, err = _run(["convert-fp16", str(tmp_path / "q.onnx"), "-o", str(tmp_path / "h.onnx"), "--calib", calib,
                           "--report", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    (name, why), = report["float32_nodes"].items()
    assert "com.microsoft.DynamicQuantizeLSTM" in why and "takes no float16" in why and why in out
    converted = onnx.load(tmp_path / "h.onnx")
    head = next(n for n in converted.graph.node if n.op_type == "MatMul")
    assert TensorProto.FLOAT16 in {t.data_type for t in converted.graph.initializer if t.name in head.input}
    assert _max_rel_error(str(tmp_path / "q.onnx"), str(tmp_path / "h.onnx"), feeds) < 2e-3


# ------------------------------------------------------------------ C: the default domain listed twice (skl2onnx 1.20)


def _conv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
        [numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w1"),
         numpy_helper.from_array(np.zeros(8, np.float32), "b1"),
         numpy_helper.from_array(rng.standard_normal((8, 8, 1, 1)).astype(np.float32) * 0.1, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _matmul_model() -> onnx.ModelProto:
    w = np.random.default_rng(6).standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _doubled(model: onnx.ModelProto, domain: str) -> onnx.ModelProto:
    model.opset_import.append(helper.make_opsetid(domain, 17))
    return model


def _default_entries(model: onnx.ModelProto) -> list[tuple[str, int]]:
    return [(o.domain, o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")]


@pytest.mark.parametrize("loader_merges", [True, False])
@pytest.mark.parametrize("domain", ["", "ai.onnx"])
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_quantize_cli_default_domain_listed_twice(tmp_path, capsys, monkeypatch, domain, mode, loader_merges):
    if not loader_merges:  # quantize's own paths, as if the loader kept both entries
        monkeypatch.setattr("onnxforge.model._dedupe_opsets", lambda _model: None, raising=False)
    model = _conv_model() if mode == "static" else _matmul_model()
    onnx.save(_doubled(model, domain), tmp_path / "m.onnx")  # no checker: as skl2onnx writes it
    rng = np.random.default_rng(2)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    calib = _calib(tmp_path / "calib", [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(4)])
    code, _, err = _run(["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib", calib,
                         "--mode", mode, "--no-latency", "--report", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    quantized = onnx.load(tmp_path / "q.onnx")
    assert _default_entries(quantized) == [("", 17)]
    assert json.loads((tmp_path / "r.json").read_text())["int8_nodes"]
    import onnxruntime as ort

    ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("domain", ["", "ai.onnx"])
def test_quant_paths_take_the_default_domain_listed_twice(domain):
    """The quant code's own ModelProto paths, whatever the loader did: onnxruntime's
    quantizers (static and dynamic), its offline rewrite, the int8-weight reuse."""
    from onnxforge.passes.quant.detect import detect, int8_weights_to_dynamic_matmul
    from onnxforge.passes.quant.prepare import ort_offline
    from onnxforge.passes.quant.quantize import quantize

    model = _doubled(_conv_model(), domain)
    spec = formats.spec_for("cpu", model, vnni=True)
    ranges = {name: (-4.0, 4.0) for name in ("x", "c1", "r1", "y")}
    assert _default_entries(formats.static_qdq(model, ranges, spec)) == [("", 17)]
    dynamic = formats.dynamic_matmul(_doubled(_matmul_model(), domain), spec)
    assert _default_entries(dynamic) == [("", 17)] and any(n.op_type != "MatMul" for n in dynamic.graph.node)
    assert _default_entries(ort_offline(model)) == [("", 17)]
    reused = _doubled(_weight_only_model(), domain)
    rewritten, names = int8_weights_to_dynamic_matmul(reused, detect(reused))
    assert names and _default_entries(rewritten) == [("", 17)]
    out, report = quantize(reused, [{"x": np.ones((2, 4), np.float32)}], measure_latency=False, log=lambda _m: None)
    assert _default_entries(out.to_proto()) == [("", 17)] and report.int8_nodes == ["matmul"]
    assert len(model.opset_import) == 2  # the caller's proto is left as it was


# ------------------------------------------------------------------ contrib ops before a quantized bias


def _contrib_then_gemm_model() -> onnx.ModelProto:
    """x[4,16] -> Gemm(w1, b1) -> com.microsoft FastGelu -> Gemm(w2, b2): onnx's shape
    inference gives FastGelu's output no type, as in an -O3 output (magika_v3_3)."""
    rng = np.random.default_rng(7)
    w1, w2 = (rng.normal(0, 0.3, (16, 16)).astype(np.float32) for _ in range(2))
    b1, b2 = (rng.normal(0, 0.1, 16).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
         helper.make_node("FastGelu", ["h"], ["g"], domain="com.microsoft"),
         helper.make_node("Gemm", ["g", "w2", "b2"], ["y"])],
        "contrib_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_shape_inference_types_contrib_outputs():
    from onnxforge.passes.quant.ortsession import infer_shapes

    inferred = infer_shapes(_contrib_then_gemm_model())
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    assert types.get("g") == TensorProto.FLOAT  # onnx alone leaves it untyped


def test_static_quantize_after_a_contrib_op_quantizes_its_reader(tmp_path, capsys):
    """The second Gemm's bias needs g's scale: before, onnxruntime's QDQ quantizer skipped
    the untyped g and quantize ended in an internal error (exit 1)."""
    path = tmp_path / "m.onnx"
    onnx.save(_contrib_then_gemm_model(), path)
    rng = np.random.default_rng(3)
    calib = _calib(tmp_path / "calib", [{"x": rng.normal(size=(4, 16)).astype(np.float32)} for _ in range(8)])
    out = tmp_path / "q.onnx"
    code, _, err = _run(["quantize", str(path), "-o", str(out), "--provider", "cpu", "--calib", calib,
                         "--mode", "static", "--no-latency", "--max-drop", "0.5"], capsys)
    assert code == 0, err
    quantized = onnx.load(out)
    readers_of_g = [n for n in quantized.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "g"]
    assert readers_of_g, [n.op_type for n in quantized.graph.node]


def _seven_wide_model() -> onnx.ModelProto:
    """x [n, k] @ W [7, 16]: k must be 7, a size no made-up try uses (1..4, 8, 16, ... 16000)."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((7, 16)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "k"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("command", [["quantize", "--calib", "random", "--no-latency"],
                                     ["convert-fp16", "--calib", "random"]])
def test_input_shape_reaches_random_calibration_and_every_check(tmp_path, capsys, command):
    """The model runs at k = 7 only: with --input-shape x:2x7 made-up calibration, the verification and the
    written-file check all run there and the output keeps the pinned shape; without it the command says
    in one line that no made-up inputs run the model (exit 2)."""
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(_seven_wide_model(), src)
    code, _, err = _run([command[0], str(src), "-o", str(out), *command[1:]], capsys)
    assert code == 2 and "no made-up inputs run the model" in err and not out.exists()
    code, _, err = _run([command[0], str(src), "-o", str(out), *command[1:], "--input-shape", "x:2x7"], capsys)
    assert code == 0, err
    dims = [d.dim_value for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 7]
    code, _, err = _run([command[0], str(src), "-o", str(out), *command[1:], "--input-shape", "y:2x7"], capsys)
    assert code == 2 and err.startswith("error: --input-shape names y, which the model does not have")


def test_input_shape_with_bits_auto_is_refused_in_one_line(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(_seven_wide_model(), src)
    code, _, err = _run(["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--bits", "auto", "--calib", "random",
                         "--input-shape", "x:2x7"], capsys)
    assert code == 2 and err.splitlines()[0] == "error: --input-shape cannot be combined with --bits auto"


@pytest.mark.parametrize("step", ['step = "quantize"\ncalibration = "random"\nmeasure_latency = false',
                                  'step = "fp16"\ncalibration = "random"'])
def test_recipe_input_shapes_reach_a_random_calibration(tmp_path, capsys, step):
    """A recipe's input_shapes pin the model before its first step, as --input-shape does."""
    src, out, recipe = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "r.toml"
    onnx.save(_seven_wide_model(), src)
    recipe.write_text(f'version = 1\nprovider = "cpu"\ninput_shapes = {{ x = [2, 7] }}\n[[steps]]\n{step}\n')
    code, _, err = _run(["run", str(recipe), str(src), "-o", str(out), "--no-cache"], capsys)
    assert code == 0, err
    assert [d.dim_value for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim] == [2, 7]


def test_keep_float_and_keep_int8_if_slower_together_are_refused(tmp_path, capsys):
    """Contradicting options: one line, exit 2, before any work (one used to win silently)."""
    src = tmp_path / "m.onnx"
    onnx.save(_seven_wide_model(), src)
    code, _, err = _run(["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--calib", "random",
                         "--keep-float-if-slower", "--keep-int8-if-slower"], capsys)
    assert code == 2 and err.startswith("error: argument --keep-int8-if-slower: not allowed with argument "
                                        "--keep-float-if-slower")
    assert not (tmp_path / "q.onnx").exists()
