"""save(): atomic, never overwrites its inputs, streams external data into a fresh file."""
from __future__ import annotations

import os
import stat

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from io_helpers import constant_node_model, listing, matmul_model, run_ort, weight, write_external_model
from onnxforge import io
from onnxforge.errors import ModelSaveError
from onnxforge.io import load, save
from onnxforge.model import ExternalValues, Model, constants


@pytest.fixture
def ext_model(tmp_path):
    """A loaded model whose W (4x4 float) is external, plus its folder."""
    folder = tmp_path / "in"
    folder.mkdir()
    w = weight((64, 32), seed=1)
    path = write_external_model(folder, "weights.bin", w=w)
    return load(path), w, folder


def _external_locations(path) -> set[str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {
        e.value
        for t, _ in io.iter_tensor_protos(proto)
        for e in t.external_data
        if e.key == "location"
    }


def _feeds(rows: int, cols: int) -> dict:
    return {"X": np.random.default_rng(7).standard_normal((rows, cols)).astype(np.float32)}


# ------------------------------------------------------------------ overwrite refusal


def test_refuses_to_overwrite_the_input_model(ext_model):
    model, _, folder = ext_model
    before = (folder / "model.onnx").read_bytes()
    with pytest.raises(ModelSaveError, match="refusing to overwrite"):
        save(model, folder / "model.onnx")
    assert (folder / "model.onnx").read_bytes() == before


def test_refuses_to_overwrite_the_input_through_a_symlink(ext_model, tmp_path):
    model, _, folder = ext_model
    os.symlink(folder / "model.onnx", tmp_path / "alias.onnx")
    with pytest.raises(ModelSaveError, match="refusing to overwrite"):
        save(model, tmp_path / "alias.onnx")


def test_refuses_to_overwrite_the_input_through_a_hard_link(tmp_path):
    path = tmp_path / "single.onnx"
    path.write_bytes(matmul_model().SerializeToString())
    model = load(path)
    os.link(path, tmp_path / "hard.onnx")
    with pytest.raises(ModelSaveError, match="refusing to overwrite"):
        save(model, tmp_path / "hard.onnx")


def test_refuses_to_write_over_an_input_data_file(ext_model):
    model, _, folder = ext_model
    before = (folder / "weights.bin").read_bytes()
    with pytest.raises(ModelSaveError, match="refusing to overwrite"):
        save(model, folder / "weights.bin")
    assert (folder / "weights.bin").read_bytes() == before


def test_refuses_when_its_data_file_would_replace_an_input_data_file(tmp_path):
    w = weight((16, 8))
    path = write_external_model(tmp_path, "out.onnx.data", w=w, name="in.onnx")
    model = load(path)
    with pytest.raises(ModelSaveError, match="out.onnx.data: refusing to overwrite"):
        save(model, tmp_path / "out.onnx", external_data=True)
    np.testing.assert_array_equal(np.fromfile(tmp_path / "out.onnx.data", np.float32).reshape(16, 8), w)


def test_output_folder_must_exist(ext_model, tmp_path):
    with pytest.raises(ModelSaveError, match="does not exist"):
        save(ext_model[0], tmp_path / "nowhere" / "m.onnx")


def test_output_must_not_be_a_folder(ext_model, tmp_path):
    with pytest.raises(ModelSaveError, match="is a folder"):
        save(ext_model[0], tmp_path)


# ------------------------------------------------------------------ atomicity


def test_failure_while_writing_data_leaves_the_old_target_and_no_litter(ext_model, tmp_path, monkeypatch):
    model, w, _ = ext_model
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "m.onnx"
    save(model, target)
    before = {name: (out_dir / name).read_bytes() for name in listing(out_dir)}

    def failing_read(self, chunk=64 << 20):
        yield b"\1" * 16
        raise OSError("disk on fire")

    monkeypatch.setattr(ExternalValues, "read_bytes", failing_read)
    with pytest.raises(ModelSaveError, match="disk on fire"):
        save(model, target)
    assert {name: (out_dir / name).read_bytes() for name in listing(out_dir)} == before
    monkeypatch.undo()
    np.testing.assert_array_equal(load(target).graph.tensors()["W"].values, w)


def test_failure_while_writing_the_model_leaves_the_old_target_and_no_litter(tmp_path, monkeypatch):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old contents")
    model = Model.from_proto(matmul_model())

    def failing_write(self, out):
        out.write(b"half a tensor")
        raise KeyboardInterrupt  # even an interrupt cleans up

    monkeypatch.setattr(io._InitializerEntry, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        save(model, target)
    assert target.read_bytes() == b"old contents"
    assert listing(tmp_path) == ["m.onnx"]


def test_saved_files_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        save(Model.from_proto(matmul_model()), tmp_path / "m.onnx", external_data=True, size_threshold=0)
    finally:
        os.umask(old)
    for name in ("m.onnx", "m.onnx.data"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644


# ------------------------------------------------------------------ external data


def test_resave_over_a_previous_output_with_external_data(tmp_path):
    big, small = weight((256, 64), seed=1), weight((8, 4), seed=2)
    save(Model.from_proto(matmul_model(big)), tmp_path / "m.onnx", external_data=True)
    size_big = (tmp_path / "m.onnx.data").stat().st_size
    save(Model.from_proto(matmul_model(small)), tmp_path / "m.onnx", external_data=True, size_threshold=0)
    assert (tmp_path / "m.onnx.data").stat().st_size < size_big, "a fresh data file, not an appended one"
    reloaded = load(tmp_path / "m.onnx")
    np.testing.assert_array_equal(reloaded.graph.tensors()["W"].values, small)
    np.testing.assert_allclose(run_ort(tmp_path / "m.onnx", _feeds(3, 8))[0], _feeds(3, 8)["X"] @ small, rtol=1e-5)


def test_save_reload_save_chain(ext_model, tmp_path):
    model, w, _ = ext_model
    save(model, tmp_path / "a.onnx")
    again = load(tmp_path / "a.onnx")
    save(again, tmp_path / "b.onnx")
    assert _external_locations(tmp_path / "b.onnx") == {"b.onnx.data"}
    np.testing.assert_array_equal(load(tmp_path / "b.onnx").graph.tensors()["W"].values, w)


def test_in_memory_tensors_and_external_ones_in_one_save(ext_model, tmp_path):
    model, w, _ = ext_model
    bias = np.linspace(-1, 1, 32, dtype=np.float32)
    out = model.graph.outputs[0]
    biased = gs.Variable("Yb", dtype=np.float32, shape=out.shape)
    model.graph.nodes.append(gs.Node("Add", inputs=[out, gs.Constant("bias", bias)], outputs=[biased], name="add"))
    model.graph.outputs = [biased]
    save(model, tmp_path / "m.onnx")
    assert isinstance(model.graph.tensors()["W"]._values, ExternalValues), "the model is unchanged by saving"
    assert listing(tmp_path) == ["in", "m.onnx", "m.onnx.data"]
    feeds = _feeds(2, 64)
    np.testing.assert_allclose(run_ort(tmp_path / "m.onnx", feeds)[0], feeds["X"] @ w + bias, rtol=1e-5, atol=1e-5)


def test_external_values_materialized_by_a_pass(ext_model, tmp_path):
    model, w, _ = ext_model
    const = model.graph.tensors()["W"]
    const.values = const.values * 2  # a pass rewrote the weights in memory
    save(model, tmp_path / "ext.onnx")
    save(model, tmp_path / "single.onnx", external_data=False)
    assert not (tmp_path / "single.onnx.data").exists()
    for name in ("ext.onnx", "single.onnx"):
        np.testing.assert_array_equal(load(tmp_path / name).graph.tensors()["W"].values, w * 2)


def test_external_model_saved_as_a_single_file(ext_model, tmp_path):
    model, w, _ = ext_model
    save(model, tmp_path / "one.onnx", external_data=False)
    assert listing(tmp_path) == ["in", "one.onnx"]
    proto = onnx.load(str(tmp_path / "one.onnx"), load_external_data=False)
    assert proto.graph.initializer[0].data_location == onnx.TensorProto.DEFAULT
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(proto.graph.initializer[0]), w)


def test_constant_node_attribute_with_external_data_round_trips(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    path, c = constant_node_model(folder)
    model = load(path)
    save(model, tmp_path / "out.onnx")
    proto = onnx.load(str(tmp_path / "out.onnx"), load_external_data=False)
    (node,) = [n for n in proto.graph.node if n.op_type == "Constant"]
    assert node.attribute[0].t.data_location == onnx.TensorProto.EXTERNAL
    assert _external_locations(tmp_path / "out.onnx") == {"out.onnx.data"}
    x = np.ones(c.shape, np.float32)
    np.testing.assert_allclose(run_ort(tmp_path / "out.onnx", {"X": x})[0], x + c)
    np.testing.assert_allclose(run_ort(path, {"X": x})[0], x + c)


def test_shared_values_are_written_once(ext_model, tmp_path):
    model, w, _ = ext_model
    twin = gs.Constant("W2", model.graph.tensors()["W"]._values)
    y2 = gs.Variable("Y2", dtype=np.float32)
    model.graph.nodes.append(gs.Node("MatMul", inputs=[model.graph.inputs[0], twin], outputs=[y2], name="mm2"))
    model.graph.outputs.append(y2)
    save(model, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx.data").stat().st_size == w.nbytes
    out = run_ort(tmp_path / "m.onnx", _feeds(1, 64))
    np.testing.assert_array_equal(out[0], out[1])


def test_small_tensors_stay_inline_and_data_is_aligned(tmp_path):
    w1, w2, small = weight((32, 32), seed=1), weight((32, 16), seed=2), np.arange(16, dtype=np.float32)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("MatMul", ["X", "W1"], ["H"], name="mm1"),
            onnx.helper.make_node("MatMul", ["H", "W2"], ["G"], name="mm2"),
            onnx.helper.make_node("Add", ["G", "small"], ["Y"], name="add"),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["n", 32])],
        [onnx.helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["n", 16])],
        [onnx.numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (w2, "W2"), (small, "small"))],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(Model.from_proto(model), tmp_path / "m.onnx", external_data=True)
    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    by_name = {t.name: t for t in proto.graph.initializer}
    assert by_name["small"].data_location == onnx.TensorProto.DEFAULT
    offsets = [int(io.external_entries(by_name[n])["offset"]) for n in ("W1", "W2")]
    assert all(o % io.ALIGNMENT == 0 for o in offsets) and len(set(offsets)) == 2
    feeds = _feeds(2, 32)
    expected = feeds["X"] @ w1 @ w2 + small
    np.testing.assert_allclose(run_ort(tmp_path / "m.onnx", feeds)[0], expected, rtol=1e-4, atol=1e-4)


