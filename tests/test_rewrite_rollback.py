"""Verification finds the one bad rewrite inside a pass and rolls back only it;
rules record which original tensor each new tensor stands for (the name map)."""
import numpy as np
import onnx
import pytest
from onnx import helper

import onnx_graphsurgeon as gs
from onnxforge import Model, PassContext, PassManager
from onnxforge.errors import VerificationError
from onnxforge.pass_manager import NAME_MAP_KEY, read_name_map
from onnxforge.passes.base import Match, Rule, RulePass

N = 8  # Mul nodes; one of them multiplies by 2, the others by 1


def _model(bad: int = 5) -> Model:
    nodes, inits, prev = [], [], "x"
    for i in range(N):
        c = f"c{i}"
        inits.append(helper.make_tensor(c, onnx.TensorProto.FLOAT, [], [2.0 if i == bad else 1.0]))
        nodes.append(helper.make_node("Mul", [prev, c], [f"m{i}"], name=f"mul{i}"))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}"))
        prev = f"r{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"], name="out"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])], inits)
    return Model.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


class DropMulByOne(Rule):
    """Wrong on purpose: drops every Mul by a scalar constant without checking it is 1."""

    name = "test-drop-mul"
    anchor_ops = ("Mul",)

    def match(self, graph, node):
        return Match([node]) if isinstance(node.inputs[1], gs.Constant) else None

    def rewrite(self, graph, match, ctx):
        node = match.nodes[0]
        src, dst = node.inputs[0], node.outputs[0]
        for reader in list(dst.outputs):
            reader.inputs[reader.inputs.index(dst)] = src
        node.outputs.clear()


class DropMulPass(RulePass):
    name = "test-drop-mul-pass"
    rules = (DropMulByOne,)


class ReluAsMax(Rule):
    """Exact: Relu(x) as Max(x, 0), a new node with a new output name."""

    name = "test-relu-as-max"
    anchor_ops = ("Relu",)

    def match(self, graph, node):
        return Match([node])

    def rewrite(self, graph, match, ctx):
        node = match.nodes[0]
        out = node.outputs[0]
        new = gs.Variable(f"{out.name}_max", dtype=out.dtype)
        zero = gs.Constant(f"{node.name}_zero", np.zeros((), np.float32))
        graph.nodes.append(gs.Node("Max", f"{node.name}_max", inputs=[node.inputs[0], zero], outputs=[new]))
        for reader in list(out.outputs):
            reader.inputs[reader.inputs.index(out)] = new
        node.outputs.clear()


class ReluAsMaxPass(RulePass):
    name = "test-relu-as-max-pass"
    rules = (ReluAsMax,)


def test_only_the_bad_rewrite_is_rolled_back():
    out, report = PassManager([DropMulPass()]).run(_model(bad=5), PassContext())
    muls = [n.name for n in out.graph.nodes if n.op == "Mul"]
    assert muls == ["mul5"]  # the 7 correct rewrites are kept
    assert report.verification["ok"]
    (rolled,) = report.rolled_back
    assert rolled["pass"] == "test-drop-mul-pass" and rolled["rule"] == "test-drop-mul"
    assert rolled["nodes"] == ["mul5"]
    assert any(r["rule"] == "test-drop-mul" and "rolled back" in r["reason"] and r["nodes"] == ("mul5",)
               for r in report.refusals)


def test_strict_names_the_rule_and_nodes():
    with pytest.raises(VerificationError, match=r"rule test-drop-mul on node\(s\) mul2 of pass test-drop-mul-pass"):
        PassManager([DropMulPass()], strict=True).run(_model(bad=2), PassContext())


def test_report_line_names_rule_and_nodes():
    from onnxforge.report import rolled_back_line

    _out, report = PassManager([DropMulPass()]).run(_model(bad=0), PassContext())
    line = rolled_back_line(report.rolled_back[0])
    assert "rewrite test-drop-mul on node(s) mul0 rolled back" in line


def test_name_map_records_new_tensors_and_is_written_to_metadata(tmp_path):
    from onnxforge.io import load, save

    out, _report = PassManager([ReluAsMaxPass()]).run(_model(bad=-1), PassContext())
    name_map = read_name_map(out)
    assert name_map == {f"r{i}_max": f"r{i}" for i in range(N)}
    save(out, tmp_path / "m.onnx")
    again = load(tmp_path / "m.onnx")
    assert read_name_map(again) == name_map
    assert [p.key for p in again.meta.metadata_props].count(NAME_MAP_KEY) == 1


def test_name_map_leaves_removed_noops_out():
    out, _report = PassManager([DropMulPass()]).run(_model(bad=-1), PassContext())
    assert not [n for n in out.graph.nodes if n.op == "Mul"]
    assert read_name_map(out) == {}  # readers of m_i read x / r_(i-1): tensors standing for themselves
