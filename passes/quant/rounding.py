"""Learned rounding of a QDQ model's INT8 weights, layer by layer (the per-layer math: adaround.py).

Sites: each Conv (1-D or 2-D, any group), Gemm (transA = 0, alpha = 1) and MatMul (2-D weight) of the QDQ
model whose weight is DequantizeLinear(constant 8-bit codes, scales per output channel or per tensor),
whose float twin (same node name and op in the float model the QDQ one was built from) reads the float
weight, and whose stored codes are that weight's rounding on the stored grid (within one step of
W / s + z everywhere). Any other weighted node is listed in ``skipped`` with the reason. The code range
is the one onnxruntime's quantizer used (symmetric weights; 7 bits with ``reduce_range``, which keeps
u8 x s8 products from saturating on CPUs without VNNI, unless the stored codes use 8: a weight the format
kept at full range), so the learned codes fit the same kernels.

Inputs of a layer (``inputs``):
  * "quantized" (default): x_q read from the QDQ model carrying the learned codes and refit biases of
    every layer upstream of it (sequential: a layer corrects what the earlier ones passed on, as
    bias_correct.py does). Layers are fit in groups in graph order; a group never holds a layer and one
    of its ancestors, so each layer's x_q is exactly what the written model gives it. (Groups of a fixed
    count of consecutive layers did not: a layer then corrected an upstream error, mean shift above all,
    that the refit of an earlier layer of its group removed too; the written model got both corrections.
    Measured on PP-OCRv4 rec with 8 such groups: the layers' fits improved while the model's cosine fell
    from 0.92 to 0.23.) Each group's inputs come from one run per feed of the part of the QDQ model
    upstream of them (weights and int32 biases are inputs of that session);
  * "float": x_q = x_f, the float model's own inputs (AdaRound's setting; one run per feed).
The target is always the float layer on the float model's inputs (the teacher): the float model runs once
per feed and its layer outputs at the sampled positions are kept.

Samples: conv patches at up to ``samples`` output positions per layer (Gemm/MatMul: rows), spread evenly
over the feeds and drawn by a generator seeded with (seed, layer, feed): the same every run, whatever the
machine's load. Memory: the moments of one stage's layers (a [K, K] per group) and one feed's exposed
tensors of that stage. The result (codes, bias deltas) is applied to the QDQ model by the registered
pass qdq/weight_codes.py and to the float model's biases (plan.py).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .adaround import ITERATIONS, Moments, layer_loss, learn_codes
from .bias_correct import _session
from .calibrate import session_with_outputs
from .proto_graph import graph_maps, independent_groups, upstream_of

INPUTS = ("quantized", "float")
SAMPLES = 4096
FEEDS = 16
ROUNDED_OPS = ("Conv", "Gemm", "MatMul")


@dataclasses.dataclass
class Site:
    node: str
    op: str
    output: str  # the node's output in the QDQ model
    float_input: str
    qdq_input: str
    codes_name: str
    stored: np.ndarray  # the codes in the model (its layout and dtype)
    weight: np.ndarray  # [G, Og, K] float32
    scale: np.ndarray  # [G, Og, 1]
    zero: np.ndarray  # [G, Og, 1]
    bounds: tuple[int, int]
    transposed: bool  # weight stored [K, N] (MatMul, Gemm without transB)
    conv: dict | None  # kernel, strides, pads, dilations (2-D form), group
    bias: str | None = None  # float bias initializer (refit)
    bias_codes: str | None = None  # its int32 initializer in the QDQ model
    bias_scale: np.ndarray | None = None
    bias_int: np.ndarray | None = None

    def grouped(self, codes: np.ndarray) -> np.ndarray:
        """Codes in the model's layout -> [G, Og, K] int32."""
        c = np.asarray(codes).astype(np.int32)
        return (c.T if self.transposed else c).reshape(self.weight.shape)

    def layout(self, codes: np.ndarray) -> np.ndarray:
        """[G, Og, K] -> the model's layout and dtype."""
        c = codes.reshape(self.stored.T.shape if self.transposed else self.stored.shape)
        return (c.T if self.transposed else c).astype(self.stored.dtype)


