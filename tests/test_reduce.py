"""`onnxforge reduce`: a model with one wrong node shrinks to a few nodes holding it."""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxforge.cli import main

WRONG = "add_5"


def _chain(wrong: bool = False, sin_at: int | None = None) -> onnx.ModelProto:
    """x -> 12 nodes (MatMul, Add, Tanh, ... with a side branch) -> y. ``wrong``: one Add
    adds another constant; ``sin_at``: one Tanh is a Sin."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(4):
        w = rng.standard_normal((6, 6)).astype(np.float32) * 0.3
        b = rng.standard_normal((6,)).astype(np.float32)
        if wrong and f"add_{i * 2 + 1}" == WRONG:
            b = b + 0.5
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        act = "Sin" if sin_at == i else "Tanh"
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"mm{i}"], name=f"matmul_{i * 2}"),
                  helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"a{i}"], name=f"add_{i * 2 + 1}"),
                  helper.make_node(act, [f"a{i}"], [f"t{i}"], name=f"act_{i}")]
        prev = f"t{i}"
    nodes.append(helper.make_node("Relu", ["t1"], ["side"], name="side_relu"))  # a branch off the chain
    nodes.append(helper.make_node("Add", [prev, "side"], ["y"], name="join"))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_wrong_node_reduces_to_at_most_3_nodes(tmp_path, capsys):
    orig, bad = tmp_path / "orig.onnx", tmp_path / "bad.onnx"
    onnx.save(_chain(), orig)
    onnx.save(_chain(wrong=True), bad)
    out = tmp_path / "reduced.onnx"
    assert main(["reduce", str(bad), "--reference", str(orig), "-o", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    reduced = onnx.load(out)
    names = [n.name for n in reduced.graph.node]
    assert len(names) <= 3 and WRONG in names
    assert result["original_nodes"] == 14 and [n["name"] for n in result["nodes"]] == names
    assert "differs from the original" in result["why"]
    # the cut input is a graph input fed with the recorded (original) value, and still shows the bug
    feed = dict(np.load(tmp_path / "reduced.inputs.npz"))
    assert set(feed) == {i.name for i in reduced.graph.input}
    import onnxruntime as ort

    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feed)
    assert any(o.shape == (3, 6) for o in got)
    onnx.checker.check_model(reduced)
    assert not list(tmp_path.glob(".*.tmp"))


def test_until_command(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(_chain(sin_at=2), model)
    out = tmp_path / "r.onnx"
    cmd = "! grep -q Sin {model}"  # exits 1 while the candidate holds a Sin node (cheap: no interpreter start)
    assert main(["reduce", str(model), "--until", cmd, "-o", str(out), "--max-steps", "60"]) == 0
    text = capsys.readouterr().out
    assert [n.op_type for n in onnx.load(out).graph.node] == ["Sin"]
    assert "reduced 14 nodes to 1: act_2 (Sin)" in text


def test_a_model_that_does_not_fail_exits_2(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(_chain(), model)
    assert main(["reduce", str(model), "-o", str(tmp_path / "r.onnx")]) == 2  # onnxruntime agrees with onnx
    err = capsys.readouterr().err
    assert "does not fail" in err and "Traceback" not in err
    assert not (tmp_path / "r.onnx").exists()


def test_step_budget_bounds_the_search(tmp_path, capsys):
    orig, bad = tmp_path / "orig.onnx", tmp_path / "bad.onnx"
    onnx.save(_chain(), orig)
    onnx.save(_chain(wrong=True), bad)
    out = tmp_path / "r.onnx"
    assert main(["reduce", str(bad), "--reference", str(orig), "-o", str(out), "--max-steps", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] <= 4  # 3 search steps + the final check
    assert WRONG in [n["name"] for n in result["nodes"]]
