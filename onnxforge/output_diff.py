"""How two models' outputs differ: the worst absolute and relative error and the cosine per
output, over tensors and the sequences, maps and empty optionals onnxruntime returns
(``compare_arrays``), and the worst case over feeds (``merge_diffs``); per tensor, folded feed by
feed (``RunningDiff``: also SQNR and NaN/Inf counts). verify.py judges rewrites with it;
``onnxforge compare``, ``debug``, ``reduce`` and the pipeline's steps report with it.

An output is within tolerance when max |ref - out| <= atol + rtol * max |ref| (NaN where
both are NaN counts as equal); the relative error is max |ref - out| / max |ref|.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import numpy as np


@dataclasses.dataclass
class OutputDiff:
    name: str
    max_abs: float
    max_rel: float
    cosine: float
    ok: bool

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)



def compare_arrays(name: str, ref, out, rtol: float, atol: float) -> OutputDiff:
    """Worst error between two output values: tensors, or the sequences (lists), maps
    (dicts) and empty optionals (None) onnxruntime returns for non-tensor types."""
    if isinstance(ref, (list, tuple, dict)) or ref is None or isinstance(out, (list, tuple, dict)) or out is None:
        return _compare_nested(name, ref, out, rtol, atol)
    ref, out = np.asarray(ref), np.asarray(out)
    if ref.shape != out.shape or ref.dtype != out.dtype:
        return OutputDiff(name, float("inf"), float("inf"), 0.0, False)
    if ref.dtype.kind not in "fc":
        equal = bool(np.array_equal(ref, out))
        return OutputDiff(name, 0.0 if equal else float("inf"), 0.0 if equal else float("inf"), 1.0 if equal else 0.0, equal)
    r, o = ref.astype(np.float64), out.astype(np.float64)
    both_nan = np.isnan(r) & np.isnan(o)
    diff = np.where(both_nan, 0.0, np.abs(r - o))
    diff = np.where(np.isnan(diff), np.inf, diff)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.nanmax(np.abs(r))) if r.size and not np.all(np.isnan(r)) else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    similarity = cosine(r, o)
    ok = max_abs <= atol + rtol * scale
    return OutputDiff(name, max_abs, max_rel, similarity, bool(ok))


def _compare_nested(name: str, ref, out, rtol: float, atol: float) -> OutputDiff:
    mismatch = OutputDiff(name, float("inf"), float("inf"), 0.0, False)
    if ref is None or out is None:
        return OutputDiff(name, 0.0, 0.0, 1.0, True) if ref is None and out is None else mismatch
    if isinstance(ref, dict) or isinstance(out, dict):
        if not (isinstance(ref, dict) and isinstance(out, dict)) or ref.keys() != out.keys():
            return mismatch
        keys = list(ref)
        parts = [compare_arrays(name, ref[k], out[k], rtol, atol) for k in keys]
    else:
        if not isinstance(out, (list, tuple)) or not isinstance(ref, (list, tuple)) or len(ref) != len(out):
            return mismatch
        parts = [compare_arrays(name, r, o, rtol, atol) for r, o in zip(ref, out)]
    if not parts:
        return OutputDiff(name, 0.0, 0.0, 1.0, True)
    return OutputDiff(name, max(p.max_abs for p in parts), max(p.max_rel for p in parts),
                      min(p.cosine for p in parts), all(p.ok for p in parts))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays, flattened, in float64 with NaN/Inf made finite;
    1 when both are all zero, 0 when only one is."""
    a = np.nan_to_num(np.asarray(a, dtype=np.float64).ravel())
    b = np.nan_to_num(np.asarray(b, dtype=np.float64).ravel())
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def same_kind(name: str, ref, out) -> OutputDiff:
    """Whether two output values have one kind (tensor shape and dtype, or Python type): for outputs
    whose values differ from run to run (random ops), where only the kind can be compared."""
    a = np.asarray(ref) if not isinstance(ref, (list, dict)) and ref is not None else ref
    same = type(ref) is type(out) if not isinstance(a, np.ndarray) else (
        isinstance(out, np.ndarray) and a.shape == out.shape and a.dtype == out.dtype)
    return OutputDiff(name, 0.0, 0.0, 1.0, True) if same else OutputDiff(name, float("inf"), float("inf"), 0.0, False)


