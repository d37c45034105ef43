"""Sequential vs one-shot GPTQ on a range of SmolLM2 decoder layers, the rest fp32 (benchmarks/int4_smollm2.md).

``quantize_int4`` (the function behind ``onnxforge quantize --bits 4``) with its weight sites limited to the
MatMuls of layers FIRST..LAST, written as a MatMulNBits model to be scored by shared/corpus/llm_eval.py.

usage: python benchmarks/int4_sequential_layers.py OUT.onnx FIRST LAST STAGES [quantized|float]
  STAGES 1: one shot (every Hessian from the float model); STAGE_TARGET as --stage-target.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from onnxforge.io import load, save
from onnxforge.passes.quant import int4

ROOT = Path(__file__).resolve().parents[1]
MODEL = Path.home() / ".cache/onnxforge/corpus/smollm2_135m_kv.onnx"
CALIB = ROOT.parent / "shared/data/smollm2_135m_kv/calib"


def main() -> None:
    out, first, last, stages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    target = sys.argv[5] if len(sys.argv) > 5 else "quantized"
    every = int4._sites

    def in_range(graph):
        return {k: v for k, v in every(graph).items()
                if (m := re.search(r"layers\.(\d+)/", v[2].name)) and first <= int(m[1]) <= last}

    int4._sites = in_range  # quantize_int4 looks it up at call time
    start = time.monotonic()
    model, report = int4.quantize_int4(load(MODEL), str(CALIB), method="gptq", stages=stages, stage_target=target,
                                       refine=0, check=False, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    save(model, out)
    print(json.dumps({"quantized": report.quantized, "stages": report.stages, "stage_target": target,
                      "seconds": round(time.monotonic() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
