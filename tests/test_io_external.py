"""Loading models with external data: every unsafe reference is refused before
onnx or onnxruntime reads it, and safe ones stay on disk as ExternalValues."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from io_helpers import constant_node_model, set_external, weight, write_external_model
from onnxforge.errors import ModelLoadError, UnsafeModelError
from onnxforge.io import load
from onnxforge.model import ExternalValues, constants


def _refused(path, why: str):
    with pytest.raises(UnsafeModelError, match=why) as info:
        load(path)
    message = str(info.value)
    assert "'W'" in message, "the refusal names the tensor"
    assert "\n" not in message
    return message


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    return folder


def test_valid_external_data_stays_on_disk(model_dir):
    w = weight()
    path = write_external_model(model_dir, "weights.bin", w=w)
    model = load(path)
    (const,) = [c for c in constants(model.graph) if c.name == "W"]
    assert isinstance(const._values, ExternalValues)
    assert const._values.path == (model_dir / "weights.bin").resolve()
    np.testing.assert_array_equal(const.values, w)


def test_data_in_a_subfolder_and_at_an_offset(model_dir):
    w = weight(seed=5)
    path = write_external_model(model_dir, "sub/weights.bin", offset=4096, w=w)
    np.testing.assert_array_equal(load(path).graph.tensors()["W"].values, w)


def test_symlink_inside_the_folder_is_accepted(model_dir):
    w = weight(seed=2)
    (model_dir / "real.bin").write_bytes(w.tobytes())
    os.symlink("real.bin", model_dir / "link.bin")
    path = write_external_model(model_dir, "link.bin", w=w)
    np.testing.assert_array_equal(load(path).graph.tensors()["W"].values, w)


def test_absolute_path_is_refused(model_dir, tmp_path):
    outside = tmp_path / "abs.bin"
    outside.write_bytes(weight().tobytes())
    _refused(write_external_model(model_dir, str(outside)), "not a relative path")


def test_parent_escape_is_refused(model_dir, tmp_path):
    (tmp_path / "secret.bin").write_bytes(weight().tobytes())
    _refused(write_external_model(model_dir, "../secret.bin"), "outside the model's folder")


def test_escape_hidden_inside_a_path_is_refused(model_dir, tmp_path):
    (model_dir / "sub").mkdir()
    (tmp_path / "secret.bin").write_bytes(weight().tobytes())
    _refused(write_external_model(model_dir, "sub/../../secret.bin"), "outside the model's folder")


def test_symlink_escaping_the_folder_is_refused(model_dir, tmp_path):
    (tmp_path / "secret.bin").write_bytes(weight().tobytes())
    os.symlink(tmp_path / "secret.bin", model_dir / "w.bin")
    _refused(write_external_model(model_dir, "w.bin"), "outside the model's folder")


def test_symlinked_subfolder_escaping_is_refused(model_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "w.bin").write_bytes(weight().tobytes())
    os.symlink(elsewhere, model_dir / "sub")
    _refused(write_external_model(model_dir, "sub/w.bin"), "outside the model's folder")


def test_hard_link_is_refused(model_dir):
    path = write_external_model(model_dir, "w.bin")
    os.link(model_dir / "w.bin", model_dir / "alias.bin")
    _refused(path, "hard link")


def test_folder_instead_of_file_is_refused(model_dir):
    (model_dir / "w.bin").mkdir()
    _refused(write_external_model(model_dir, "w.bin"), "not a regular file")


def test_model_folder_itself_is_refused(model_dir):
    _refused(write_external_model(model_dir, "."), "outside the model's folder|not a regular file")


def test_fifo_is_refused_without_blocking(model_dir):
    os.mkfifo(model_dir / "w.bin")
    _refused(write_external_model(model_dir, "w.bin"), "not a regular file")


def test_offset_plus_length_beyond_the_file_is_refused(model_dir):
    (model_dir / "w.bin").write_bytes(b"\0" * 80)
    _refused(write_external_model(model_dir, "w.bin", offset=32, length=64), "beyond the file")


def test_missing_file_is_refused(model_dir):
    _refused(write_external_model(model_dir, "absent.bin", data=b""), "does not exist")


def test_length_too_small_for_the_dims_is_refused(model_dir):
    (model_dir / "w.bin").write_bytes(b"\0" * 64)
    _refused(write_external_model(model_dir, "w.bin", length=32), "dims need 64")


def test_file_too_small_without_length_is_refused(model_dir):
    (model_dir / "w.bin").write_bytes(b"\0" * 40)
    _refused(write_external_model(model_dir, "w.bin", offset=None, with_length=False), "dims need 64")


@pytest.mark.parametrize("offset", ["-4", "1_0", "0x10", " 8", "4.0"])
def test_malformed_offset_is_refused(model_dir, offset):
    path = write_external_model(model_dir, "w.bin")
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "offset":
            entry.value = offset
    path.write_bytes(model.SerializeToString())
    _refused(path, "offset that is not a non-negative integer")


def test_location_given_twice_is_refused(model_dir, tmp_path):
    path = write_external_model(model_dir, "w.bin")
    model = onnx.load(str(path), load_external_data=False)
    entry = model.graph.initializer[0].external_data.add()
    entry.key, entry.value = "location", "../elsewhere.bin"
    path.write_bytes(model.SerializeToString())
    _refused(path, "'location' twice")


def test_empty_location_is_refused(model_dir):
    path = write_external_model(model_dir, "w.bin")
    model = onnx.load(str(path), load_external_data=False)
    del model.graph.initializer[0].external_data[:]
    path.write_bytes(model.SerializeToString())
    _refused(path, "no location")


def test_refusal_comes_before_the_checker(model_dir, tmp_path, monkeypatch):
    """onnx's checker must never see an unsafe reference (it would stat/follow it)."""
    (tmp_path / "secret.bin").write_bytes(weight().tobytes())
    path = write_external_model(model_dir, "../secret.bin")

    def checker_must_not_run(*args, **kwargs):
        raise AssertionError("the checker ran before the external data was validated")

    monkeypatch.setattr(onnx.checker, "check_model", checker_must_not_run)
    _refused(path, "outside")