def merge_diffs(per_feed: Iterable[list[OutputDiff]]) -> list[OutputDiff]:
    """Worst case over feeds, per output."""
    merged: dict[str, OutputDiff] = {}
    for diffs in per_feed:
        for d in diffs:
            m = merged.get(d.name)
            merged[d.name] = d if m is None else OutputDiff(
                d.name, max(m.max_abs, d.max_abs), max(m.max_rel, d.max_rel), min(m.cosine, d.cosine), m.ok and d.ok
            )
    return list(merged.values())


@dataclasses.dataclass
class RunningDiff:
    """Running figures of one tensor's difference over several feeds (``onnxforge debug`` folds each
    feed's values in and drops them): max abs and rel error, cosine, SQNR, NaN/Inf counts."""

    name: str
    max_abs: float = 0.0
    ref_max: float = 0.0
    dot: float = 0.0
    ref_sq: float = 0.0
    out_sq: float = 0.0
    err_sq: float = 0.0
    nan: int = 0
    inf: int = 0
    ref_nonfinite: int = 0
    mismatch: str | None = None
    shape: list = dataclasses.field(default_factory=list)
    dtype: str = ""

    def add(self, ref, out) -> None:
        if ref is None or out is None or isinstance(ref, (list, tuple, dict)) or isinstance(out, (list, tuple, dict)):
            self.mismatch = self.mismatch or "not a tensor"
            return
        ref, out = np.asarray(ref), np.asarray(out)
        if ref.shape != out.shape:
            self.mismatch = f"shape {list(ref.shape)} vs {list(out.shape)}"
            return
        if ref.dtype != out.dtype and not (ref.dtype.kind == out.dtype.kind == "f"):
            # float32 vs float16 is the precision change being measured; int vs float is not comparable
            self.mismatch = f"type {ref.dtype} vs {out.dtype}"
            return
        self.shape = list(ref.shape)
        self.dtype = str(out.dtype)
        if ref.dtype.kind not in "biufc" or ref.size == 0:
            return
        r = ref.astype(np.float64) if ref.dtype.kind != "c" else np.abs(ref).astype(np.float64)
        o = out.astype(np.float64) if out.dtype.kind != "c" else np.abs(out).astype(np.float64)
        self.nan += int(np.isnan(o).sum())
        self.inf += int(np.isinf(o).sum())
        ok_r, ok_o = np.isfinite(r), np.isfinite(o)
        self.ref_nonfinite += int((~ok_r).sum())
        both = ok_r & ok_o
        r, o = np.where(both, r, 0.0), np.where(both, o, 0.0)
        d = r - o
        self.max_abs = max(self.max_abs, float(np.abs(d).max()))
        self.ref_max = max(self.ref_max, float(np.abs(r).max()))
        self.dot += float(np.dot(r.ravel(), o.ravel()))
        self.ref_sq += float(np.dot(r.ravel(), r.ravel()))
        self.out_sq += float(np.dot(o.ravel(), o.ravel()))
        self.err_sq += float(np.dot(d.ravel(), d.ravel()))

    def as_dict(self, threshold: float) -> dict:
        if self.mismatch:
            return {"name": self.name, "mismatch": self.mismatch, "jump": True}
        max_rel = self.max_abs / self.ref_max if self.ref_max > 0 else (0.0 if self.max_abs == 0 else math.inf)
        if self.ref_sq == 0 and self.out_sq == 0:
            cosine = 1.0
        elif self.ref_sq == 0 or self.out_sq == 0:
            cosine = 0.0
        else:
            cosine = self.dot / math.sqrt(self.ref_sq * self.out_sq)
        if self.err_sq == 0:
            sqnr = math.inf
        elif self.ref_sq == 0:
            sqnr = -math.inf
        else:
            sqnr = 10 * math.log10(self.ref_sq / self.err_sq)
        jump = (max_rel > threshold or cosine < 1 - threshold or self.nan + self.inf > self.ref_nonfinite)
        return {"name": self.name, "shape": self.shape, "dtype": self.dtype, "max_abs": self.max_abs, "max_rel": max_rel,
                "cosine": cosine, "sqnr_db": sqnr, "nan": self.nan, "inf": self.inf, "jump": bool(jump)}
