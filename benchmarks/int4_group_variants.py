"""One group of SmolLM2 weights solved by an INT4 method variant, the rest fp32: val perplexity (issue 18).

The second moments come from the cache ``benchmarks/int4_smollm2_methods.py`` writes (one calibration pass over
shared/data/smollm2_135m_kv/calib); every MatMul input of the group is solved by ``int4._solve`` (what
``quantize_int4`` runs per input tensor: GPTQ / AWQ / both, the scale refit, the tied embedding's own scales),
the dequantized weights written back into the fp32 export (fake quantization) and the model scored on the val
text exactly as benchmarks/int4_ablation.py (= shared/corpus/llm_eval.py's perplexity).

usage: python benchmarks/int4_group_variants.py CACHE.npz GROUP METHOD [noao]
  GROUP: parts joined by '+': all | head | qkv | o | gateup | down | layers:A-B | KIND@A-B (e.g. down@0-29)
  METHOD: rtn | gptq | awq | awq+gptq (act-order unless 'noao')
Prints one JSON line. Deterministic.
"""
from __future__ import annotations

import glob
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int4_ablation import KINDS, MODEL, VAL, ppl  # noqa: E402

from onnxforge.io import load  # noqa: E402
from onnxforge.passes.quant import int4  # noqa: E402
from onnxforge.passes.quant.nbits import dequantize  # noqa: E402


def _layer(site) -> int | None:
    found = re.search(r"layers\.(\d+)/", site[2].name)
    return int(found[1]) if found else None


def keys_of(group: str, sites, heads) -> set[str]:
    out = set()
    for part in group.split("+"):
        kind, _, span = part.partition("@")
        lo, hi = map(int, span.split("-")) if span else (0, 10 ** 9)
        if part == "all":
            out |= set(sites)
        elif part == "head":
            out |= heads
        elif part.startswith("layers:"):
            lo, hi = map(int, part[7:].split("-"))
            out |= {k for k, v in sites.items() if _layer(v) is not None and lo <= _layer(v) <= hi}
        elif kind in KINDS:
            out |= {k for k, v in sites.items() if any(f"/{x}/" in v[2].name for x in KINDS[kind])
                    and _layer(v) is not None and lo <= _layer(v) <= hi}
        else:
            raise SystemExit(f"unknown group {part!r}")
    return out


def solve(model, keys, cache, method: str, act_order: bool):
    """{initializer name: fp32 value the INT4 codes stand for} for ``keys`` (and a tied table), and the report."""
    sites = int4._sites(model.graph)
    heads = int4._lm_heads(model.graph, sites)
    tables = int4._tied_tables(model.graph, sites)
    tensors = sorted({sites[k][2].inputs[0].name for k in keys})
    plan = {"weights": {}}
    report = int4.Int4Report(method, 128, True, "int4", "cache")
    for tensor in tensors:  # every weight reading the tensor, stacked, as quantize_int4 does
        readers = [k for k, v in sites.items() if v[2].inputs[0].name == tensor]
        int4._solve(plan, report, readers, sites, tables, cache[tensor.replace("/", "|")], tensor, method, 128, True,
                    act_order, heads, 0)
    out = {}
    for key in keys:
        entry = plan["weights"][key]
        approx = dequantize(entry.codes, entry.scales, entry.zeros, entry.block, entry.k)
        if entry.input_scale is not None:
            approx = approx / entry.input_scale[None, :]
        constant, transposed, _node = sites[key]
        out[constant.name] = approx if transposed else approx.T
        if entry.embedding is not None:
            own = entry.embedding_scales if entry.embedding_scales is not None else entry.scales
            out[entry.embedding] = dequantize(entry.codes, own, entry.zeros, entry.block, entry.k)
    return out, report


def perplexity(weights: dict[str, np.ndarray]) -> float:
    proto = onnx.load(str(MODEL))
    for init in proto.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(weights[init.name], np.float32), init.name))
    return ppl(proto, sorted(glob.glob(str(VAL / "*.npz"))))


def main() -> None:
    cache, group, method = np.load(sys.argv[1]), sys.argv[2], sys.argv[3]
    act_order = "noao" not in sys.argv[4:]
    model = load(MODEL)
    sites = int4._sites(model.graph)
    keys = keys_of(group, sites, int4._lm_heads(model.graph, sites))
    start = time.monotonic()
    weights, report = solve(model, keys, cache, method, act_order)
    del model
    errors = [report.layer_error[k] for k in keys]
    print(json.dumps({"group": group, "method": method, "act_order": act_order, "matmuls": len(keys),
                      "mean_layer_error": float(np.mean(errors)), "solve_s": round(time.monotonic() - start),
                      "perplexity": round(perplexity(weights), 3)}), flush=True)


if __name__ == "__main__":
    main()
