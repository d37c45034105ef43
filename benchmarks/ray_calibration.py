"""Distributed calibration over 2 Ray workers vs one process, on ppocrv4_det's
calibration set (issue 20): the same histograms and ranges, bit for bit.

    nice -n 10 .venv/bin/python benchmarks/ray_calibration.py

Starts a private local Ray (2 CPUs, no dashboard), splits ../shared/data/ppocrv4_det/calib
into 2 shards (one per worker), merges the histograms, and compares every
tensor's histogram and its ranges under each method with the one-process
result. Writes benchmarks/results/ray_calibration.json.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "models" / "ppocrv4_det.onnx"
CALIB = ROOT.parent / "shared" / "data" / "ppocrv4_det" / "calib"


def main() -> int:
    import ray

    from onnxforge.inputs import data_files, iter_feed_files
    from onnxforge.passes.quant.calibrate import METHODS, collect_histograms, compute_range
    from onnxforge.passes.quant.shards import collect_histograms_sharded, split
    from onnxforge.workers import RayWorkers

    model = onnx.load(MODEL)
    files = data_files(CALIB, (".npz",))
    t0 = time.perf_counter()
    single, n1 = collect_histograms(model, iter_feed_files(CALIB))
    one_process_s = time.perf_counter() - t0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        workers = RayWorkers()
        t0 = time.perf_counter()
        sharded, n2 = collect_histograms_sharded(model, files, workers)
        ray_s = time.perf_counter() - t0
        where = workers.where
    finally:
        ray.shutdown()
    same_hist = [k for k in single if single[k].edge == sharded[k].edge and np.array_equal(single[k].counts, sharded[k].counts)
                 and single[k].minimum == sharded[k].minimum and single[k].maximum == sharded[k].maximum]
    ranges = {}
    for method in METHODS:
        for symmetric in (False, True):
            a = {k: compute_range(h, method, symmetric) for k, h in single.items()}
            b = {k: compute_range(h, method, symmetric) for k, h in sharded.items()}
            ranges[f"{method}{'-symmetric' if symmetric else ''}"] = sum(a[k] == b[k] for k in a)
    result = {
        "command": "nice -n 10 .venv/bin/python benchmarks/ray_calibration.py",
        "model": MODEL.name, "feeds": n1, "feeds_ray": n2, "shards": [len(s) for s in split(files, 2)],
        "workers": where, "tensors": len(single), "identical_histograms": len(same_hist),
        "identical_ranges_by_method": ranges,
        "seconds": {"one_process": round(one_process_s, 1), "ray_2_workers": round(ray_s, 1)},
        "machine": f"{platform.node()}, 2 cores AVX2 (no AVX-512/VNNI), shared by other jobs: times are indicative only",
    }
    out = ROOT / "benchmarks" / "results" / "ray_calibration.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    ok = len(same_hist) == len(single) and all(v == len(single) for v in ranges.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