@dataclasses.dataclass
class LayerFit:
    """Output error of one layer on the calibration samples, relative to its output variance:
    nearest codes, nearest + bias refit, learned codes + refit (the figure the kept codes get)."""

    node: str
    nearest: float
    refit: float
    learned: float
    kept: bool  # learned codes stored (their error is below nearest's)
    flips: int  # codes that differ from nearest rounding

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RoundingResult:
    codes: dict = dataclasses.field(default_factory=dict)  # codes initializer -> learned codes
    bias_deltas: dict = dataclasses.field(default_factory=dict)  # float bias -> refit delta
    layers: list = dataclasses.field(default_factory=list)  # LayerFit per site, graph order
    skipped: dict = dataclasses.field(default_factory=dict)  # node -> why its rounding stays nearest
    inputs: str = "quantized"

    def describe(self) -> str:
        kept = sum(1 for f in self.layers if f.kept)
        gain = [f.learned / f.nearest for f in self.layers if f.nearest > 0]
        line = (f"learned rounding ({self.inputs} inputs): {kept} of {len(self.layers)} layers took learned codes, "
                f"{len(self.bias_deltas)} biases refit")
        if gain:
            line += f", layer error x{float(np.median(gain)):.3f} of nearest (median)"
        if self.skipped:
            line += f"; {len(self.skipped)} layers kept nearest rounding"
        return line

    def as_dict(self) -> dict:
        return {"inputs": self.inputs, "layers": [f.as_dict() for f in self.layers], "skipped": dict(self.skipped),
                "biases_refit": len(self.bias_deltas)}


def code_bounds(dtype, reduce_range: bool) -> tuple[int, int]:
    """The code range onnxruntime's quantizer gives symmetric weights of ``dtype``."""
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    qmin, qmax = get_qmin_qmax_for_qType(elem, reduce_range=reduce_range, symmetric=True)
    return int(qmin), int(qmax)


# ------------------------------------------------------------------ sites


def find_sites(float_model: onnx.ModelProto, qdq_model: onnx.ModelProto,
               reduce_range: bool) -> tuple[list[Site], dict[str, str]]:
    """(sites in graph order, {node: why it is not one}) for the quantized weighted nodes."""
    producers, readers, inits, _outputs = graph_maps(qdq_model)
    float_nodes = {n.name: n for n in float_model.graph.node}
    float_inits = {t.name: t for t in float_model.graph.initializer}
    sites, skipped = [], {}
    for node in qdq_model.graph.node:
        if node.op_type not in ROUNDED_OPS or len(node.input) < 2:
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue  # a float weight or an activation: not an int8 weight
        site = _site(node, dq, producers, readers, inits, float_nodes.get(node.name), float_inits, reduce_range)
        if isinstance(site, str):
            skipped[node.name] = site
        else:
            sites.append(site)
    return sites, skipped


