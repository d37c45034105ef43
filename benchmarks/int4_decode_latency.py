"""Decode-step latency of smollm2_135m_kv: fp32 vs int8 dynamic vs INT4 (MatMulNBits) on the CPU provider,
measured interleaved (onnxforge.bench.harness.compare_latency: shuffled rounds, 2 threads, ratio to fp32 with
a 95% t-interval).

usage: python benchmarks/int4_decode_latency.py INT4.onnx [INT4_B.onnx ...] [--past 128] [--rounds 15]
  The int8 dynamic model is onnxruntime's quantize_dynamic (MatMul, per-channel int8 weights, QInt8) of the fp32
  export, written next to the first INT4 model (made with the synth venv's onnxruntime if absent).
One decode step: batch 1, one new token after ``--past`` cached positions (random cache values: the time
does not depend on them). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np

from onnxforge.bench.harness import compare_latency
from onnxforge.runtime.env import environment

MODEL = Path.home() / ".cache/onnxforge/corpus/smollm2_135m_kv.onnx"
SYNTH = Path.home() / ".cache/onnxforge/synth-venv/bin/python"
INT8 = """
import sys
from onnxruntime.quantization import QuantType, quantize_dynamic
quantize_dynamic(sys.argv[1], sys.argv[2], op_types_to_quantize=["MatMul"], per_channel=True,
                 weight_type=QuantType.QInt8)
"""


def decode_feed(past: int, layers: int = 30, kv_heads: int = 3, head_dim: int = 64) -> dict:
    rng = np.random.default_rng(0)
    feed = {"input_ids": np.array([[42]], np.int64), "attention_mask": np.ones((1, past + 1), np.int64),
            "position_ids": np.array([[past]], np.int64)}
    for i in range(layers):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = rng.standard_normal((1, kv_heads, past, head_dim)).astype(np.float32)
    return feed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("int4", nargs="+")
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    int8 = Path(a.int4[0]).with_name("smollm2_int8_dynamic.onnx")
    if not int8.exists():
        subprocess.run([str(SYNTH), "-c", INT8, str(MODEL), str(int8)], check=True)
    models = [str(MODEL), str(int8), *a.int4]
    result = compare_latency(models, decode_feed(a.past), threads=2, rounds=a.rounds)
    env = environment()
    out = {"past": a.past, "rounds": a.rounds, "threads": 2, "cpu": env["cpu"],
           "onnxruntime": env["versions"]["onnxruntime"], "models": []}
    for m in result.models:
        entry = {"model": Path(m.path).name, "p50_ms": m.stats["p50"]}
        if m.ratio is not None:
            entry.update(ratio=m.ratio.ratio, low=m.ratio.low, high=m.ratio.high)
        out["models"].append(entry)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
