"""simplify-shapes: shape arithmetic over dynamic dims that needs no dim to be pinned.

Exporters write a Reshape's target as ``Concat`` of pieces read from the data's own
shape (``Shape(x) -> Gather -> Unsqueeze``, ``Shape(x) -> Slice``) and constants, so the
dynamic batch or sequence dim passes through. fold-constants folds these only when the
dims are static; these rules fold them while the dims stay dynamic.

Identities:
  * Gather(Shape(x), k) and Slice(Shape(x), a, b) are constants when the dims they read are
    static after shape inference, even where other dims of x are dynamic (fold-constants folds
    a Shape only when all of its dims are static).
  * Reshape(x, Concat(p_0, ..., p_n)) with allowzero=0, where every piece is a constant or
    the dims ``x.shape[k:k+m]`` sitting at output positions ``k..k+m-1``: a 0 entry of a
    Reshape target copies the input dim at that position (allowzero=0), so each such piece
    can be written as m zeros and the target becomes one constant. Constant pieces keep
    their values (a 0 there already meant "copy" before). No value of any dim is assumed.
  * Reshape(x, Concat(p_0, ..., p_n)) (possibly through a Cast to int64) where every entry is
    a positive constant but one, a single dim d of any origin (another tensor's shape, data):
    the output has as many elements as x, so d = numel(x) / prod(constants) on every run the
    original makes, which is what a -1 entry means; the target becomes one constant. Only
    positive constants beside it: a 0 (copied dim, possibly 0) would make the -1 ambiguous.
  * Concat(a, Concat(b, c), d) = Concat(a, b, c, d) on the same axis (concatenation is
    associative); done when the inner Concat has no other reader, so a node goes away.
  * Concat(..., x.shape[i:j], x.shape[j:k], ...) = Concat(..., x.shape[i:k], ...): adjacent
    pieces read from one tensor's shape at consecutive dims become one ``Shape(x, start=i,
    end=k)`` (opset >= 15), replacing one Shape+Gather+Unsqueeze (or Slice) chain per dim.

The pass also drops zero initial states of LSTM/GRU/RNN (``recurrent.DropZeroInitialState``),
whose shape chains are the same Shape arithmetic in tf2onnx exports.

Refused (reason in --explain): a piece computed from tensor values rather than a shape
(it depends on data), a piece read from another tensor's shape or from other dims than
the position it fills, allowzero=1 (a 0 would be a literal zero), an unknown rank where an
index is negative or open-ended; for the -1 target: more than one entry not a constant, a
constant entry that is not positive.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, Pass
from onnxforge.passes.matching import producer_op
from onnxforge.passes.shape_vectors import Piece, clamp_index, concat_pieces, rank_of, shape_node, slice_piece

from .common import DEFAULT_DOMAINS, IndexedRule, IndexedRulePass, infer_types, remove_node, replace_uses, small_value
from .recurrent import DropZeroInitialState

def _ints(tensor: gs.Tensor) -> np.ndarray | None:
    """A small integer initializer's values (Constant nodes are constant-to-initializer's)."""
    value = small_value(tensor, 1 << 16)
    return value if value is not None and value.dtype.kind in "iu" else None


@dataclasses.dataclass(frozen=True)
class PiecesMatch:
    pieces: tuple[Piece, ...]  # what each input of the shape's Concat holds


@dataclasses.dataclass(frozen=True)
class NestedConcatMatch:
    inner: tuple[int, ...]  # the inputs an inner Concat on the same axis makes


@dataclasses.dataclass(frozen=True)
class ShapeRunsMatch:
    pieces: tuple[Piece, ...]
    runs: tuple[tuple[int, int], ...]  # (first, last) input of each run of consecutive dims of one tensor


@dataclasses.dataclass(frozen=True)
class TargetEntriesMatch:
    pieces: tuple[Piece, ...]  # what each input of the Reshape target's Concat holds
    tensors: tuple[gs.Tensor, ...]  # those inputs


@dataclasses.dataclass(frozen=True)
class StaticDimsMatch:
    value: np.ndarray  # the int64 dims the node reads, all static


class ReshapeCopiesOwnDims(IndexedRule):
    name = "reshape-copies-own-dims"
    anchor_ops = ("Reshape",)

    def match(self, graph, node):
        if len(node.inputs) != 2:
            return None
        concat = producer_op(node.inputs[1], "Concat")
        if concat is None or self.index.graph_of(concat) is not graph:
            return None
        pieces = concat_pieces(concat, self.types, _ints)
        if not any(p.source is not None or p.why for p in pieces):
            return None  # all constant: fold-constants' job
        return Match([node], PiecesMatch(tuple(pieces)))

    def check(self, graph, match, ctx):
        node = match.nodes[0]
        if int(node.attrs.get("allowzero", 0)):
            return self.refusal("allowzero=1: a 0 entry would be a literal zero, not a copied dim", match)
        offset = 0
        for piece in match.info.pieces:
            if piece.why:
                return self.refusal(f"a piece of the target shape is {piece.why}", match)
            if piece.source is not None:
                if piece.source is not node.inputs[0]:
                    return self.refusal("a piece of the target shape reads another tensor's shape", match)
                if piece.start != offset:
                    return self.refusal("a piece of the target shape moves a dim to another position", match)
            offset += piece.length
        return None

    def rewrite(self, graph, match, ctx):
        node = match.nodes[0]
        target = []
        for piece in match.info.pieces:
            target += list(piece.values) if piece.values is not None else [0] * piece.count
        node.inputs[1] = gs.Constant(f"{node.name or 'reshape'}_target", np.array(target, dtype=np.int64))


def _target_concat(reshape: gs.Node) -> gs.Node | None:
    """The Concat building a Reshape's target, directly or through one Cast to int64."""
    cast = producer_op(reshape.inputs[1], "Cast")
    if cast is not None and int(cast.attrs.get("to", 0)) == 7:
        return producer_op(cast.inputs[0], "Concat")
    return producer_op(reshape.inputs[1], "Concat")


