"""Per-channel rescaling before INT8: cross-layer equalization (CLE) and
SmoothQuant-style smoothing of Conv/MatMul inputs. Both are exact in float.

Identity. Let x be the input of a weighted op W2 (Conv: channel axis 1 of
NCHW; MatMul: last axis) and let f be the chain of ops that produces x. For
any s > 0 per channel i,

    W2 * x = (W2 * diag(s)) * (diag(1/s) * x),

so scaling input channel i of W2 by s_i and making f produce x_i / s_i
leaves the output unchanged. f absorbs 1/s exactly when each of its ops is
per-channel positively homogeneous, walking back from x:
  * Conv / MatMul with constant weights (the chain end): output channel i of
    W1 and its bias divided by s_i;
  * Relu, LeakyRelu: g(x / s) = g(x) / s for s > 0 (positive homogeneity);
  * Add(const): (h + c) / s = h / s + c / s, the walk continues into h;
  * Mul(const): (h * c) / s = h * (c / s), the walk ends (h is untouched).
HardSwish, HardSigmoid, Sigmoid, Clip(0, 6) (ReLU6) are NOT homogeneous
(HardSwish(x/s) != HardSwish(x)/s), so the walk stops there: in PP-LCNetV3
(PaddleOCR v4) the activation is HardSwish followed by a learnable scalar
affine (Mul, Add), and it is that affine which absorbs 1/s. Zero padding of
Conv is unaffected (0 / s = 0). Every tensor on the walk must have a single
reader and not be a graph output, so nothing else sees the rescaled values.

Choice of s (per channel i, alpha = 0.5):
  * CLE, data-free (Nagel et al. 2019, "Data-Free Quantization through Weight
    Equalization and Bias Correction"): with r1_i = max|W1[i, ...]| (output
    channel i of the producing Conv) and r2_i = max|W2[:, i, ...]| (input
    channel i of the reading one), after rescaling the ranges are r1_i / s_i
    and r2_i * s_i; making them equal gives s_i = sqrt(r1_i / r2_i), the
    paper's s_i = (1 / r2_i) * sqrt(r1_i * r2_i). The paper iterates over
    chains of pairs until the scales converge.
  * Smoothing (Xiao et al. 2023, SmoothQuant), data-aware: with a_i the
    calibrated max|x_i| (per channel over the calibration feeds),
    s_i = a_i^alpha / r2_i^(1 - alpha). With per-channel weights the output
    channel ranges of W1 no longer cost precision; what does is x, quantized
    per tensor: channels with large ranges squeeze the others. Smoothing
    moves that spread into W2's input channels, where per-output-channel
    weight scales see it only within a row.
Scales are clamped to [1/MAX_SCALE, MAX_SCALE] so a dead channel (a_i = 0)
does not blow up its weights.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from .ortsession import session as ort_session

ALPHA = 0.5
MAX_SCALE = 100.0
HOMOGENEOUS = ("Relu", "LeakyRelu")


@dataclasses.dataclass
class Site:
    """A weighted op whose input x can be rescaled, and the walk that absorbs 1/s."""

    reader: onnx.NodeProto  # Conv or MatMul reading x
    tensor: str  # x
    steps: list[tuple[onnx.NodeProto, int]]  # (node, index of its constant input or -1) from x back
    end: onnx.NodeProto | None  # producing Conv/MatMul that absorbs 1/s in its weights, if the walk ends there

    @property
    def axis(self) -> int:
        return 1 if self.reader.op_type == "Conv" else -1


def graph_maps(model: onnx.ModelProto):
    """(producer by tensor, readers by tensor, initializers by name, graph output names) of the main graph."""
    producers = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    inits = {t.name: t for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    return producers, readers, inits, outputs


def _weighted(node: onnx.NodeProto, inits) -> bool:
    if node.op_type == "Conv":
        return len(node.input) > 1 and node.input[1] in inits and (len(node.input) < 3 or not node.input[2] or node.input[2] in inits)
    if node.op_type == "MatMul":
        return len(node.input) > 1 and node.input[1] in inits and len(inits[node.input[1]].dims) == 2
    return False


def find_sites(model: onnx.ModelProto) -> list[Site]:
    """Every Conv/MatMul whose input chain absorbs a per-channel 1/s exactly."""
    producers, readers, inits, outputs = graph_maps(model)
    sites = []
    for node in model.graph.node:
        if not _weighted(node, inits) or node.input[0] in inits:
            continue
        site = _walk(node, producers, readers, inits, outputs)
        if site is not None:
            sites.append(site)
    return sites


def _private(name: str, readers, outputs) -> bool:
    return len(readers.get(name, [])) == 1 and name not in outputs


def _walk(reader, producers, readers, inits, outputs) -> Site | None:
    tensor = reader.input[0]
    steps: list[tuple[onnx.NodeProto, int]] = []
    current = tensor
    while True:
        if not _private(current, readers, outputs):
            return None
        node = producers.get(current)
        if node is None:
            return None
        if node.op_type == reader.op_type and _weighted(node, inits) and node.output[0] == current:
            return Site(reader, tensor, steps, node)
        if node.op_type in HOMOGENEOUS and node.domain in ("", "ai.onnx"):
            steps.append((node, -1))
            current = node.input[0]
            continue
        if node.op_type in ("Add", "Mul") and len(node.input) == 2:
            const = [i for i, name in enumerate(node.input) if name in inits]
            if len(const) != 1:
                return None
            steps.append((node, const[0]))
            if node.op_type == "Mul":
                return Site(reader, tensor, steps, None)
            current = node.input[1 - const[0]]
            continue
        return None


# ------------------------------------------------------------------ ranges


def input_channel_range(reader: onnx.NodeProto, weight: np.ndarray, channels: int) -> np.ndarray:
    """max |W2| over everything but input channel i, for i < channels."""
    if reader.op_type == "MatMul":
        return np.abs(weight).max(axis=1)
    group = _group(reader)
    per_group_in = weight.shape[1]
    per_group_out = weight.shape[0] // group
    ranges = np.zeros(channels, np.float64)
    for c in range(channels):
        g, local = divmod(c, per_group_in)
        rows = weight[g * per_group_out : (g + 1) * per_group_out, local]
        ranges[c] = np.abs(rows).max() if rows.size else 0.0
    return ranges


def output_channel_range(end: onnx.NodeProto, weight: np.ndarray) -> np.ndarray:
    if end.op_type == "MatMul":
        return np.abs(weight).max(axis=0)
    return np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)


def _group(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _channels(site: Site, inits) -> int:
    weight = inits[site.reader.input[1]]
    if site.reader.op_type == "MatMul":
        return int(weight.dims[0])
    return int(weight.dims[1]) * _group(site.reader)


def scales_from(activation: np.ndarray, weight: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """s = a^alpha / w^(1-alpha), 1 where either range is 0, clamped."""
    activation = np.asarray(activation, np.float64)
    weight = np.asarray(weight, np.float64)
    ok = (activation > 0) & (weight > 0)
    scales = np.ones_like(activation)
    scales[ok] = activation[ok] ** alpha / weight[ok] ** (1 - alpha)
    return np.clip(scales, 1.0 / MAX_SCALE, MAX_SCALE)


def channel_amax(model: onnx.ModelProto, tensors: list[str], feeds: Iterable[Mapping[str, np.ndarray]], axes: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Per-channel max |x| of ``tensors`` over ``feeds``, reduced feed by feed."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    have = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in have)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort_session(exposed, options)
    wanted = {i.name for i in session.get_inputs()}
    amax: dict[str, np.ndarray] = {}
    for feed in feeds:
        values = session.run(tensors, {k: v for k, v in feed.items() if k in wanted})
        for name, value in zip(tensors, values):
            axis = axes[name] % value.ndim
            reduced = np.abs(np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)).max(axis=1)
            amax[name] = reduced if name not in amax else np.maximum(amax[name], reduced)
    return amax


# ------------------------------------------------------------------ rewrite


def _per_channel(scale: np.ndarray, axis: int) -> np.ndarray:
    """``scale`` shaped to broadcast along channel ``axis`` (1 of NCHW, or last)."""
    return scale if axis == -1 else scale.reshape(-1, 1, 1)


def apply_scales(model: onnx.ModelProto, site: Site, scales: np.ndarray) -> None:
    """x_i -> x_i / s_i along the walk, W2[:, i] -> W2[:, i] * s_i (in place on ``model``)."""
    inits = {t.name: t for t in model.graph.initializer}
    scales = scales.astype(np.float64)
    _scale_reader(model, inits, site.reader, scales)
    inverse = 1.0 / scales
    for node, index in site.steps:
        if index < 0:
            continue
        const = numpy_helper.to_array(inits[node.input[index]]).astype(np.float64)
        new = (const / _per_channel(scales, site.axis)).astype(np.float32)
        node.input[index] = _add_init(model, inits, node.input[index] + "_eq", new)
    if site.end is not None:
        _scale_end(model, inits, site.end, inverse)


def _scale_reader(model, inits, reader, scales) -> None:
    weight = numpy_helper.to_array(inits[reader.input[1]]).astype(np.float64)
    if reader.op_type == "MatMul":
        weight = weight * scales[:, None]
    else:
        group, per_in = _group(reader), weight.shape[1]
        per_out = weight.shape[0] // group
        for g in range(group):
            block = scales[g * per_in : (g + 1) * per_in].reshape(1, -1, *([1] * (weight.ndim - 2)))
            weight[g * per_out : (g + 1) * per_out] *= block
    reader.input[1] = _add_init(model, inits, reader.input[1] + "_eq", weight.astype(np.float32))


def _scale_end(model, inits, end, inverse) -> None:
    weight = numpy_helper.to_array(inits[end.input[1]]).astype(np.float64)
    if end.op_type == "MatMul":
        weight = weight * inverse[None, :]
    else:
        weight = weight * inverse.reshape(-1, *([1] * (weight.ndim - 1)))
        if len(end.input) > 2 and end.input[2]:
            bias = numpy_helper.to_array(inits[end.input[2]]).astype(np.float64) * inverse
            end.input[2] = _add_init(model, inits, end.input[2] + "_eq", bias.astype(np.float32))
    end.input[1] = _add_init(model, inits, end.input[1] + "_eq", weight.astype(np.float32))


def _add_init(model, inits, base: str, value: np.ndarray) -> str:
    name, n = base, 0
    while name in inits:
        n += 1
        name = f"{base}{n}"
    tensor = numpy_helper.from_array(value, name)
    model.graph.initializer.append(tensor)
    inits[name] = tensor
    return name


def _drop_unused(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _site_ok(site: Site, inits, channels: int) -> bool:
    """Constants on the walk must broadcast per channel of x (scalar or [C]-shaped along the axis)."""
    for node, index in site.steps:
        if index < 0:
            continue
        shape = tuple(inits[node.input[index]].dims)
        size = int(np.prod(shape)) if shape else 1
        if size == 1:
            continue
        if site.axis == -1 and shape[-1:] == (channels,) and size == channels:
            continue
        if site.axis == 1 and len(shape) >= 3 and shape[-3] == channels and size == channels:
            continue
        return False
    if site.end is not None:
        weight = inits[site.end.input[1]]
        produced = weight.dims[1] if site.end.op_type == "MatMul" else weight.dims[0]
        if produced != channels:
            return False
    return True


# ------------------------------------------------------------------ entries


def equalize(model: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]] | None = None, *,
             alpha: float = ALPHA, iterations: int = 3) -> tuple[onnx.ModelProto, int]:
    """The rescaled copy of ``model`` and the number of rescaled inputs.

    With ``feeds``: smoothing of every site (activation ranges measured on
    the float model). Without: data-free CLE on sites whose walk ends at a
    Conv/MatMul, iterated ``iterations`` times as chains share layers."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    feeds = list(feeds) if feeds is not None else None
    inits = {t.name: t for t in out.graph.initializer}
    sites = [s for s in find_sites(out) if _site_ok(s, inits, _channels(s, inits))]
    if feeds is not None:
        done = _smooth(out, sites, feeds, alpha)
    else:
        done = _cle(out, [s for s in sites if s.end is not None], iterations)
    _drop_unused(out)
    return out, done


