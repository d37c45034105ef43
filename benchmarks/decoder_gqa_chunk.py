"""A chunk of new tokens on a non-empty KV cache at batch > 1 (left padding): the GroupQueryAttention-fused
decoder against the export (onnxruntime's kernel refuses this case as such; passes/fusion/attention_gqa_cache.py
moves the past into the chunk).

    .venv/bin/python benchmarks/decoder_gqa_chunk.py [--model M.onnx] [--fused F.onnx] [--past 8] [--chunk 4]

Without --fused the model is fused here with fuse-gqa-rotary alone (no other pass). The past is the export's
own prefill of ``--past`` random tokens at batch 2 with row 0 left padded by 3; then both models run the chunk.
Prints the largest difference over logits and presents (relative to each output's max |x|, at least 1) and
whether the last position's argmax agrees.
"""
from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxforge.passes.quant.registered import apply_passes

MODEL = Path.home() / ".cache/onnxforge/corpus/smollm2_135m_kv.onnx"


def session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 2, 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--fused")
    ap.add_argument("--past", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=4)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fused = a.fused
        if fused is None:
            out, _ = apply_passes(onnx.load(a.model), ("fuse-gqa-rotary",), max_iterations=2)
            print("GroupQueryAttention:", collections.Counter(n.op_type for n in out.graph.node)["GroupQueryAttention"])
            fused = str(Path(tmp) / "fused.onnx")
            onnx.save(out, fused)
        raw_s, fused_s = session(a.model), session(fused)
        pasts = [i for i in raw_s.get_inputs() if i.name.startswith("past_key_values")]
        rng = np.random.default_rng(0)
        batch, past, chunk = 2, a.past, a.chunk
        mask = np.ones((batch, past + chunk), np.int64)
        mask[0, :3] = 0
        pos = np.clip(np.cumsum(mask, 1) - 1, 0, None).astype(np.int64)
        pre = {"input_ids": rng.integers(0, 1000, (batch, past)).astype(np.int64), "attention_mask": mask[:, :past],
               "position_ids": pos[:, :past]}
        pre.update({i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32) for i in pasts})
        made = dict(zip([o.name for o in raw_s.get_outputs()], raw_s.run(None, pre)))
        feed = {"input_ids": rng.integers(0, 1000, (batch, chunk)).astype(np.int64), "attention_mask": mask,
                "position_ids": pos[:, past:]}
        feed.update({i.name: made[i.name.replace("past_key_values", "present")] for i in pasts})
        want, got = raw_s.run(None, feed), fused_s.run(None, feed)
        worst = max(float(np.abs(x - y).max() / max(1.0, float(np.abs(x).max()))) for x, y in zip(want, got))
        same = bool((want[0][:, -1].argmax(-1) == got[0][:, -1].argmax(-1)).all())
        print(f"batch {batch}, past {past}, chunk {chunk}, row 0 left padded by 3: largest relative difference "
              f"{worst:.2e}; last-position argmax equal: {same}")


if __name__ == "__main__":
    main()
