"""Peak memory and time of `onnxforge quantize` and `onnxforge convert-fp16` on one model.

    python benchmarks/quant_memory.py MODEL [--calib DIR [--val DIR]] [--markdown FILE] [--keep DIR]

Each command runs as its own child process (the CLI exactly as a user runs it), so
the child's ``ru_maxrss`` is the peak resident memory of that command alone. Without
``--calib`` the quantizer calibrates on seeded random feeds (``--calib random``):
what is measured is memory and time, not accuracy (the cosine the report prints is
copied as a sanity check). With ``--calib DIR`` it calibrates on DIR, and
onnxruntime's ``quantize_static`` (QDQ, per-channel, MinMax, the benchmarks/quant.py
recipe) runs on the same feeds for comparison: its calibrator keeps every
intermediate output of every feed. Weight bytes are read from the model's external
data and inline tensors without loading them.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # siblings: benchmarks/ is a folder of scripts, not a package

COMMANDS = {
    "quantize": ["-m", "onnxforge.cli", "quantize", "{model}", "-o", "{out}", "--calib", "{calib}", "--no-latency"],
    "convert-fp16": ["-m", "onnxforge.cli", "convert-fp16", "{model}", "-o", "{out}"],
    "ort-quantize-static": [__file__, "--ort-static", "{model}", "{out}", "{calib}"],
}


def weight_bytes(model_path: str) -> int:
    from onnxforge.io import load
    from onnxforge.model import weight_bytes as graph_weight_bytes

    return graph_weight_bytes(load(model_path).graph)


def run(name: str, model: str, out: str, calib: str = "random", val: str | None = None, shown: str | None = None) -> dict:
    """Run one command in a child and return its peak RSS, wall time and exit code."""
    args = [a.format(model=model, out=out, calib=calib) for a in COMMANDS[name]]
    if val and name == "quantize":
        args += ["--val", val]
    wrapper = (
        "import resource, subprocess, sys; "
        "rc = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True); "
        "print(rc.stdout); print('RC', rc.returncode); "
        "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    started = time.monotonic()
    text = subprocess.run([sys.executable, "-c", wrapper, sys.executable, *args], capture_output=True, text=True, check=False).stdout
    seconds = time.monotonic() - started
    peak_kb = int(re.search(r"MAXRSS_KB (\d+)", text).group(1))
    cosine = re.search(r"cosine vs float[^:]*: ([0-9.]+)", text)
    shown_args = args[2:] if args[0] == "-m" else ["(onnxruntime quantize_static)", *args[2:]]
    return {
        "command": ("onnxforge " if args[0] == "-m" else "")
        + " ".join(shown_args).replace(out, Path(out).name).replace(model, shown or model),
        "rc": int(re.search(r"RC (-?\d+)", text).group(1)),
        "seconds": round(seconds, 1),
        "peak_bytes": peak_kb * 1024,
        "out_bytes": _size_with_data(out),
        "cosine": cosine.group(1) if cosine else "-",
    }


def ort_static(model: str, out: str, calib: str) -> None:
    """onnxruntime's quantize_static on the feeds in ``calib`` (benchmarks/quant.py's recipe)."""
    import onnx

    from quant import ort_quantize_static
    from onnxforge.passes.quant.quantize import _feeds

    proto = onnx.load(model)
    feeds = list(_feeds(calib, proto, "calibration")[0])
    with tempfile.TemporaryDirectory(prefix="ort-static-") as tmp:
        quantized, status = ort_quantize_static(proto, feeds, Path(tmp))
        if quantized is None:
            raise SystemExit(f"onnxruntime quantize_static failed: {status}")
        onnx.save(quantized, out)


def _size_with_data(path: str) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.parent.glob(p.name + "*")) if p.exists() else 0


def markdown(model: str, weights: int, results: dict[str, dict]) -> str:
    gb = lambda b: f"{b / 1e9:.2f} GB" if b >= 1e9 else f"{b / 1e6:.1f} MB"  # noqa: E731
    lines = [
        f"Model: `{model}`, weights {gb(weights)}.",
        "",
        "| command | exit | time | peak RSS | peak / weights | output | cosine (onnxforge's report) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results.values():
        lines.append(
            f"| `{r['command']}` | {r['rc']} | {r['seconds']} s | {gb(r['peak_bytes'])} | "
            f"{r['peak_bytes'] / max(weights, 1):.2f}x | {gb(r['out_bytes'])} | {r['cosine']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--markdown", help="write the table to this file")
    parser.add_argument("--keep", help="write the outputs here (default: a temporary folder)")
    parser.add_argument("--calib", help="calibration folder (default: seeded random feeds, no onnxruntime run)")
    parser.add_argument("--val", help="validation folder for onnxforge quantize's accuracy budget (default: the calibration feeds)")
    parser.add_argument("--only", choices=sorted(COMMANDS), action="append", help="run only these commands")
    if len(sys.argv) == 5 and sys.argv[1] == "--ort-static":  # the child of "ort-quantize-static"
        ort_static(*sys.argv[2:])
        return 0
    args = parser.parse_args()
    weights = weight_bytes(args.model)
    with tempfile.TemporaryDirectory(prefix="quant-memory-") as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        results = {}
        default = ["quantize", "convert-fp16"] + (["ort-quantize-static"] if args.calib else [])
        for name in args.only or default:
            out = str(folder / f"{Path(args.model).stem}.{name}.onnx")
            calib = os.path.abspath(args.calib) if args.calib else "random"
            val = os.path.abspath(args.val) if args.val else None
            results[name] = run(name, os.path.abspath(args.model), out, calib, val, shown=args.model)
            print(f"{name}: rc {results[name]['rc']}, {results[name]['seconds']} s, "
                  f"peak {results[name]['peak_bytes'] / 1e9:.2f} GB", file=sys.stderr)
        table = markdown(args.model, weights, results)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0 if all(r["rc"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
