"""Per-layer check of the residual rotation on SmolLM2 (issue 18): relative output error of single weight groups.

For each named MatMul input (the weights reading it stacked, as quantize_int4 solves them), the relative output
error ||X (W^ - W)||^2 / ||X W||^2 on the cached calibration Hessians (benchmarks/int4_smollm2_methods.py's
cache), with the weights as given (none), the RMSNorm gamma folded into the readers (fold, Q = I), and rotated
(orth, had; the same rotation as benchmarks/int4_rotate_sim.py). The error is basis-independent, so the
columns compare directly.

With ``input`` instead: each weight as given against its input side rotated (W' = Q^T W, Q the Hadamard-based
rotation of its K inputs, seed 0), what an online rotation of the activation before it (QuaRot's Hadamard on
down_proj's input, a run-time op) would allow; both RTN and GPTQ.

usage: python benchmarks/int4_rotate_layers.py CACHE.npz PATTERN[,PATTERN...] [rtn|gptq|input]
  PATTERN: part of a MatMul's node name (e.g. layers.15/mlp/down_proj, lm_head)
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int4_ablation import MODEL  # noqa: E402
from int4_rotate_sim import gamma_of, rotation  # noqa: E402

from onnxforge.io import load  # noqa: E402
from onnxforge.passes.quant import int4  # noqa: E402
from onnxforge.passes.quant.gptq import gptq, output_error, refit_scales  # noqa: E402
from onnxforge.passes.quant.int4_rules import weight_rows  # noqa: E402
from onnxforge.passes.quant.nbits import dequantize, quantize_rtn  # noqa: E402


def main() -> None:
    cache, want = np.load(sys.argv[1]), sys.argv[2].split(",")
    method = sys.argv[3] if len(sys.argv) > 3 else "rtn"
    model = load(MODEL)
    sites = int4._sites(model.graph)
    heads = int4._lm_heads(model.graph, sites)
    d = 576
    if method == "input":
        return input_side(cache, want, sites)
    print("rotation", method, want)
    for kind in ("none", "fold", "orth", "had"):
        q = rotation(kind, d)
        errors = []
        for pattern in want:
            tensor = next(v[2].inputs[0] for v in sites.values() if pattern in v[2].name)
            readers = [k for k, v in sites.items() if v[2].inputs[0].name == tensor.name]
            h = cache[tensor.name.replace("/", "|")].astype(np.float64)
            rows = np.concatenate([weight_rows(*sites[k][:2]) for k in readers]).astype(np.float64)
            if rows.shape[1] != d:  # a writer: its outputs rotated
                rotated, hr = q.T @ rows, h
            else:
                g = gamma_of(tensor)
                g = np.ones(d) if g is None or kind == "none" or any(r in heads for r in readers) else g
                rotated, hr = rows @ (g[:, None] * q), q.T @ (h / np.outer(g, g)) @ q
            rotated, hr = rotated.astype(np.float32), hr.astype(np.float32)
            if method == "rtn":
                codes, scales, zeros = quantize_rtn(rotated, 128, True)
            else:
                codes, scales, zeros = gptq(rotated, hr, 128, True, act_order=True)
                scales = refit_scales(rotated, codes, scales, zeros, hr, 128)
            errors.append(round(output_error(rotated, dequantize(codes, scales, zeros, 128, d if rows.shape[1] == d
                                                                 else rows.shape[1]), hr), 5))
        print(kind, errors, flush=True)


def _errors(wt: np.ndarray, h: np.ndarray) -> tuple[float, float]:
    """(RTN, GPTQ act-order + scale refit) relative output errors of Wt [N, K] on H."""
    k = wt.shape[1]
    codes, scales, zeros = quantize_rtn(wt, 128, True)
    rtn = output_error(wt, dequantize(codes, scales, zeros, 128, k), h)
    codes, scales, zeros = gptq(wt, h, 128, True, act_order=True)
    scales = refit_scales(wt, codes, scales, zeros, h, 128)
    return round(rtn, 5), round(output_error(wt, dequantize(codes, scales, zeros, 128, k), h), 5)


def input_side(cache, want, sites) -> None:
    from onnxforge.passes.quant.rotate_residual import rotation as product_rotation

    print("pattern: (RTN, GPTQ) as given, (RTN, GPTQ) input rotated")
    for pattern in want:
        key = next(k for k, v in sites.items() if pattern in v[2].name)
        h = cache[sites[key][2].inputs[0].name.replace("/", "|")].astype(np.float64)
        wt = weight_rows(*sites[key][:2]).astype(np.float64)
        q = product_rotation(wt.shape[1], "hadamard", 0)
        print(pattern, _errors(wt.astype(np.float32), h.astype(np.float32)),
              _errors((wt @ q).astype(np.float32), (q.T @ h @ q).astype(np.float32)), flush=True)


if __name__ == "__main__":
    main()
