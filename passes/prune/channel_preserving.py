"""Channel analysis of ops that keep the channel axis: elementwise (ids unified where two
tensors meet), pooling, normalisations, softmax, reductions (groups.py has the model)."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .channels import Tracked


class ChannelPreserving:
    """ChannelAnalysis handlers for channel-preserving ops (a mixin of it)."""

    def _elementwise(self, node: gs.Node) -> None:
        out = node.outputs[0]
        out_rank = self.rank(out)
        if out_rank is None:
            self.block_inputs(node, "elementwise op with unknown output rank")
            return
        tracked = [(i, t, self.get(t)) for i, t in enumerate(node.inputs) if self.get(t) is not None]
        aligned = {tt.axis + out_rank - self.rank(t) for _, t, tt in tracked}
        if len(aligned) != 1:
            self.block_inputs(node, "elementwise join of tensors with channels on different axes")
            return
        axis = aligned.pop()
        main = max((tt for _, _, tt in tracked), key=lambda tt: len(tt.ids))
        width = len(main.ids)
        for _, t, tt in tracked:
            if len(tt.ids) == width:
                for a, b in zip(main.ids, tt.ids):
                    self.uf.union(a, b)
            elif len(tt.ids) == 1:
                self.block(tt.ids, f"single channel broadcast over {width} channels ({node.name!r})")
            else:
                self.block_inputs(node, "elementwise join of different channel counts")
                return
        tracked_idx = {i for i, _, _ in tracked}
        for i, t in enumerate(node.inputs):
            if i in tracked_idx or t is None or (node.op in ("Clip", "Dropout") and i > 0):
                continue
            if not self._broadcast_operand(node, i, t, axis, out_rank, main.ids):
                return
        self.track(out, main.ids, axis)

    def _broadcast_operand(self, node, i, t, axis, out_rank, ids) -> bool:
        shape = self.shape(t)
        if shape is None:
            self.block(ids, f"operand of unknown shape joins the channels ({node.name!r})")
            return False
        at = axis - (out_rank - len(shape))
        if at < 0 or shape[at] == 1:
            return True
        if isinstance(t, gs.Constant) and shape[at] == len(ids):
            self.site("param", node, i, at, ids)
            return True
        self.block(ids, f"joined with a tensor whose channels cannot be pruned ({node.name!r})")
        return False

    def _single_input(self, node: gs.Node) -> Tracked | None:
        tx = self.get(node.inputs[0])
        for t in node.inputs[1:]:
            if self.get(t) is not None:
                self.block_inputs(node, "channels used as an auxiliary input")
                return None
        return tx

    def _pool(self, node: gs.Node) -> None:
        tx = self._single_input(node)
        if tx is None:
            return
        if tx.axis != 1:
            self.block(tx.ids, f"pooling over the channel axis ({node.name!r})")
            return
        self.track(node.outputs[0], tx.ids, 1)

    def _batchnorm(self, node: gs.Node) -> None:
        tx = self._single_input(node)
        if tx is None:
            return
        if tx.axis != 1 or len(node.outputs) > 1 and any(o.outputs for o in node.outputs[1:]):
            self.block(tx.ids, f"normalisation in training mode or off axis 1 ({node.name!r})")
            return
        for i in range(1, len(node.inputs)):
            if not isinstance(node.inputs[i], gs.Constant):
                self.block(tx.ids, f"non-constant normalisation parameters ({node.name!r})")
                return
            self.site("param", node, i, 0, tx.ids)
        self.track(node.outputs[0], tx.ids, 1)

    def _layernorm(self, node: gs.Node) -> None:
        tx = self._single_input(node)
        rank = self.rank(node.inputs[0])
        if tx is None or rank is None:
            return
        axis = node.attrs.get("axis", -1) % rank
        if tx.axis >= axis:
            self.block(tx.ids, f"normalisation over the channel axis depends on all channels ({node.name!r})")
            return
        self.track(node.outputs[0], tx.ids, tx.axis)

    def _softmax(self, node: gs.Node) -> None:
        tx = self._single_input(node)
        rank = self.rank(node.inputs[0])
        if tx is None or rank is None:
            return
        axis = node.attrs.get("axis", -1 if self.opset >= 13 else 1) % rank
        mixes = tx.axis == axis if self.opset >= 13 else tx.axis >= axis
        if mixes:
            self.block(tx.ids, f"softmax over the channel axis ({node.name!r})")
            return
        self.track(node.outputs[0], tx.ids, tx.axis)

    def _reduce(self, node: gs.Node) -> None:
        tx = self._single_input(node)
        rank = self.rank(node.inputs[0])
        if tx is None or rank is None:
            return
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
            axes = node.inputs[1].values.tolist()
        if not axes:
            self.block(tx.ids, f"reduction over all axes ({node.name!r})")
            return
        axes = sorted(int(a) % rank for a in axes)
        if tx.axis in axes:
            self.block(tx.ids, f"reduction over the channel axis ({node.name!r})")
            return
        keep = node.attrs.get("keepdims", 1)
        axis = tx.axis if keep else tx.axis - sum(a < tx.axis for a in axes)
        self.track(node.outputs[0], tx.ids, axis)

    def _transpose(self, node: gs.Node) -> None:
        tx = self._single_input(node)
        rank = self.rank(node.inputs[0])
        if tx is None or rank is None:
            return
        perm = list(node.attrs.get("perm", list(range(rank))[::-1]))
        self.track(node.outputs[0], tx.ids, perm.index(tx.axis))

    def _pad(self, node: gs.Node) -> None:
        tx = self._single_input(node)
        rank = self.rank(node.inputs[0])
        if tx is None or rank is None:
            return
        pads = node.attrs.get("pads")
        if pads is None and len(node.inputs) > 1:
            pads = node.inputs[1].values.tolist() if isinstance(node.inputs[1], gs.Constant) else None
        axes = list(range(rank))
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            axes = [int(a) % rank for a in node.inputs[3].values.tolist()] \
                if isinstance(node.inputs[3], gs.Constant) else None
        if pads is None or axes is None:
            self.block(tx.ids, f"Pad with non-constant pads ({node.name!r})")
            return
        n = len(axes)
        if tx.axis in axes and (pads[axes.index(tx.axis)] or pads[n + axes.index(tx.axis)]):
            self.block(tx.ids, f"Pad on the channel axis ({node.name!r})")
            return
        self.track(node.outputs[0], tx.ids, tx.axis)

    def _resize(self, node: gs.Node) -> None:
        tx = self._single_input(node)
        if tx is None:
            return
        scales = node.inputs[2] if len(node.inputs) > 2 else None
        sizes = node.inputs[3] if len(node.inputs) > 3 else None
        if node.op == "Upsample":
            scales, sizes = node.inputs[1] if len(node.inputs) > 1 else None, None
        if sizes is not None and sizes.name:
            if not isinstance(sizes, gs.Constant):
                self.block(tx.ids, f"Resize with computed sizes ({node.name!r})")
                return
            self.site("reshape", node, 3, tx.axis, tx.ids, const=sizes)
        elif scales is not None and scales.name:
            if not isinstance(scales, gs.Constant) or float(scales.values[tx.axis]) != 1.0:
                self.block(tx.ids, f"Resize that may scale the channel axis ({node.name!r})")
                return
        self.track(node.outputs[0], tx.ids, tx.axis)
