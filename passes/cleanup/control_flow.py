"""If whose condition is known before run time becomes its taken branch (a rule of fold-constants).

Identity: If(c) with c a constant runs the same branch on every run, so the branch's
nodes can run in the enclosing graph and the If's readers read the branch outputs.
Besides the node, this drops the untaken branch, which may be statically invalid once
shapes are pinned (silero_vad's decoder checks the state's batch size this way).
fold-constants sweeps to a fixpoint, so a condition that folds only after other folding
(Shape -> Gather -> Equal on static dims) is inlined in a later sweep. The rule is offered
every graph of the model, so Ifs inside Loop and Scan bodies and nested branches fold too.

Preconditions:
  * the condition is a constant with one element (a condition computed from tensor values or
    from a graph input depends on data: refused, with the tensor named);
  * an If output that is a graph output is replaced by the branch's tensor (which takes the
    model output's name and, when the branch left it untyped, the If output's type), so that
    tensor must be made by a node of the branch (a branch returning an outer value or
    returning one tensor twice is refused);
  * names: a tensor the branch makes whose name is defined elsewhere in the model (the other
    branch may reuse it; the enclosing scope or another If's branch may too) is renamed to a
    fresh name before the move. The branch reads outer-scope values by reference (the same
    tensor objects), so those reads stay correct in the enclosing graph.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match

from .common import DEFAULT_DOMAINS, IndexedRule, const_nbytes, position, remove_node, replace_uses


def model_names(index) -> set[str]:
    """Every tensor name any graph of the model defines (inputs, node outputs, initializers)."""
    names: set[str] = set()
    for g in index.graphs:
        names.update(t.name for t in g.inputs)
        for node in g.nodes:
            names.update(t.name for t in node.outputs if not t.is_empty())
            names.update(t.name for t in node.inputs if isinstance(t, gs.Constant))
    return names


@dataclasses.dataclass(frozen=True)
class IfMatch:
    cond: gs.Tensor


class InlineConstantIf(IndexedRule):
    name = "inlined_if"
    anchor_ops = ("If",)

    def match(self, graph, node):
        if node.domain not in DEFAULT_DOMAINS or not node.inputs:
            return None
        return Match([node], IfMatch(node.inputs[0]))

    def check(self, graph, match, ctx):
        cond = match.info.cond
        if not isinstance(cond, gs.Constant):
            return self.refusal(f"the condition depends on data ({cond.name})", match)
        if const_nbytes(cond) > 64 or np.asarray(cond.values).size != 1:
            return self.refusal("the condition is not a single value", match)
        node = match.nodes[0]
        branch = node.attrs["then_branch" if bool(np.asarray(cond.values).reshape(-1)[0]) else "else_branch"]
        made = {id(t) for n in branch.nodes for t in n.outputs}
        for out, result in zip(node.outputs, branch.outputs):
            if self.index.is_graph_output(out) and (id(result) not in made or list(branch.outputs).count(result) > 1):
                return self.refusal("an If output is a graph output and the branch returns a value it does not make once",
                                    match)
        return None

    def rewrite(self, graph, match, ctx):
        node = match.nodes[0]
        taken = bool(np.asarray(match.info.cond.values).reshape(-1)[0])
        branch = node.attrs["then_branch" if taken else "else_branch"]
        self.rename_clashes(branch, node)
        at = position(node, graph)
        graph.nodes[at:at] = list(branch.nodes)
        self.index.adopt(list(branch.nodes), graph)
        for if_graph in (node.attrs["then_branch"], node.attrs["else_branch"]):
            self.index.forget(if_graph)
        root = self.index.root
        for out, result in zip(list(node.outputs), list(branch.outputs)):
            if any(t is out for t in root.outputs):
                # The model's output keeps its name: the branch's tensor takes it.
                name = out.name
                for i, t in enumerate(root.outputs):
                    if t is out:
                        root.outputs[i] = result
                out.name = f"{name}__inlined"
                result.name = name
                # A branch output may be untyped (legal in a subgraph); a model output must
                # keep the type the If declared for it.
                if result.dtype is None:
                    result.dtype = out.dtype
                if result.shape is None:
                    result.shape = out.shape
            replace_uses(out, result, self.index)
        remove_node(node, graph)

    def rename_clashes(self, branch: gs.Graph, node: gs.Node) -> None:
        """Give the branch's own tensors fresh names where another graph defines the same name."""
        skip = {id(node.attrs["then_branch"]), id(node.attrs["else_branch"])}
        elsewhere: set[str] = set()
        for g in self.index.graphs:
            if id(g) in skip:
                continue
            elsewhere.update(t.name for t in g.inputs)
            for other in g.nodes:
                elsewhere.update(t.name for t in other.outputs if not t.is_empty())
        taken = model_names(self.index)
        base = (node.name or "If").replace("/", "_")
        for inner in branch.nodes:
            for tensor in inner.outputs:
                if tensor.is_empty() or tensor.name not in elsewhere:
                    continue
                k, fresh = 0, f"{tensor.name}__{base}"
                while fresh in taken:
                    k += 1
                    fresh = f"{tensor.name}__{base}_{k}"
                taken.add(fresh)
                tensor.name = fresh
