"""Where INT4 loses perplexity on smollm2_135m_kv: quantize one group of weights at a time, the rest fp32.

Each variant is the fp32 export with the chosen weights replaced by what an INT4 model's codes stand for
(fake quantization: the dequantized values written back as fp32 initializers, so onnxruntime runs the
same fp32 graph), and its perplexity on the val text (same scoring as shared/corpus/llm_eval.py:
next-token NLL over unmasked positions). Groups: the tied LM head (MatMul side), the embedding (Gather
side of the same codes), q/k/v, o, gate/up, down, and ranges of layer indices.

usage: python benchmarks/int4_ablation.py INT4_MODEL.onnx [GROUP ...]
  INT4_MODEL: an `onnxforge quantize --bits 4` output (MatMulNBits nodes named <MatMul>_Q4, symmetric)
  GROUP: all | head | embed | embedrefit (embedding scales of its own) | head+embed | qkv | o | gateup | down | layers:A-B | none (default: a standard set)
Prints one JSON line per group. Deterministic: no sampling, no time dependence.
"""
from __future__ import annotations

import glob
import json
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
MODEL = Path.home() / ".cache/onnxforge/corpus/smollm2_135m_kv.onnx"
VAL = ROOT.parent / "shared/data/smollm2_135m_kv/val"
DEFAULT = ["none", "all", "head+embed", "head", "embed", "qkv", "o", "gateup", "down",
           "layers:0-4", "layers:5-9", "layers:10-14", "layers:15-19", "layers:20-24", "layers:25-29"]
KINDS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gateup": ("gate_proj", "up_proj"),
         "down": ("down_proj",)}


def dequantized(int4: onnx.ModelProto, wanted: set[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(MatMul node name -> W [K, N] the INT4 codes stand for, name -> centred codes [N, kb, block]), for the
    ``wanted`` MatMul names only (memory)."""
    inits = {i.name: i for i in int4.graph.initializer}
    out, centred = {}, {}
    for node in int4.graph.node:
        if node.op_type != "MatMulNBits" or node.name.removesuffix("_Q4") not in wanted:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if len(node.input) > 3 and node.input[3]:
            raise SystemExit(f"{node.name}: zero points (asymmetric) are not handled here")
        b = numpy_helper.to_array(inits[node.input[1]])
        scales = numpy_helper.to_array(inits[node.input[2]]).reshape(attrs["N"], -1)
        codes = np.stack([b & 15, b >> 4], -1).reshape(attrs["N"], -1, attrs["block_size"]).astype(np.float32)
        wt = ((codes - 8) * scales[..., None]).reshape(attrs["N"], -1)[:, :attrs["K"]]
        out[node.name.removesuffix("_Q4")] = wt.T.copy()
        centred[node.name.removesuffix("_Q4")] = codes - 8
    return out, centred


def refit_rows(centred: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The table the codes stand for with each block's scale refit to the rows (least squares, MSE):
    what the Gather side would read with scales of its own."""
    n, kb, block = centred.shape
    rows = np.pad(table, ((0, 0), (0, kb * block - table.shape[1]))).reshape(n, kb, block)
    scale = (centred * rows).sum(-1) / np.maximum((centred * centred).sum(-1), 1e-12)
    return (centred * scale[..., None]).reshape(n, -1)[:, :table.shape[1]]


def ppl(model: onnx.ModelProto, files: list[str]) -> float:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    nll = []
    for f in files:
        with np.load(f) as z:
            feed = {k: z[k] for k in z.files if k in wanted}
        logits = sess.run(["logits"], feed)[0].astype(np.float64)
        mask = feed["attention_mask"].astype(bool)
        scored = mask[:, :-1] & mask[:, 1:]
        lp = logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        nll.append(-np.take_along_axis(lp, feed["input_ids"][:, 1:, None], -1)[..., 0][scored])
    return float(np.exp(np.concatenate(nll).mean()))


def selected(group: str, matmuls: list[str], head: str) -> tuple[set[str], bool]:
    """(MatMul names to replace, whether (and how) the embedding table takes the head's codes)."""
    parts = group.split("+")
    names, embed = set(), False
    for part in parts:
        if part == "none":
            continue
        if part == "all":
            names |= set(matmuls)
            embed = True
        elif part == "head":
            names.add(head)
        elif part in ("embed", "embedrefit"):
            embed = part
        elif part in KINDS:
            names |= {m for m in matmuls if any(f"/{k}/" in m for k in KINDS[part])}
        elif part.startswith("layers:"):
            lo, hi = map(int, part[7:].split("-"))
            names |= {m for m in matmuls if (x := re.search(r"layers\.(\d+)/", m)) and lo <= int(x[1]) <= hi}
        else:
            raise SystemExit(f"unknown group {part!r}")
    return names, embed


def main() -> None:
    int4 = onnx.load(sys.argv[1])
    groups = sys.argv[2:] or DEFAULT
    names = sorted(n.name.removesuffix("_Q4") for n in int4.graph.node if n.op_type == "MatMulNBits")
    head = next(n.name.removesuffix("_Q4") for n in int4.graph.node if n.op_type == "MatMulNBits"
                and n.output[0] == "logits")
    wanted = {head}.union(*(selected(g, names, head)[0] for g in groups))
    approx, centred = dequantized(int4, wanted)
    del int4
    model = onnx.load(str(MODEL))
    inits = {i.name: i for i in model.graph.initializer}
    weight_of = {n.name: n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    table = next(n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
                 and len(inits[n.input[0]].dims) == 2 and inits[n.input[0]].dims[0] > 10000)
    original = {name: numpy_helper.to_array(inits[w]) for name, w in weight_of.items() if name in approx}
    original_table = numpy_helper.to_array(inits[table])
    files = sorted(glob.glob(str(VAL / "*.npz")))
    for group in groups:
        chosen, embed = selected(group, names, head)
        for name in original:
            inits[weight_of[name]].CopyFrom(numpy_helper.from_array(
                (approx[name] if name in chosen else original[name]).astype(np.float32), weight_of[name]))
        rows = original_table
        if embed == "embedrefit":
            rows = refit_rows(centred[head], original_table)
        elif embed:
            rows = approx[head].T.copy()
        inits[table].CopyFrom(numpy_helper.from_array(rows.astype(np.float32), table))
        print(json.dumps({"group": group, "matmuls": len(chosen), "embed": embed,
                          "perplexity": round(ppl(model, files), 3)}), flush=True)


if __name__ == "__main__":
    main()
