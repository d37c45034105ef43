"""INT4 weight-only on smollm2_135m_kv: onnxruntime's MatMulNBitsQuantizer (RTN) against
``onnxforge quantize --bits 4`` (RTN / GPTQ / AWQ / AWQ+GPTQ), perplexity on the val text by
../shared/corpus/llm_eval.py (the fp32 export as reference), and file sizes.

usage: python benchmarks/int4_smollm2.py OUT_DIR CONFIG [CONFIG ...]
  CONFIG: ort-rtn | ort-rtn-headfp32 | METHOD[-headfp32][-ao] with METHOD in rtn, gptq, awq, awq+gptq
Each model is written under OUT_DIR (kept: a config whose model exists is only evaluated again);
prints one JSON line per config. Needs the synth venv (onnxruntime 1.32 with its quantization tools)
for the onnxruntime baseline and llm_eval; onnxforge runs from this checkout's venv.
Block 128, symmetric, as issue 18 judges it; nothing here depends on time.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path.home() / ".cache/onnxforge/corpus"
MODEL = CORPUS / "smollm2_135m_kv.onnx"
DATA = ROOT.parent / "shared/data/smollm2_135m_kv"
SYNTH = Path.home() / ".cache/onnxforge/synth-venv/bin/python"
ONNXFORGE = ROOT / ".venv/bin/onnxforge"
EVAL = ROOT.parent / "shared/corpus/llm_eval.py"
LM_HEAD = "/model/lm_head/MatMul"

ORT_QUANT = """
import sys, onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
model = onnx.load(sys.argv[1])
exclude = sys.argv[3:]
q = MatMulNBitsQuantizer(model, block_size=128, is_symmetric=True, nodes_to_exclude=exclude)
q.process()
q.model.save_model_to_file(sys.argv[2], use_external_data_format=False)
"""


def build(config: str, out: Path) -> list[str]:
    head_fp32 = "-headfp32" in config
    if config.startswith("ort-rtn"):
        return [str(SYNTH), "-c", ORT_QUANT, str(MODEL), str(out)] + ([LM_HEAD] if head_fp32 else [])
    method = config.split("-")[0]
    cmd = [str(ONNXFORGE), "quantize", str(MODEL), "-o", str(out), "--bits", "4", "--block-size", "128",
           "--weight-method", method, "--calib", str(DATA / "calib"), "--val", str(DATA / "val"),
           "--report", str(out.with_suffix(".json"))]
    if head_fp32:
        cmd += ["--lm-head", "float"]
    cmd += ["--act-order" if "-ao" in config else "--no-act-order"]
    return cmd


def main() -> None:
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    for config in sys.argv[2:]:
        out = out_dir / f"{config.replace('+', '_')}.onnx"
        if not out.exists():
            done = subprocess.run(build(config, out), capture_output=True, text=True)
            if done.returncode not in (0, 3):  # 3: onnxforge's budget missed, the model is written
                print(json.dumps({"config": config, "error": done.stderr.strip().splitlines()[-1:]}), flush=True)
                continue
        evaluated = subprocess.run([str(SYNTH), str(EVAL), str(out), str(DATA / "val"), "--reference", str(MODEL),
                                    "--json"], capture_output=True, text=True, check=True)
        result = json.loads(evaluated.stdout)
        result.update(config=config, bytes=os.path.getsize(out), fp32_bytes=os.path.getsize(MODEL))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
