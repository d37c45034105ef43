"""Peak memory of load -> cleanup pipeline -> save, against the size of the weights.

    python benchmarks/io_memory.py MODEL OUT [--no-pipeline] [--no-verify] [--markdown FILE]

Each phase runs in its own child process so ``ru_maxrss`` (the peak resident set
of that process alone) is clean:

* ``measure``: load MODEL, run the -O1 cleanup pipeline (every pass repeated
  until it reports no change) and save to OUT; reports peak RSS, weight bytes
  (from the external data and inline tensors) and the time of each step;
* ``verify``: run MODEL and OUT in onnxruntime CPU on one seeded feed (token ids
  below the vocabulary size) and compare the outputs. onnxruntime holds the
  weights itself, so this check is allowed about twice the weights and is not
  part of the figure.

The goal: peak RSS of ``measure`` below 2x the weights, aiming at 1.3x.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MAX_ROUNDS = 10  # a pass that still changes the graph after this many runs is reported


def _peak_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _weight_bytes(model) -> int:
    from onnxforge.model import weight_bytes

    return weight_bytes(model.graph)


def _run_pipeline(model) -> dict[str, int]:
    from onnxforge.context import PassContext
    from onnxforge.passes.registry import level_pipeline, resolve

    ctx = PassContext(model=model)
    rounds: dict[str, int] = {}
    for name in level_pipeline(1):
        pass_ = resolve(name)
        for count in range(1, MAX_ROUNDS + 1):
            if not pass_.run(model.graph, ctx).changed:
                break
        rounds[name] = count
    return rounds


def measure(model_path: str, out_path: str, pipeline: bool) -> dict:
    from onnxforge.io import load, save

    t0 = time.perf_counter()
    model = load(model_path)
    t1 = time.perf_counter()
    weights = _weight_bytes(model)
    nodes_before = len(model.graph.nodes)
    rounds = _run_pipeline(model) if pipeline else {}
    t2 = time.perf_counter()
    save(model, out_path)
    t3 = time.perf_counter()
    out_files = [Path(out_path), Path(out_path + ".data")]
    return {
        "peak_rss_bytes": _peak_rss_bytes(),
        "weight_bytes": weights,
        "nodes_before": nodes_before,
        "nodes_after": len(model.graph.nodes),
        "pass_rounds": rounds,
        "load_s": round(t1 - t0, 2),
        "pipeline_s": round(t2 - t1, 2),
        "save_s": round(t3 - t2, 2),
        "output_bytes": sum(p.stat().st_size for p in out_files if p.exists()),
    }


def verify(model_path: str, out_path: str, seed: int = 0) -> dict:
    import gc

    import numpy as np
    import onnxruntime as ort

    from onnxforge.inputs import seeded_feeds
    from onnxforge.io import load

    model = load(model_path)  # weights stay on disk: only shapes and vocabulary sizes are read
    # Symbolic dims: batch 1, every other (sequence) 128.
    shapes = {t.name: tuple(d if isinstance(d, int) else 1 if i == 0 else 128 for i, d in enumerate(t.shape or ()))
              for t in model.graph.inputs}
    feeds = seeded_feeds(model, shapes, seed=seed)
    del model
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    outputs = []
    for path in (model_path, out_path):
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        outputs.append(session.run(None, {n: feeds[n] for n in names}))
        del session
        gc.collect()
    diffs = [float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
             for a, b in zip(*outputs)]
    scale = max(float(np.max(np.abs(a))) for a in outputs[0])
    return {
        "max_abs_diff": max(diffs),
        "output_scale": scale,
        "same_shapes": [a.shape for a in outputs[0]] == [b.shape for b in outputs[1]],
        "feeds": {k: [list(v.shape), str(v.dtype), int(v.max())] for k, v in feeds.items()},
        "verify_peak_rss_bytes": _peak_rss_bytes(),
    }


def _child(phase: str, *args: str) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{phase} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _markdown(args, result: dict, check: dict | None) -> str:
    ratio = result["peak_rss_bytes"] / result["weight_bytes"]
    lines = [
        "# Model IO memory",
        "",
        f"Command: `{' '.join(['python', 'benchmarks/io_memory.py', *sys.argv[1:]]).replace(str(Path.home()), '~')}`",
        "",
        f"Model: `{Path(args.model).name}`, weights {_gb(result['weight_bytes'])}",
        "",
        "| step | value |",
        "|---|---|",
        f"| peak RSS (load + cleanup + save, own process) | {_gb(result['peak_rss_bytes'])} |",
        f"| peak RSS / weights | {ratio:.2f}x |",
        f"| load | {result['load_s']} s |",
        f"| cleanup pipeline (-O1 passes to fixpoint) | {result['pipeline_s']} s |",
        f"| save | {result['save_s']} s |",
        f"| nodes | {result['nodes_before']} -> {result['nodes_after']} |",
        f"| output files | {_gb(result['output_bytes'])} |",
    ]
    if check is not None:
        lines += [
            f"| onnxruntime parity: max abs diff of outputs | {check['max_abs_diff']:.3g} "
            f"(outputs up to {check['output_scale']:.3g}) |",
            f"| peak RSS of the parity check (onnxruntime, not part of the figure) | "
            f"{_gb(check['verify_peak_rss_bytes'])} |",
        ]
    lines += ["", "Runs of each pass (repeated until a run changes nothing): "
              f"{result['pass_rounds'] or 'pipeline skipped'}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--no-pipeline", action="store_true", help="measure load + save only")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime parity check")
    parser.add_argument("--markdown", help="also write the result as a markdown table to this file")
    parser.add_argument("--phase", choices=("measure", "verify"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.phase == "measure":
        print(json.dumps(measure(args.model, args.out, not args.no_pipeline)))
        return 0
    if args.phase == "verify":
        print(json.dumps(verify(args.model, args.out)))
        return 0

    extra = ["--no-pipeline"] if args.no_pipeline else []
    result = _child("measure", args.model, args.out, *extra)
    ratio = result["peak_rss_bytes"] / result["weight_bytes"]
    print(f"weights {_gb(result['weight_bytes'])}, peak RSS {_gb(result['peak_rss_bytes'])} ({ratio:.2f}x); "
          f"load {result['load_s']} s, pipeline {result['pipeline_s']} s, save {result['save_s']} s")
    check = None
    if not args.no_verify:
        check = _child("verify", args.model, args.out)
        print(f"onnxruntime parity: max abs diff {check['max_abs_diff']:.3g} "
              f"(outputs up to {check['output_scale']:.3g}); check's own peak RSS {_gb(check['verify_peak_rss_bytes'])}")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(_markdown(args, result, check))
    return 0


if __name__ == "__main__":
    sys.exit(main())
