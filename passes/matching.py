"""Structural helpers every rule family shares (cleanup, fusion, quant): which node
makes a tensor, and whether it is a default-domain op. One home, one behaviour."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxforge.opsets import DEFAULT_DOMAINS  # noqa: F401  (rules import it from here)


def producer(tensor: gs.Tensor, *ops: str) -> gs.Node | None:
    """The node that makes ``tensor`` (when its op is one of ``ops``, if given; any domain)."""
    node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    return node if node is not None and (not ops or node.op in ops) else None


def producer_op(tensor: gs.Tensor, *ops: str) -> gs.Node | None:
    """The default-domain node of one of ``ops`` that makes ``tensor``."""
    node = producer(tensor, *ops)
    return node if node is not None and node.domain in DEFAULT_DOMAINS else None