def test_typed_field_tensors_are_externalized(tmp_path):
    w = weight((16, 16))
    model = matmul_model(w)
    typed = onnx.helper.make_tensor("W", onnx.TensorProto.FLOAT, w.shape, w.ravel().tolist())
    model.graph.initializer[0].CopyFrom(typed)
    save(Model.from_proto(model), tmp_path / "m.onnx", external_data=True)
    assert _external_locations(tmp_path / "m.onnx") == {"m.onnx.data"}
    np.testing.assert_array_equal(load(tmp_path / "m.onnx").graph.tensors()["W"].values, w)


# ------------------------------------------------------------------ when to write external data


def test_large_models_switch_to_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 100)
    save(Model.from_proto(matmul_model(weight((16, 16)))), tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx.data").exists()


def test_protobuf_limit_falls_back_to_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 600)  # the estimate says "fits", serializing says no
    model = Model.from_proto(matmul_model(weight((16, 16))))
    save(model, tmp_path / "auto.onnx")
    assert (tmp_path / "auto.onnx.data").exists()
    with pytest.raises(ModelSaveError, match="2 GB limit"):
        save(model, tmp_path / "forced.onnx", external_data=False)
    assert listing(tmp_path) == ["auto.onnx", "auto.onnx.data"]


def test_small_model_with_external_input_keeps_external_data(ext_model, tmp_path):
    save(ext_model[0], tmp_path / "m.onnx")
    assert _external_locations(tmp_path / "m.onnx") == {"m.onnx.data"}


