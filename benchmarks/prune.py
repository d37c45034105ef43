"""Reproduce the pruning table: FLOPs/parameter ratios, checker, CPU latency, refit quality.

    .venv/bin/python benchmarks/prune.py --out benchmarks/results/prune

CNN rows (corpus, seeded inputs): ``--target-flops`` (0.7), L1 importance, no
calibration; latency is measured interleaved (2 threads, ORT_ENABLE_ALL) with
``onnxforge.bench.harness.compare_latency``: ratio = geometric mean of per-round ratios
with a 95% t-interval. On a shared machine wall time swings with other load, so
each CNN row also has the single-thread CPU-time ratio (``time.process_time``,
interleaved, median of runs; see ``cpu_time_ratios`` in benchmarks/fusion_transformers.py).
Real-weight rows (ppocrv4_det/rec, rendered text):
activation importance and refit on ``calib``, output cosine to the unpruned
model on ``val`` for plain pruning and for the refitted model at the same plan.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from onnxforge.io import load, save
from onnxforge.passes.prune.prune import prune

sys.path.insert(0, str(Path(__file__).resolve().parent))  # siblings: benchmarks/ is a folder of scripts, not a package

CORPUS = Path.home() / ".cache" / "onnxforge" / "corpus"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CNNS = ("mobilenet_v2_hf", "efficientnet_b0_hf", "resnet50_hf")
REAL = ("ppocrv4_det", "ppocrv4_rec")


def cnn_row(name: str, target: float, out: Path, rounds: int) -> dict:
    from onnxforge.bench.harness import compare_latency

    src = CORPUS / f"{name}.onnx"
    start = time.time()
    pruned, report = prune(load(src), target_flops=target, method="l1")
    dst = out / f"{name}_pruned.onnx"
    save(pruned, dst)
    onnx.checker.check_model(str(dst), full_check=True)
    bench = compare_latency([src, dst], threads=2, rounds=rounds, input_shapes={"pixel_values": (1, 3, 224, 224)})
    ratio = bench.models[1].ratio
    from fusion_transformers import cpu_time_ratios

    pixels = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    cpu_ratio = cpu_time_ratios([src, dst], [{"pixel_values": pixels}], rounds=max(3 * rounds, 30))[1]
    return dict(model=name, target_flops=target, flops_ratio=report.flops_ratio, params_ratio=report.params_ratio,
                checker="pass", raw_ms=bench.models[0].stats["p50"], pruned_ms=bench.models[1].stats["p50"],
                latency_ratio=ratio.ratio, latency_low=ratio.low, latency_high=ratio.high, cpu_time_ratio=cpu_ratio,
                file_mb_before=src.stat().st_size / 1e6, file_mb_after=dst.stat().st_size / 1e6,
                prune_s=time.time() - start, refusals=report.refusals)


def real_row(name: str, target: float, out: Path, calib_limit: int) -> dict:
    data = SHARED / "data" / name
    start = time.time()
    pruned, report = prune(load(SHARED / "models" / f"{name}.onnx"), target_flops=target, method="activation",
                           calib_data=data / "calib", eval_data=data / "val", calib_limit=calib_limit)
    save(pruned, out / f"{name}_pruned_{int(target * 100)}.onnx")
    rec = report.reconstruction
    return dict(model=name, target_flops=target, flops_ratio=report.flops_ratio, params_ratio=report.params_ratio,
                cosine_plain=rec.get("cosine_plain"), cosine_refit=rec.get("cosine_refit"),
                eval_samples=rec.get("eval_samples"), refit_layers=len(rec.get("layers", [])),
                refit_applied=sum(1 for f in rec.get("layers", []) if f["error_after"] < f["error_before"]),
                prune_s=time.time() - start)


def markdown(rows: list[dict]) -> str:
    cnn = [r for r in rows if "latency_ratio" in r]
    real = [r for r in rows if "cosine_plain" in r]
    lines = []
    if cnn:
        lines += ["| model | target | FLOPs ratio | params ratio | checker | latency ratio, 2 threads [95% CI] "
                  "| raw ms | pruned ms | CPU-time ratio, 1 thread |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['target_flops']} | {r['flops_ratio']:.3f} | {r['params_ratio']:.3f} "
                  f"| {r['checker']} | {r['latency_ratio']:.3f} [{r['latency_low']:.3f}, {r['latency_high']:.3f}] "
                  f"| {r['raw_ms']:.2f} | {r['pruned_ms']:.2f} | {r.get('cpu_time_ratio', float('nan')):.3f} |"
                  for r in cnn]
    if real:
        lines += ["", "| model | target | FLOPs ratio | params ratio | cosine plain | cosine refit "
                  "| layers refitted | val feeds |", "|---|---|---|---|---|---|---|---|"]
        for r in real:
            refit = f"{r['cosine_refit']:.5f}" if r["cosine_refit"] is not None else "-"
            lines.append(f"| {r['model']} | {r['target_flops']} | {r['flops_ratio']:.3f} | {r['params_ratio']:.3f} "
                         f"| {r['cosine_plain']:.5f} | {refit} | {r['refit_applied']}/{r['refit_layers']} "
                         f"| {r['eval_samples']} |")
    return "\n".join(lines).lstrip("\n") + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/prune")
    parser.add_argument("--target", type=float, default=0.7, help="FLOPs target of the CNN rows")
    parser.add_argument("--real-targets", type=float, nargs="*", default=[0.9, 0.7])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calib-limit", type=int, default=16)
    parser.add_argument("--models", nargs="*", default=list(CNNS + REAL))
    parser.add_argument("--prefix", default="", help="file name prefix: PREFIX_table.md, PREFIX_results.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        if name in CNNS and (CORPUS / f"{name}.onnx").exists():
            rows.append(cnn_row(name, args.target, out, args.rounds))
        elif name in REAL and (SHARED / "models" / f"{name}.onnx").exists():
            rows.extend(real_row(name, t, out, args.calib_limit) for t in args.real_targets)
        else:
            print(f"skipping {name}: model not found", file=sys.stderr)
            continue
        print(json.dumps(rows[-1], default=str), flush=True)
    stem = f"{args.prefix}_" if args.prefix else ""
    (out / f"{stem}results.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2,
                                                 default=str))
    (out / f"{stem}table.md").write_text(f"Command: `{' '.join(sys.argv)}`\n\n" + markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
