"""CNN speed of onnxforge -O3 (CPU profile) against the peer simplifiers onnxsim and onnxslim.

    .venv/bin/python benchmarks/fusion_cnn_vs_peers.py --peer-python /tmp/peers/bin/python \
        [--rounds 15] [--out benchmarks/results/fusion_cnn] [model ...]

Per model, four variants are timed interleaved in one ``onnxforge.bench.harness.compare_latency``
run (2 intra-op threads, onnxruntime's ORT_ENABLE_ALL, shuffled rounds; ratio to raw is
the geometric mean of per-round median ratios with a 95% t-interval):

* raw: the model as exported;
* onnxsim: ``onnxsim.simplify`` (default options) and onnxslim: ``onnxslim.slim``
  (default options), each run in ``--peer-python``, a separate virtualenv, so that
  the project's environment is left alone;
* onnxforge: ``onnxforge optimize M -o X -O3 --provider cpu`` (``--data`` the
  model's realistic val feeds where /work/shared/data has them), run as the CLI.

Feeds: the PaddleOCR models get their realistic val feeds (/work/shared/data/<model>/val),
the HF CNNs one seeded 1x3x224x224 image. "forge / sim" is onnxforge's ratio to
onnxsim's from the same rounds, so "slower" there means slower beyond noise.
Accuracy: max |variant - raw| over all outputs and timing feeds, onnxruntime CPU with
graph optimizations off. Node counts include subgraphs.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

from onnxforge.bench.harness import compare_latency
from onnxforge.bench.stats import ratio_ci
from onnxforge.inputs import load_feeds, seeded_feeds
from onnxforge.io import load

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path.home() / ".cache" / "onnxforge" / "corpus"
SHARED = ROOT.parent / "shared"
FORGE_CLI = Path(sys.executable).with_name("onnxforge")
VARIANTS = ("raw", "onnxsim", "onnxslim", "onnxforge")


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    path: Path
    data: Path | None = None  # realistic feeds (.npz folder); None = seeded 1x3x224x224

    @property
    def feed_label(self) -> str:
        return "val" if self.data else "seeded 1x3x224x224"


def _hf(name: str) -> Spec:
    return Spec(name, CORPUS / f"{name}.onnx")


def _paddle(name: str) -> Spec:
    return Spec(name, SHARED / "models" / f"{name}.onnx", SHARED / "data" / name / "val")


SPECS = tuple(_hf(n) for n in ("mobilenet_v2_hf", "efficientnet_b0_hf", "resnet50_hf", "convnext_tiny_hf")) + tuple(
    _paddle(n) for n in ("ppocrv4_det", "ppocrv4_rec", "ppocr_mobile_v2_cls"))

# ------------------------------------------------------------------ producing the variants

ONNXSIM_SCRIPT = """
import sys, onnx, onnxsim
simplified, ok = onnxsim.simplify(onnx.load(sys.argv[1]))
if not ok:
    sys.exit("onnxsim check failed")
