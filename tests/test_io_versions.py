"""ir_version and opset are capped at what the installed onnxruntime reads, with a note."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from io_helpers import run_ort, set_external, weight
from onnxforge import versions
from onnxforge.errors import ModelLoadError
from onnxforge.io import load, save


def _model(opset: int, ir: int, extra_domains=()) -> onnx.ModelProto:
    w = weight((4, 4), seed=6)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["H"], name="mm"), helper.make_node("Relu", ["H"], ["Y"], name="relu")],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(w, "W")],
        doc_string="graph doc",
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_domains)],
        producer_name="maker",
        doc_string="model doc",
    )
    model.ir_version = ir
    helper.set_model_props(model, {"k": "v"})
    return model


def _write(tmp_path, proto, name="m.onnx"):
    path = tmp_path / name
    path.write_bytes(proto.SerializeToString())
    return path


def test_runtime_limits_match_what_onnxruntime_loads():
    max_ir, max_opset = versions.runtime_limits()
    assert versions._loads(max_ir, 13) and versions._loads(max_ir, max_opset)
    if max_ir < onnx.IR_VERSION:
        assert not versions._loads(max_ir + 1, 13)
    if max_opset < onnx.defs.onnx_opset_version():
        assert not versions._loads(max_ir, max_opset + 1)


def test_highest_is_a_binary_search():
    calls = []

    def accepted(v):
        calls.append(v)
        return v <= 21

    assert versions._highest(7, 28, accepted) == 21
    assert len(calls) <= 5
    assert versions._highest(7, 7, accepted) == 7


def test_within_limits_nothing_changes(tmp_path):
    model = load(_write(tmp_path, _model(17, 8)))
    assert model.notes == []
    assert model.meta.ir_version == 8 and model.opset() == 17


def test_ir_version_above_the_limit_is_lowered(tmp_path, monkeypatch):
    monkeypatch.setattr(versions, "runtime_limits", lambda: (7, 17))
    model = load(_write(tmp_path, _model(17, 9)))
    assert model.meta.ir_version == 7
    assert model.notes == ["ir_version lowered from 9 to 7 (the installed onnxruntime's limit)"]


def test_opset_above_the_limit_is_converted_down(tmp_path, monkeypatch):
    # MatMul and Relu last changed in opsets 13 and 14: onnx converts 19 -> 17 without adapters.
    monkeypatch.setattr(versions, "runtime_limits", lambda: (8, 17))
    src = _write(tmp_path, _model(19, 9, extra_domains=[("ai.onnx.ml", 3), ("com.example", 2)]))
    model = load(src)
    assert model.opset() == 17 and model.meta.ir_version == 8
    assert model.notes == [
        "opset lowered from 19 to 17 (the installed onnxruntime's limit)",
        "ir_version lowered from 9 to 8 (the installed onnxruntime's limit)",
    ]
    save(model, tmp_path / "out.onnx")
    saved = onnx.load(str(tmp_path / "out.onnx"))
    assert {i.domain: i.version for i in saved.opset_import} == {"": 17, "ai.onnx.ml": 3, "com.example": 2}
    assert (saved.doc_string, saved.graph.doc_string, saved.producer_name) == ("model doc", "graph doc", "maker")
    assert [(p.key, p.value) for p in saved.metadata_props] == [("k", "v")]
    assert [n.name for n in saved.graph.node] == ["mm", "relu"]
    x = weight((2, 4), seed=3)
    np.testing.assert_allclose(run_ort(tmp_path / "out.onnx", {"X": x})[0], run_ort(src, {"X": x})[0])


def test_conversion_keeps_external_data_on_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(versions, "runtime_limits", lambda: (8, 17))
    proto = _model(19, 8)
    w = numpy_helper.to_array(proto.graph.initializer[0])
    (tmp_path / "w.bin").write_bytes(w.tobytes())
    set_external(proto.graph.initializer[0], "w.bin", 0, w.nbytes)
    model = load(_write(tmp_path, proto))
    const = model.graph.tensors()["W"]
    assert type(const._values).__name__ == "ExternalValues"
    np.testing.assert_array_equal(const.values, w)


def test_opset_that_cannot_be_converted_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(versions, "runtime_limits", lambda: (8, 16))
    graph = helper.make_graph(
        [helper.make_node("LayerNormalization", ["X", "S"], ["Y"], name="ln")],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(np.ones(4, np.float32), "S")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    with pytest.raises(ModelLoadError, match="opset 17 is newer than the installed onnxruntime reads \\(16\\)") as info:
        load(_write(tmp_path, proto))
    assert "\n" not in str(info.value)


def test_capping_can_be_switched_off(tmp_path, monkeypatch):
    monkeypatch.setattr(versions, "runtime_limits", lambda: (7, 13))
    model = load(_write(tmp_path, _model(17, 9)), cap_versions=False)
    assert model.notes == [] and model.meta.ir_version == 9 and model.opset() == 17
