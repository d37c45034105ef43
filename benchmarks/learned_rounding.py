"""Learned rounding (quantize --rounding learned) against nearest rounding at the same float layers.

    .venv/bin/python benchmarks/learned_rounding.py MODEL.onnx --calib DIR --val DIR [--float-layers 0,3,8]
        [--variants float,quantized] [--stages 8] [--out R.json]

Runs ``quantize`` (CPU, default equalization, ``--max-evaluations 3`` so its fallback gets none: the
all-int8 model `onnxforge quantize` starts its fallback from; ``--method minmax --max-evaluations 2``
builds the same plan in half the time where auto picks minmax, as on PP-OCRv4 det and rec) and takes the plan that builds it. The
weighted layers are ranked once by their int8 contribution (quantize's fallback ranking, on the nearest
model); for each count k in ``--float-layers`` the first k are kept float and every variant is built with
the same float layers, its biases re-corrected for that configuration (as quantize's fallback does), and
scored on every validation feed (cosine of the outputs vs the float model, quantize's metric):
  * nearest: onnxruntime's rounding (what quantize wrote before);
  * learned-<inputs>: codes and bias refits from rounding.learn_rounding on the nearest model, with the
    layers' inputs from the float model or from the model quantized so far (sequential, ``--stages``).
The learned rounding is computed once per variant (with every layer int8) and reused for every k.
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
from onnxforge.passes.quant.formats import cpu_has_vnni  # noqa: E402
from onnxforge.passes.quant.rounding import FEEDS, learn_rounding  # noqa: E402

quantize_mod = importlib.import_module("onnxforge.passes.quant.quantize")


class _Captured(Exception):
    pass


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--float-layers", default="0,3", help="comma-separated counts of layers kept float")
    ap.add_argument("--variants", default="float,quantized", help="learned rounding's input sources")
    ap.add_argument("--stages", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--method", default="auto", help="quantize's --method (auto: what quantize does by default)")
    ap.add_argument("--max-evaluations", type=int, default=3,
                    help="3 with auto: both range options scored, the fallback gets none; 2 with one --method")
    ap.add_argument("--out")
    args = ap.parse_args()
    seen = {}

    def capture(report, baseline, final, plan, excluded):
        seen.update(plan=plan, int8=final, excluded=excluded, report=report)
        raise _Captured

    quantize_mod._fill_nodes = capture
    t0 = time.monotonic()
    try:
        quantize_mod.quantize(args.model, args.calib, val=args.val, provider="cpu", measure_latency=False, method=args.method,
                              max_evaluations=args.max_evaluations, log=lambda m: print(m, file=sys.stderr))
    except _Captured:
        pass
    plan = seen["plan"]
    print(f"quantize (nearest) took {time.monotonic() - t0:.0f} s", file=sys.stderr)
    baseline = plan.float_model
    val = load_feeds(args.val, [i.name for i in baseline.graph.input])
    reference = budget_mod.run_outputs(baseline, val)
    score = lambda m: budget_mod.cosine(reference, budget_mod.run_outputs(m, val))  # noqa: E731
    weighted = {n.name: n for n in baseline.graph.node if n.name in plan.candidates and n.op_type in quantize_mod.WEIGHTED}
    ranked = ranked_by_contribution(seen["int8"], weighted, plan.kept_feeds[:2])
    counts = [int(k) for k in args.float_layers.split(",")]

    plan.bias_deltas, plan.rounding = {}, None
    nearest_model = plan.build([])
    roundings = {"nearest": None}
    seconds = {}
    for inputs in [v for v in args.variants.split(",") if v]:
        t = time.monotonic()
        kwargs = {} if args.iterations is None else {"iterations": args.iterations}
        roundings[f"learned-{inputs}"] = learn_rounding(
            baseline, nearest_model, plan.kept_feeds[:FEEDS], reduce_range=plan_reduce_range(seen["report"]),
            inputs=inputs, stages=args.stages, log=lambda m: print(m, file=sys.stderr), **kwargs)
        seconds[f"learned-{inputs}"] = round(time.monotonic() - t, 1)
        print(f"{inputs}: {roundings[f'learned-{inputs}'].describe()} ({seconds[f'learned-{inputs}']} s)", file=sys.stderr)

    rows = []
    for k in counts:
        excluded = ranked[:k]
        for label, rounding in roundings.items():
            plan.rounding, plan.bias_deltas = rounding, {}
            plain = score(plan.build(excluded))
            plan.bias_deltas = quantize_mod._bias_deltas(plan, plan.build(excluded), budget_mod.SearchBudget(10), True)
            corrected = score(plan.build(excluded))
            rows.append({"float_layers": k, "rounding": label, "cosine": plain, "cosine_bias_corrected": corrected})
            print(json.dumps(rows[-1]), file=sys.stderr)
    result = {
        "model": args.model, "isa": "VNNI" if cpu_has_vnni() else "AVX2 (no VNNI)", "machine": platform.processor() or platform.machine(),
        "format": seen["report"].format, "method": seen["report"].method, "val_feeds": len(val),
        "rounding_feeds": len(plan.kept_feeds[:FEEDS]), "stages": args.stages, "ranked_float": ranked[:max(counts)],
        "learning_seconds": seconds, "rows": rows,
        "layers": {label: r.as_dict() for label, r in roundings.items() if r is not None},
    }
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    for row in rows:
        print(f"| {Path(args.model).stem} | {row['float_layers']} | {row['rounding']} | {row['cosine']:.5f} | "
              f"{row['cosine_bias_corrected']:.5f} |")
    return 0


def plan_reduce_range(report) -> bool:
    return bool(report.format.get("reduce_range"))


if __name__ == "__main__":
    sys.exit(main())
