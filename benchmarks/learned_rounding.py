"""Learned rounding (quantize --rounding learned) against nearest rounding at the same float layers.

    OPENBLAS_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/learned_rounding.py MODEL.onnx \
        --calib DIR --val DIR [--float-layers 0,3] [--variants float,quantized] [--feeds 16] [--out R.json]

Builds quantize's plan as `onnxforge quantize --provider cpu --method minmax` does (float baseline, CLE,
calibration on every feed of --calib, the format of this CPU: 7-bit s8 weights without VNNI), without
quantize's own scoring. For each count k in ``--float-layers`` (k > 0: the first k weighted layers of the
int8-contribution ranking, quantize's fallback ranking, on the nearest model) every variant is built with
the same float layers, its biases corrected layer by layer for that configuration (quantize's
bias_correct step: the model quantize scores) and scored on every validation feed (cosine of the outputs
vs the float model, quantize's metric):
  * nearest: onnxruntime's rounding (what quantize writes by default);
  * learned-<inputs>: codes and bias refits from rounding.learn_rounding on the nearest model (every layer
    int8), with the layers' inputs from the float model or from the model quantized so far (sequential:
    each layer after every layer upstream of it), on the first ``--feeds`` calibration feeds; reused for every k.
``cosine`` is the model before the bias correction step, ``cosine_bias_corrected`` after it.
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxforge.inputs import load_feeds  # noqa: E402
from onnxforge.passes.quant import budget as budget_mod  # noqa: E402
from onnxforge.passes.quant.contribution import ranked_by_contribution  # noqa: E402
from onnxforge.passes.quant.detect import detect  # noqa: E402
from onnxforge.passes.quant.formats import cpu_has_vnni, spec_for  # noqa: E402
from onnxforge.passes.quant.inputs import _feeds, _source_and_original  # noqa: E402
from onnxforge.passes.quant.plan import _plan  # noqa: E402
from onnxforge.passes.quant.prepare import float_baseline  # noqa: E402
from onnxforge.passes.quant.report import QuantReport  # noqa: E402
from onnxforge.passes.quant.rounding import FEEDS, learn_rounding  # noqa: E402

quantize_mod = importlib.import_module("onnxforge.passes.quant.quantize")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--float-layers", default="0", help="comma-separated counts of layers kept float")
    ap.add_argument("--variants", default="float,quantized", help="learned rounding's input sources")
    ap.add_argument("--feeds", type=int, default=FEEDS, help="calibration feeds learned rounding reads")
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--out")
    args = ap.parse_args()
    started = time.monotonic()
    source, original = _source_and_original(args.model)
    baseline = float_baseline(source if source is not None else original)
    spec = spec_for("cpu", baseline)
    calib, desc = _feeds(args.calib, original, "calibration")
    report = QuantReport("cpu", spec.as_dict(), "minmax", desc, 0, "", "cosine", 0.01)
    plan = _plan(original, baseline, spec, detect(original), calib, "minmax", report, log, "cle")
    log(f"plan built ({time.monotonic() - started:.0f} s)")
    float_model = plan.float_model
    val = load_feeds(args.val, [i.name for i in float_model.graph.input])
    reference = budget_mod.run_outputs(baseline, val)
    score = lambda m: budget_mod.cosine(reference, budget_mod.run_outputs(m, val))  # noqa: E731
    counts = [int(k) for k in args.float_layers.split(",")]
    plan.bias_deltas, plan.rounding = {}, None
    nearest_model = plan.build([])
    ranked = []
    if max(counts) > 0:
        weighted = {n.name: n for n in float_model.graph.node if n.name in plan.candidates and n.op_type in quantize_mod.WEIGHTED}
        ranked = ranked_by_contribution(nearest_model, weighted, plan.kept_feeds[:2])
    roundings, seconds = {"nearest": None}, {}
    for inputs in [v for v in args.variants.split(",") if v]:
        t = time.monotonic()
        kwargs = {} if args.iterations is None else {"iterations": args.iterations}
        label = f"learned-{inputs}"
        roundings[label] = learn_rounding(float_model, nearest_model, plan.kept_feeds[:args.feeds],
                                          reduce_range=spec.reduce_range, inputs=inputs, log=log, **kwargs)
        seconds[label] = round(time.monotonic() - t, 1)
        log(f"{roundings[label].describe()} ({seconds[label]} s)")
    rows = []
    for k in counts:
        excluded = ranked[:k]
        for label, rounding in roundings.items():
            plan.rounding, plan.bias_deltas = rounding, {}
            plain = score(plan.build(excluded))
            plan.bias_deltas = quantize_mod._bias_deltas(plan, plan.build(excluded), budget_mod.SearchBudget(10), True)
            corrected = score(plan.build(excluded))
            rows.append({"float_layers": k, "rounding": label, "cosine": plain, "cosine_bias_corrected": corrected})
            log(json.dumps(rows[-1]))
            if args.out:  # partial results survive a stopped run
                Path(args.out).with_suffix(".partial.json").write_text(json.dumps(rows, indent=1) + "\n")
    result = {
        "model": args.model, "isa": "VNNI" if cpu_has_vnni() else "AVX2 (no VNNI)",
        "machine": platform.processor() or platform.machine(), "format": spec.as_dict(), "method": "minmax",
        "calibration_feeds": report.calibration_feeds, "val_feeds": len(val), "rounding_feeds": len(plan.kept_feeds[:args.feeds]),
        "ranked_float": ranked[:max(counts)], "learning_seconds": seconds,
        "seconds": round(time.monotonic() - started, 1), "rows": rows,
        "layers": {label: r.as_dict() for label, r in roundings.items() if r is not None},
    }
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    for row in rows:
        print(f"| {Path(args.model).stem} | {row['float_layers']} | {row['rounding']} | {row['cosine']:.5f} | "
              f"{row['cosine_bias_corrected']:.5f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
