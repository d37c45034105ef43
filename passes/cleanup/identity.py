"""eliminate-identity: ``Identity(x) = x`` and inference-mode ``Dropout(x) = x``.

Identities:
  * Identity(x) = x, bit for bit.
  * Dropout(x) = x when it does not drop: opset < 12 Dropout at inference (the only
    mode a runtime runs), opset >= 12 when training_mode is absent or a constant
    false, or at any mode when ratio is a constant 0.

Preconditions:
  * Dropout's mask output is unused (no consumer, no graph output);
  * when the output is a graph output its name is kept: the input tensor is
    renamed to it, which needs the input to be made by a node of the same graph
    and to be no graph input or output; otherwise the node stays.
"""
from __future__ import annotations

from onnxforge.passes.base import Match, Pass

from .common import DEFAULT_DOMAINS, IndexedRule, IndexedRulePass, bypass, bypass_refusal, small_value


class RemoveIdentity(IndexedRule):
    name = "removed-identity"
    anchor_ops = ("Identity",)

    def match(self, graph, node):
        if node.domain not in DEFAULT_DOMAINS or len(node.inputs) != 1 or len(node.outputs) != 1:
            return None
        return Match([node])

    def check(self, graph, match, ctx):
        return bypass_check(self, match)

    def rewrite(self, graph, match, ctx):
        node = match.nodes[0]
        bypass(node, node.inputs[0], node.outputs[0], self.index)


class RemoveDropout(IndexedRule):
    name = "removed-dropout"
    anchor_ops = ("Dropout",)

    def match(self, graph, node):
        if node.domain not in DEFAULT_DOMAINS or not node.inputs or not node.outputs:
            return None
        return Match([node])

    def check(self, graph, match, ctx):
        node = match.nodes[0]
        mask = node.outputs[1] if len(node.outputs) > 1 else None
        if mask is not None and not mask.is_empty() and (mask.outputs or self.index.is_graph_output(mask)):
            return self.refusal("its mask output is used", match)
        if not self.drops_nothing(node):
            return self.refusal("training_mode is not a constant false and ratio is not 0", match)
        return bypass_check(self, match)

    @staticmethod
    def drops_nothing(node) -> bool:
        ratio = node.inputs[1] if len(node.inputs) > 1 and not node.inputs[1].is_empty() else None
        if ratio is not None:
            value = small_value(ratio, 64)
            if value is not None and value.size == 1 and float(value.reshape(-1)[0]) == 0.0:
                return True
        training = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
        if training is None:
            return True
        value = small_value(training, 64)
        return value is not None and value.size == 1 and not bool(value.reshape(-1)[0])

    def rewrite(self, graph, match, ctx):
        node = match.nodes[0]
        bypass(node, node.inputs[0], node.outputs[0], self.index)


def bypass_check(rule: IndexedRule, match: Match):
    node = match.nodes[0]
    reason = bypass_refusal(node, node.inputs[0], node.outputs[0], rule.index)
    return rule.refusal(reason, match) if reason else None


class EliminateIdentity(IndexedRulePass):
    name = "eliminate-identity"
    description = "remove Identity and non-dropping Dropout nodes, keeping graph output names"
    tolerance = (0.0, 0.0)
    rules = (RemoveIdentity, RemoveDropout)


PASSES: tuple[type[Pass], ...] = (EliminateIdentity,)