onnx.save(simplified, sys.argv[2])
"""

ONNXSLIM_SCRIPT = """
import sys, onnx, onnxslim
onnx.save(onnxslim.slim(onnx.load(sys.argv[1])), sys.argv[2])
"""


def _run(command: list[str], out: Path) -> str:
    """Run one optimizer as a subprocess; '' on success, else the last line of its complaint."""
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0 or not out.exists():
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return (lines[-1] if lines else f"exit {proc.returncode}")[:160]
    return ""


def produce(spec: Spec, label: str, out: Path, peer_python: str) -> str:
    if label == "onnxsim":
        return _run([peer_python, "-c", ONNXSIM_SCRIPT, str(spec.path), str(out)], out)
    if label == "onnxslim":
        return _run([peer_python, "-c", ONNXSLIM_SCRIPT, str(spec.path), str(out)], out)
    command = [str(FORGE_CLI), "optimize", str(spec.path), "-o", str(out), "-O3", "--provider", "cpu"]
    if spec.data and spec.data.is_dir():
        command += ["--data", str(spec.data)]
    return _run(command, out)


# ------------------------------------------------------------------ measuring

def op_histogram(path: Path) -> collections.Counter:
    """Op types over the graph and all its subgraphs."""
    counts: collections.Counter = collections.Counter()
    pending = [onnx.load(str(path), load_external_data=False).graph]
    while pending:
        graph = pending.pop()
        for node in graph.node:
            counts[node.op_type] += 1
            pending.extend(a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
            pending.extend(a.graphs for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS)
    return counts


def timing_feeds(spec: Spec) -> list[dict]:
    if spec.data and spec.data.is_dir():
        return load_feeds(spec.data, limit=4)
    model = load(spec.path)
    return [seeded_feeds(model, {model.graph.inputs[0].name: (1, 3, 224, 224)})]


def run_all(path: Path, feeds: list[dict]) -> list[list[np.ndarray]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [session.run(None, feed) for feed in feeds]


def cpu_time_medians(paths: list[Path], feeds: list[dict], rounds: int, runs: int = 3) -> list[list[float]]:
    """Single-thread CPU seconds per run, interleaved in shuffled rounds: the work each graph
    costs, far less disturbed than wall time by other processes on a shared machine.
    Returns each path's per-round median CPU seconds."""
    import random
    import time

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths]
    for session in sessions:  # warm up
        session.run(None, feeds[0])
    medians: list[list[float]] = [[] for _ in paths]
    order, rng = list(range(len(paths))), random.Random(0)
    for r in range(rounds):
        rng.shuffle(order)
        for index in order:
            times = []
            for i in range(runs):
                started = time.process_time()
                sessions[index].run(None, feeds[(r * runs + i) % len(feeds)])
                times.append(time.process_time() - started)
            medians[index].append(float(np.median(times)))
    return medians


def max_abs_diff(reference: list[list[np.ndarray]], other: list[list[np.ndarray]]) -> float:
    return max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
               for ref, got in zip(reference, other) for a, b in zip(ref, got))


def bench_model(spec: Spec, tmp: Path, peer_python: str, rounds: int) -> dict:
    row: dict = {"model": spec.name, "feed": spec.feed_label, "notes": []}
    paths = {"raw": spec.path}
    for label in VARIANTS[1:]:
        out = tmp / f"{spec.name}_{label}.onnx"
        why = produce(spec, label, out, peer_python)
        if why:
            row["notes"].append(f"{label}: {why}")
        else:
            paths[label] = out
    feeds = timing_feeds(spec)
    reference = run_all(spec.path, feeds)
    row["nodes"] = {label: sum(op_histogram(p).values()) for label, p in paths.items()}
    row["ops"] = {label: dict(op_histogram(p).most_common()) for label, p in paths.items()}
    row["max_abs_diff"] = {label: max_abs_diff(reference, run_all(p, feeds))
                           for label, p in paths.items() if label != "raw"}
    result = compare_latency([str(p) for p in paths.values()], feeds, threads=2, rounds=rounds)
    by_label = dict(zip(paths, result.models))
    row["raw_ms"] = by_label["raw"].stats["p50"]
    row["ratio"] = {label: _ci(m.ratio) for label, m in by_label.items() if label != "raw"}
    if "onnxsim" in by_label and "onnxforge" in by_label:
        row["forge_vs_sim"] = _ci(ratio_ci(by_label["onnxsim"].round_medians_ms,
                                           by_label["onnxforge"].round_medians_ms))
    cpu = dict(zip(paths, cpu_time_medians(list(paths.values()), feeds, rounds)))
    row["cpu_ms"] = 1e3 * float(np.median(cpu["raw"]))
    row["cpu_ratio"] = {label: _ci(ratio_ci(cpu["raw"], m)) for label, m in cpu.items() if label != "raw"}
    if "onnxsim" in cpu and "onnxforge" in cpu:
        row["cpu_forge_vs_sim"] = _ci(ratio_ci(cpu["onnxsim"], cpu["onnxforge"]))
    row["rounds"] = rounds
    return row


def _ci(ci) -> dict:
    return {"ratio": ci.ratio, "low": ci.low, "high": ci.high, "rounds": ci.rounds, "verdict": ci.verdict}


