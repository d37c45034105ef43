"""INT4 methods on smollm2_135m_kv with one calibration pass: the second moments H = X^T X / n of every
MatMul input are collected once (passes/quant/hessians.py, cached in CACHE) and reused by each method,
then ``quantize_int4`` (the function behind ``onnxforge quantize --bits 4``) writes one model per config
under OUT_DIR, its check skipped (the models are judged by shared/corpus/llm_eval.py, see
benchmarks/int4_smollm2.py, which evaluates existing models by the same config names).

usage: python benchmarks/int4_smollm2_methods.py OUT_DIR CACHE.npz CONFIG [CONFIG ...]
  CONFIG: METHOD[-headfp32][-noao][-cdN], METHOD in rtn, gptq, awq, awq+gptq; -noao: GPTQ without act-order,
  -cdN: N coordinate-descent passes after GPTQ (default 0 here, the figures before it existed),
  -seqN: sequential calibration in N stages (the cache is not used: each stage runs the data again)
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from onnxforge.io import load, save
from onnxforge.passes.quant import hessians
from onnxforge.passes.quant.int4 import quantize_int4

ROOT = Path(__file__).resolve().parents[1]
MODEL = Path.home() / ".cache/onnxforge/corpus/smollm2_135m_kv.onnx"
CALIB = ROOT.parent / "shared/data/smollm2_135m_kv/calib"


def cached_collector(cache: Path):
    collect = hessians.collect_hessians

    def collect_once(model, feeds, names, **options):
        if cache.exists():
            with np.load(cache) as z:
                return {n: z[n.replace("/", "|")] for n in names}, int(z["__tokens"])
        found, tokens = collect(model, feeds, names, **options)
        np.savez(cache, __tokens=tokens, **{n.replace("/", "|"): h for n, h in found.items()})
        return found, tokens
    return collect_once


def main() -> None:
    out_dir, cache = Path(sys.argv[1]), Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    hessians.collect_hessians = cached_collector(cache)  # quantize_int4 imports it at call time
    for config in sys.argv[3:]:
        out = out_dir / f"{config.replace('+', '_')}.onnx"
        if out.exists():
            continue
        start = time.monotonic()
        flags = config.split("-")[1:]
        refine = next((int(f[2:]) for f in flags if f.startswith("cd")), 0)
        stages = next((int(f[3:]) for f in flags if f.startswith("seq")), 1)
        model, report = quantize_int4(load(MODEL), str(CALIB), method=config.split("-")[0],
                                      lm_head="headfp32" not in flags, act_order="noao" not in flags,
                                      refine=refine, stages=stages, check=False,
                                      log=lambda msg: print(msg, file=sys.stderr, flush=True))
        save(model, out)
        (out.with_suffix(".json")).write_text(json.dumps(report.as_dict(), indent=1))
        errors = report.layer_error
        print(json.dumps({"config": config, "seconds": round(time.monotonic() - start, 1),
                          "mean_layer_error": float(np.mean(list(errors.values()))) if errors else None,
                          "bytes": os.path.getsize(out)}), flush=True)


if __name__ == "__main__":
    main()
