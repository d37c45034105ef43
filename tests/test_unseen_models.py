"""Models onnxruntime runs come out of `onnxforge optimize M -o OUT -O3` running and equal,
or the command says in one line why not: one test per class of model that broke that
promise (each built with onnx.helper, run through the CLI, OUT reloaded from disk)."""
import json
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper

from onnxforge.cli import main


def _model(nodes, inputs, outputs, opset=17, ir=8, initializers=(), value_info=(), extra_opsets=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers), value_info=list(value_info))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    m.ir_version = ir
    return m


def _optimize(model, tmp_path, capsys, *extra):
    src, out, rep = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(model, src)
    before = src.read_bytes()
    code = main(["optimize", str(src), "-o", str(out), "-O3", "--report", str(rep), *extra])
    stdout, stderr = capsys.readouterr()
    assert src.read_bytes() == before
    return code, out, (json.loads(rep.read_text()) if rep.exists() else None), stdout, stderr


def _run(path_or_model, feed):
    data = path_or_model if isinstance(path_or_model, str) else path_or_model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feed)


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, list):
            assert len(x) == len(y)
            for u, v in zip(x, y):
                _assert_same([u], [v])
        elif isinstance(x, dict):
            assert x.keys() == y.keys() and all(np.isclose(x[k], y[k]) for k in x)
        else:
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ 1. the file written is what is judged


def test_ir3_default_initializer_inputs_keep_their_types(tmp_path, capsys):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", T.FLOAT, [4, 2]), helper.make_tensor_value_info("w", T.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", T.FLOAT, [4, 3])],
        opset=6, ir=3, initializers=[onnx.numpy_helper.from_array(w, "w")],
    )
    code, out, report, _, err = _optimize(model, tmp_path, capsys)
    assert code == 0, err
    written = onnx.load(out)
    assert {i.name: i.type.tensor_type.elem_type for i in written.graph.input} == {"x": T.FLOAT, "w": T.FLOAT}
    feed = {"x": np.ones((4, 2), np.float32)}
    _assert_same(_run(model, feed), _run(str(out), feed))
    assert report["verification"]["ok"] and report["verification"]["file"]


def test_a_written_file_that_fails_is_never_left_at_the_output(tmp_path, capsys, monkeypatch):
    from onnxforge import io

    real = io._write_single_file

    def corrupt(model, target):  # the save path breaks the model after the in-memory check passed
        real(model, target)
        target.write_bytes(target.read_bytes()[:-7])

    monkeypatch.setattr(io, "_write_single_file", corrupt)
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", T.FLOAT, [2])],
                   [helper.make_tensor_value_info("y", T.FLOAT, [2])])
    code, out, _, _, err = _optimize(model, tmp_path, capsys)
    assert code == 3 and err.startswith("error: the written model fails"), err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


# ------------------------------------------------------------------ 2. never loop, never leave files