# ------------------------------------------------------------------ publishing

def _fmt(ci: dict | None) -> str:
    return "—" if ci is None else f"{ci['ratio']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def _verdict_cell(ci: dict | None) -> str:
    return "—" if ci is None else f"{_fmt(ci)} {ci['verdict']}"


def _row_line(row: dict) -> str:
    """Wall-time row: 2 threads, the harness's interleaved rounds."""
    ratio, nodes, diff = row["ratio"], row["nodes"], row["max_abs_diff"]
    return (f"| {row['model']} | {row['feed']} | {row['raw_ms']:.2f} | {_fmt(ratio.get('onnxsim'))} | "
            f"{_fmt(ratio.get('onnxslim'))} | {_fmt(ratio.get('onnxforge'))} | "
            f"{_verdict_cell(row.get('forge_vs_sim'))} | "
            + "/".join(str(nodes.get(v, "—")) for v in VARIANTS) + " | "
            + "/".join(f"{diff[v]:.1e}" if v in diff else "—" for v in VARIANTS[1:]) + " |")


def _cpu_line(row: dict) -> str:
    ratio = row["cpu_ratio"]
    return (f"| {row['model']} | {row['cpu_ms']:.2f} | {_fmt(ratio.get('onnxsim'))} | {_fmt(ratio.get('onnxslim'))} | "
            f"{_fmt(ratio.get('onnxforge'))} | {_verdict_cell(row.get('cpu_forge_vs_sim'))} |")


def markdown(rows: list[dict], command: str) -> str:
    rounds = rows[0]["rounds"] if rows else "?"
    lines = ["# CNNs: onnxforge -O3 --provider cpu vs onnxsim and onnxslim", "",
             f"Command: `{command}`", "",
             "Wall time, `bench.harness.compare_latency`: raw, onnxsim, onnxslim and onnxforge interleaved in one run",
             f"per model, 2 intra-op threads, ORT_ENABLE_ALL, {rounds} shuffled rounds. Ratio = variant / raw latency",
             "(geometric mean of per-round median ratios, 95% t-interval); forge/sim = onnxforge / onnxsim from the",
             "same rounds, verdict 'faster'/'slower' only where the interval excludes 1. The machine has 2 vCPUs",
             "shared with other jobs, so raw milliseconds are inflated and intervals wide.", "",
             "| model | feed | raw p50 ms | onnxsim | onnxslim | onnxforge | forge/sim | nodes raw/sim/slim/forge "
             "| max abs diff vs raw sim/slim/forge |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [_row_line(row) for row in rows]
    lines += ["", f"Single-thread CPU time per run (process_time, ORT_ENABLE_ALL, interleaved, {rounds} rounds of 3",
              "runs, per-round medians): the work each graph costs, less disturbed by other processes.", "",
              "| model | raw CPU ms | onnxsim | onnxslim | onnxforge | forge/sim |", "|---|---|---|---|---|---|"]
    lines += [_cpu_line(row) for row in rows if "cpu_ratio" in row]
    notes = [f"- {row['model']}: {note}" for row in rows for note in row["notes"]]
    if notes:
        lines += ["", "Failures:", *notes]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model names (default: all seven)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--peer-python", default="/tmp/peers/bin/python",
                        help="interpreter of a separate virtualenv with onnxsim and onnxslim")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fusion_cnn",
                        help="writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    specs = [s for s in SPECS if not args.models or s.name in args.models]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            if not spec.path.exists():
                print(f"{spec.name}: missing ({spec.path})", file=sys.stderr)
                continue
            rows.append(bench_model(spec, Path(tmp), args.peer_python, args.rounds))
            print(_row_line(rows[-1]), flush=True)
    command = "python benchmarks/fusion_cnn_vs_peers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(markdown(rows, command.strip()))
    args.out.with_suffix(".json").write_text(json.dumps({"command": command.strip(), "rows": rows}, indent=1))
    print(markdown(rows, command.strip()))


if __name__ == "__main__":
    main()
