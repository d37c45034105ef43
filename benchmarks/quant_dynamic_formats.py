"""Dynamic MatMul weight formats on a transformer's own layers, on this CPU: the measurement
behind formats.dynamic_formats (which formats quantize tries, fastest first, per CPU class).

    .venv/bin/python benchmarks/quant_dynamic_formats.py MODEL [MODEL ...] [--rounds 15]

Per model: quantize's float baseline, then one dynamic-MatMul model per weight format
(onnxruntime's dynamic quantizer, no outlier exclusions, no fallback), cosine mean / min
over the validation feeds (../shared/data/<model>/val, else seeded [1, 128] tokens) against
the original model, and the latency of each against the ``-O3`` float model, all interleaved
in one bench-harness run (2 threads), ratio with a 95% interval. Prints markdown rows.
  u8u8 8-bit   uint8 weights (u8 x u8 kernel: exact on every CPU)
  s8 7-bit     s8 weights in 7 bits (reduce_range: no saturation without VNNI)
  s8 8-bit     full-range s8 (exact only with int8 dot products; saturates elsewhere)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from quant import cosines, feeds_for, model_path  # noqa: E402  (the INT8 table's helpers)


def measure(name: str, rounds: int) -> list[str]:
    import onnxforge
    from onnxforge.bench.harness import compare_latency
    from onnxforge.passes.quant import formats
    from onnxforge.passes.quant.budget import run_outputs
    from onnxforge.passes.quant.prepare import float_baseline

    proto = onnx.load(str(model_path(name)))
    _, val, kind = feeds_for(name, proto)
    reference = run_outputs(proto, val)
    base = float_baseline(proto)
    spec = formats.spec_for("cpu", base, "dynamic", cpu="avx2")
    specs = {"u8u8 8-bit": dataclasses.replace(spec, weight_type="u8", reduce_range=False),
             "s8 7-bit": dataclasses.replace(spec, weight_type="s8", reduce_range=True),
             "s8 8-bit": dataclasses.replace(spec, weight_type="s8", reduce_range=False)}
    rows, cos = [], {}
    with tempfile.TemporaryDirectory(prefix="onnxforge-dynfmt-") as tmp:
        o3, _ = onnxforge.optimize(proto, level=3, provider="cpu")
        paths = [Path(tmp) / "o3.onnx"]
        onnxforge.save(o3, paths[0])
        for i, (label, s) in enumerate(specs.items()):
            model = formats.dynamic_matmul(base, s)
            cos[label] = cosines(reference, run_outputs(model, val))
            paths.append(Path(tmp) / f"{i}.onnx")
            onnx.save(model, paths[-1])
        result = compare_latency([str(p) for p in paths], val[0], threads=2, rounds=rounds)
    for label, m in zip(specs, result.models[1:]):
        r = m.ratio
        rows.append(f"| {name} | {kind} | {label} | {cos[label][0]:.5f} / {cos[label][1]:.5f} | "
                    f"{r.ratio:.3f} [{r.low:.3f}, {r.high:.3f}] | {os.getloadavg()[0]:.1f} |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    print("| model | data | weights | cosine mean / min | int8 / -O3 float | load |\n|---|---|---|---|---|---|")
    for name in args.models:
        print("\n".join(measure(name, args.rounds)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
