"""Does an orthogonal rotation of the residual stream help INT4 on SmolLM2? A quick check from the cached Hessians.

QuaRot/SpinQuant-style: the residual stream x is replaced by x Q (Q orthogonal 576 x 576); every RMSNorm
commutes with Q (the mean of squares is kept), so with each norm's gamma folded into its readers the float model
is unchanged: readers (q/k/v, gate/up) W' = Q^T diag(g) W, writers (o, down) W' = W Q, embedding E' = E Q, and
the tied head reads E' behind one extra float 576 x 576 MatMul Q^T diag(g_f) Q. Quantizing W' instead of W
changes what INT4 loses. Here no graph is rewritten: each weight group is rotated in numpy, solved by the
product's own per-tensor solve (``int4._solve``: GPTQ act-order + scale refit, the tied embedding's own
scales, or RTN) on the rotated Hessian (readers: H' = Q^T diag(1/g) H diag(1/g) Q; writers: H unchanged;
head: Q^T H Q), and the dequantized result rotated back into the fp32 export (exactly what the rotated INT4
model computes, up to float rounding), which is then scored as benchmarks/int4_ablation.py does.

usage: python benchmarks/int4_rotate_sim.py CACHE.npz METHOD ROTATION [GROUP]
  METHOD: rtn | gptq;  ROTATION: none (no fold) | fold (gamma folded, Q = I) | orth (seeded QR) | had
  (random signs x kron(Hadamard 64, seeded orthogonal 9x9)) | mixed (had for the writers, the embedding and
  the tied head; q/k/v and gate/up as given, gamma not folded: what an online Q^T after each RMSNorm would
  allow);  GROUP as int4_group_variants.py (default all).
Prints one JSON line. Deterministic (seed 0).
"""
from __future__ import annotations

import glob
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int4_ablation import MODEL, VAL, ppl  # noqa: E402
from int4_group_variants import keys_of  # noqa: E402

from onnxforge.io import load  # noqa: E402
from onnxforge.passes.quant import int4  # noqa: E402
from onnxforge.passes.quant.int4_rules import weight_rows  # noqa: E402
from onnxforge.passes.quant.nbits import dequantize  # noqa: E402
from onnxforge.passes.quant.rotate_residual import rotation as product_rotation  # noqa: E402


def rotation(kind: str, d: int) -> np.ndarray:
    """Q: the product's own (``rotate_residual.rotation``, seed 0), or the identity for none / fold."""
    if kind in ("none", "fold"):
        return np.eye(d)
    if kind == "mixed":
        kind = "had"
    if kind not in ("orth", "had"):
        raise SystemExit(f"unknown rotation {kind!r}")
    return product_rotation(d, {"orth": "orthogonal", "had": "hadamard"}[kind], 0)


def gamma_of(tensor: gs.Variable) -> np.ndarray | None:
    """The norm weight when ``tensor`` is Mul(gamma [d], normalized) (an RMSNorm's output)."""
    if len(tensor.inputs) != 1 or tensor.inputs[0].op != "Mul":
        return None
    consts = [i for i in tensor.inputs[0].inputs if isinstance(i, gs.Constant) and len(i.shape) == 1]
    return consts[0].values.astype(np.float64) if consts else None


def main() -> None:
    cache, method, kind = np.load(sys.argv[1]), sys.argv[2], sys.argv[3]
    group = sys.argv[4] if len(sys.argv) > 4 else "all"
    start = time.monotonic()
    out, errors = solve(cache, method, kind, group)
    solve_s = round(time.monotonic() - start)
    proto = onnx.load(str(MODEL))
    for init in proto.graph.initializer:  # the weights moved into the model one at a time (memory)
        if init.name in out:
            init.CopyFrom(numpy_helper.from_array(out.pop(init.name), init.name))
    print(json.dumps({"group": group, "method": method, "rotation": kind, "matmuls": len(errors),
                      "mean_layer_error": float(np.mean(errors)), "solve_s": solve_s,
                      "perplexity": round(ppl(proto, sorted(glob.glob(str(VAL / "*.npz")))), 3)}), flush=True)


def solve(cache, method: str, kind: str, group: str) -> tuple[dict[str, np.ndarray], list[float]]:
    """{initializer name: the fp32 value the rotated INT4 codes stand for, rotated back}, the layer errors."""
    model = load(MODEL)
    sites = int4._sites(model.graph)
    heads = int4._lm_heads(model.graph, sites)
    tables = int4._tied_tables(model.graph, sites)
    keys = keys_of(group, sites, heads)
    tensors = {sites[key][2].inputs[0].name: sites[key][2].inputs[0] for key in keys}
    d = 576
    q = rotation(kind, d)
    plan = {"weights": {}}
    report = int4.Int4Report(method, 128, True, "int4", "cache")
    out = {}
    for _name, tensor in sorted(tensors.items()):
        readers = [k for k, v in sites.items() if v[2].inputs[0].name == tensor.name]
        h = cache[tensor.name.replace("/", "|")].astype(np.float64)
        gamma = gamma_of(tensor)
        k_in = weight_rows(*sites[readers[0]][:2]).shape[1]
        writer = k_in != d  # o_proj / down_proj: 576 outputs into the residual stream
        if writer:
            left, right, hr = q.T, np.eye(k_in), h
        elif kind == "mixed" and not any(r in heads for r in readers):  # read through an online Q^T: as given
            left, right, hr = np.eye(1), np.eye(d), h
        else:
            g = np.ones(d) if (gamma is None or kind == "none" or any(r in heads for r in readers)) else gamma
            left, right = np.eye(1), (g[:, None] * q)
            hr = q.T @ (h / np.outer(g, g)) @ q
        fake = {}
        for key in readers:
            rows = weight_rows(*sites[key][:2]).astype(np.float64)
            rot = (left @ rows) if writer else rows @ right
            fake[key] = (gs.Constant(key, rot.astype(np.float32)), True, sites[key][2])
        int4._solve(plan, report, readers, fake, tables, hr.astype(np.float32), tensor.name, method, 128, True, True,
                    heads, 0)
        for key in readers:
            entry = plan["weights"][key]
            approx = dequantize(entry.codes, entry.scales, entry.zeros, entry.block, entry.k).astype(np.float64)
            back = (left.T @ approx) if writer else approx @ np.linalg.inv(right)
            constant, transposed, _n = sites[key]
            out[constant.name] = (back if transposed else back.T).astype(np.float32)
            if entry.embedding is not None:  # the embedding E' = E Q, read back as E'^ Q^T
                own = entry.embedding_scales if entry.embedding_scales is not None else entry.scales
                table = dequantize(entry.codes, own, entry.zeros, entry.block, entry.k).astype(np.float64)
                out[entry.embedding] = (table @ q.T).astype(np.float32)
    return out, [report.layer_error[k] for k in keys]


if __name__ == "__main__":
    main()
