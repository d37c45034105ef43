"""The rule that rescales the input channels of a Conv/MatMul before INT8 (cross-layer
equalization and smoothing): the pass ``equalize-channels``, which ``equalize.py`` runs.

Identity. Let x be the input of a weighted op W2 (Conv: channel axis 1 of NCHW; MatMul:
last axis) and let f be the chain of ops that produces x. For any s > 0 per channel i,

    W2 * x = (W2 * diag(s)) * (diag(1/s) * x),

so scaling input channel i of W2 by s_i and making f produce x_i / s_i leaves the output
unchanged. f absorbs 1/s exactly when each of its ops is per-channel positively
homogeneous, walking back from x:
  * Conv / MatMul with constant weights (the chain end): output channel i of W1 and its
    bias divided by s_i;
  * Relu, LeakyRelu: g(x / s) = g(x) / s for s > 0 (positive homogeneity);
  * Add(const): (h + c) / s = h / s + c / s, the walk continues into h;
  * Mul(const): (h * c) / s = h * (c / s), the walk ends (h is untouched).
HardSwish, HardSigmoid, Sigmoid, Clip(0, 6) (ReLU6) are NOT homogeneous (HardSwish(x/s) !=
HardSwish(x)/s), so the walk stops there (no match): in PP-LCNetV3 (PaddleOCR v4) the
activation is HardSwish followed by a learnable scalar affine (Mul, Add), and it is that
affine which absorbs 1/s. Zero padding of Conv is unaffected (0 / s = 0). Every tensor on
the walk must have a single reader and not be a graph output, so nothing else sees the
rescaled values.

Choice of s (per channel i): the pass options say which.
  * CLE, data-free (no ``amax`` option; Nagel et al. 2019, "Data-Free Quantization through
    Weight Equalization and Bias Correction"): with r1_i = max|W1[i, ...]| (output channel i
    of the producing Conv) and r2_i = max|W2[:, i, ...]| (input channel i of the reading
    one), after rescaling the ranges are r1_i / s_i and r2_i * s_i; making them equal gives
    s_i = sqrt(r1_i / r2_i). The paper iterates over chains of pairs until the scales
    converge: the caller runs the pass several rounds.
  * Smoothing (``amax``: x's calibrated per-channel max|x_i| =: a_i; Xiao et al. 2023,
    SmoothQuant): s_i = a_i^alpha / r2_i^(1 - alpha). With per-channel weights the output
    channel ranges of W1 no longer cost precision; what does is x, quantized per tensor:
    channels with large ranges squeeze the others. Smoothing moves that spread into W2's
    input channels, where per-output-channel weight scales see it only within a row.
Scales are clamped to [1/MAX_SCALE, MAX_SCALE] so a dead channel (a_i = 0) does not blow up
its weights. The rule refuses (``check``) where a constant on the walk does not act per
channel of x, where the producing layer writes another number of channels than W2 reads,
where CLE has no producing layer to balance against, and where smoothing has no range for x.

The matched nodes are the reader and the walk; the producing Conv/MatMul (whose weights
change too) is not among them, so in Conv -> Relu -> Conv -> Conv both pairs rescale in one
sweep, each from the weights the one before it left.
"""
from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, Rule, RulePass
from onnxforge.passes.fusion._match import fresh_constant
from onnxforge.passes.matching import DEFAULT_DOMAINS, producer

PASS_NAME = "equalize-channels"
ALPHA = 0.5
MAX_SCALE = 100.0
HOMOGENEOUS = ("Relu", "LeakyRelu")


@dataclasses.dataclass(frozen=True)
class Site:
    """A weighted op whose input x can be rescaled, and the walk that absorbs 1/s."""

    reader: gs.Node  # Conv or MatMul reading x
    tensor: str  # x
    steps: tuple[tuple[gs.Node, int], ...]  # (node, index of its constant input or -1) from x back
    end: gs.Node | None  # producing Conv/MatMul that absorbs 1/s in its weights, if the walk ends there

    @property
    def axis(self) -> int:
        return 1 if self.reader.op == "Conv" else -1


def group(node: gs.Node) -> int:
    return int(node.attrs.get("group", 1))


