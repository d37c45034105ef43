"""Each quantized node's own contribution (that node alone int8, all else float)."""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxforge.passes.quant.contribution import node_contributions, quantized_reads, switch_model


def _qdq(src: str, scale: float, tag: str) -> tuple[list, list, str]:
    inits = [numpy_helper.from_array(np.array(scale, np.float32), f"s_{tag}"),
             numpy_helper.from_array(np.array(0, np.int8), f"z_{tag}")]
    nodes = [helper.make_node("QuantizeLinear", [src, f"s_{tag}", f"z_{tag}"], [f"q_{tag}"], name=f"Q_{tag}"),
             helper.make_node("DequantizeLinear", [f"q_{tag}", f"s_{tag}", f"z_{tag}"], [f"dq_{tag}"], name=f"DQ_{tag}")]
    return nodes, inits, f"dq_{tag}"


def _model(quantized: bool) -> onnx.ModelProto:
    """x -> mm1 -> relu -> mm2 -> y; quantized: x read coarsely (scale 0.25) by mm1, the
    Relu's output read finely (scale 0.05) by mm2 and by add (a second reader)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32) * 0.5, f"w{i}") for i in (1, 2)]
    nodes, a, b = [], "x", "r"
    if quantized:
        n1, i1, a = _qdq("x", 0.25, "x")
        nodes += n1
        inits += i1
    nodes += [helper.make_node("MatMul", [a, "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"], name="relu")]
    if quantized:
        n2, i2, b = _qdq("r", 0.05, "r")
        nodes += n2
        inits += i2
    nodes += [helper.make_node("MatMul", [b, "w2"], ["m2"], name="mm2"), helper.make_node("Add", ["m2", b], ["y"], name="add")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _feeds():
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(2)]


def test_reads_and_switch_model():
    q = _model(True)
    assert [(n.name, i, src) for n, i, src, _pair in quantized_reads(q)] == [("mm1", 0, "x"), ("mm2", 0, "r"), ("add", 1, "r")]
    switched, order = switch_model(q)
    onnx.checker.check_model(switched)
    assert [n.name for n in order] == ["mm1", "mm2", "add"]
    sess = ort.InferenceSession(switched.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = _feeds()[0]
    run = lambda k: sess.run(None, {**feed, "onnxforge_contribution_which": np.array(k, np.int64)})[0]  # noqa: E731
    float_y = ort.InferenceSession(_model(False).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(run(-1), float_y, rtol=1e-5, atol=1e-5)  # -1: every node reads float (unrounded)
    assert not np.array_equal(run(0), float_y)


def test_coarse_input_ranks_first():
    ranked = node_contributions(_model(True), _feeds())
    assert [c.node for c in ranked][0] == "mm1"
    assert {c.node for c in ranked} == {"mm1", "mm2", "add"}
    assert ranked[0].noise_ratio > 10 * ranked[-1].noise_ratio > 0
    assert ranked[0].cosine < 1 and ranked[0].sqnr_db < ranked[-1].sqnr_db
    assert [c.node for c in node_contributions(_model(True), _feeds(), nodes={"add"})] == ["add"]


def test_debug_lists_tensors_and_ranks_the_nodes_to_keep_float(tmp_path, capsys):
    import json

    from onnxforge.cli import main

    onnx.save(_model(False), tmp_path / "f.onnx")
    onnx.save(_model(True), tmp_path / "q.onnx")
    assert main(["debug", str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), "--json", "--samples", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in result["tensors"]] == ["h", "r", "m2", "y"]
    assert [c["node"] for c in result["contributions"]][0] == "mm1"
    assert main(["debug", str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx")]) == 0
    assert "keep float first: mm1, " in capsys.readouterr().out
    assert main(["debug", str(tmp_path / "f.onnx"), str(tmp_path / "f.onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["contributions"] is None  # a float model: nothing to rank
