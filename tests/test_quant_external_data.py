"""Quantizing models whose weights live in external data files, and models too large
to serialize in one protobuf (passes/quant/ortsession.py)."""
from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto

from test_quant import _conv_model, _feeds

from onnxforge.passes.quant import ortsession
from onnxforge.passes.quant.quantize import quantize


def _int8_weights(model: onnx.ModelProto) -> int:
    return sum(1 for t in model.graph.initializer if t.data_type == TensorProto.INT8 and int(np.prod(t.dims)) > 8)


def test_quantize_a_model_with_external_data_from_another_directory(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "conv.onnx"
    onnx.save_model(_conv_model(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="conv.onnx.data", size_threshold=0)
    monkeypatch.chdir(tmp_path)  # relative data paths must resolve against the model, not the cwd
    out, report = quantize(str(path), _feeds(4), measure_latency=False, log=lambda _m: None)
    proto = out.to_proto()
    assert _int8_weights(proto) == 2 and not ortsession.has_external_data(proto)
    assert report.score > 0.99


def test_large_models_take_the_file_path(monkeypatch):
    """Past the size limit every session (calibration, budget, onnxruntime's offline
    rewrites) loads from a temporary file with external data: forced here for a small model."""
    monkeypatch.setattr(ortsession, "LARGE_MODEL_BYTES", 16)
    calls = []
    real = ortsession.write_with_external_data
    monkeypatch.setattr(ortsession, "write_with_external_data", lambda proto, path: calls.append(path) or real(proto, path))
    from onnxforge.passes.quant import prepare
    monkeypatch.setattr(prepare, "write_with_external_data", ortsession.write_with_external_data)
    out, report = quantize(_conv_model(), _feeds(4), measure_latency=False, log=lambda _m: None)
    assert calls and _int8_weights(out.to_proto()) == 2 and report.score > 0.99
    assert all(not os.path.exists(p) for p in calls)  # temporary folders are gone


def test_session_leaves_the_model_as_it_was(monkeypatch):
    monkeypatch.setattr(ortsession, "LARGE_MODEL_BYTES", 16)
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
