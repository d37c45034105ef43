"""Unreadable models fail with one-line ModelLoadErrors, never a library traceback."""
from __future__ import annotations

import os
import zlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from io_helpers import matmul_model, shared_model_paths
from onnxforge import io
from onnxforge.errors import ModelLoadError
from onnxforge.io import load


def _load_error(path, match: str, **kwargs) -> ModelLoadError:
    with pytest.raises(ModelLoadError, match=match) as info:
        load(path, **kwargs)
    err = info.value
    assert "\n" not in str(err), "one-line message"
    assert "Traceback" not in str(err)
    assert err.__cause__ is None or isinstance(err.__cause__, Exception)
    assert err.hint
    return err


def _write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_random_bytes(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    _load_error(_write(tmp_path, "random.onnx", data), "not a valid ONNX protobuf|not an ONNX model")


def test_truncated_hand_built_model(tmp_path):
    data = matmul_model(np.ones((64, 64), np.float32)).SerializeToString()
    _load_error(_write(tmp_path, "half.onnx", data[: len(data) // 2]), "not a valid ONNX protobuf|not an ONNX model")


@pytest.mark.parametrize("model_path", shared_model_paths()[:3], ids=lambda p: p.name)
def test_truncated_real_model(tmp_path, model_path):
    data = model_path.read_bytes()
    _load_error(_write(tmp_path, "half.onnx", data[: len(data) // 2]), "not a valid ONNX protobuf|not an ONNX model")


def test_empty_file(tmp_path):
    _load_error(_write(tmp_path, "empty.onnx", b""), "empty")


def test_missing_file(tmp_path):
    _load_error(tmp_path / "absent.onnx", "no such file")


def test_folder_given_as_model(tmp_path):
    _load_error(tmp_path, "is a folder")


def test_fifo_given_as_model_does_not_block(tmp_path):
    os.mkfifo(tmp_path / "pipe.onnx")
    _load_error(tmp_path / "pipe.onnx", "not a regular file")


def test_text_file(tmp_path):
    text = b"# not a model\nhello = 'world'\n" * 20
    _load_error(_write(tmp_path, "model.onnx", text), "not a valid ONNX protobuf|not an ONNX model")


def _png_bytes() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = (1).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0\0")) + chunk(b"IEND", b"")


def test_png_file(tmp_path):
    _load_error(_write(tmp_path, "image.onnx", _png_bytes()), "not a valid ONNX protobuf|not an ONNX model")


def test_protobuf_of_another_message(tmp_path):
    tensor = helper.make_tensor("t", TensorProto.FLOAT, [8], np.arange(8, dtype=np.float32))
    _load_error(_write(tmp_path, "tensor.onnx", tensor.SerializeToString()), "not an ONNX model|not a valid ONNX")


def test_graph_proto_instead_of_model(tmp_path):
    graph = matmul_model().graph
    _load_error(_write(tmp_path, "graph.onnx", graph.SerializeToString()), "not an ONNX model|not a valid ONNX")


@pytest.mark.parametrize("ir", [99, onnx.IR_VERSION + 1])
def test_ir_version_too_new(tmp_path, ir):
    model = matmul_model()
    model.ir_version = ir
    _load_error(_write(tmp_path, "m.onnx", model.SerializeToString()), f"ir_version {ir} is newer")


@pytest.mark.parametrize("ir", [1, 2])
def test_ir_version_too_old(tmp_path, ir):
    model = matmul_model()
    model.ir_version = ir
    _load_error(_write(tmp_path, "m.onnx", model.SerializeToString()), f"ir_version {ir} predates")


def test_no_opset_import(tmp_path):
    model = matmul_model()
    del model.opset_import[:]
    _load_error(_write(tmp_path, "m.onnx", model.SerializeToString()), "no opset_import")


def test_single_file_over_2gb_sparse(tmp_path):
    path = tmp_path / "huge.onnx"
    with open(path, "wb") as f:
        f.truncate(2**31 + 4096)  # sparse: no disk space used, nothing read
    err = _load_error(path, "exceeds protobuf's 2 GB limit")
    assert "external data" in err.hint


def test_single_file_over_the_limit_monkeypatched(tmp_path, monkeypatch):
    path = _write(tmp_path, "m.onnx", matmul_model().SerializeToString())
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 16)
    _load_error(path, "exceeds protobuf's 2 GB limit")


def _bad_attribute_model():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["X"], ["Y"], name="relu", not_an_attribute=3)],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_checker_failure(tmp_path):
    path = _write(tmp_path, "m.onnx", _bad_attribute_model().SerializeToString())
    err = _load_error(path, "checker rejects")
    assert "check=False" in err.hint
    assert load(path, check=False).graph.nodes[0].op == "Relu"


def test_undefined_input_is_a_checker_failure(tmp_path):
    model = matmul_model()
    model.graph.node[0].input[1] = "nowhere"
    _load_error(_write(tmp_path, "m.onnx", model.SerializeToString()), "checker rejects")


def test_invalid_utf8_string(tmp_path):
    model = matmul_model()
    model.graph.node[0].name = "QQQQ"
    data = model.SerializeToString()
    broken = data.replace(b"QQQQ", b"\xff\xfe\xfd\xfc")  # same length: still well-formed protobuf
    _load_error(_write(tmp_path, "m.onnx", broken), "UTF-8|not a valid ONNX|cannot import|checker")


def test_graph_that_graphsurgeon_cannot_import(tmp_path, monkeypatch):
    path = _write(tmp_path, "m.onnx", matmul_model().SerializeToString())

    def broken_import(proto):
        raise KeyError("boom")

    monkeypatch.setattr("onnx_graphsurgeon.import_onnx", broken_import)
    _load_error(path, "cannot import the graph")


def test_unreadable_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads files regardless of permissions")
    path = _write(tmp_path, "m.onnx", matmul_model().SerializeToString())
    path.chmod(0)
    _load_error(path, "cannot read")


def test_large_tensor_with_wrong_raw_size_is_a_checker_failure(tmp_path):
    model = matmul_model(np.ones((64, 64), np.float32))
    model.graph.initializer[0].raw_data = b"\0" * (64 * 64 * 4 - 8)
    _load_error(_write(tmp_path, "m.onnx", model.SerializeToString()), "holds 16376 bytes of raw data")


def test_the_checker_never_gets_the_weights(tmp_path, monkeypatch):
    model = matmul_model(np.ones((512, 512), np.float32))  # 1 MB
    path = _write(tmp_path, "m.onnx", model.SerializeToString())
    seen = []
    real_check = onnx.checker.check_model

    def recording_check(proto, *args, **kwargs):
        seen.append(proto.ByteSize())
        return real_check(proto, *args, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", recording_check)
    model = load(path)
    assert seen and max(seen) < 10_000
    assert model.graph.tensors()["W"].values.shape == (512, 512)


def test_checker_defers_ops_only_onnxruntime_knows(tmp_path):
    """-O3 output at opset < 17 holds onnxruntime's default-domain LayerNormalization:
    the onnx checker has no schema for it there, onnxruntime runs it; load must accept it."""
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    from onnxforge.io import load

    node = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5)
    graph = helper.make_graph(
        [node], "ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        initializer=[numpy_helper.from_array(np.ones(4, np.float32), "g"),
                     numpy_helper.from_array(np.zeros(4, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = 7
    path = tmp_path / "ln12.onnx"
    path.write_bytes(model.SerializeToString())
    loaded = load(path)
    assert any("onnxruntime implements it" in n for n in loaded.notes)
    # an op nobody implements is still refused
    model.graph.node[0].op_type = "NoSuchOp"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelLoadError, match="NoSuchOp"):
        load(path)
