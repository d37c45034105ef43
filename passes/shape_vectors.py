"""Shape vectors read from the graph, one representation for every rule family: a
``Piece`` is what one part of a shape vector holds: constant values, or the dims
[start, start + count) of a tensor's runtime shape (read through ``Shape(x)``,
``Shape(x, start, end)``, ``Gather(Shape(x), k)`` [-> ``Unsqueeze``] or
``Slice(Shape(x), a, b)``), or neither, with why (``why``: what it depends on).

  * simplify-shapes (cleanup/shapes.py) reads each input of a Concat as one piece
    (``concat_pieces``), with ranks from shape inference;
  * the attention matchers (fusion) read a whole vector as entries (``shape_entries``):
    ints for constants and one-dim pieces (``Piece.dim``) for runtime dims, through
    nested Concats, the source's rank assumed.

Where constants come from is the caller's (``ints``): cleanup reads initializers only,
the fusions also Constant nodes and Identity chains (``_match.const_value``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from .matching import producer_op

INT64_MAX = np.iinfo(np.int64).max
UNKNOWN = "?"  # a shape entry computed at runtime from something other than a Shape
OUT_OF_RANGE = "the gathered index is out of range"
DATA = "computed from tensor values (depends on data)"

Ints = Callable[[gs.Tensor], "np.ndarray | None"]  # an integer constant's values, or None


@dataclasses.dataclass(frozen=True)
class Piece:
    """Constant values, or dims [start, start+count) of ``source``'s shape (read by ``nodes``)."""

    values: tuple[int, ...] | None = None
    source: gs.Tensor | None = None
    start: int = 0
    count: int = 0
    nodes: tuple[gs.Node, ...] = ()
    why: str = ""  # set when the piece is neither (what it depends on)

    @property
    def length(self) -> int:
        return len(self.values) if self.values is not None else self.count

    @classmethod
    def dim(cls, source: gs.Tensor, index: int) -> "Piece":
        """Entry ``index`` of ``source``'s runtime shape."""
        return cls(source=source, start=index, count=1)

    def is_dim(self, source: gs.Tensor | None, index: int) -> bool:
        """One runtime dim: entry ``index`` of ``source``'s shape (any source when None)."""
        return self.count == 1 and self.source is not None and (source is None or self.source is source) \
            and self.start == index


class AssumedRank:
    """Shape "inference" that knows only the rank of every shape source (the fusions' view)."""

    def __init__(self, rank: int):
        self.rank = rank

    def shape(self, tensor: gs.Tensor) -> tuple:
        return (None,) * self.rank


def _listed(value: np.ndarray | None) -> list[int] | None:
    return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]


def rank_of(tensor: gs.Tensor, types) -> int | None:
    shape = types.shape(tensor)
    return None if shape is None else len(shape)


def clamp_index(index: int, rank: int) -> int:
    return min(max(index + rank if index < 0 else index, 0), rank)


def shape_node(tensor: gs.Tensor, types) -> tuple[int, int, gs.Node] | str:
    """The Shape node making ``tensor`` with its [start, end) over the source, or why not."""
    node = producer_op(tensor, "Shape")
    if node is None:
        return DATA
    start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
    rank = rank_of(node.inputs[0], types)
    if rank is None and (start < 0 or end is None or int(end) < 0):
        return "the rank of the shape's source is unknown"
    if rank is None:
        return start, int(end), node
    return clamp_index(start, rank), clamp_index(int(rank if end is None else end), rank), node


def shape_piece(tensor: gs.Tensor, types, ints: Ints) -> Piece:
    """What a part of a shape vector holds (structure only; constants by value)."""
    values = _listed(ints(tensor))
    if values is not None:
        return Piece(values=tuple(values))
    direct = producer_op(tensor, "Shape")
    if direct is not None:
        found = shape_node(tensor, types)
        if isinstance(found, str):
            return Piece(why=found)
        start, end, node = found
        return Piece(source=node.inputs[0], start=start, count=max(end - start, 0), nodes=(node,))
    unsq = producer_op(tensor, "Unsqueeze")
    gather = producer_op(unsq.inputs[0], "Gather") if unsq is not None else producer_op(tensor, "Gather")
    if gather is not None:
        return _gather_piece(gather, unsq, types, ints)
    sliced = producer_op(tensor, "Slice")
    if sliced is not None:
        return slice_piece(sliced, types, ints)
    return Piece(why=DATA)


