"""Quantizing models whose weights live in external data files, and models too large
to serialize in one protobuf (passes/quant/ortsession.py)."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from test_quant import _conv_model, _feeds

from onnxforge.passes.quant import ortsession
from onnxforge.passes.quant.quantize import quantize


def _int8_weights(model: onnx.ModelProto) -> int:
    return sum(1 for t in model.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) >= 2)  # not zero points


@pytest.mark.parametrize("channels", [8, 64])  # 64: weights stay on disk through -O2 (streamed baseline)
def test_quantize_a_model_with_external_data_from_another_directory(tmp_path, monkeypatch, channels):
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "conv.onnx"
    onnx.save_model(_conv_model(channels), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="conv.onnx.data", size_threshold=0)
    monkeypatch.chdir(tmp_path)  # relative data paths must resolve against the model, not the cwd
    if channels == 64:  # the streamed baseline: graphsurgeon never folds loaded weights
        from onnxforge.passes.quant import prepare

        monkeypatch.setattr(prepare, "lower_constants", lambda *_a: (_ for _ in ()).throw(AssertionError("loaded")))
    out, report = quantize(str(path), _feeds(4), measure_latency=False, log=lambda _m: None)
    proto = out.to_proto()
    assert _int8_weights(proto) == 2 and not ortsession.has_external_data(proto)
    assert report.score > 0.99


def test_random_calibration_of_a_model_with_external_data_from_another_directory(tmp_path, monkeypatch):
    """Made-up feeds are tried on the loaded model: onnxruntime refuses external data paths in a
    model given as bytes (it resolved them against the cwd: exit 2, 'escapes working directory')."""
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "conv.onnx"
    onnx.save_model(_conv_model(8), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="conv.onnx.data", size_threshold=0)
    monkeypatch.chdir(tmp_path)
    out, report = quantize(str(path), "random", measure_latency=False, max_evaluations=1, log=lambda _m: None)
    assert report.calibration.startswith("random") and _int8_weights(out.to_proto()) == 2


def test_large_models_take_the_file_path(monkeypatch):
    """Past the size limit every session (calibration, budget, onnxruntime's offline
    rewrites) loads from a temporary file with external data: forced here for a small model."""
    monkeypatch.setattr(ortsession, "LARGE_MODEL_BYTES", 16)
    monkeypatch.setattr(ortsession, "SESSION_FILE_BYTES", 16)
    calls = []
    real = ortsession.write_with_external_data
    monkeypatch.setattr(ortsession, "write_with_external_data", lambda proto, path, *rest: calls.append(path) or real(proto, path, *rest))
    from onnxforge.passes.quant import prepare
    monkeypatch.setattr(prepare, "write_with_external_data", ortsession.write_with_external_data)
    out, report = quantize(_conv_model(), _feeds(4), measure_latency=False, log=lambda _m: None)
    assert calls and _int8_weights(out.to_proto()) == 2 and report.score > 0.99
    assert all(not os.path.exists(p) for p in calls)  # temporary folders are gone


def test_session_leaves_the_model_as_it_was(monkeypatch):
    monkeypatch.setattr(ortsession, "SESSION_FILE_BYTES", 16)
    model = _conv_model()
    before = model.SerializeToString()
    import onnxruntime as ort

    options = ort.SessionOptions()
    feed = _feeds(1)[0]
    y = ortsession.session(model, options).run(None, feed)[0]
    assert model.SerializeToString() == before and y.shape == (1, 8, 8, 8)


def test_shape_inference_past_the_size_limit_keeps_types(monkeypatch):
    """fp16 conversion and calibration read tensor types from shape inference, which
    onnx refuses past 2 GB: the weight-less copy gives the same types."""
    model = _conv_model()
    expected = {v.name: v.type.tensor_type.elem_type for v in ortsession.infer_shapes(model).graph.value_info}
    monkeypatch.setattr(ortsession, "LARGE_MODEL_BYTES", 16)
    monkeypatch.setattr(ortsession, "EXTERNAL_MIN_BYTES", 16)
    inferred = ortsession.infer_shapes(model)
    assert {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info} == expected == {"c1": 1, "r1": 1}


def test_fp16_of_a_large_model_casts_consistently(monkeypatch):
    from onnxforge.passes.quant.fp16 import convert_fp16

    monkeypatch.setattr(ortsession, "LARGE_MODEL_BYTES", 16)
    monkeypatch.setattr(ortsession, "EXTERNAL_MIN_BYTES", 16)
    out, report = convert_fp16(_conv_model(), calib=_feeds(4), log=lambda _m: None)
    proto = out.to_proto()
    assert any(t.data_type == TensorProto.FLOAT16 for t in proto.graph.initializer) and report.score >= 0.99


def _saved_with_external_data(model: onnx.ModelProto, folder) -> str:
    folder.mkdir()
    path = folder / "model.onnx"
    model = onnx.ModelProto.FromString(model.SerializeToString())  # saving rewrites the proto's tensors
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    return str(path)


def test_baseline_streams_external_weights_to_onnxruntime(tmp_path, monkeypatch):
    """A model with external data: its weights go file to file into onnxruntime's offline
    rewrite and are read once, from its output; the baseline is the in-memory one."""
    from onnxforge.io import load
    from onnxforge.passes.quant import prepare
    from onnxforge.passes.quant.budget import run_outputs

    model = _conv_model(channels=64)  # weights above the size -O2 reads to compare constants
    expected = prepare.float_baseline(model)
    path = _saved_with_external_data(model, tmp_path / "m")

    def refuse(*_a, **_k):
        raise AssertionError("the weights were loaded into memory before onnxruntime")

    monkeypatch.setattr(prepare, "with_external_data_loaded", refuse)
    monkeypatch.setattr(prepare, "lower_constants", refuse)
    baseline = prepare.float_baseline(load(path))
    assert not ortsession.has_external_data(baseline)
    assert [n.op_type for n in baseline.graph.node] == [n.op_type for n in expected.graph.node]
    feeds = _feeds(2)
    for got, want in zip(run_outputs(baseline, feeds), run_outputs(expected, feeds)):
        np.testing.assert_array_equal(got[0], want[0])


def test_write_with_external_data_copies_external_bytes(tmp_path):
    model = _conv_model()
    source = _saved_with_external_data(model, tmp_path / "src")
    light = onnx.load(source, load_external_data=False)
    out = ortsession.write_with_external_data(light, tmp_path / "copy.onnx", base_dir=tmp_path / "src")
    copied = onnx.load(str(out))
    for a, b in zip(copied.graph.initializer, model.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))


def test_write_with_external_data_refuses_references_outside_the_folder(tmp_path):
    from onnxforge.errors import UnsafeModelError

    source = _saved_with_external_data(_conv_model(), tmp_path / "src")
    light = onnx.load(source, load_external_data=False)
    light.graph.initializer[0].external_data[0].value = "../outside.data"
    (tmp_path / "outside.data").write_bytes(b"\0" * 4096)
    with pytest.raises(UnsafeModelError):
        ortsession.write_with_external_data(light, tmp_path / "copy.onnx", base_dir=tmp_path / "src")


def test_dynamic_matmul_is_onnxruntimes_result_without_its_model_copies(monkeypatch):
    """The dynamic quantizer's own shape inference deep-copies, saves and reloads the
    model; formats.dynamic_matmul infers types on the model it holds instead. The
    result is the same graph and the same weights, and onnxruntime is left unpatched."""
    import copy

    from onnxruntime.quantization import onnx_quantizer
    from onnxruntime.quantization.quant_utils import QuantizationMode
    from test_quant import _transformer_block

    from onnxforge.passes.quant import formats

    model = _transformer_block()
    spec = formats.spec_for("cpu", model, mode="dynamic")
    theirs = onnx_quantizer.ONNXQuantizer(
        copy.deepcopy(model), spec.per_channel, spec.reduce_range, QuantizationMode.IntegerOps, False,
        formats._qtype(spec.weight_type), formats._qtype(spec.activation_type), None, None, [], ["MatMul", "Gemm"],
        {"MatMulConstBOnly": True, "DefaultTensorType": TensorProto.FLOAT},
    )
    theirs.quantize_model()
    theirs = formats._without_unused_initializers(theirs.model.model)
    original = onnx_quantizer.save_and_reload_model_with_shape_infer
    deep_copies = []
    real_deepcopy = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda x, *a: deep_copies.append(type(x)) or real_deepcopy(x, *a))
    ours = formats.dynamic_matmul(model, spec, [])
    assert onnx.ModelProto not in deep_copies
    assert onnx_quantizer.save_and_reload_model_with_shape_infer is original
    assert [n.SerializeToString() for n in ours.graph.node] == [n.SerializeToString() for n in theirs.graph.node]
    want = {t.name: onnx.numpy_helper.to_array(t) for t in theirs.graph.initializer}
    got = {t.name: onnx.numpy_helper.to_array(t) for t in ours.graph.initializer}
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)
    assert not any(p.key == "onnx.infer" for p in ours.metadata_props)
    assert sum(n.op_type == "MatMulInteger" for n in ours.graph.node) >= 4
    # a model that carries the mark itself keeps it, once
    onnx.helper.set_model_props(model, {"onnx.infer": "onnxruntime.quant", "author": "me"})
    marks = [(p.key, p.value) for p in formats.dynamic_matmul(model, spec, []).metadata_props]
    assert sorted(marks) == [("author", "me"), ("onnx.infer", "onnxruntime.quant")]


def test_offline_graph_without_weights_reads_the_same_nodes(monkeypatch):
    """Kernel and transpose counts read only onnxruntime's optimized graph: past the
    session-file size its large weights are not read back."""
    from onnxforge.passes.quant.prepare import ort_offline

    model = _conv_model(channels=64)
    full = ort_offline(model, level="extended")
    monkeypatch.setattr(ortsession, "SESSION_FILE_BYTES", 16)
    graph_only = ort_offline(model, level="extended", weights=False)
    assert [n.op_type for n in graph_only.graph.node] == [n.op_type for n in full.graph.node]
    assert ortsession.has_external_data(graph_only) and not ortsession.has_external_data(full)


def _matmul_with_if_branch_weight() -> onnx.ModelProto:
    """x0 @ w0 -> If(cond): then x @ w_then (a subgraph initializer), else x."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w_then = numpy_helper.from_array(rng.random((64, 64), dtype=np.float32), "w_then")
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "w_then"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 64])], [w_then])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 64])])
    w0 = numpy_helper.from_array(rng.random((64, 64), dtype=np.float32), "w0")
    nodes = [helper.make_node("MatMul", ["x0", "w0"], ["x"], name="mm0"),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1, 64]),
                                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w0])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_external_weights_inside_subgraphs_are_loaded_not_streamed(tmp_path):
    """Only main-graph initializers are streamed to onnxruntime; a subgraph's external
    tensor would point into the temporary folder, so such models take the loading path."""
    from onnx.reference import ReferenceEvaluator

    from onnxforge.io import load
    from onnxforge.passes.quant import prepare
    from onnxforge.passes.quant.budget import run_outputs

    model = _matmul_with_if_branch_weight()
    path = _saved_with_external_data(model, tmp_path / "m")
    baseline = prepare.float_baseline(load(path))
    feed = {"x0": np.ones((1, 64), np.float32), "cond": np.array(True)}
    want = ReferenceEvaluator(model).run(None, feed)[0]
    np.testing.assert_allclose(run_outputs(baseline, [feed])[0][0], want, rtol=1e-5)