class ReshapeInfersOneDim(IndexedRule):
    name = "reshape-infers-one-dim"
    anchor_ops = ("Reshape",)

    def match(self, graph, node):
        if len(node.inputs) != 2:
            return None
        concat = _target_concat(node)
        if concat is None or self.index.graph_of(concat) is not graph:
            return None
        pieces = concat_pieces(concat, self.types, _ints)
        if all(p.values is not None for p in pieces):
            return None  # all constant: fold-constants' job
        return Match([node], TargetEntriesMatch(tuple(pieces), tuple(concat.inputs)))

    def check(self, graph, match, ctx):
        varying = [(p, t) for p, t in zip(match.info.pieces, match.info.tensors) if p.values is None]
        if len(varying) > 1:
            return self.refusal("more than one entry of the target shape is not a constant", match)
        shape = self.types.static_shape(varying[0][1])
        if shape not in ((1,),):
            return self.refusal("the entry that is not a constant is not one dim", match)
        if any(v <= 0 for p in match.info.pieces if p.values is not None for v in p.values):
            return self.refusal("a constant entry of the target is 0 or negative (a -1 would not be unique)", match)
        return None

    def rewrite(self, graph, match, ctx):
        node = match.nodes[0]
        target = []
        for piece in match.info.pieces:
            target += list(piece.values) if piece.values is not None else [-1]
        node.inputs[1] = gs.Constant(f"{node.name or 'reshape'}_target", np.array(target, dtype=np.int64))


def _same_axis(outer: gs.Node, inner: gs.Node, types) -> bool:
    a, b = int(outer.attrs.get("axis", 0)), int(inner.attrs.get("axis", 0))
    if a == b:
        return True
    rank = rank_of(outer.outputs[0], types)
    return rank is not None and clamp_index(a, rank) == clamp_index(b, rank)


class FlattenNestedConcat(IndexedRule):
    name = "flatten-nested-concat"
    anchor_ops = ("Concat",)

    def match(self, graph, node):
        inner = [i for i, t in enumerate(node.inputs) if (p := producer_op(t, "Concat")) is not None
                 and self.index.graph_of(p) is graph and _same_axis(node, p, self.types)]
        return Match([node], NestedConcatMatch(tuple(inner))) if inner else None

    def check(self, graph, match, ctx):
        node = match.nodes[0]
        if all(len(node.inputs[i].outputs) != 1 or self.index.is_graph_output(node.inputs[i])
               for i in match.info.inner):
            return self.refusal("the inner Concat has other readers (flattening would save nothing)", match)
        return None

    def rewrite(self, graph, match, ctx):
        node = match.nodes[0]
        spliced = []
        for i, tensor in enumerate(node.inputs):
            if i in match.info.inner and len(tensor.outputs) == 1 and not self.index.is_graph_output(tensor):
                spliced += list(tensor.inputs[0].inputs)
            else:
                spliced.append(tensor)
        node.inputs.clear()
        node.inputs.extend(spliced)


