"""Which 3 layers to keep float: the int8 contribution ranking (onnxforge debug, and
quantize's ranking since issue 19) against the local-noise ranking quantize used before
(budget.node_sensitivity: the noise a node adds at its output).

    .venv/bin/python benchmarks/quant_keep_float.py MODEL.onnx --calib DIR --val DIR [--out R.json] [--save-int8 Q.onnx]

Runs ``quantize`` (CPU, default method and equalization, ``--val DIR --max-evaluations 3``,
which leaves its fallback no evaluation: the model `onnxforge quantize` writes), takes the int8 model and the plan that builds it,
ranks the weighted layers both ways on the first 2 calibration feeds, and scores on every
validation feed (cosine of the outputs vs the float model, quantize's metric) the model with
each ranking's first 3 layers kept float, with the plan's bias corrections as they are and
re-run for the float layers (as quantize's fallback does).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxforge.inputs import load_feeds  # noqa: E402
from onnxforge.passes.quant import budget as budget_mod  # noqa: E402
import importlib  # noqa: E402

quantize_mod = importlib.import_module("onnxforge.passes.quant.quantize")  # the package exports a function of that name
from onnxforge.passes.quant.contribution import node_contributions  # noqa: E402


class _Captured(Exception):
    pass


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--keep", type=int, default=3)
    ap.add_argument("--out")
    ap.add_argument("--save-int8", help="also write the int8 model here (what `onnxforge quantize` writes)")
    ap.add_argument("--all-nodes", action="store_true",
                    help="also rank every quantized node (Mul, Add, pools...: the list `onnxforge debug` prints) "
                         "and score its first 3 kept float")
    ap.add_argument("--no-recorrect", action="store_true", help="skip re-running bias correction (the slow part)")
    ap.add_argument("--rank-feeds", type=int, default=2, help="calibration feeds the rankings run on (default 2)")
    args = ap.parse_args()
    seen = {}

    def capture(report, baseline, final, plan, excluded):
        seen.update(plan=plan, int8=final, excluded=excluded)
        raise _Captured

    quantize_mod._fill_nodes = capture  # called once the search is over: the plan and its model
    try:
        quantize_mod.quantize(args.model, args.calib, val=args.val, provider="cpu", measure_latency=False,
                              max_evaluations=3, log=lambda m: print(m, file=sys.stderr))
    except _Captured:
        pass
    plan, int8 = seen["plan"], seen["int8"]
    assert not seen["excluded"], "3 evaluations leave the fallback none: the model is all int8"
    if args.save_int8:
        from onnxforge.io import save
        from onnxforge.model import Model

        save(Model.from_proto(int8), args.save_int8)
    baseline = plan.float_model
    names = [i.name for i in baseline.graph.input]
    val = load_feeds(args.val, names)
    rank_feeds = plan.kept_feeds[:args.rank_feeds]
    reference = budget_mod.run_outputs(baseline, val)
    score = lambda m: budget_mod.cosine(reference, budget_mod.run_outputs(m, val))  # noqa: E731
    weighted = {n.name: n for n in baseline.graph.node
                if n.name in plan.candidates and n.op_type in quantize_mod.WEIGHTED}

    t0 = time.monotonic()
    noise = budget_mod.node_sensitivity(baseline, int8, weighted, rank_feeds)
    local = sorted(noise, key=lambda k: -noise[k])
    t1 = time.monotonic()
    # every quantized node ranked once (what `onnxforge debug` prints); quantize's fallback takes the weighted ones
    every_node = node_contributions(int8, rank_feeds, nodes=None if args.all_nodes else set(weighted))
    contrib = [c for c in every_node if c.node in weighted]
    own = [c.node for c in contrib]
    t2 = time.monotonic()

    def kept_float(excluded):
        deltas = plan.bias_deltas
        as_is = score(plan.build(excluded))
        if args.no_recorrect:
            return as_is, None
        plan.bias_deltas = {}
        plan.bias_deltas = quantize_mod._bias_deltas(plan, plan.build(excluded), budget_mod.SearchBudget(10), True)
        recorrected = score(plan.build(excluded))
        plan.bias_deltas = deltas
        return as_is, recorrected

    result = {"model": args.model, "int8_cosine": score(int8), "weighted_layers": len(weighted),
              "quantized_nodes_ranked": len(contrib), "rank_feeds": len(rank_feeds), "val_feeds": len(val),
              "seconds": {"local_noise": round(t1 - t0, 1), "contributions": round(t2 - t1, 1)}}
    rankings = [("local_noise", local), ("contribution", own)]
    if args.all_nodes:  # what `onnxforge debug` ranks: every node reading int8 activations
        rankings.append(("contribution_all_nodes", [c.node for c in every_node if c.node in plan.candidates]))
        result["debug_top10"] = [c.as_dict() for c in every_node[:10]]
    for label, ranking in rankings:
        top = ranking[:args.keep]
        as_is, recorrected = kept_float(top)
        result[label] = {"top": top, "cosine_bias_as_is": as_is, "cosine_bias_recorrected": recorrected}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
