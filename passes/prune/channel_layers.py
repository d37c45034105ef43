"""Channel analysis of weighted layers (Conv, ConvTranspose, Gemm, MatMul): each output
channel gets a fresh id, the weights' input channels become sinks (groups.py has the model)."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .channels import Tracked


class WeightedLayers:
    """ChannelAnalysis handlers for the layers that make channels (a mixin of it)."""

    def _conv(self, node: gs.Node) -> None:
        x, w = node.inputs[0], node.inputs[1]
        tx = self.get(x)
        if not isinstance(w, gs.Constant):
            self.block_inputs(node, "conv weight is not a constant")
            return
        group = int(node.attrs.get("group", 1))
        cout, cin_per_group = w.shape[0], w.shape[1]
        cin = cin_per_group * group
        if tx is not None and tx.axis != 1:
            self.block(tx.ids, f"conv input channels are not on axis 1 ({node.name!r})")
            tx = None
        if group > 1 and group == cin and cout == group:
            self._depthwise(node, tx, cin)
            return
        if group > 1:
            if tx is not None:
                self.block(tx.ids, f"grouped conv (group={group}) that is not depthwise ({node.name!r})")
            ids = self.fresh_source(node, cout)
            self.block(ids, f"grouped conv (group={group}) that is not depthwise ({node.name!r})")
            self.track(node.outputs[0], ids, 1)
            return
        if tx is not None:
            self.site("sink", node, 1, 1, tx.ids)
        ids = self.fresh_source(node, cout)
        self.site("source", node, 1, 0, ids)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            self._bias_site(node, 2, ids)
        self.track(node.outputs[0], ids, 1)
        self.weighted.append((node, None if tx is None else tx.ids, ids))

    def _depthwise(self, node: gs.Node, tx: Tracked | None, cin: int) -> None:
        if tx is None:
            ids = self.fresh_source(node, cin)
            self.block(ids, f"depthwise conv over channels that cannot be pruned ({node.name!r})")
        else:
            ids = tx.ids
        self.site("param", node, 1, 0, ids)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            self._bias_site(node, 2, ids)
        self.site("group", node, 0, 0, ids)
        self.track(node.outputs[0], ids, 1)
        self.weighted.append((node, ids, None))

    def _bias_site(self, node: gs.Node, index: int, ids: np.ndarray) -> None:
        bias = node.inputs[index]
        if isinstance(bias, gs.Constant):
            self.site("source", node, index, len(bias.shape) - 1, ids)
        else:
            self.block(ids, f"bias of {node.name!r} is not a constant")

    def _conv_transpose(self, node: gs.Node) -> None:
        x, w = node.inputs[0], node.inputs[1]
        tx = self.get(x)
        if not isinstance(w, gs.Constant) or int(node.attrs.get("group", 1)) != 1:
            self.block_inputs(node, "ConvTranspose with a grouped or non-constant weight")
            return
        if tx is not None and tx.axis != 1:
            self.block(tx.ids, f"ConvTranspose input channels are not on axis 1 ({node.name!r})")
            tx = None
        if tx is not None:
            self.site("sink", node, 1, 0, tx.ids)
        ids = self.fresh_source(node, w.shape[1])
        self.site("source", node, 1, 1, ids)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            self._bias_site(node, 2, ids)
        self.track(node.outputs[0], ids, 1)
        self.weighted.append((node, None if tx is None else tx.ids, ids))

    def _gemm(self, node: gs.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        ta = self.get(a)
        if not isinstance(b, gs.Constant) or node.attrs.get("transA", 0):
            self.block_inputs(node, "Gemm with transA or a non-constant B")
            return
        trans_b = bool(node.attrs.get("transB", 0))
        if ta is not None and ta.axis != 1:
            self.block(ta.ids, f"Gemm input channels are not its K axis ({node.name!r})")
            ta = None
        if ta is not None:
            self.site("sink", node, 1, 1 if trans_b else 0, ta.ids)
        ids = self.fresh_source(node, b.shape[0] if trans_b else b.shape[1])
        self.site("source", node, 1, 0 if trans_b else 1, ids)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = node.inputs[2]
            if isinstance(c, gs.Constant) and c.shape and c.shape[-1] == len(ids):
                self.site("source", node, 2, len(c.shape) - 1, ids)
            elif not (isinstance(c, gs.Constant) and (not c.shape or c.shape[-1] == 1)):
                self.block(ids, f"Gemm bias of {node.name!r} is not a per-output constant")
        self.track(node.outputs[0], ids, 1)
        self.weighted.append((node, None if ta is None else ta.ids, ids))

    def _matmul(self, node: gs.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        if not isinstance(a, gs.Constant) and not isinstance(b, gs.Constant):
            self._activation_matmul(node)
            return
        ta = self.get(a)
        if not isinstance(b, gs.Constant) or len(b.shape) != 2 or isinstance(a, gs.Constant):
            self.block_inputs(node, "MatMul between two activations (or with a batched weight) mixes channels")
            return
        rank = self.rank(a)
        if ta is not None and (rank is None or ta.axis != rank - 1):
            self.block(ta.ids, f"MatMul input channels are not its K axis ({node.name!r})")
            ta = None
        if ta is not None:
            self.site("sink", node, 1, 0, ta.ids)
        ids = self.fresh_source(node, b.shape[1])
        self.site("source", node, 1, 1, ids)
        out_rank = self.rank(node.outputs[0])
        if out_rank is None:
            self.block(ids, f"unknown output rank of {node.name!r}")
            return
        self.track(node.outputs[0], ids, out_rank - 1)
        self.weighted.append((node, None if ta is None else ta.ids, ids))

    def _activation_matmul(self, node: gs.Node) -> None:
        """MatMul of two activations (attention scores, attention x values): channels on a batch
        axis (attention heads) pass through, tied between both operands; any other axis mixes them."""
        a, b, out = node.inputs[0], node.inputs[1], node.outputs[0]
        ta, tb = self.get(a), self.get(b)
        ranks = {self.rank(a), self.rank(b), self.rank(out)}
        mixes = "MatMul between two activations (or with a batched weight) mixes channels"
        if len(ranks) != 1 or None in ranks or min(ranks) < 3:
            self.block_inputs(node, mixes)
            return
        rank = ranks.pop()
        tracked = [(t, tt) for t, tt in ((a, ta), (b, tb)) if tt is not None]
        if not tracked:
            return  # no prunable channels involved
        if any(tt.axis >= rank - 2 for _, tt in tracked) or len({tt.axis for _, tt in tracked}) > 1:
            self.block_inputs(node, mixes)
            return
        axis, ids = tracked[0][1].axis, tracked[0][1].ids
        for t, tt in ((a, ta), (b, tb)):
            if tt is not None:
                for x, y in zip(ids, tt.ids):
                    self.uf.union(x, y)
            elif self.shape(t) is None or self.shape(t)[axis] != 1:
                self.block_inputs(node, f"{mixes} (only one operand's heads are known)")
                return
        self.track(out, ids, axis)