def weighted(node: gs.Node) -> bool:
    """A default-domain Conv (weight and bias initializers) or MatMul (a 2-D initializer weight)."""
    if node.domain not in DEFAULT_DOMAINS or len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return False
    if node.op == "Conv":
        return len(node.inputs) < 3 or not node.inputs[2].name or isinstance(node.inputs[2], gs.Constant)
    return node.op == "MatMul" and len(node.inputs[1].shape) == 2


def walk(graph: gs.Graph, reader: gs.Node) -> Site | None:
    """The site of ``reader``: the chain back from its input x that absorbs 1/s, or None."""
    x = reader.inputs[0]
    outputs = {id(t) for t in graph.outputs}
    steps: list[tuple[gs.Node, int]] = []
    current = x
    while True:
        if len(current.outputs) != 1 or id(current) in outputs:
            return None
        node = producer(current)
        if node is None:
            return None
        if node.op == reader.op and weighted(node) and node.outputs[0] is current:
            return Site(reader, x.name, tuple(steps), node)
        if node.op in HOMOGENEOUS and node.domain in DEFAULT_DOMAINS:
            steps.append((node, -1))
            current = node.inputs[0]
            continue
        if node.op in ("Add", "Mul") and len(node.inputs) == 2:
            const = [i for i, t in enumerate(node.inputs) if isinstance(t, gs.Constant)]
            if len(const) != 1:
                return None
            steps.append((node, const[0]))
            if node.op == "Mul":
                return Site(reader, x.name, tuple(steps), None)
            current = node.inputs[1 - const[0]]
            continue
        return None


def channels_read(site: Site) -> int:
    """Input channels of x that the reader reads (Conv: per group times groups)."""
    weight = site.reader.inputs[1]
    return int(weight.shape[0]) if site.reader.op == "MatMul" else int(weight.shape[1]) * group(site.reader)


# ------------------------------------------------------------------ ranges


def input_channel_range(op: str, groups: int, weight: np.ndarray, channels: int) -> np.ndarray:
    """max |W2| over everything but input channel i, for i < channels."""
    if op == "MatMul":
        return np.abs(weight).max(axis=1)
    per_group_in = weight.shape[1]
    per_group_out = weight.shape[0] // groups
    ranges = np.zeros(channels, np.float64)
    for c in range(channels):
        g, local = divmod(c, per_group_in)
        rows = weight[g * per_group_out : (g + 1) * per_group_out, local]
        ranges[c] = np.abs(rows).max() if rows.size else 0.0
    return ranges


def output_channel_range(op: str, weight: np.ndarray) -> np.ndarray:
    if op == "MatMul":
        return np.abs(weight).max(axis=0)
    return np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)


