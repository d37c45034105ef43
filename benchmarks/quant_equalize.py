"""Cosine before any float fallback, per equalization variant (the table in benchmarks/results/quant.md).

    .venv/bin/python benchmarks/quant_equalize.py [MODEL ...] [--calib 8] [--val 8]

For each model with real data (../shared/data/<model>/{calib,val}): the float
baseline without the affine fold, with it, and each with no equalization,
data-free CLE, or smoothing; static QDQ u8/s8 per channel, minmax ranges from
the first --calib feeds, all CPU static ops; cosine to the unfolded float
baseline over the first --val feeds. Also checks that every variant's float
model matches the baseline (max |diff| printed).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # siblings: benchmarks/ is a folder of scripts, not a package

from quant import DATA_DIR, model_path  # noqa: E402


def variants(name: str, n_calib: int, n_val: int):
    from onnxforge.inputs import load_feeds
    from onnxforge.passes.quant import equalize as eq
    from onnxforge.passes.quant.budget import cosine, run_outputs
    from onnxforge.passes.quant.calibrate import calibrate
    from onnxforge.passes.quant.formats import spec_for, static_qdq
    from onnxforge.passes.quant.prepare import float_baseline

    proto = onnx.load(str(model_path(name)))
    base = float_baseline(proto, affine_into_next=False)
    calib = _take(load_feeds(DATA_DIR / name / "calib"), n_calib)
    val = _take(load_feeds(DATA_DIR / name / "val"), n_val)
    reference = run_outputs(base, val)
    spec = spec_for("cpu", base, "static")
    for fold in (False, True):
        start = eq.fold_affine(base)[0] if fold else base
        for mode in ("none", "cle", "smooth"):
            model = start if mode == "none" else eq.equalize(start, calib[:4] if mode == "smooth" else None)[0]
            drift = max(float(np.max(np.abs(a - b))) for r, o in zip(reference, run_outputs(model, val)) for a, b in zip(r, o))
            ranges, _, _ = calibrate(model, iter(calib), "minmax", symmetric=False)
            score = cosine(reference, run_outputs(static_qdq(model, ranges, spec, []), val))
            yield {"model": name, "fold": fold, "equalize": mode, "float_drift": drift, "cosine": score}


def _take(feeds, n: int) -> list:
    return list(feeds)[:n]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["ppocrv4_det", "ppocrv4_rec"])
    parser.add_argument("--calib", type=int, default=8)
    parser.add_argument("--val", type=int, default=8)
    args = parser.parse_args(argv)
    print("| model | fold | equalize | float max drift | cosine before fallback |\n|---|---|---|---|---|")
    for name in args.models:
        for row in variants(name, args.calib, args.val):
            print(f"| {row['model']} | {'yes' if row['fold'] else 'no'} | {row['equalize']} | "
                  f"{row['float_drift']:.2e} | {row['cosine']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
