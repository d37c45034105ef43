"""Shape vectors as the attention matchers read them: a list of ints (constant entries) and
``Dim(source, index)`` (entry ``index`` of ``source``'s runtime shape), from constants, Concat,
``Unsqueeze(Gather(Shape(y), i))``, ``Shape(y, start, end)`` and ``Slice(Shape(y), s, e)``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from ._match import const_value, producer, scalar

INT64_MAX = np.iinfo(np.int64).max
UNKNOWN = "?"  # a shape entry computed at runtime from something other than a Shape


@dataclasses.dataclass(frozen=True)
class Dim:
    """Entry ``index`` of the runtime shape of ``source``."""

    source: gs.Tensor
    index: int


def _slice_range(node: gs.Node, rank: int) -> tuple[int, int] | None:
    starts, ends = (const_value(t) for t in node.inputs[1:3])
    if starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return None
    if len(node.inputs) > 3 and (v := const_value(node.inputs[3])) is not None and v.reshape(-1)[0] != 0:
        return None  # only slices along axis 0 of a shape vector
    if len(node.inputs) > 4 and (v := const_value(node.inputs[4])) is not None and v.reshape(-1)[0] != 1:
        return None
    start, end = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
    start = max(0, start + rank if start < 0 else start)
    end = min(rank, end + rank if end < 0 else end)
    return start, end


def _shape_node_dims(node: gs.Node, rank: int) -> list[Dim]:
    start = int(node.attrs.get("start", 0))
    end = node.attrs.get("end")
    start = start + rank if start < 0 else start
    stop = rank if end is None else (int(end) + rank if int(end) < 0 else min(int(end), rank))
    return [Dim(node.inputs[0], i) for i in range(start, stop)]


def _shape_dims(tensor: gs.Tensor, rank: int) -> list[Any] | None:
    """``Shape(y)``, ``Shape(y, start, end)`` or ``Slice(Shape(y))`` as a list of Dim."""
    node = producer(tensor, "Shape", "Slice")
    if node is None:
        return None
    if node.op == "Shape":
        return _shape_node_dims(node, rank)
    shape = producer(node.inputs[0], "Shape")
    if shape is None:
        return None
    dims = _shape_node_dims(shape, rank)
    span = _slice_range(node, len(dims))
    return None if span is None else dims[span[0]:span[1]]


def shape_entries(tensor: gs.Tensor, source_rank: int = 4) -> list[Any] | None:
    """A shape vector as a list of ints (constants) and ``Dim``s (runtime dims), or None.

    Understands constant vectors and Concat of constants, ``Unsqueeze(Gather(Shape(y), i))``,
    ``Shape(y, start, end)`` and ``Slice(Shape(y), s, e)`` (``y`` of rank ``source_rank``).
    """
    value = const_value(tensor)
    if value is not None:
        return [int(v) for v in value.reshape(-1)]
    node = producer(tensor)
    if node is None:
        return None
    if node.op == "Concat":
        entries: list[Any] = []
        for part in node.inputs:
            sub = shape_entries(part, source_rank)
            if sub is None:
                return None
            entries += sub
        return entries
    if node.op == "Unsqueeze":
        gather = producer(node.inputs[0], "Gather")
        shape = producer(gather.inputs[0], "Shape") if gather is not None else None
        index = scalar(gather.inputs[1]) if gather is not None else None
        if shape is None or index is None:
            return [UNKNOWN]  # a runtime scalar made into one entry
        dims = _shape_node_dims(shape, source_rank)
        return [dims[int(index)]] if -len(dims) <= int(index) < len(dims) else None
    return _shape_dims(tensor, source_rank)