def scales_from(activation: np.ndarray, weight: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """s = a^alpha / w^(1-alpha), 1 where either range is 0, clamped."""
    activation = np.asarray(activation, np.float64)
    weight = np.asarray(weight, np.float64)
    ok = (activation > 0) & (weight > 0)
    scales = np.ones_like(activation)
    scales[ok] = activation[ok] ** alpha / weight[ok] ** (1 - alpha)
    return np.clip(scales, 1.0 / MAX_SCALE, MAX_SCALE)


# ------------------------------------------------------------------ the rule


class EqualizeInputChannels(Rule):
    name = "equalize-input-channels"
    anchor_ops = ("Conv", "MatMul")

    def match(self, graph, node):
        if not weighted(node) or isinstance(node.inputs[0], gs.Constant):
            return None
        site = walk(graph, node)
        return None if site is None else Match([node] + [n for n, _ in site.steps], site)

    def check(self, graph, match, ctx):
        site: Site = match.info
        channels = channels_read(site)
        for node, index in site.steps:
            if index >= 0 and not self._per_channel(tuple(node.inputs[index].shape), site.axis, channels):
                return self.refusal(f"the constant of {node.op} {node.name} does not act per channel of "
                                    f"{site.tensor} (scalar or [{channels}] along its channel axis)", match)
        if site.end is not None:
            weight = site.end.inputs[1]
            produced = weight.shape[1] if site.end.op == "MatMul" else weight.shape[0]
            if produced != channels:
                return self.refusal(f"{site.end.op} {site.end.name} writes {produced} channels, "
                                    f"{site.reader.name} reads {channels}", match)
        amax = ctx.option(PASS_NAME, "amax")
        w2 = np.asarray(site.reader.inputs[1].values)
        r2 = input_channel_range(site.reader.op, group(site.reader), w2, channels)
        if amax is None:  # data-free CLE
            if site.end is None:
                return self.refusal(f"data-free equalization needs a Conv/MatMul making {site.tensor}; the walk "
                                    f"ends at {site.steps[-1][0].op} {site.steps[-1][0].name} (smoothing, with "
                                    "calibration data, rescales it)", match)
            w1 = np.asarray(site.end.inputs[1].values)
            return scales_from(output_channel_range(site.end.op, w1), r2, 0.5)
        if site.tensor not in amax:
            return self.refusal(f"no calibrated range for {site.tensor}", match)
        return scales_from(amax[site.tensor], r2, ctx.option(PASS_NAME, "alpha", ALPHA))

    @staticmethod
    def _per_channel(shape: tuple, axis: int, channels: int) -> bool:
        size = int(np.prod(shape)) if shape else 1
        if size == 1:
            return True
        if axis == -1:
            return shape[-1:] == (channels,) and size == channels
        return len(shape) >= 3 and shape[-3] == channels and size == channels

    def rewrite(self, graph, match, ctx):
        """x_i -> x_i / s_i along the walk, W2[:, i] -> W2[:, i] * s_i; every changed constant is a
        new one (another node may read the old)."""
        site: Site = match.info
        scales = np.asarray(match.plan, np.float64)
        self._scale_reader(graph, site.reader, scales)
        per_channel = scales if site.axis == -1 else scales.reshape(-1, 1, 1)
        for node, index in site.steps:
            if index >= 0:
                const = node.inputs[index]
                new = (np.asarray(const.values).astype(np.float64) / per_channel).astype(np.float32)
                node.inputs[index] = fresh_constant(graph, const.name + "_eq", new)
        if site.end is not None:
            self._scale_end(graph, site.end, 1.0 / scales)

    @staticmethod
    def _scale_reader(graph, reader: gs.Node, scales: np.ndarray) -> None:
        weight = np.asarray(reader.inputs[1].values).astype(np.float64)
        if reader.op == "MatMul":
            weight = weight * scales[:, None]
        else:
            groups, per_in = group(reader), weight.shape[1]
            per_out = weight.shape[0] // groups
            for g in range(groups):
                block = scales[g * per_in : (g + 1) * per_in].reshape(1, -1, *([1] * (weight.ndim - 2)))
                weight[g * per_out : (g + 1) * per_out] *= block
        reader.inputs[1] = fresh_constant(graph, reader.inputs[1].name + "_eq", weight.astype(np.float32))

    @staticmethod
    def _scale_end(graph, end: gs.Node, inverse: np.ndarray) -> None:
        weight = np.asarray(end.inputs[1].values).astype(np.float64)
        if end.op == "MatMul":
            weight = weight * inverse[None, :]
        else:
            weight = weight * inverse.reshape(-1, *([1] * (weight.ndim - 1)))
            if len(end.inputs) > 2 and end.inputs[2].name:
                bias = np.asarray(end.inputs[2].values).astype(np.float64) * inverse
                end.inputs[2] = fresh_constant(graph, end.inputs[2].name + "_eq", bias.astype(np.float32))
        end.inputs[1] = fresh_constant(graph, end.inputs[1].name + "_eq", weight.astype(np.float32))


class EqualizeChannels(RulePass):
    name = PASS_NAME
    description = "per-channel rescaling of Conv/MatMul inputs before INT8 (CLE, or smoothing with calibrated ranges)"
    tolerance = (1e-5, 1e-5)  # exact in real arithmetic; float32 sums of rescaled terms round differently
    rules = (EqualizeInputChannels,)
    options: Mapping = MappingProxyType({
        "amax": (dict, "tensor -> per-channel max |x| from calibration: smoothing (absent: data-free CLE)"),
        "alpha": (float, "smoothing's migration strength (default 0.5)"),
    })


PASSES = (EqualizeChannels,)
