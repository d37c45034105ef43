"""INT8 with DEFAULT options against the `-O3` float model, per CPU class: the table of
issue 17 (latency ratio, cosine, float nodes, exit code, time).

    .venv/bin/python benchmarks/quant_cpu_table.py [MODEL ...] [--rounds 10] \
        [--out benchmarks/results/quant_avx2.md]

Per model: ``onnxforge.optimize(level=3, provider="cpu")`` gives the float reference;
``quantize(model, calib, val=val)`` with default options (what ``onnxforge quantize
MODEL -o OUT --calib DIR --val DIR`` runs; exit code 0 when the budget is met, 3 when
not) gives the INT8 model; both run interleaved in the bench harness (2 threads,
``--rounds`` rounds, ratio int8 / -O3 float with a 95% interval); cosine is mean / min
over the validation feeds of int8 vs the original float model. Data: ../shared/data/<model>
(real) or seeded random feeds of shape [1, 128] for token inputs (their cosine says
little). Rows of models not run now are kept from the previous json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from quant import cosines, feeds_for, model_path  # noqa: E402  (the INT8 table's helpers)

DEFAULT_MODELS = ("ppocrv4_det", "ppocrv4_rec", "mobilenet_v2_hf", "resnet50_hf", "minilm_l6_w8", "distilbert_base",
                  "bert_base")
TARGETS = {"cnn": (0.6, 0.99), "transformer": (0.7, 0.99)}


def measure(name: str, rounds: int, reuse: tuple[str, str] | None = None) -> dict:
    import onnxforge
    from onnxforge.bench.harness import compare_latency
    from onnxforge.passes.quant.budget import run_outputs
    from onnxforge.passes.quant.formats import is_transformer
    from onnxforge.passes.quant.quantize import quantize

    path = model_path(name)
    proto = onnx.load(str(path))
    calib, val, kind = feeds_for(name, proto)
    family = "transformer" if is_transformer(proto) or name.startswith("minilm") else "cnn"
    if reuse:  # the output and report of `onnxforge quantize` run by hand with default options
        from onnxforge.model import Model
        from onnxforge.passes.quant.report import QuantReport

        int8 = Model.from_proto(onnx.load(reuse[0]))
        report = QuantReport(**json.loads(Path(reuse[1]).read_text()))
        seconds = report.seconds
    else:
        started = time.monotonic()
        int8, report = quantize(proto, calib, val=val, measure_latency=False, log=lambda m: None)
        seconds = time.monotonic() - started
    o3, _ = onnxforge.optimize(proto, level=3, provider="cpu")
    reference = run_outputs(proto, val)
    row = {"model": name, "family": family, "data": kind, "seconds": round(seconds, 1),
           "exit_code": 0 if report.budget_met else 3, "score": report.score,
           "score_before_fallback": report.score_before_fallback, "float_nodes": len(report.float_nodes),
           "int8_nodes": len(report.int8_nodes), "evaluations": f"{report.evaluations}/{report.max_evaluations}",
           "quantized_for": report.quantized_for, "format": report.format}
    int8_proto = int8.to_proto()
    row["cosine"] = cosines(reference, run_outputs(int8_proto, val))
    with tempfile.TemporaryDirectory(prefix="onnxforge-cpu-table-") as tmp:
        paths = [Path(tmp) / "o3.onnx", Path(tmp) / "int8.onnx"]
        onnxforge.save(o3, paths[0])
        onnx.save(int8_proto, paths[1])
        result = compare_latency([str(p) for p in paths], val[0], threads=2, rounds=rounds)
    ratio = result.models[1].ratio
    row["o3_ms"] = result.models[0].stats["p50"]
    row["int8_ms"] = result.models[1].stats["p50"]
    row["ratio"] = [round(ratio.ratio, 3), round(ratio.low, 3), round(ratio.high, 3)]
    target_ratio, target_cos = TARGETS[family]
    row["meets"] = bool(ratio.high <= target_ratio and row["cosine"][0] >= target_cos)
    row["load"] = round(os.getloadavg()[0], 1)
    return row


def markdown(rows: list[dict], command: str) -> str:
    import onnxruntime

    from onnxforge.runtime.cpuclass import cpu_class

    lines = [f"# INT8 with default options vs `-O3` float, CPU class {cpu_class()}", "",
             f"Command: `{command}`", "",
             f"onnxruntime {onnxruntime.__version__}; ratio = int8 / -O3 float latency, interleaved, 2 threads, "
             "[95% interval]; cosine = mean / min over validation feeds vs the original float model; targets: CNNs "
             "<= 0.6x, transformers <= 0.7x, cosine >= 0.99 (met: the whole interval under the ratio). The machine is "
             "shared: 'load' is the 1-minute load average when the row finished (2 cores); ratios are interleaved, "
             "so load widens the intervals more than it moves them.", "",
             "| model | data | -O3 float ms | int8 ms | ratio | cosine mean / min | float nodes | evaluations | exit | "
             "quantize s | load | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} |" + " |" * 10)
            continue
        ratio = r["ratio"]
        lines.append(f"| {r['model']} | {r['data']} | {r['o3_ms']:.2f} | {r['int8_ms']:.2f} | "
                     f"{ratio[0]:.3f} [{ratio[1]:.3f}, {ratio[2]:.3f}] | {r['cosine'][0]:.4f} / {r['cosine'][1]:.4f} | "
                     f"{r['float_nodes']} | {r['evaluations']} | {r['exit_code']} | {r['seconds']:.0f} | {r['load']} | "
                     f"{'met' if r['meets'] else 'MISSED'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(DEFAULT_MODELS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quant_avx2.md"))
    parser.add_argument("--reuse", action="append", default=[], metavar="MODEL=INT8.onnx,REPORT.json",
                        help="take MODEL's INT8 model and report from an `onnxforge quantize` run instead")
    args = parser.parse_args(argv)
    reused = {k: tuple(v.split(",")) for k, v in (item.split("=", 1) for item in args.reuse)}
    command = "python benchmarks/quant_cpu_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    json_path = out.with_suffix(".json")
    rows = json.loads(json_path.read_text()) if json_path.exists() else []
    for name in args.models:
        print(f"== {name}", file=sys.stderr, flush=True)
        try:
            row = measure(name, args.rounds, reused.get(name))
        except Exception as exc:  # noqa: BLE001 - one model's failure is a row, not the end
            row = {"model": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        row["command"] = command
        rows = [r for r in rows if r["model"] != name] + [row]
        out.write_text(markdown(rows, command))
        json_path.write_text(json.dumps(rows, indent=1, default=str))
        print(markdown([row], command).splitlines()[-1], file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
