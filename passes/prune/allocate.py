"""How many channels each group loses: a fixed ratio, or a global FLOPs (and parameter) target.

Cost model: a weighted layer with F FLOPs and P weights whose input keeps a
fraction a and output a fraction b of its channel positions costs F*a*b and P*a*b
(a depthwise conv: F*a); the rest of the network is counted as fixed.

Latency proxy (what allocation spends its error on): F*a*b + T*(I*a + O*b), where
I and O are the layer's input and output activation element counts and T is
TRAFFIC_FLOPS, the FLOPs a CPU core does in the time it moves one float32 to or
from cache. FLOPs alone undervalue memory-bound layers (depthwise convs and
the wide, high-resolution early layers of mobile nets), so pruning them by FLOPs
saves little time; the traffic term lets allocation see that.

Global allocation is greedy: channels leave in chunks of ``round_to`` (kept
counts stay multiples of it, which vectorised CPU kernels need), lowest-importance
first within each group. Each step takes the chunk with the smallest predicted
error per unit of latency proxy saved (counting only the part of its FLOPs saving
the target still needs), where a group's predicted output error after removing a
share r of its importance is s_g * r^2 and s_g is its measured sensitivity
(output error when that group alone loses half its channels; 1 when not measured).
So groups whose error grows fastest are pruned least.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .groups import ChannelAnalysis, Group

TRAFFIC_FLOPS = 16.0  # ~100 GFLOP/s of fp32 FMA against ~25 GB/s (6 G floats/s) of cache traffic per core


@dataclasses.dataclass
class CostModel:
    classes: np.ndarray  # dense index -> root id
    layer_flops: np.ndarray
    layer_params: np.ndarray
    in_mult: list[np.ndarray | None]  # per layer: positions per class on the input channel axis
    out_mult: list[np.ndarray | None]
    fixed_flops: float
    fixed_params: float
    traffic_in: np.ndarray | None = None  # per layer: input activation elements
    traffic_out: np.ndarray | None = None  # per layer: output activation elements

    def totals(self, keep: np.ndarray) -> tuple[float, float]:
        flops, params = self.fixed_flops, self.fixed_params
        for f, p, a, b in zip(self.layer_flops, self.layer_params, self.in_mult, self.out_mult):
            scale = _fraction(a, keep) * _fraction(b, keep)
            flops += f * scale
            params += p * scale
        return flops, params


def _fraction(mult: np.ndarray | None, keep: np.ndarray) -> float:
    if mult is None:
        return 1.0
    total = mult.sum()
    return float(mult[keep].sum() / total) if total else 1.0


def build_cost_model(analysis: ChannelAnalysis, flops: dict[str, int], total_flops: int,
                     total_params: int) -> CostModel:
    all_ids = np.arange(len(analysis.uf.parent))
    roots = analysis.uf.roots(all_ids)
    classes = np.unique(roots)
    dense = {int(r): k for k, r in enumerate(classes)}

    def multiplicity(ids):
        if ids is None:
            return None
        idx = [dense[analysis.uf.find(int(i))] for i in ids]
        return np.bincount(idx, minlength=len(classes)).astype(np.float64)

    layer_flops, layer_params, in_mult, out_mult, traffic_in, traffic_out = [], [], [], [], [], []
    for node, in_ids, out_ids in analysis.weighted:
        layer_flops.append(float(flops.get(node.name, 0)))
        layer_params.append(float(np.prod(node.inputs[1].shape)))
        in_mult.append(multiplicity(in_ids))
        out_mult.append(multiplicity(out_ids))
        traffic_in.append(_elements(analysis.shape(node.inputs[0])))
        traffic_out.append(_elements(analysis.shape(node.outputs[0])))
    return CostModel(classes, np.array(layer_flops), np.array(layer_params), in_mult, out_mult,
                     total_flops - sum(layer_flops), total_params - sum(layer_params),
                     np.array(traffic_in), np.array(traffic_out))


def _elements(shape) -> float:
    return float(np.prod(shape, dtype=np.float64)) if shape else 0.0


@dataclasses.dataclass
class Plan:
    removed: set[int]
    per_group: dict[int, tuple[int, int]]  # group index -> (kept, size)
    predicted_flops: float
    predicted_params: float


def _group_order(group: Group, scores: dict[int, float]) -> np.ndarray:
    """Prunable classes of a group, least important first."""
    prunable = group.classes[group.prunable]
    return prunable[np.argsort([scores.get(int(c), 0.0) for c in prunable], kind="stable")]


def chunk_size(size: int, round_to: int, width: int = 1) -> int:
    """Channels leave in chunks of ``round_to``, so kept counts stay multiples of it (onnxruntime
    runs a conv in its blocked NCHWc layout only when its channel counts are multiples of the
    block, 16 with AVX-512); groups narrower than two chunks in half chunks."""
    if width > 1:  # each class is a block of channels (an attention head): whole heads up to round_to
        return max(1, -(-round_to // width))
    return round_to if size >= 2 * round_to else max(1, round_to // 2)


def _max_removable(group: Group, round_to: int, max_ratio: float) -> int:
    round_to = chunk_size(group.size, round_to, group.width)
    limit = min(int(group.prunable.sum()), int(group.size * max_ratio))
    limit = min(limit, group.size - round_to)  # keep at least one chunk
    if limit <= 0:
        return 0
    first = group.size % round_to
    return first + (limit - first) // round_to * round_to if limit >= first else 0


def ratio_plan(groups: list[Group], scores: dict[int, float], ratio: float, round_to: int,
               cost: CostModel) -> Plan:
    """Every prunable group loses ``ratio`` of its channels (rounded to chunks)."""
    removed: set[int] = set()
    per_group = {}
    for g in groups:
        order = _group_order(g, scores)
        round_to = chunk_size(g.size, round_to, g.width)
        want = int(round(g.size * ratio))
        kept_target = max(round_to, int(np.ceil((g.size - want) / round_to)) * round_to)
        count = min(max(g.size - kept_target, 0), len(order))
        removed.update(int(c) for c in order[:count])
        per_group[g.index] = (g.size - count, g.size)
    return _finish(removed, per_group, cost)


def _finish(removed, per_group, cost) -> Plan:
    keep = ~np.isin(cost.classes, list(removed))
    flops, params = cost.totals(keep)
    return Plan(removed, per_group, flops, params)


def global_plan(groups: list[Group], scores: dict[int, float], cost: CostModel, target_flops: float,
                target_params: float | None, round_to: int, max_ratio: float,
                sensitivity: dict[int, float] | None = None) -> Plan:
    """Greedy chunk removal until predicted FLOPs (then parameters) are within the targets."""
    tally = _Tally(cost)
    base_flops, base_params = tally.totals()
    base_latency = tally.latency()
    dense = {int(r): k for k, r in enumerate(cost.classes)}
    state = {g.index: _GroupState(g, _group_order(g, scores), scores, round_to, max_ratio) for g in groups}
    sens = sensitivity or {}
    for st in state.values():
        st.sensitivity = sens.get(st.group.index, 1.0)
    budgets = [("flops", target_flops * base_flops)]
    if target_params is not None:
        budgets.append(("params", target_params * base_params))
    for kind, target in budgets:
        while tally.totals()[0 if kind == "flops" else 1] > target:
            best = None
            for st in state.values():
                chunk = st.next_chunk()
                if chunk is None:
                    continue
                idx = np.array([dense[int(c)] for c in chunk])
                saved_flops, saved_params = tally.saving(idx)
                saved = saved_flops / base_flops if kind == "flops" else saved_params / base_params
                if saved <= 0:
                    continue
                need = (tally.totals()[0 if kind == "flops" else 1] - target) / (base_flops if kind == "flops" else base_params)
                # savings past the target buy nothing, so they do not lower the price
                useful = min(1.0, need / saved)
                gain = tally.latency_saving(idx) / base_latency if kind == "flops" else saved
                key = sens.get(st.group.index, 1.0) * st.error_increase(chunk) / max(gain * useful, 1e-15)
                if best is None or key < best[0]:
                    best = (key, st, chunk, idx)
            if best is None:
                break
            _, st, chunk, idx = best
            tally.remove(idx)
            st.take(chunk)
    _give_back(state, tally, dense, target_flops * base_flops,
               None if target_params is None else target_params * base_params)
    removed = {int(c) for st in state.values() for c in st.removed}
    per_group = {i: (st.group.size - len(st.removed), st.group.size) for i, st in state.items()}
    flops, params = tally.totals()
    return Plan(removed, per_group, flops, params)


def _give_back(state: dict, tally: "_Tally", dense: dict, flops_target: float, params_target: float | None) -> None:
    """Undo the last chunks of groups, most costly first, while the targets still hold
    (the greedy's final chunk can overshoot the target by a lot on small, expensive groups)."""
    restored = True
    while restored:
        restored = False
        for st in sorted(state.values(), key=lambda s: -s.last_error()):
            chunk = st.last_chunk()
            if chunk is None:
                continue
            idx = np.array([dense[int(c)] for c in chunk])
            tally.restore(idx)
            flops, params = tally.totals()
            if flops <= flops_target and (params_target is None or params <= params_target):
                st.untake()
                restored = True
            else:
                tally.remove(idx)


class _Tally:
    """Kept position counts per layer, updated as chunks leave (the cost model, incrementally)."""

    def __init__(self, cost: CostModel):
        self.cost = cost
        n = len(cost.classes)
        ones = np.ones(n)
        self.in_total = np.array([m.sum() if m is not None else 1.0 for m in cost.in_mult])
        self.out_total = np.array([m.sum() if m is not None else 1.0 for m in cost.out_mult])
        self.in_kept = self.in_total.copy()
        self.out_kept = self.out_total.copy()
        self.in_mat = np.stack([m if m is not None else np.zeros(n) for m in cost.in_mult]) if cost.in_mult else ones[None]
        self.out_mat = np.stack([m if m is not None else np.zeros(n) for m in cost.out_mult]) if cost.out_mult else ones[None]
        layers = len(cost.layer_flops)
        self.traffic_in = cost.traffic_in if cost.traffic_in is not None else np.zeros(layers)
        self.traffic_out = cost.traffic_out if cost.traffic_out is not None else np.zeros(layers)
        self.depthwise = np.array([o is None and i is not None for i, o in zip(cost.in_mult, cost.out_mult)],
                                  dtype=bool)

    def _totals(self, in_kept, out_kept) -> tuple[float, float]:
        scale = (in_kept / self.in_total) * (out_kept / self.out_total)
        return (self.cost.fixed_flops + float(self.cost.layer_flops @ scale),
                self.cost.fixed_params + float(self.cost.layer_params @ scale))

    def totals(self) -> tuple[float, float]:
        return self._totals(self.in_kept, self.out_kept)

    def _latency(self, in_kept, out_kept) -> float:
        a, b = in_kept / self.in_total, out_kept / self.out_total
        b_mem = np.where(self.depthwise, a, b)  # a depthwise conv writes as many channels as it reads
        traffic = float(self.traffic_in @ a + self.traffic_out @ b_mem)
        return self.cost.fixed_flops + float(self.cost.layer_flops @ (a * b)) + TRAFFIC_FLOPS * traffic

    def latency(self) -> float:
        """The latency proxy of the module docstring, in FLOP units."""
        return self._latency(self.in_kept, self.out_kept)

    def latency_saving(self, idx: np.ndarray) -> float:
        return self.latency() - self._latency(self.in_kept - self.in_mat[:, idx].sum(1),
                                              self.out_kept - self.out_mat[:, idx].sum(1))

    def saving(self, idx: np.ndarray) -> tuple[float, float]:
        flops, params = self.totals()
        f2, p2 = self._totals(self.in_kept - self.in_mat[:, idx].sum(1), self.out_kept - self.out_mat[:, idx].sum(1))
        return flops - f2, params - p2

    def restore(self, idx: np.ndarray) -> None:
        self.in_kept = self.in_kept + self.in_mat[:, idx].sum(1)
        self.out_kept = self.out_kept + self.out_mat[:, idx].sum(1)

    def remove(self, idx: np.ndarray) -> None:
        self.in_kept = self.in_kept - self.in_mat[:, idx].sum(1)
        self.out_kept = self.out_kept - self.out_mat[:, idx].sum(1)


class _GroupState:
    def __init__(self, group: Group, order: np.ndarray, scores: dict[int, float], round_to: int, max_ratio: float):
        self.group = group
        self.order = order
        self.scores = np.array([scores.get(int(c), 0.0) for c in order])
        self.total = float(sum(scores.get(int(c), 0.0) for c in group.classes)) or 1.0
        self.limit = _max_removable(group, round_to, max_ratio)
        self.round_to = chunk_size(group.size, round_to, group.width)
        self.removed: list[int] = []
        self.chunks: list[int] = []
        self.sensitivity = 1.0

    def next_chunk(self) -> np.ndarray | None:
        done = len(self.removed)
        size = self.group.size % self.round_to if done == 0 and self.group.size % self.round_to else self.round_to
        if done + size > self.limit:
            return None
        return self.order[done:done + size]

    def error_increase(self, chunk: np.ndarray) -> float:
        before = self.scores[:len(self.removed)].sum() / self.total
        after = before + self.scores[len(self.removed):len(self.removed) + len(chunk)].sum() / self.total
        return after ** 2 - before ** 2 + 1e-12

    def take(self, chunk: np.ndarray) -> None:
        self.chunks.append(len(chunk))
        self.removed.extend(int(c) for c in chunk)

    def last_chunk(self) -> np.ndarray | None:
        return self.order[len(self.removed) - self.chunks[-1]:len(self.removed)] if self.chunks else None

    def last_error(self) -> float:
        chunk = self.last_chunk()
        if chunk is None:
            return 0.0
        done = len(self.removed)
        before = self.scores[:done - len(chunk)].sum() / self.total
        after = self.scores[:done].sum() / self.total
        return self.sensitivity * (after ** 2 - before ** 2)

    def untake(self) -> None:
        del self.removed[len(self.removed) - self.chunks.pop():]