def test_constant_node_attribute_with_external_data(tmp_path):
    path, c = constant_node_model(tmp_path)
    model = load(path)
    (node,) = [n for n in model.graph.nodes if n.op == "Constant"]
    value = node.attrs["value"]
    assert isinstance(value._values, ExternalValues), "gs keeps the attribute's TensorProto object"
    np.testing.assert_array_equal(value.values, c)


def test_constant_node_attribute_escape_is_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    path, _ = constant_node_model(folder, location="const.bin")
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.node[0].attribute[0].t.external_data:
        if entry.key == "location":
            entry.value = "../const.bin"
    (tmp_path / "const.bin").write_bytes(b"\0" * 64)
    path.write_bytes(model.SerializeToString())
    with pytest.raises(UnsafeModelError, match="'c_value'.*outside"):
        load(path)


def _if_model(folder) -> tuple:
    """An If whose then-branch reads an external initializer of its own."""
    w = weight((3,), seed=4)
    init = numpy_helper.from_array(w, "B")
    (folder / "branch.bin").write_bytes(w.tobytes())
    set_external(init, "branch.bin", 0, w.nbytes)
    out = helper.make_tensor_value_info("Z", TensorProto.FLOAT, [3])
    then_graph = helper.make_graph([helper.make_node("Add", ["X", "B"], ["Z"])], "then", [], [out], [init])
    else_graph = helper.make_graph([helper.make_node("Identity", ["X"], ["Z"])], "else", [], [out])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["Y"], then_branch=then_graph, else_branch=else_graph, name="if")],
        "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("X", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "if.onnx"
    path.write_bytes(model.SerializeToString())
    return path, w


def test_subgraph_initializer_with_external_data(tmp_path):
    path, w = _if_model(tmp_path)
    model = load(path)
    external = [c for c in constants(model.graph) if isinstance(c._values, ExternalValues)]
    assert [c.name for c in external] == ["B"]
    np.testing.assert_array_equal(external[0].values, w)


def test_external_data_in_a_function_body_is_refused_clearly(tmp_path):
    w = weight((2,), seed=1)
    value = numpy_helper.from_array(w, "fv")
    (tmp_path / "f.bin").write_bytes(w.tobytes())
    set_external(value, "f.bin", 0, w.nbytes)
    func = helper.make_function(
        "local", "AddConst", ["a"], ["b"],
        [helper.make_node("Constant", [], ["k"], value=value), helper.make_node("Add", ["a", "k"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [helper.make_node("AddConst", ["X"], ["Y"], domain="local")],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[func])
    model.ir_version = 8
    path = tmp_path / "f.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelLoadError, match="'fv'.*model-local function"):
        load(path)


def test_replaced_data_file_is_detected_when_read(model_dir):
    w = weight()
    path = write_external_model(model_dir, "w.bin", w=w)
    model = load(path)
    (model_dir / "w.new").write_bytes(w.tobytes())  # same bytes, another file
    os.replace(model_dir / "w.new", model_dir / "w.bin")
    with pytest.raises(OSError, match="changed since the model was loaded"):
        model.graph.tensors()["W"].values


def test_data_file_swapped_for_an_escaping_link_is_detected(model_dir, tmp_path):
    w = weight()
    path = write_external_model(model_dir, "w.bin", w=w)
    model = load(path)
    (tmp_path / "secret.bin").write_bytes(w.tobytes())
    (model_dir / "w.bin").unlink()
    os.symlink(tmp_path / "secret.bin", model_dir / "w.bin")
    with pytest.raises(OSError, match="changed since the model was loaded"):
        model.graph.tensors()["W"].values


@pytest.mark.parametrize("dtype", [np.float16, np.int64, np.uint8, np.bool_, np.float64])
def test_external_values_decode_every_plain_type(model_dir, dtype):
    w = (np.arange(12).reshape(3, 4) % 3).astype(dtype)
    tensor = numpy_helper.from_array(w, "W")
    (model_dir / "w.bin").write_bytes(w.tobytes())
    set_external(tensor, "w.bin", 0, w.nbytes)
    values = ExternalValues(tensor, model_dir / "w.bin", 0, w.nbytes)
    loaded = values.load()
    assert loaded.dtype == w.dtype
    np.testing.assert_array_equal(loaded, w)


def test_external_values_decode_bfloat16(model_dir):
    tensor = helper.make_tensor("W", TensorProto.BFLOAT16, [3], [1.0, -2.0, 0.5])
    raw = numpy_helper.from_array(numpy_helper.to_array(tensor), "W").raw_data if not tensor.raw_data else tensor.raw_data
    header = TensorProto()
    header.CopyFrom(tensor)
    header.ClearField("int32_data")
    (model_dir / "w.bin").write_bytes(raw)
    set_external(header, "w.bin", 0, len(raw))
    loaded = ExternalValues(header, model_dir / "w.bin", 0, len(raw)).load()
    np.testing.assert_array_equal(loaded.astype(np.float32), [1.0, -2.0, 0.5])
