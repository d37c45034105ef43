"""Interleaved latency comparison of two models (A = float, B = int8).

Measured by the project's bench harness: shuffled interleaved rounds, so drift
in machine load hits both alike; the result is the geometric mean of the
per-round ratios B/A with a 95% t-interval on the log ratios.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx


@dataclasses.dataclass
class LatencyComparison:
    base_ms: float
    variant_ms: float
    ratio: float
    ci_low: float
    ci_high: float
    rounds: int
    threads: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def compare(
    base: onnx.ModelProto,
    variant: onnx.ModelProto,
    feed: Mapping[str, np.ndarray],
    *,
    rounds: int = 10,
    threads: int = 2,
    warmup: int = 3,
) -> LatencyComparison:
    """Interleaved latency of ``variant`` relative to ``base`` (the bench harness)."""
    from onnxforge.bench.harness import compare_latency

    with tempfile.TemporaryDirectory(prefix="onnxforge-quant-latency-") as tmp:
        paths = [Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"]
        for model, path in zip((base, variant), paths):
            path.write_bytes(model.SerializeToString())
        result = compare_latency([str(p) for p in paths], dict(feed), threads=threads, rounds=rounds, warmup=warmup)
    ratio = result.models[1].ratio
    return LatencyComparison(
        result.models[0].stats["p50"], result.models[1].stats["p50"], ratio.ratio, ratio.low, ratio.high, rounds, threads,
    )
