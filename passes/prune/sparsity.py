"""Unstructured magnitude pruning and N:M (e.g. 2:4) semi-structured sparsity.

Zeroing weights keeps every tensor's shape: dense runtimes (onnxruntime CPU and
CUDA, TensorRT without sparse kernels) run exactly as fast as before. It helps
only runtimes with sparse kernels (TensorRT's 2:4 sparse tensor cores on Ampere+)
and compressors that exploit zeros.

Magnitude: the fraction ``level`` of smallest-|w| weights of every Conv / Gemm /
MatMul weight is set to zero (per layer). N:M: in every run of M consecutive
weights along the input-channel (reduction) axis, only the N largest |w| stay,
so each group of M holds at least M-N zeros exactly. Layers whose reduction
length is not a multiple of M are left dense and listed.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.errors import OptionError

NOTE = ("sparsity zeroes weights but keeps tensor shapes: dense runtimes (onnxruntime, TensorRT without "
        "sparse kernels) gain no speed; only sparse kernels (e.g. TensorRT 2:4 on Ampere+) or compressors do")


def parse_pattern(pattern: str) -> tuple[int, int]:
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except ValueError:
        raise OptionError(f"--pattern {pattern!r}: expected N:M, e.g. 2:4") from None
    if not 0 < n < m:
        raise OptionError(f"--pattern {pattern!r}: need 0 < N < M")
    return n, m


def weighted_layers(graph: gs.Graph):
    """(node, weight constant, reduction axis) of every Conv / Gemm / MatMul with a constant weight."""
    for node in graph.nodes:
        if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
            continue
        w = node.inputs[1]
        if node.op == "Conv" and len(w.shape) >= 3:
            yield node, w, 1
        elif node.op == "Gemm" and len(w.shape) == 2:
            yield node, w, 1 if node.attrs.get("transB", 0) else 0
        elif node.op == "MatMul" and len(w.shape) == 2:
            yield node, w, 0


def magnitude_mask(values: np.ndarray, level: float) -> np.ndarray:
    """True where a weight stays: all but the ``level`` fraction of smallest magnitudes."""
    flat = np.abs(values).reshape(-1)
    drop = int(round(level * flat.size))
    if drop == 0:
        return np.ones(values.shape, dtype=bool)
    order = np.argsort(flat, kind="stable")
    keep = np.ones(flat.size, dtype=bool)
    keep[order[:drop]] = False
    return keep.reshape(values.shape)


def nm_mask(values: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    """True where a weight stays: the n largest |w| of every m consecutive along ``axis``."""
    moved = np.moveaxis(np.abs(values), axis, -1)
    if moved.shape[-1] % m:
        raise ValueError(f"reduction length {moved.shape[-1]} is not a multiple of {m}")
    blocks = moved.reshape(-1, m)
    ranks = np.argsort(np.argsort(-blocks, axis=1, kind="stable"), axis=1, kind="stable")
    keep = (ranks < n).reshape(moved.shape)
    return np.moveaxis(keep, -1, axis)


def conv_reduction_view(values: np.ndarray) -> tuple[np.ndarray, int]:
    """A conv weight [O, I, k...] viewed as [O, k..., I]: runs of M along the input channels
    at each kernel tap (TensorRT's layout for sparse convs)."""
    return np.moveaxis(values, 1, -1), values.ndim - 1


def sparsify(graph: gs.Graph, level: float | None = None, pattern: str | None = None) -> dict:
    """Zero weights in place; returns the per-layer zero fractions and the speed note."""
    nm = parse_pattern(pattern) if pattern else None
    layers, skipped = [], []
    for node, w, axis in weighted_layers(graph):
        values = np.array(w.values)
        if nm is None:
            mask = magnitude_mask(values, level)
        else:
            view, view_axis = conv_reduction_view(values) if node.op == "Conv" else (values, axis)
            if view.shape[view_axis] % nm[1]:
                skipped.append(node.name)
                continue
            mask = nm_mask(view, view_axis, *nm)
            mask = np.moveaxis(mask, -1, 1) if node.op == "Conv" else mask
        node.inputs[1] = gs.Constant(f"{w.name}_sparse_{node.name}", np.where(mask, values, 0).astype(values.dtype))
        layers.append({"layer": node.name, "zeros": float(1 - mask.mean())})
    total = sum(int(np.prod(n.inputs[1].shape)) for n, _, _ in weighted_layers(graph))
    zeros = sum(int((n.inputs[1].values == 0).sum()) for n, _, _ in weighted_layers(graph))
    return {"pattern": pattern, "level": level, "layers": layers, "dense_layers": skipped,
            "weight_zero_fraction": zeros / total if total else 0.0, "note": NOTE}


def satisfies_nm(values: np.ndarray, axis: int, n: int, m: int) -> bool:
    """Every run of m consecutive weights along ``axis`` holds at most n non-zeros."""
    moved = np.moveaxis(values, axis, -1)
    if moved.shape[-1] % m:
        return False
    return bool(((moved.reshape(-1, m) != 0).sum(1) <= n).all())
