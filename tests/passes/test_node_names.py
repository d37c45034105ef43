"""passes.base.name_nodes: the one helper that names nodes, on graph-surgeon nodes and NodeProtos
(rule passes: shared names made unique; quant's baseline: unnamed nodes named; pruning: both)."""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from onnxforge.passes.base import name_nodes, unique_node_names


def _protos(*names: str) -> list[onnx.NodeProto]:
    return [helper.make_node("Relu", [f"i{k}"], [f"o{k}"], name=name) for k, name in enumerate(names)]


def test_unnamed_nodes_get_op_and_position_and_avoid_names_taken_later():
    nodes = _protos("", "Relu_2", "", "a")
    name_nodes(nodes, duplicates=False)
    assert [n.name for n in nodes] == ["Relu_0", "Relu_2", "Relu_2_1", "a"]


def test_shared_names_are_kept_without_duplicates_and_renamed_with_it():
    kept = _protos("a", "a", "")
    name_nodes(kept, duplicates=False)
    assert [n.name for n in kept] == ["a", "a", "Relu_2"]
    renamed = _protos("a", "a", "a_1", "")
    name_nodes(renamed)
    assert [n.name for n in renamed] == ["a", "a_2", "a_1", "Relu_3"]


def test_rule_passes_make_names_unique_and_leave_unnamed_nodes():
    x = gs.Variable("x")
    graph = gs.Graph(nodes=[gs.Node("Relu", name=name, inputs=[x], outputs=[gs.Variable(f"y{k}")])
                            for k, name in enumerate(["a", "", "a"])])
    unique_node_names(graph)
    assert [n.name for n in graph.nodes] == ["a", "", "a_1"]
