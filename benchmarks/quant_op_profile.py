"""Where INT8 wins or loses against the `-O3` float model, per op kind: onnxruntime's profiler on
both models (sessions at onnxruntime's default level, as written; 2 threads), and which layout
transforms onnxruntime applied (its optimized graph, ``optimized_model_filepath``).

    .venv/bin/python benchmarks/quant_op_profile.py MODEL [MODEL ...] [--runs 20] [--int8 PATH]

INT8 model: ``quantize`` with default options and one evaluation (the all-int8 model of its
plan: first format and range option, no bias correction, no float fallback), unless --int8
names a file. Per node the fastest of ``--runs`` runs is kept (on a shared machine the mean
mostly measures other processes), then summed per kind: convolutions by weight shape
(1x1, depthwise kxk, kxk; "one row" when the output has one position per channel), other
ops by type. Feeds: the first validation feed of benchmarks/quant.py's feeds_for.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from quant import feeds_for, model_path  # noqa: E402  (the INT8 table's model and data lookup)

CONVS = ("Conv", "FusedConv", "QLinearConv")
ROW_OPS = CONVS + ("Gemm", "QGemm", "MatMul", "QLinearMatMul", "FusedMatMul")


def kind_of(node: onnx.NodeProto | None, op: str, output_shape: list[int], inits: dict) -> str:
    """The node's kind: convolution weight shape, or its op type."""
    kind = op
    weight = None
    if node is not None and op in CONVS and len(node.input) > 1:
        weight = inits.get(node.input[3] if op == "QLinearConv" else node.input[1])
    if weight is not None:
        dims, group = list(weight.dims), next((a.i for a in node.attribute if a.name == "group"), 1)
        size = "x".join(map(str, dims[2:]))
        kind = f"conv dw{size}" if group > 1 and dims[1] == 1 else "conv 1x1" if dims[2:] == [1, 1] else f"conv {size}"
    if op in ROW_OPS and len(output_shape) >= 2 and int(np.prod(output_shape)) == max(output_shape):
        kind += " (one row)"
    return kind


def profile(path: str, feed: dict, runs: int) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.enable_profiling = 2, True
    with tempfile.TemporaryDirectory(prefix="onnxforge-op-profile-") as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        feed = {k: v for k, v in feed.items() if k in names}
        for _ in range(3 + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
        optimized = onnx.load(options.optimized_model_filepath)
    nodes = {n.name: n for n in optimized.graph.node}
    inits = {t.name: t for t in optimized.graph.initializer}
    per_node: dict[str, tuple[str, list[float]]] = {}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        name, op = event["name"][: -len("_kernel_time")], event["args"].get("op_name", "?")
        shapes = [list(s.values())[0] for s in event["args"].get("output_type_shape", [])]
        kind = kind_of(nodes.get(name), op, shapes[0] if shapes else [], inits)  # convs: float and int8 alike
        per_node.setdefault(name, (kind, []))[1].append(event["dur"] / 1000)
    by_kind, count = collections.Counter(), collections.Counter()
    for kind, durations in per_node.values():
        by_kind[kind] += min(durations[3:] or durations)  # the warm-up runs left out
        count[kind] += 1
    ops = collections.Counter(f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in optimized.graph.node)
    return {"ms": dict(by_kind), "count": dict(count), "optimized_ops": dict(ops.most_common())}


def measure(name: str, runs: int, int8_path: str | None) -> dict:
    import onnxforge
    from onnxforge.passes.quant.quantize import quantize

    proto = onnx.load(str(model_path(name)))
    calib, val, kind = feeds_for(name, proto)
    with tempfile.TemporaryDirectory(prefix="onnxforge-op-profile-") as tmp:
        o3, _ = onnxforge.optimize(proto, level=3, provider="cpu")
        paths = {"-O3 float": str(Path(tmp) / "o3.onnx"), "int8": int8_path or str(Path(tmp) / "int8.onnx")}
        onnxforge.save(o3, paths["-O3 float"])
        if int8_path is None:
            int8, _report = quantize(proto, calib, val=val, measure_latency=False, max_evaluations=1, log=lambda m: None)
            onnx.save(int8.to_proto(), paths["int8"])
        return {"model": name, "data": kind, "runs": runs, **{label: profile(p, val[0], runs) for label, p in paths.items()}}


def report(row: dict) -> str:
    lines = [f"### {row['model']} ({row['data']} feed, fastest of {row['runs']} runs per node, ms)", "",
             "| kind | -O3 float ms (nodes) | int8 ms (nodes) |", "|---|---|---|"]
    float_ms, int8_ms = row["-O3 float"]["ms"], row["int8"]["ms"]
    for kind in sorted(set(float_ms) | set(int8_ms), key=lambda k: -max(float_ms.get(k, 0), int8_ms.get(k, 0))):
        cells = [f"{side['ms'][kind]:.2f} ({side['count'][kind]})" if kind in side["ms"] else "-"
                 for side in (row["-O3 float"], row["int8"])]
        lines.append(f"| {kind} | {cells[0]} | {cells[1]} |")
    lines.append(f"| **sum** | {sum(float_ms.values()):.2f} | {sum(int8_ms.values()):.2f} |")
    for label in ("-O3 float", "int8"):
        ops = ", ".join(f"{op} {n}" for op, n in list(row[label]["optimized_ops"].items())[:12])
        lines.append(f"\n{label}, onnxruntime's optimized graph: {ops}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--int8", help="profile this INT8 file instead of quantizing (one model)")
    args = parser.parse_args(argv)
    for name in args.models:
        row = measure(name, args.runs, args.int8)
        print(report(row))
        print(f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
