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
    """x[2,4] @ (Cast(wq int8, full range) * 0.02)."""
    wq = np.random.default_rng(3).integers(-127, 128, (4, 6)).astype(np.int8)
    wq[:2] = np.where(np.arange(6) % 2, 127, -127)  # pairs whose u8 x s8 sums pass int16
    nodes = [
        helper.make_node("Cast", ["wq"], ["wf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["wf", "ws"], ["w"], name="dequant"),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])],
                              [numpy_helper.from_array(wq, "wq"),
                               numpy_helper.from_array(np.full((1, 6), 0.02, np.float32), "ws")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


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
