"""Channel analysis of ops that move or reshape the channel axis: Transpose, Pad, Resize,
Reshape (attention heads included), Concat, Split, Slice (groups.py has the model)."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .channels import Tracked


class ShapeChangers:
    """ChannelAnalysis handlers for ops that move, split or reshape channels (a mixin of it)."""

    def _reshape(self, node: gs.Node) -> None:
        tx = self._single_input(node)
        if tx is None:
            return
        mapped = reshape_channels(self.shape(node.inputs[0]), self.shape(node.outputs[0]), tx)
        if mapped is None:
            mapped = self._split_heads(node, tx)
        if mapped is None:
            self.block(tx.ids, f"{node.op} mixes the channel dim with other dims ({node.name!r})")
            return
        if node.op == "Reshape":
            entry = shape_entry(node, mapped.axis)
            piece = self._target_piece(node, mapped.axis) if entry is None else None
            if piece is not None and isinstance(piece[0], gs.Constant):
                entry = piece
            if entry is None and self._reads_channel_count(node, mapped):
                self.track(node.outputs[0], mapped.ids, mapped.axis)  # the entry follows the pruned count
                return
            if entry is None:
                self.block(tx.ids, f"Reshape target shape is computed, its channel entry unknown ({node.name!r})")
                return
            const, position = entry
            if int(const.values.reshape(-1)[position]) not in (0, -1):
                self.site("reshape", node, 1, position, mapped.ids, const=const)
        self.track(node.outputs[0], mapped.ids, mapped.axis)

    def _split_heads(self, node: gs.Node, tx: Tracked) -> Tracked | None:
        """[.., H*D] -> [.., H, D] (attention heads): the D channels of each head are tied into
        one class, so a head leaves whole; the head axis is tracked from here on."""
        shape_in, shape_out = self.shape(node.inputs[0]), self.shape(node.outputs[0])
        if shape_in is None or shape_out is None or tx.axis != len(shape_in) - 1 or len(shape_out) < 2:
            return None
        heads, width = shape_out[-2], shape_out[-1]
        if tuple(shape_out[:-2]) != tuple(shape_in[:-1]) or heads * width != len(tx.ids) or width < 2:
            return None
        blocks = tx.ids.reshape(heads, width)
        for row in blocks:
            for i in row[1:]:
                self.uf.union(row[0], i)
        return Tracked(blocks[:, 0].copy(), len(shape_out) - 2)

    def _reads_channel_count(self, node: gs.Node, mapped: Tracked) -> bool:
        """True when the Reshape's target entry for the channel axis is read at run time from the
        shape of a tensor carrying exactly these channels (``Concat(.., Unsqueeze(Gather(Shape(t),
        k)), ..)`` as torch exports ``x.view(x.size(0), x.size(1))``): it then stays right after pruning."""
        piece = self._target_piece(node, mapped.axis)
        if piece is None:
            return False
        tensor, position = piece
        producer = tensor.inputs[0] if tensor.inputs else None
        if producer is not None and producer.op == "Unsqueeze" and position == 0:
            tensor = producer.inputs[0]
            producer = tensor.inputs[0] if tensor.inputs else None
        if producer is None or producer.op != "Gather" or not isinstance(producer.inputs[1], gs.Constant):
            return False
        shape_node = producer.inputs[0].inputs[0] if producer.inputs[0].inputs else None
        if shape_node is None or shape_node.op != "Shape" or shape_node.attrs.get("start") or \
                shape_node.attrs.get("end") is not None:
            return False
        source, rank = self.get(shape_node.inputs[0]), self.rank(shape_node.inputs[0])
        index = producer.inputs[1].values.reshape(-1)
        if source is None or rank is None or position >= len(index):
            return False
        return int(index[position]) % rank == source.axis and np.array_equal(source.ids, mapped.ids)

    def _target_piece(self, node: gs.Node, axis: int):
        """(Concat input, index within it) that gives entry ``axis`` of a Reshape's target shape."""
        shape = node.inputs[1]
        if isinstance(shape, gs.Constant) or not shape.inputs or shape.inputs[0].op != "Concat":
            return None
        offset = 0
        for piece in shape.inputs[0].inputs:
            dims = self.shape(piece)
            if dims is None or len(dims) != 1:
                return None
            if offset <= axis < offset + dims[0]:
                return piece, axis - offset
            offset += dims[0]
        return None

    def _concat(self, node: gs.Node) -> None:
        rank = self.rank(node.outputs[0])
        if rank is None:
            self.block_inputs(node, "Concat of unknown rank")
            return
        axis = node.attrs.get("axis", 0) % rank
        parts = [(t, self.get(t)) for t in node.inputs]
        tracked_axes = {tt.axis for _, tt in parts if tt is not None}
        if tracked_axes == {axis}:
            pieces = []
            for t, tt in parts:
                if tt is None:
                    shape = self.shape(t)
                    if shape is None:
                        self.block_inputs(node, "Concat with an operand of unknown shape")
                        return
                    fresh = self.fresh_source(node, shape[axis])
                    self.block(fresh, f"channels concatenated from an unprunable tensor ({node.name!r})")
                    pieces.append(fresh)
                else:
                    pieces.append(tt.ids)
            self.track(node.outputs[0], np.concatenate(pieces), axis)
            return
        self._elementwise_concat(node, parts, axis, rank)

    def _elementwise_concat(self, node, parts, axis, rank) -> None:
        """Concat along another axis: the channel axes of all inputs line up and are tied."""
        tracked = [tt for _, tt in parts if tt is not None]
        if len({tt.axis for tt in tracked}) != 1 or len({len(tt.ids) for tt in tracked}) != 1 or any(
                tt is None for _, tt in parts):
            self.block_inputs(node, "Concat mixing prunable and unprunable channels")
            return
        for tt in tracked[1:]:
            for a, b in zip(tracked[0].ids, tt.ids):
                self.uf.union(a, b)
        self.track(node.outputs[0], tracked[0].ids, tracked[0].axis)

    def _split(self, node: gs.Node) -> None:
        tx = self._single_input(node)
        rank = self.rank(node.inputs[0])
        if tx is None or rank is None:
            return
        axis = node.attrs.get("axis", 0) % rank
        if axis != tx.axis:
            for out in node.outputs:
                self.track(out, tx.ids, tx.axis)
            return
        sizes = [self.shape(o)[axis] if self.shape(o) else None for o in node.outputs]
        if None in sizes:
            self.block(tx.ids, f"Split with unknown output sizes ({node.name!r})")
            return
        offsets = np.cumsum([0] + sizes)
        for out, lo, hi in zip(node.outputs, offsets[:-1], offsets[1:]):
            self.track(out, tx.ids[lo:hi], axis)
        self.site("split", node, 0, axis, tx.ids, sizes=sizes, opset=self.opset)

    def _slice(self, node: gs.Node) -> None:
        tx = self._single_input(node)
        shape = self.shape(node.inputs[0])
        if tx is None or shape is None:
            return
        params = slice_params(node, len(shape))
        if params is None:
            self.block(tx.ids, f"Slice with non-constant parameters ({node.name!r})")
            return
        if tx.axis not in params:
            self.track(node.outputs[0], tx.ids, tx.axis)
            return
        start, end, step = params[tx.axis]
        if step != 1:
            self.block(tx.ids, f"strided Slice on the channel axis ({node.name!r})")
            return
        lo, hi, _ = slice(start, end, step).indices(shape[tx.axis])
        self.track(node.outputs[0], tx.ids[lo:hi], tx.axis)
        self.site("slice", node, 0, tx.axis, tx.ids, lo=lo, hi=hi)