def _gather_piece(gather: gs.Node, unsq: gs.Node | None, types, ints: Ints) -> Piece:
    index_value = ints(gather.inputs[1])
    index = _listed(index_value)
    if index is None or len(index) != 1 or int(gather.attrs.get("axis", 0)) != 0:
        return Piece(why="an index into the shape is not a constant")
    if unsq is not None:
        axes = _listed(ints(unsq.inputs[1])) if len(unsq.inputs) > 1 else [int(a) for a in unsq.attrs.get("axes", [])]
        if axes not in ([0], [-1]) or np.ndim(index_value) != 0:
            return Piece(why="the gathered dim is not made a 1-element vector")
    elif np.ndim(index_value) != 1:
        return Piece(why="the gathered dim is a scalar")
    found = shape_node(gather.inputs[0], types)
    if isinstance(found, str):
        return Piece(why=found)
    start, end, node = found
    k = index[0] + (end - start) if index[0] < 0 else index[0]
    if not 0 <= k < end - start:
        return Piece(why=OUT_OF_RANGE)
    nodes = (node, gather) + ((unsq,) if unsq is not None else ())
    return Piece(source=node.inputs[0], start=start + k, count=1, nodes=nodes)


def slice_piece(node: gs.Node, types, ints: Ints) -> Piece:
    """``Slice(Shape(x), a, b)`` along its only axis with step 1, as a piece."""
    starts, ends = _listed(ints(node.inputs[1])), _listed(ints(node.inputs[2]))
    axes = _listed(ints(node.inputs[3])) if len(node.inputs) > 3 and not node.inputs[3].is_empty() else [0]
    steps = _listed(ints(node.inputs[4])) if len(node.inputs) > 4 and not node.inputs[4].is_empty() else [1]
    if None in (starts, ends, axes, steps) or len(starts) != 1 or axes not in ([0], [-1]) or steps != [1]:
        return Piece(why="the slice of the shape is not a constant unit-step range")
    found = shape_node(node.inputs[0], types)
    if isinstance(found, str):
        return Piece(why=found)
    start, end, source_shape = found
    n = end - start
    lo, hi = clamp_index(starts[0], n), clamp_index(min(ends[0], INT64_MAX), n)
    return Piece(source=source_shape.inputs[0], start=start + lo, count=max(hi - lo, 0), nodes=(source_shape, node))


def concat_pieces(concat: gs.Node, types, ints: Ints) -> list[Piece]:
    return [shape_piece(t, types, ints) for t in concat.inputs]


def shape_entries(tensor: gs.Tensor, ints: Ints, source_rank: int = 4) -> list[Any] | None:
    """A shape vector as a list of ints (constants) and one-dim pieces (runtime dims), or
    None; through nested Concats, every shape source taken to be of rank ``source_rank``.
    ``UNKNOWN`` stands for an entry an Unsqueeze makes of a runtime scalar that is not a
    dim of a shape."""
    value = ints(tensor)
    if value is not None:
        return _listed(value)
    node = producer_op(tensor)
    if node is None:
        return None
    if node.op == "Concat":
        entries: list[Any] = []
        for part in node.inputs:
            sub = shape_entries(part, ints, source_rank)
            if sub is None:
                return None
            entries += sub
        return entries
    piece = shape_piece(tensor, AssumedRank(source_rank), ints)
    if piece.source is not None:
        return [Piece(source=piece.source, start=piece.start + i, count=1, nodes=piece.nodes) for i in range(piece.count)]
    if node.op == "Unsqueeze" and piece.why != OUT_OF_RANGE:
        return [UNKNOWN]  # a runtime scalar made into one entry
    return None
