"""INT8 weight formats compared on a model's own layers, on this CPU: the measurement
behind the per-CPU-class format choice of passes/quant/formats.py (spec_for).

    .venv/bin/python benchmarks/quant_formats.py MODEL [MODEL ...] [--method percentile] [--rounds 6] \
        [--out benchmarks/results/quant_formats_avx2.md]

For each model: the float baseline, calibrated once (``--method``, CLE as quantize does
by default), then one static QDQ model per format with the same ranges, before any
bias correction or fallback. Cosine: mean over the validation feeds
(../shared/data/<model>/val; seeded random feeds where there is none) against the float
baseline. Latency: every format and the float model in one interleaved bench-harness
run (2 threads), ratio to float with a 95% interval. The formats:
  s8-7bit            s8 per-channel weights in 7 bits (reduce_range), u8 activations
  s8-7bit+dw8        the same with depthwise Conv weights in 8 bits (MLAS's depthwise
                     kernel widens before adding: no saturation)
  s8-7bit dw-float   depthwise Convs left float
  s8-7bit tiny-float Convs with < 4096 weight elements left float
  s8-7bit per-tensor one weight scale per tensor
  u8u8               uint8 weights, 8 bits (u8 x u8 kernels: no saturation)
  s8-8bit            full-range s8 weights: exact only with int8 dot products (VNNI);
                     on other CPUs the u8 x s8 kernels saturate (the cosine shows how much)
  s8-8bit a7-gemm    full-range s8 weights with the u8 inputs of GEMM-based kernels on a
                     7-bit grid (formats.static_formats, rule seven-bit-gemm-input): no
                     saturation without VNNI either; quantize scores it beside s8-7bit there
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from quant import DATA_DIR, model_path  # noqa: E402  (the INT8 table's model lookup)

TINY = 4096


def variants(spec, model: onnx.ModelProto) -> dict[str, tuple]:
    """Format name -> (FormatSpec, nodes kept float)."""
    from onnxforge.passes.quant.formats import depthwise_weights

    inits = {t.name: t for t in model.graph.initializer}
    depthwise = sorted(depthwise_weights(model).values())
    tiny = sorted(n.name for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits
                  and int(np.prod(inits[n.input[1]].dims)) < TINY)
    s8 = dataclasses.replace(spec, weight_type="s8", reduce_range=True, depthwise_full_range=False)
    return {
        "s8-7bit": (s8, []),
        "s8-7bit+dw8": (dataclasses.replace(s8, depthwise_full_range=True), []),
        "s8-7bit dw-float": (s8, depthwise),
        "s8-7bit tiny-float": (s8, tiny),
        "s8-7bit per-tensor": (dataclasses.replace(s8, per_channel=False), []),
        "u8u8": (dataclasses.replace(s8, weight_type="u8", reduce_range=False), []),
        "s8-8bit": (dataclasses.replace(s8, reduce_range=False), []),
        "s8-8bit a7-gemm": (dataclasses.replace(s8, reduce_range=False, narrow_gemm_inputs=True), []),
    }


def measure(name: str, method: str, rounds: int) -> dict:
    from onnxforge.bench.harness import compare_latency
    from onnxforge.passes.quant import budget, formats
    from onnxforge.passes.quant import plan as plan_mod
    from onnxforge.passes.quant.detect import detect
    from onnxforge.passes.quant.inputs import _feeds, _source_and_original, _validation_feeds
    from onnxforge.passes.quant.prepare import float_baseline
    from onnxforge.passes.quant.report import QuantReport
    from onnxforge.runtime.cpuclass import cpu_class

    folder = DATA_DIR / name
    calib_arg, val_arg = ((str(folder / "calib"), str(folder / "val")) if folder.exists() else ("random", None))
    source, original = _source_and_original(str(model_path(name)))
    baseline = float_baseline(source if source is not None else original)
    spec = formats.spec_for("cpu", baseline, "static")
    calib, desc = _feeds(calib_arg, original, "calibration")
    report = QuantReport("cpu", {}, method, desc, 0, "", "cosine", 0.01)
    plan = plan_mod._plan(original, baseline, spec, detect(original), calib, method, report, lambda m: None, "cle")
    val, _ = _validation_feeds(val_arg, plan.kept_feeds, original, desc)
    reference = budget.run_outputs(baseline, val)
    row = {"model": name, "data": "real" if folder.exists() else "seeded (random)", "method": method,
           "cpu_class": cpu_class(), "formats": {}}
    models = {}
    for label, (fmt, floats) in variants(spec, plan.float_model).items():
        variant = plan_mod._static_plan(plan.float_model, fmt, {**plan.fixed_float, **{n: label for n in floats}},
                                        plan.ranges, plan.kept_feeds)
        models[label] = variant.build([])
        row["formats"][label] = {"cosine": round(budget.cosine(reference, budget.run_outputs(models[label], val)), 5),
                                 "float_nodes": len(floats)}
        print(f"{name} {label}: cosine {row['formats'][label]['cosine']}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="onnxforge-formats-") as tmp:
        paths = [Path(tmp) / "float.onnx"] + [Path(tmp) / f"{i}.onnx" for i in range(len(models))]
        onnx.save(baseline, paths[0])
        for path, model in zip(paths[1:], models.values()):
            onnx.save(model, path)
        result = compare_latency([str(p) for p in paths], val[0], threads=2, rounds=rounds)
    row["float_ms"] = result.models[0].stats["p50"]
    for label, measured in zip(models, result.models[1:]):
        r = measured.ratio
        row["formats"][label]["ratio"] = [round(r.ratio, 3), round(r.low, 3), round(r.high, 3)]
    return row


def markdown(rows: list[dict], command: str, load: str) -> str:
    import onnxruntime

    lines = ["# INT8 weight formats on this CPU class, per model", "",
             f"Command: `{command}`", "",
             f"CPU class {rows[0]['cpu_class'] if rows else '?'}, onnxruntime {onnxruntime.__version__}, {load}. "
             "Cosine: mean over validation feeds vs float, same ranges, before bias correction and fallback. "
             "Ratio: int8 / float latency, all formats and float interleaved in one run, 2 threads, [95% interval].", "",
             "| model | data | float ms | format | cosine | ratio | float nodes |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        for label, f in row["formats"].items():
            ratio = f.get("ratio")
            lines.append(f"| {row['model']} | {row['data']} | {row['float_ms']:.2f} | {label} | {f['cosine']:.5f} | "
                         + (f"{ratio[0]:.3f} [{ratio[1]:.3f}, {ratio[2]:.3f}]" if ratio else "-")
                         + f" | {f['float_nodes']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--method", default="percentile")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quant_formats_avx2.md"))
    args = parser.parse_args(argv)
    command = "python benchmarks/quant_formats.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    rows = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else []
    for name in args.models:
        row = measure(name, args.method, args.rounds)
        rows = [r for r in rows if r["model"] != name] + [row]
        load = f"load average {os.getloadavg()[0]:.1f} at the end (machine shared)"
        out.write_text(markdown(rows, command, load))
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