def test_shape_less_output_type_is_judged_by_onnxruntime_without_a_rollback_loop(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    model = _model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Abs", ["r"], ["y"])],
        [helper.make_tensor_value_info("x", T.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", T.FLOAT, None)],  # a type without a shape: the checker refuses it
        value_info=[helper.make_tensor_value_info("r", T.FLOAT, None)],
    )
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model, full_check=True)
    code, out, report, stdout, err = _optimize(model, tmp_path, capsys)
    assert code == 0, err
    assert report["rolled_back"] == [] and "onnxruntime" in " ".join(report["warnings"])
    feed = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    _assert_same(_run(model, feed), _run(str(out), feed))
    assert [p.name for p in (tmp_path / "tmp").iterdir() if p.name != ".ses"] == []  # .ses: onnxruntime telemetry


def test_random_outputs_are_not_blamed_on_a_pass(tmp_path, capsys):
    model = _model(
        [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("RandomNormalLike", ["i"], ["y"]),
         helper.make_node("Relu", ["i"], ["z"])],
        [helper.make_tensor_value_info("x", T.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", T.FLOAT, [4, 4]), helper.make_tensor_value_info("z", T.FLOAT, [4, 4])],
    )
    code, out, report, _, err = _optimize(model, tmp_path, capsys)
    assert code == 0, err
    assert report["rolled_back"] == []
    assert any("differ between two runs of the original" in w for w in report["warnings"])


# ------------------------------------------------------------------ 3. types and opsets kept


def test_zipmap_output_keeps_its_sequence_of_maps_type(tmp_path, capsys):
    zip_type = helper.make_sequence_type_proto(helper.make_map_type_proto(T.INT64, helper.make_tensor_type_proto(T.FLOAT, [])))
    model = _model(
        [helper.make_node("Softmax", ["x"], ["p"]),
         helper.make_node("ZipMap", ["p"], ["probs"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2])],
        [helper.make_tensor_value_info("x", T.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("p", T.FLOAT, [2, 3]), helper.make_value_info("probs", zip_type)],
        extra_opsets=[helper.make_opsetid("ai.onnx.ml", 3)],
    )
    code, out, _, _, err = _optimize(model, tmp_path, capsys)
    assert code == 0, err
    written = onnx.load(out)
    assert written.graph.output[1].type == zip_type
    feed = {"x": np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)}
    _assert_same(_run(model, feed), _run(str(out), feed))
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outputs"]
    assert main(["compare", str(tmp_path / "m.onnx"), str(out)]) == 0


def test_doubled_default_opset_is_normalized_and_said(tmp_path, capsys):
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", T.FLOAT, [2])],
                   [helper.make_tensor_value_info("y", T.FLOAT, [2])], extra_opsets=[helper.make_opsetid("", 15)])
    code, out, report, _, err = _optimize(model, tmp_path, capsys)
    assert code == 0, err
    assert [(o.domain, o.version) for o in onnx.load(out).opset_import] == [("", 17)]
    assert any("more than once" in w for w in report["warnings"])


def test_optional_values_through_if(tmp_path, capsys):
    opt_type = helper.make_optional_type_proto(helper.make_tensor_type_proto(T.FLOAT, [3]))
    then_g = helper.make_graph([helper.make_node("Optional", [], ["t"], type=helper.make_tensor_type_proto(T.FLOAT, [3]))],
                               "then", [], [helper.make_value_info("t", opt_type)])
    else_g = helper.make_graph([helper.make_node("Optional", ["x"], ["e"])], "else", [], [helper.make_value_info("e", opt_type)])
    model = _model(
        [helper.make_node("If", ["c"], ["o"], then_branch=then_g, else_branch=else_g),
         helper.make_node("OptionalHasElement", ["o"], ["has"])],
        [helper.make_tensor_value_info("c", T.BOOL, []), helper.make_tensor_value_info("x", T.FLOAT, [3])],
        [helper.make_tensor_value_info("has", T.BOOL, [])], opset=18,
    )
    code, out, _, _, err = _optimize(model, tmp_path, capsys)
    assert code == 0, err
    for c in (True, False):
        feed = {"c": np.array(c), "x": np.ones(3, np.float32)}
        _assert_same(_run(model, feed), _run(str(out), feed))


# ------------------------------------------------------------------ 4. inputs that run the original


def test_a_model_that_needs_a_minimum_input_size_is_verified_numerically(tmp_path, capsys):
    w = np.random.default_rng(2).standard_normal((4, 1, 400)).astype(np.float32)
    model = _model(
        [helper.make_node("Conv", ["x", "w"], ["c"], strides=[160]), helper.make_node("Relu", ["c"], ["y"])],
        [helper.make_tensor_value_info("x", T.FLOAT, [1, 1, "samples"])],
        [helper.make_tensor_value_info("y", T.FLOAT, [1, 4, None])], initializers=[onnx.numpy_helper.from_array(w, "w")],
    )
    code, out, report, _, err = _optimize(model, tmp_path, capsys)
    assert code == 0, err
    assert report["verification"]["mode"] == "numeric" and report["verification"]["ok"]
    assert any("verification inputs: dynamic dims" in w for w in report["warnings"])
    dims = onnx.load(out).graph.input[0].type.tensor_type.shape.dim
    assert dims[2].dim_param == "samples"  # the saved model keeps its dynamic dim
    feed = {"x": np.random.default_rng(3).standard_normal((1, 1, 1600)).astype(np.float32)}
    _assert_same(_run(model, feed), _run(str(out), feed))


def test_inputs_that_cannot_be_found_fall_back_to_structural_with_one_line(tmp_path, capsys):
    shape = onnx.numpy_helper.from_array(np.array([7, 11, 13], np.int64), "shape")
    model = _model(
        [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Relu", ["r"], ["y"])],
        [helper.make_tensor_value_info("x", T.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", T.FLOAT, [7, 11, 13])], initializers=[shape],
    )
    code, out, report, _, err = _optimize(model, tmp_path, capsys)
    assert code == 0, err
    assert report["verification"]["mode"] == "structural" and report["verification"]["ok"]
    assert any("verified structurally only" in w and "--data" in w for w in report["warnings"])
    # --verify-shape gives the verifier the size without pinning the saved model
    code, out, report, _, err = _optimize(model, tmp_path, capsys, "--verify-shape", "x:1001")
    assert code == 0 and report["verification"]["mode"] == "numeric", err
    assert onnx.load(out).graph.input[0].type.tensor_type.shape.dim[0].dim_param == "n"


def test_index_shape_sequence_and_scalar_bool_inputs(tmp_path, capsys):
    model = _model(
        [helper.make_node("Gather", ["table", "idx"], ["g"]),
         helper.make_node("Reshape", ["g", "target"], ["r"]),
         helper.make_node("SequenceLength", ["seq"], ["n"]),
         helper.make_node("Cast", ["n"], ["nf"], to=T.FLOAT),
         helper.make_node("Where", ["flag", "r", "nf"], ["y"])],
        [helper.make_tensor_value_info("idx", T.INT64, [2]), helper.make_tensor_value_info("target", T.INT64, [2]),
         helper.make_tensor_sequence_value_info("seq", T.FLOAT, None), helper.make_tensor_value_info("flag", T.BOOL, [])],
        [helper.make_tensor_value_info("y", T.FLOAT, None)],
        initializers=[onnx.numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "table")],
    )
    code, out, report, _, err = _optimize(model, tmp_path, capsys)
    assert code == 0, err
    assert report["verification"]["mode"] == "numeric"
    feed = {"idx": np.array([2, 0]), "target": np.array([4, 2]), "seq": [np.ones(2, np.float32)] * 3,
            "flag": np.array(True)}
    _assert_same(_run(model, feed), _run(str(out), feed))


# ------------------------------------------------------------------ 5. bounded time on control flow


def _nested_if(depth: int) -> onnx.ModelProto:
    def body(level, sign):
        out = f"o{level}{sign}{id(object())}"
        if level == 0:
            const = helper.make_node("Constant", [], [out + "c"], value=helper.make_tensor("v", T.FLOAT, [1], [1.0 if sign == "p" else -1.0]))
            nodes = [const, helper.make_node("Add", ["x", out + "c"], [out])]
        else:
            nodes = [helper.make_node("If", ["cond"], [out], then_branch=body(level - 1, "p"), else_branch=body(level - 1, "n"))]
        return helper.make_graph(nodes, f"g{out}", [], [helper.make_tensor_value_info(out, T.FLOAT, [2])])

    top = helper.make_node("If", ["cond"], ["y"], then_branch=body(depth - 1, "p"), else_branch=body(depth - 1, "n"))
    return _model([top], [helper.make_tensor_value_info("cond", T.BOOL, []), helper.make_tensor_value_info("x", T.FLOAT, [2])],
                  [helper.make_tensor_value_info("y", T.FLOAT, [2])])


def test_nested_control_flow(tmp_path, capsys):
    model = _nested_if(4)
    code, out, report, _, err = _optimize(model, tmp_path, capsys)
    assert code == 0, err
    for c in (True, False):
        feed = {"cond": np.array(c), "x": np.array([1.0, 2.0], np.float32)}
        _assert_same(_run(model, feed), _run(str(out), feed))
