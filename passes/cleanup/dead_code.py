"""eliminate-dead-code: nodes and constants that no graph output depends on.

Identity: a graph's outputs are a function of the nodes they transitively read; the
rest can go. onnx-graphsurgeon's cleanup walks back from each graph's outputs and
counts the outer-scope tensors read inside If/Loop/Scan bodies as used.

Preconditions / what stays:
  * main-graph inputs and outputs (the model's interface) never change;
  * subgraph inputs stay too: Loop and Scan bodies bind them by position (iteration
    count, condition, carried and scanned values), so dropping an unused one would
    shift the others; If branches have none;
  * multi-output nodes keep every output slot (outputs are positional).
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxforge.context import PassContext
from onnxforge.model import iter_graphs
from onnxforge.passes.base import Pass, PassResult

from .common import finish


def census(graph: gs.Graph) -> tuple[int, int]:
    """(nodes, distinct constants read by nodes) over the graph and its subgraphs."""
    nodes = 0
    consts: set[int] = set()
    for g in iter_graphs(graph):
        nodes += len(g.nodes)
        for node in g.nodes:
            consts.update(id(t) for t in node.inputs if isinstance(t, gs.Constant))
    return nodes, len(consts)


class EliminateDeadCode(Pass):
    name = "eliminate-dead-code"
    description = "remove nodes and constants no output depends on (graph inputs and outputs stay)"
    tolerance = (0.0, 0.0)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        nodes_before, consts_before = census(graph)
        finish(graph)
        nodes_after, consts_after = census(graph)
        return PassResult.from_counts(
            {"removed_node": nodes_before - nodes_after, "removed_initializer": consts_before - consts_after}
        )


PASSES: tuple[type[Pass], ...] = (EliminateDeadCode,)
