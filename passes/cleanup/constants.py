"""constant-to-initializer: ``y = Constant<value=T>()`` becomes the initializer ``y = T``.

Identity: a Constant node's output equals its attribute tensor on every run, so
consumers can read the tensor directly. The same holds for value_float(s) and
value_int(s) (float32 / int64 tensors of rank 0 or 1).

Preconditions:
  * the value is a dense tensor, a float(s) or an int(s) attribute (sparse and
    string values stay Constant nodes);
  * the output is no graph output (an initializer cannot take a graph output's place);
  * the tensor stays in its scope: gs exports a constant as an initializer of each
    graph whose nodes read it, so a constant read from other (sub)graphs is
    converted only when it is small (``SHARED_CONSTANT_BYTES``).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, Pass

from .common import DEFAULT_DOMAINS, IndexedRule, IndexedRulePass, const_nbytes, remove_node, replace_uses, shared_placement_ok


def attribute_value(node: gs.Node) -> gs.Constant | np.ndarray | None:
    """The node's value as a gs Constant (kept lazy) or an array, None for unsupported forms."""
    attrs = node.attrs
    if isinstance(attrs.get("value"), gs.Constant):
        return attrs["value"]
    if "value_float" in attrs:
        return np.array(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.array(list(attrs["value_floats"]), dtype=np.float32)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.array(list(attrs["value_ints"]), dtype=np.int64)
    return None


@dataclasses.dataclass(frozen=True)
class ConstantMatch:
    value: gs.Constant | np.ndarray  # the Constant node's value (a Constant: one holding external data)


class ConstantNodeToInitializer(IndexedRule):
    name = "constant-to-initializer"
    anchor_ops = ("Constant",)

    def match(self, graph, node):
        if node.domain not in DEFAULT_DOMAINS or len(node.outputs) != 1:
            return None
        value = attribute_value(node)
        if value is None:
            return None
        return Match([node], ConstantMatch(value))

    def check(self, graph, match, ctx):
        out = match.nodes[0].outputs[0]
        if self.index.is_graph_output(out):
            return self.refusal("its output is a graph output", match)
        value = match.info.value
        nbytes = const_nbytes(value) if isinstance(value, gs.Constant) else value.nbytes
        if not shared_placement_ok(out, graph, self.index, nbytes):
            return self.refusal("read by other (sub)graphs and too large to copy into each", match)
        return None

    def rewrite(self, graph, match, ctx):
        node = match.nodes[0]
        out = node.outputs[0]
        value = match.info.value
        if isinstance(value, gs.Constant):
            tensor = gs.Constant(out.name, value._values, data_location=value.data_location,
                                 export_dtype=value.export_dtype)
        else:
            tensor = gs.Constant(out.name, value)
        remove_node(node, graph)
        replace_uses(out, tensor, self.index)


class ConstantToInitializer(IndexedRulePass):
    name = "constant-to-initializer"
    description = "Constant nodes become initializers (graph-level constant tensors) of their own scope"
    tolerance = (0.0, 0.0)
    rules = (ConstantNodeToInitializer,)


PASSES: tuple[type[Pass], ...] = (ConstantToInitializer,)