def test_single_file_model_stays_single_file(tmp_path):
    save(Model.from_proto(matmul_model()), tmp_path / "m.onnx")
    assert listing(tmp_path) == ["m.onnx"]


def test_model_proto_is_accepted(tmp_path):
    w = weight()
    save(matmul_model(w), tmp_path / "m.onnx")
    np.testing.assert_array_equal(load(tmp_path / "m.onnx").graph.tensors()["W"].values, w)


def test_model_proto_with_unknown_external_data_is_refused(tmp_path):
    proto = matmul_model()
    io_tensor = proto.graph.initializer[0]
    from io_helpers import set_external

    set_external(io_tensor, "weights.bin", 0, 64)
    with pytest.raises(ModelSaveError, match="external-data references"):
        save(proto, tmp_path / "m.onnx")


def test_saving_twice_from_one_model(ext_model, tmp_path):
    """Staging swaps values only for the duration of a save."""
    model, w, _ = ext_model
    save(model, tmp_path / "a.onnx", external_data=False)
    save(model, tmp_path / "b.onnx", external_data=True)
    assert [isinstance(c._values, ExternalValues) for c in constants(model.graph)] == [True]
    for name in ("a.onnx", "b.onnx"):
        np.testing.assert_array_equal(load(tmp_path / name).graph.tensors()["W"].values, w)