def reshape_channels(shape_in, shape_out, tx: Tracked) -> Tracked | None:
    """Channel ids of a reshaped tensor, or None if the reshape mixes channels with other dims.

    Channel position p of the input covers flat elements [p*inner, (p+1)*inner) of the
    region after the leading dims; an output axis k with the same leading product sees
    either several positions merged into one index (all must share the id) or each
    position split over several indices (ids repeat).
    """
    if shape_in is None or shape_out is None:
        return None
    outer = int(np.prod(shape_in[:tx.axis], dtype=np.int64))
    inner = int(np.prod(shape_in[tx.axis + 1:], dtype=np.int64))
    lead = 1
    for k, dim in enumerate(shape_out):
        if lead == outer and dim > 1 or lead == outer and k == len(shape_out) - 1:
            rest = int(np.prod(shape_out[k + 1:], dtype=np.int64))
            if rest >= inner and rest % inner == 0:
                merge = rest // inner
                if len(tx.ids) % merge:
                    return None
                blocks = tx.ids.reshape(-1, merge)
                return Tracked(blocks[:, 0].copy(), k) if (blocks == blocks[:, :1]).all() else None
            if inner % rest == 0:
                return Tracked(np.repeat(tx.ids, inner // rest), k)
            return None
        lead *= dim
        if lead > outer:
            return None
    return None


def shape_entry(node: gs.Node, axis: int):
    """(constant, flat index) holding entry ``axis`` of a Reshape's target shape, or None."""
    shape = node.inputs[1]
    if isinstance(shape, gs.Constant):
        return shape, axis
    if not shape.inputs or shape.inputs[0].op != "Concat":
        return None
    offset = 0
    for piece in shape.inputs[0].inputs:
        count = piece.shape[0] if piece.shape else None
        if count is None:
            return None
        if offset <= axis < offset + count:
            return (piece, axis - offset) if isinstance(piece, gs.Constant) else None
        offset += count
    return None


def slice_params(node: gs.Node, rank: int) -> dict[int, tuple[int, int, int]] | None:
    """axis -> (start, end, step) of a Slice, or None when any parameter is computed."""
    if "starts" in node.attrs:  # opset < 10
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes = node.attrs.get("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        values = []
        for i in range(1, 5):
            t = node.inputs[i] if len(node.inputs) > i else None
            if t is None or not t.name:
                values.append(None)
            elif isinstance(t, gs.Constant):
                values.append(t.values.reshape(-1).tolist())
            else:
                return None
        starts, ends, axes, steps = values
        axes = axes if axes is not None else list(range(len(starts)))
        steps = steps if steps is not None else [1] * len(starts)
    return {int(a) % rank: (int(s), int(e), int(st)) for a, s, e, st in zip(axes, starts, ends, steps)}