def _smooth(model, sites: list[Site], feeds, alpha: float) -> int:
    if not sites or not feeds:
        return 0
    amax = channel_amax(model, [s.tensor for s in sites], feeds, {s.tensor: s.axis for s in sites})
    for site in sites:
        inits = {t.name: t for t in model.graph.initializer}
        weight = numpy_helper.to_array(inits[site.reader.input[1]])
        channels = _channels(site, inits)
        scales = scales_from(amax[site.tensor], input_channel_range(site.reader, weight, channels), alpha)
        apply_scales(model, site, scales)
    return len(sites)


def _cle(model, sites: list[Site], iterations: int) -> int:
    for _ in range(iterations):
        for site in sites:
            inits = {t.name: t for t in model.graph.initializer}
            w2 = numpy_helper.to_array(inits[site.reader.input[1]])
            w1 = numpy_helper.to_array(inits[site.end.input[1]])
            channels = _channels(site, inits)
            scales = scales_from(output_channel_range(site.end, w1), input_channel_range(site.reader, w2, channels), 0.5)
            apply_scales(model, site, scales)
    return len(sites)


# ------------------------------------------------------------------ affine into the next Conv


def fold_affine(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """h -> Mul(a) [-> Add(b)] -> Conv: the affine moves into the Conv (one Q/DQ
    point instead of three, two fewer elementwise kernels). The rewrite is the
    -O2 fusion ``fuse-affine-into-conv`` (passes/fusion/affine_into_conv.py, its math
    and preconditions there); the new model (``model`` itself when nothing folds)
    and the number of folds are returned."""
    from .registered import apply_passes

    return apply_passes(model, ("fuse-affine-into-conv",))