class MergeShapePieces(IndexedRule):
    name = "merge-shape-pieces"
    anchor_ops = ("Concat",)

    def match(self, graph, node):
        if int(node.attrs.get("axis", 0)) not in (0, -1) or graph.opset < 15:
            return None
        if not node.outputs[0].outputs and not self.index.is_graph_output(node.outputs[0]):
            return None  # dead (another rule took its reader): cleanup drops it
        pieces = concat_pieces(node, self.types, _ints)
        runs, i = [], 0
        while i < len(pieces):
            j = i
            while (j + 1 < len(pieces) and pieces[i].source is not None and pieces[j + 1].source is pieces[i].source
                   and pieces[j + 1].start == pieces[j].start + pieces[j].count):
                j += 1
            if j > i:
                runs.append((i, j))
            i = j + 1
        return Match([node], ShapeRunsMatch(tuple(pieces), tuple(runs))) if runs else None

    def check(self, graph, match, ctx):
        # Each merged piece must go away with the merge, else a Shape node is only added.
        node = match.nodes[0]
        for first, last in match.info.runs:
            for tensor in node.inputs[first:last + 1]:
                if len(tensor.outputs) != 1 or self.index.is_graph_output(tensor):
                    return self.refusal("a piece of the shape is read elsewhere too (merging would add a node)", match)
        return None

    def rewrite(self, graph, match, ctx):
        node, pieces = match.nodes[0], match.info.pieces
        inputs = list(node.inputs)
        for first, last in reversed(match.info.runs):
            start, end = pieces[first].start, pieces[last].start + pieces[last].count
            out = gs.Variable(f"{node.name or 'concat'}_dims_{start}_{end}", dtype=np.int64, shape=[end - start])
            shape = gs.Node("Shape", name=f"{node.name or 'concat'}_shape_{start}_{end}",
                            attrs={"start": start, "end": end}, inputs=[pieces[first].source], outputs=[out])
            graph.nodes.append(shape)
            self.index.adopt([shape], graph)
            inputs[first:last + 1] = [out]
        node.inputs.clear()
        node.inputs.extend(inputs)


class StaticDimsOfShape(IndexedRule):
    name = "static-dims-of-shape"
    anchor_ops = ("Gather", "Slice")

    def match(self, graph, node):
        source_shape = producer_op(node.inputs[0], "Shape")
        if source_shape is None or node.domain not in DEFAULT_DOMAINS:
            return None
        dims = self.types.shape(source_shape.inputs[0])
        found = shape_node(node.inputs[0], self.types)
        if dims is None or isinstance(found, str):
            return None
        start, end, _ = found
        read = list(dims[start:end])
        if node.op == "Gather":
            index = small_value(node.inputs[1], 1 << 12)
            if index is None or index.dtype.kind not in "iu" or int(node.attrs.get("axis", 0)) != 0:
                return None
            if np.any(index < -len(read)) or np.any(index >= len(read)):
                return None
            value = np.array(read, dtype=object)[index.astype(np.int64)]
        else:
            piece = slice_piece(node, self.types, _ints)
            if piece.source is None:
                return None
            value = np.array(dims[piece.start:piece.start + piece.count], dtype=object)
        if any(d is None for d in np.asarray(value).reshape(-1)):
            return None  # a dynamic dim: stays computed at run time
        return Match([node], StaticDimsMatch(np.asarray(value, dtype=np.int64)))

    def check(self, graph, match, ctx):
        if self.index.is_graph_output(match.nodes[0].outputs[0]):
            return self.refusal("its output is a graph output", match)
        return None

    def rewrite(self, graph, match, ctx):
        node = match.nodes[0]
        out = node.outputs[0]
        remove_node(node, graph)
        replace_uses(out, gs.Constant(out.name, match.info.value), self.index)


class SimplifyShapes(IndexedRulePass):
    name = "simplify-shapes"
    description = ("fold shape arithmetic over dynamic dims (Reshape targets from the input's own dims or with one "
                   "inferred dim, nested Concat)")
    tolerance = (0.0, 0.0)
    rules = (StaticDimsOfShape, ReshapeCopiesOwnDims, ReshapeInfersOneDim, MergeShapePieces, FlattenNestedConcat,
             DropZeroInitialState)

    def types(self, graph, ctx):
        return infer_types(graph, ctx)


PASSES: tuple[type[Pass], ...] = (SimplifyShapes,)