def _site(node, dq, producers, readers, inits, twin, float_inits, reduce_range) -> Site | str:
    if twin is None or twin.op_type != node.op_type or len(twin.input) < 2 or twin.input[1] not in float_inits:
        return "no float twin (same name and op, constant weight) in the float model"
    if len(readers.get(node.input[1], [])) != 1 or len(readers.get(dq.input[0], [])) != 1:
        return "the weight is read by other nodes too"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    stored = numpy_helper.to_array(inits[dq.input[0]])
    if stored.dtype not in (np.int8, np.uint8):
        return f"the weight codes are {stored.dtype}, not 8-bit"
    w = numpy_helper.to_array(float_inits[twin.input[1]]).astype(np.float32)
    if w.shape != stored.shape:
        return "the float weight and its codes differ in shape"
    conv, transposed, out_axis = None, False, 0
    if node.op_type == "Conv":
        conv = _conv_attrs(attrs, w)
        if isinstance(conv, str):
            return conv
    elif node.op_type == "Gemm":
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or w.ndim != 2:
            return "Gemm with transA or alpha != 1"
        transposed, out_axis = not attrs.get("transB", 0), 0 if attrs.get("transB", 0) else 1
    elif w.ndim != 2:
        return f"MatMul weight of rank {w.ndim} (only 2-D)"
    else:
        transposed, out_axis = True, 1
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    zero = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] in inits else np.zeros(1, stored.dtype)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % w.ndim
    outputs = w.shape[out_axis]
    if scale.size != 1 and (axis != out_axis or scale.size != outputs):
        return "the weight's scales are not per output channel"
    groups = conv["group"] if conv else 1
    wo = w.T if transposed else w  # [O, ...]
    shape = (groups, outputs // groups, int(np.prod(wo.shape[1:])))
    per = lambda v: np.broadcast_to(np.asarray(v, np.float32).reshape(-1), (outputs,)).reshape(shape[0], shape[1], 1).copy()  # noqa: E731
    scale_g, zero_g = per(scale), per(zero.astype(np.float32))
    weight = wo.reshape(shape)
    codes = (stored.T if transposed else stored).astype(np.int32).reshape(shape)
    # a weight quantized at full range despite reduce_range (8-bit depthwise weights: that
    # kernel does not saturate) has codes past the 7-bit range: it keeps its 8 bits
    bounds = code_bounds(stored.dtype, True)
    if not reduce_range or codes.min() < bounds[0] or codes.max() > bounds[1]:
        bounds = code_bounds(stored.dtype, False)
    if codes.min() < bounds[0] or codes.max() > bounds[1] or np.abs(codes - (weight / scale_g + zero_g)).max() > 1.0 + 1e-3:
        return "the stored codes are not a rounding of the float weight on the stored grid"
    site = Site(node.name, node.op_type, node.output[0], twin.input[0], node.input[0], dq.input[0], stored, weight, scale_g, zero_g,
                bounds, transposed, conv)
    _bias(site, node, twin, producers, inits, float_inits, outputs)
    return site


def _conv_attrs(attrs: dict, w: np.ndarray) -> dict | str:
    rank = w.ndim - 2
    if rank not in (1, 2):
        return f"a {rank}-D convolution (only 1-D and 2-D)"
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
        return "auto_pad SAME_* (explicit pads only)"
    kernel = list(w.shape[2:])
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    pads = list(attrs.get("pads", [0] * 2 * rank))
    if rank == 1:  # as 2-D with one row
        kernel, strides, dilations, pads = [1] + kernel, [1] + strides, [1] + dilations, [0, pads[0], 0, pads[1]]
    return {"kernel": kernel, "strides": strides, "dilations": dilations, "pads": pads,
            "group": int(attrs.get("group", 1)), "rank": rank}


def _bias(site: Site, node, twin, producers, inits, float_inits, outputs: int) -> None:
    """The bias the refit moves: the float twin's bias initializer, DQ(int32) in the QDQ model."""
    if len(node.input) < 3 or len(twin.input) < 3 or twin.input[2] != node.input[2] or node.input[2] not in producers:
        return
    if twin.input[2] not in float_inits or (node.op_type == "Gemm" and any(
            a.name == "beta" and a.f != 1.0 for a in node.attribute)):
        return
    dq = producers[node.input[2]]
    if dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or dq.input[1] not in inits:
        return
    value = numpy_helper.to_array(inits[dq.input[0]])
    if value.dtype != np.int32 or value.size != outputs or tuple(float_inits[twin.input[2]].dims) != (outputs,):
        return
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    site.bias, site.bias_codes = twin.input[2], dq.input[0]
    site.bias_scale, site.bias_int = np.broadcast_to(scale, value.shape).copy(), value.astype(np.int32)


# ------------------------------------------------------------------ samples


def _where(site: Site, shape: tuple, rng: np.random.Generator, count: int):
    """Sampled positions of the layer's output for an input of ``shape``: rows (Gemm/MatMul) or
    (batch, top rows, left columns) of the conv patches."""
    if site.conv is None:
        return _positions(rng, int(np.prod(shape)) // site.weight.shape[2], count)
    c = site.conv
    n, _ch, height, width = (shape[0], shape[1], 1, shape[2]) if c["rank"] == 1 else shape
    (kh, kw), (sh, sw), (dh, dw), (pt, pl, pb, pr) = c["kernel"], c["strides"], c["dilations"], c["pads"]
    oh = (height + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (width + pl + pr - dw * (kw - 1) - 1) // sw + 1
    index = _positions(rng, n * oh * ow, count)
    b, rest = np.divmod(index, oh * ow)
    i, j = np.divmod(rest, ow)
    return b, i[:, None] * sh + np.arange(kh) * dh, j[:, None] * sw + np.arange(kw) * dw


def _patches(site: Site, x: np.ndarray, where) -> np.ndarray:
    """The layer's inputs at ``where`` (``_where``), [P, G, K]."""
    if site.conv is None:
        return x.reshape(-1, site.weight.shape[2])[where][:, None, :]
    c = site.conv
    if c["rank"] == 1:
        x = x[:, :, None, :]
    b, rows, cols = where
    pt, pl, pb, pr = c["pads"]
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    patch = xp[b[:, None, None, None], np.arange(x.shape[1])[None, :, None, None], rows[:, None, :, None],
               cols[:, None, None, :]]
    return patch.reshape(len(b), site.weight.shape[0], -1)


def _positions(rng: np.random.Generator, total: int, count: int) -> np.ndarray:
    if total <= count:
        return np.arange(total)
    return np.sort(rng.choice(total, count, replace=False))


# ------------------------------------------------------------------ the search


def learn_rounding(float_model: onnx.ModelProto, qdq_model: onnx.ModelProto,
                   feeds: Sequence[Mapping[str, np.ndarray]], *, reduce_range: bool, inputs: str = "quantized",
                   samples: int = SAMPLES, iterations: int = ITERATIONS, seed: int = 0,
                   log: Callable[[str], None] | None = None) -> RoundingResult:
    """Learned codes and bias refits for ``qdq_model``'s weights (see the module docstring)."""
    if inputs not in INPUTS:
        raise ValueError(f"inputs {inputs!r}: choose one of {', '.join(INPUTS)}")
    sites, skipped = find_sites(float_model, qdq_model, reduce_range)
    result = RoundingResult(skipped=skipped, inputs=inputs)
    feeds = list(feeds)
    if not sites or not feeds:
        return result
    current = {s.codes_name: s.stored for s in sites}
    current.update({s.bias_codes: s.bias_int for s in sites if s.bias_codes})
    per_feed = max(1, samples // len(feeds))
    moments = {s.node: Moments.zeros(*s.weight.shape) for s in sites}
    # the teacher: float outputs at the sampled positions, one float run per feed
    targets: dict[str, list] = {s.node: [] for s in sites}
    float_session = session_with_outputs(float_model, list(dict.fromkeys(s.float_input for s in sites)))
    for f, feed in enumerate(feeds):
        names = [o.name for o in float_session.get_outputs()]
        xf = dict(zip(names, float_session.run(names, _fed(float_session, feed))))
        for i, s in enumerate(sites):
            where = _where(s, xf[s.float_input].shape, np.random.default_rng([seed, i, f]), per_feed)
            sf = _patches(s, xf[s.float_input], where)
            yf = np.einsum("pgk,gok->pgo", sf, s.weight)
            if inputs == "float":
                moments[s.node].add(sf, yf)
            else:
                targets[s.node].append((where, yf))
        del xf
    groups = [sites] if inputs == "float" else [
        [sites[i] for i in group] for group in independent_groups(qdq_model, [(s.output, s.qdq_input) for s in sites])]
    done = 0
    for group in groups:
        if inputs == "quantized":
            names = list(dict.fromkeys(s.qdq_input for s in group))
            upstream = upstream_of(qdq_model, names)
            used = {t.name for t in upstream.graph.initializer}
            session = _session(upstream, names, {k: v for k, v in current.items() if k in used})
            for f, feed in enumerate(feeds):
                xq = dict(zip(names, session.run(names, _fed(session, feed, current))))
                for s in group:
                    where, yf = targets[s.node][f]
                    moments[s.node].add(_patches(s, xq[s.qdq_input], where), yf)
                del xq
        for s in group:
            targets.pop(s.node, None)
            _fit(s, moments.pop(s.node), iterations, result, current)
        done += len(group)
        if log and (len(groups) < 16 or done == len(sites) or len(group) > 1 or done % max(1, len(sites) // 8) == 0):
            log(f"  learned rounding: {done}/{len(sites)} layers")
    return result


def _fed(session, feed, extra: Mapping[str, np.ndarray] | None = None) -> dict:
    wanted = {i.name for i in session.get_inputs()}
    return {k: v for k, v in {**feed, **(extra or {})}.items() if k in wanted}


def _fit(site: Site, moments: Moments, iterations: int, result: RoundingResult, current: dict) -> None:
    """Learn one layer's codes, keep them when the layer's error drops, refit its bias."""
    centred = site.bias is not None
    h, p, c = moments.normalized(centred)
    hu, pu, cu = moments.normalized(False)
    _hc, _pc, variance = moments.normalized(True)
    nearest = site.grouped(site.stored)
    factor = moments.factor(centred) if 2 * moments.n < site.weight.shape[2] else None
    codes = learn_codes(site.weight, site.scale, site.zero, *site.bounds, h, p, c, iterations=iterations, factor=factor)
    weights = lambda q: site.scale * (q - site.zero)  # noqa: E731
    near_loss, learned_loss = layer_loss(weights(nearest), h, p, c), layer_loss(weights(codes), h, p, c)
    kept = learned_loss < near_loss
    chosen = codes if kept else nearest
    denom = max(variance, 1e-30)
    result.layers.append(LayerFit(site.node, layer_loss(weights(nearest), hu, pu, cu) / denom, near_loss / denom,
                                  min(learned_loss, near_loss) / denom, bool(kept), int((codes != nearest).sum())))
    if kept:
        result.codes[site.codes_name] = site.layout(codes)
        current[site.codes_name] = result.codes[site.codes_name]
    if centred:
        n = max(moments.n, 1)
        delta = (moments.y / n - np.einsum("gok,gk->go", weights(chosen).astype(np.float64), moments.x / n)).reshape(-1)
        result.bias_deltas[site.bias] = delta.astype(np.float32)
        step = np.round(delta / site.bias_scale).astype(np.int64)
        current[site.bias_codes] = np.clip(site.bias_int.astype(np.int64) + step, -(2**31), 2**31 - 1).astype(np.int32)
