"""How much each channel class matters, on a scale comparable across layers.

weight (l1 / l2): for every producer weight of a class, the L1 or L2 norm of that
  output channel's weights divided by the mean over the producer's channels.
activation: for every consumer of a class, ||x_c|| * ||W[:, c]|| -- the RMS of
  the input channel on calibration data times the norm of the consumer weights
  that read it -- divided by its mean over the consumer's channels. This is the
  size of the term the channel adds to the consumer's output, so channels that
  are large in weight but silent on real data rank low.
A class's score is the mean over its producers (or consumers); each group's
scores therefore average about 1, and allocation decides across groups.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from .calib import iter_outputs
from .groups import ChannelAnalysis


def _channel_norms(values: np.ndarray, axis: int, order: int) -> np.ndarray:
    moved = np.moveaxis(np.abs(np.asarray(values, np.float64)), axis, 0).reshape(values.shape[axis], -1)
    return moved.sum(1) if order == 1 else np.sqrt((moved ** 2).sum(1))


def _accumulate(analysis: ChannelAnalysis, totals, counts, ids: np.ndarray, per_position: np.ndarray) -> None:
    mean = per_position.mean()
    if mean <= 0:
        return
    for i, value in zip(ids, per_position / mean):
        root = analysis.uf.find(int(i))
        totals[root] += float(value)
        counts[root] += 1


def weight_importance(analysis: ChannelAnalysis, order: int = 1) -> dict[int, float]:
    totals: dict[int, float] = defaultdict(float)
    counts: dict[int, int] = defaultdict(int)
    for site in analysis.sites:
        if site.kind == "source" and site.index == 1 and isinstance(site.node.inputs[1], gs.Constant):
            norms = _channel_norms(site.node.inputs[1].values, site.axis, order)
            _accumulate(analysis, totals, counts, site.ids, norms)
    return {r: totals[r] / counts[r] for r in totals}


def activation_importance(model, analysis: ChannelAnalysis, feeds: list[dict]) -> dict[int, float]:
    """Consumer-side importance from calibration activations (falls back to L2 where no consumer)."""
    sinks = [s for s in analysis.sites if s.kind == "sink" and isinstance(s.node.inputs[1], gs.Constant)]
    names = sorted({s.node.inputs[0].name for s in sinks})
    square_sums: dict[str, np.ndarray] = {}
    for values in iter_outputs(model, feeds, names):
        for site in sinks:
            x = values[site.node.inputs[0].name]
            axis = analysis.tracked[site.node.inputs[0].name].axis
            sq = _channel_norms(x, axis, 2) ** 2
            square_sums[site.node.name] = square_sums.get(site.node.name, 0) + sq
    totals: dict[int, float] = defaultdict(float)
    counts: dict[int, int] = defaultdict(int)
    for site in sinks:
        rms = np.sqrt(square_sums[site.node.name])
        w_norm = _channel_norms(site.node.inputs[1].values, site.axis, 2)
        _accumulate(analysis, totals, counts, site.ids, rms * w_norm)
    scores = weight_importance(analysis, order=2)
    scores.update({r: totals[r] / counts[r] for r in totals})
    return scores


def importance(model, analysis: ChannelAnalysis, method: str, feeds: list[dict] | None) -> dict[int, float]:
    if method == "activation":
        if not feeds:
            raise ValueError("activation importance needs calibration feeds")
        return activation_importance(model, analysis, feeds)
    return weight_importance(analysis, order=1 if method == "l1" else 2)

