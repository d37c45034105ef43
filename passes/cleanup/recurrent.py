"""A zero initial state of LSTM/GRU/RNN is the absent one (a rule of simplify-shapes).

tf2onnx writes an LSTM's initial hidden and cell states as
``Shape(X) -> Slice (batch) -> Concat([dirs], batch, [hidden]) -> ConstantOfShape(0)``:
four nodes per state that exist only to make zeros of a dynamic batch size. The ONNX
spec defines a missing ``initial_h`` / ``initial_c`` as zeros, so an input that is
ConstantOfShape of 0 (or a constant tensor of zeros) can be left out; the chain making
its shape then has no reader and goes. Exact: the recurrence starts from the same zeros.

Refused (reason in --explain): the state's value is not zero (not the default), or the
state is computed from tensor values (depends on data).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match
from onnxforge.passes.matching import producer_op

from .common import DEFAULT_DOMAINS, IndexedRule, small_value

# Input positions of the initial states: LSTM initial_h, initial_c; GRU/RNN initial_h.
STATE_INPUTS = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}


def zero_fill(tensor: gs.Tensor) -> bool | None:
    """True: zeros; False: known not all zero; None: made from data."""
    if isinstance(tensor, gs.Constant):
        value = small_value(tensor, 1 << 16)
        return None if value is None else not np.any(value)
    node = producer_op(tensor, "ConstantOfShape")
    if node is None:
        return None
    fill = node.attrs.get("value")
    if fill is None:
        return True  # the default fill is float 0
    return not np.any(np.asarray(fill.values))


@dataclasses.dataclass(frozen=True)
class StateMatch:
    slots: tuple[int, ...]  # the node's initial-state inputs that are given


class DropZeroInitialState(IndexedRule):
    name = "zero-initial-state-dropped"
    anchor_ops = tuple(STATE_INPUTS)

    def match(self, graph, node):
        if node.domain not in DEFAULT_DOMAINS:
            return None
        slots = [i for i in STATE_INPUTS[node.op] if i < len(node.inputs) and not node.inputs[i].is_empty()]
        return Match([node], StateMatch(tuple(slots))) if slots else None

    def check(self, graph, match, ctx):
        node = match.nodes[0]
        states = [zero_fill(node.inputs[i]) for i in match.info.slots]
        if not any(states):
            if False in states:
                return self.refusal("the initial state is not zero (not the default)", match)
            return self.refusal("the initial state is computed from tensor values (depends on data)", match)
        return [i for i, zero in zip(match.info.slots, states) if zero]

    def rewrite(self, graph, match, ctx):
        node = match.nodes[0]
        for i in match.plan:
            node.inputs[i] = gs.Variable.empty()
