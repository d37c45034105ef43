"""Peak memory that ``optimize -O3`` + its verified save add, against the model's weight bytes.

    .venv/bin/python benchmarks/optimize_memory.py MODEL [--level 3] [--out OUT.onnx]

Linux only: the model is loaded first, then the process's peak RSS is reset
(``/proc/self/clear_refs``), so the figure is what optimize and save add on top of
the loaded model (``added``), next to the whole process's peak (``process_peak``).
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure(model_path: str, level: int, out: str) -> dict:
    import onnxforge
    from onnxforge.io import load, save
    from onnxforge.model import weight_bytes

    t0 = time.perf_counter()
    model = load(model_path)
    weights = weight_bytes(model.graph)
    loaded_peak = _status("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _status("VmRSS")
    t1 = time.perf_counter()
    result, report = onnxforge.optimize(model, level=level)
    optimize_peak = _status("VmHWM")
    save(result, out, check=report.check_written)
    t2 = time.perf_counter()
    peak = _status("VmHWM")
    return {
        "model": Path(model_path).name, "level": level, "weight_bytes": weights,
        "rss_after_load": before, "load_peak": loaded_peak,
        "added_by_optimize": optimize_peak - before, "added": peak - before,
        "added_per_weight_byte": round((peak - before) / weights, 2), "process_peak": max(peak, loaded_peak),
        "nodes": [report.before["nodes"], report.after["nodes"]], "verified": report.verification["ok"],
        "load_s": round(t1 - t0, 1), "optimize_and_save_s": round(t2 - t1, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--level", type=int, default=3)
    parser.add_argument("--out", default=None, help="where to write the result (a temporary folder when omitted)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(measure(args.model, args.level, args.out or str(Path(tmp) / "out.onnx"))))


if __name__ == "__main__":
    main()
