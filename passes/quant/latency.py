"""Interleaved latency comparison of two models (A = float, B = int8).

Rounds alternate A, B, A, B so drift in machine load hits both alike; each
round times ``runs`` calls and keeps the median. The result is the geometric
mean of the per-round ratios B/A with a 95% t-interval on the log ratios.
Uses the bench harness when it exists, this loop otherwise.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Mapping

import numpy as np
import onnx

# Two-sided 95% t quantiles by degrees of freedom (1..30); 1.96 beyond.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


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


def session(model: onnx.ModelProto, threads: int = 2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _median_ms(sess, feed, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def compare(
    base: onnx.ModelProto,
    variant: onnx.ModelProto,
    feed: Mapping[str, np.ndarray],
    *,
    rounds: int = 10,
    runs: int = 0,
    threads: int = 2,
    warmup: int = 3,
) -> LatencyComparison:
    harnessed = _with_harness(base, variant, feed, rounds, threads, warmup)
    if harnessed is not None:
        return harnessed
    sessions = [session(base, threads), session(variant, threads)]
    feeds = [{i.name: feed[i.name] for i in s.get_inputs()} for s in sessions]
    for s, f in zip(sessions, feeds):
        for _ in range(warmup):
            s.run(None, f)
    if runs <= 0:  # about 0.25 s per model per round
        single = _median_ms(sessions[0], feeds[0], 3)
        runs = int(min(50, max(3, 250.0 / max(single, 1e-3))))
    base_ms, var_ms, logs = [], [], []
    for _ in range(rounds):
        a = _median_ms(sessions[0], feeds[0], runs)
        b = _median_ms(sessions[1], feeds[1], runs)
        base_ms.append(a)
        var_ms.append(b)
        logs.append(math.log(b / a))
    mean = float(np.mean(logs))
    half = _T95[min(rounds - 2, len(_T95) - 1)] * float(np.std(logs, ddof=1)) / math.sqrt(rounds) if rounds > 1 else 0.0
    return LatencyComparison(
        float(np.median(base_ms)), float(np.median(var_ms)), math.exp(mean), math.exp(mean - half), math.exp(mean + half),
        rounds, threads,
    )


def _with_harness(base, variant, feed, rounds: int, threads: int, warmup: int) -> LatencyComparison | None:
    """The project's bench harness (shuffled interleaved rounds), when installed."""
    try:
        from onnxforge.bench.harness import compare_latency
    except ImportError:
        return None
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="onnxforge-quant-latency-") as tmp:
        paths = [Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"]
        for model, path in zip((base, variant), paths):
            path.write_bytes(model.SerializeToString())
        result = compare_latency([str(p) for p in paths], dict(feed), threads=threads, rounds=rounds, warmup=warmup)
    ratio = result.models[1].ratio
    return LatencyComparison(
        result.models[0].stats["p50"], result.models[1].stats["p50"], ratio.ratio, ratio.low, ratio.high, rounds, threads,
    )
