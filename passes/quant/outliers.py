"""Which weighted MatMul/Gemm stay float in INT8 dynamic quantization: those whose input has outlier channels.

Dynamic quantization (``formats.dynamic_matmul``, onnxruntime's DynamicQuantizeLinear) rounds the whole input
tensor of each call to uint8 with one scale, s = (max(x, 0) - min(x, 0)) / 255. When a few channels of a few
tokens are far larger than the rest ("massive activations": SmolLM2's down projections reach 50-4000x the median
channel's max |x|) the step s is set by them and every other token keeps a few levels per value or none: the
product's error is that of its input, carried into the residual stream. Measured over the whole tensor the
error hides (the outlier holds most of its norm); per token it does not. The decision, judged from data and not
from names: on each calibration feed (one call) the input x is quantized as the kernel would,

    q = clamp(round(x / s) + z, 0, 255),  z = round(-min(x, 0) / s),  x' = (q - z) s,
    error = median over tokens t (all axes but the last) of ||x'_t - x_t|| / ||x_t||,

and a node whose largest error over the feeds exceeds ``max_error`` is kept float, its reason naming the error
and the outlier ratio (max over channels of max |x| / the median channel's) beside it (``outlier_reason``: the
rule onnxruntime-dynamic-matmul, ort_dynamic.py, refuses such a node with it; ``outlier_nodes`` lists them). The default bound was set
on SmolLM2-135M (benchmarks/results/int8_outliers_smollm2_135m_kv.md): its 30 down projections measure 0.061-1.0,
the q/k/v, o and gate/up inputs 0.01-0.056 but for three (last layers' gate/up 0.070 and 0.100, one o_proj 0.070).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import numpy as np
import onnx

MAX_ERROR = 0.06  # default bound on the median per-token relative error of the dynamically quantized input
FEEDS = 4  # calibration feeds the statistics are measured on (each one call of the kernel)


@dataclasses.dataclass(frozen=True)
class InputStats:
    error: float  # largest over the feeds of the median per-token error of the u8 per-tensor quantized input
    channel_ratio: float  # max over channels of max|x|, over the median channel's


def dynamic_quantization_error(x: np.ndarray) -> float:
    """Median over tokens (rows: all axes but the last) of each row's relative L2 error when ``x`` is quantized
    to uint8 per tensor as DynamicQuantizeLinear does (range including 0, zero point rounded and saturated);
    all-zero rows count as exact."""
    x = np.asarray(x, np.float32)
    if not x.size or not np.any(x):
        return 0.0
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = np.float32((hi - lo) / 255.0)
    zero = np.clip(np.round(-lo / scale), 0, 255)
    back = (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale
    rows = x.reshape(-1, x.shape[-1])
    norms = np.linalg.norm(rows, axis=1)
    errors = np.linalg.norm((back - x).reshape(rows.shape), axis=1)
    return float(np.median(np.where(norms > 0, errors / np.where(norms > 0, norms, 1), 0.0)))


def weighted_inputs(model: onnx.ModelProto, ops: tuple[str, ...] = ("MatMul", "Gemm")) -> dict[str, str]:
    """Node name -> its activation input, for ``ops`` whose second input is an initializer."""
    inits = {t.name for t in model.graph.initializer}
    return {n.name: n.input[0] for n in model.graph.node
            if n.op_type in ops and len(n.input) > 1 and n.input[1] in inits and n.input[0] not in inits}


def input_stats(model: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]], tensors: list[str]) -> dict[str, InputStats]:
    """``InputStats`` of each tensor in ``tensors`` over ``feeds`` (onnxruntime CPU, rewrites off)."""
    from .calibrate import session_with_outputs

    if not tensors:
        return {}
    session = session_with_outputs(model, tensors)
    wanted = {i.name for i in session.get_inputs()}
    errors: dict[str, float] = {}
    peaks: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(tensors, session.run(tensors, {k: v for k, v in feed.items() if k in wanted})):
            if value.size == 0 or value.ndim == 0:
                continue
            errors[name] = max(errors.get(name, 0.0), dynamic_quantization_error(value))
            peak = np.abs(value.reshape(-1, value.shape[-1])).max(0)
            peaks[name] = np.maximum(peaks[name], peak) if name in peaks else peak
    out = {}
    for name in errors:
        median = float(np.median(peaks[name]))
        out[name] = InputStats(errors[name], float(peaks[name].max() / median) if median else float("inf"))
    return out


def outlier_reason(tensor: str, stats: InputStats | None, max_error: float) -> str | None:
    """Why a weighted node reading ``tensor`` stays float (its input's error above ``max_error``), or None: the
    decision, made here once; the rule onnxruntime-dynamic-matmul (ort_dynamic.py) refuses with it."""
    if stats is None or not stats.error > max_error:
        return None
    return (f"input outliers: {tensor} loses {100 * stats.error:.1f}% (median per-token relative L2) to per-tensor "
            f"dynamic u8 quantization on the calibration data, above {100 * max_error:g}%; its largest channel "
            f"peaks at {stats.channel_ratio:.0f}x the median channel's")


def measured_outliers(model: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]],
                      max_error: float = MAX_ERROR) -> tuple[dict[str, InputStats], dict[str, str]]:
    """(statistics of every weighted MatMul/Gemm input on ``feeds``, node name -> why it stays float):
    measured once, for the rule onnxruntime-dynamic-matmul to refuse from and for the report."""
    stats = input_stats(model, feeds, sorted(set(weighted_inputs(model).values())))
    return stats, outlier_nodes(model, (), max_error, stats=stats)


def outlier_nodes(model: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]], max_error: float = MAX_ERROR,
                  ops: tuple[str, ...] = ("MatMul", "Gemm"), stats: Mapping[str, InputStats] | None = None) -> dict[str, str]:
    """Node name -> why it stays float, for the weighted ``ops`` whose input's dynamic quantization error on
    ``feeds`` exceeds ``max_error`` (module docstring); the input's name and figures are in the reason.
    ``stats``: the inputs' statistics measured already (``input_stats``; then ``feeds`` are not read)."""
    readers = weighted_inputs(model, ops)
    if stats is None:
        stats = input_stats(model, feeds, sorted(set(readers.values())))
    reasons = {node: outlier_reason(tensor, stats.get(tensor), max_error) for node, tensor in readers.items()}
    return {node: why for node, why in reasons.items() if why is not None}
