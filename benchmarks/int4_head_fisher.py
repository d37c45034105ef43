"""SmolLM2's tied LM head: GPTQ on softmax-weighted Hessians of vocabulary clusters vs the one global Hessian.

The logits' second-order loss (KL to the float model) is sum_t sum_v p_tv (x_t . d_v)^2 (less a coupling term):
vocabulary row v only matters in the contexts where token v is probable, i.e. its own Hessian
H_v = sum_t p_tv x_t x_t^T. One Hessian per row is out of reach (49152 x 576^2), so the rows are clustered by
the shape of their probability profile on a sketch of 256 calibration tokens (Hellinger k-means, fixed seed) and
each cluster c is solved with H_c = sum_t w_tc x_t x_t^T (w_tc: the cluster's probability mass at token t,
normalized), mixed with the global H: (1 - lam) H_c tr(H)/tr(H_c) + lam H. C = 1 is the product's head
(act-order GPTQ on H, scale refit); DAMP the GPTQ damping (0.01 in the product). Every variant then gives the
embedding its own refit scales (the product's ``refit_rows``) and is scored with head + embedding INT4, the rest
fp32 (fake quantization, the val text, int4_ablation.py's scoring).

usage: python benchmarks/int4_head_fisher.py C LAM [DAMP]     (X of the head's input cached in /tmp/int4_xhead.npy)
"""
from __future__ import annotations

import glob
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int4_ablation import MODEL  # noqa: E402
from int4_group_variants import perplexity  # noqa: E402

from onnxforge.io import load  # noqa: E402
from onnxforge.passes.quant import int4  # noqa: E402
from onnxforge.passes.quant.gptq import gptq, output_error, refit_rows, refit_scales  # noqa: E402
from onnxforge.passes.quant.int4_rules import weight_rows  # noqa: E402
from onnxforge.passes.quant.nbits import dequantize  # noqa: E402

CALIB = Path(__file__).resolve().parents[2] / "shared/data/smollm2_135m_kv/calib"
X_CACHE = Path("/tmp/int4_xhead.npy")
CHUNK = 8192


def head_inputs(proto, name: str) -> np.ndarray:
    from onnxforge.passes.quant.calibrate import session_with_outputs
    from onnxforge.passes.quant.hessians import _rows

    session = session_with_outputs(proto, [name])
    wanted = {i.name for i in session.get_inputs()}
    rows = []
    for path in sorted(glob.glob(str(CALIB / "*.npz"))):
        with np.load(path) as z:
            feed = {k: z[k] for k in z.files}
        rows.append(_rows(session.run([name], {k: v for k, v in feed.items() if k in wanted})[0],
                          feed.get("attention_mask")))
    return np.concatenate(rows).astype(np.float32)


def clusters(x, wt, lse, count: int) -> np.ndarray:
    if count == 1:
        return np.zeros(len(wt), int)
    sketch = np.arange(0, len(x), max(1, len(x) // 256))
    profile = np.exp(x[sketch] @ wt.T - lse[sketch, None]).T  # [V, S]
    profile = np.sqrt(profile / profile.sum(1, keepdims=True))
    centres = profile[np.random.default_rng(0).choice(len(wt), count, replace=False)]
    for _ in range(15):
        labels = ((profile ** 2).sum(1)[:, None] - 2 * profile @ centres.T + (centres ** 2).sum(1)[None]).argmin(1)
        for c in range(count):
            if (labels == c).any():
                centres[c] = profile[labels == c].mean(0)
    return labels


def main() -> None:
    count, lam = int(sys.argv[1]), float(sys.argv[2])
    damp = float(sys.argv[3]) if len(sys.argv) > 3 else 0.01
    model = load(MODEL)
    sites = int4._sites(model.graph)
    head = next(iter(int4._lm_heads(model.graph, sites)))
    table = int4._tied_tables(model.graph, sites)[head]
    constant, transposed, node = sites[head]
    wt = weight_rows(constant, transposed).astype(np.float32)  # [V, K]
    if not X_CACHE.exists():
        np.save(X_CACHE, head_inputs(model.to_proto(), node.inputs[0].name))
    del model
    x = np.load(X_CACHE)
    tokens, k = x.shape
    h_global = x.astype(np.float64).T @ x / tokens
    start = time.monotonic()
    lse = np.full(tokens, -np.inf)
    for v0 in range(0, len(wt), CHUNK):
        z = x @ wt[v0:v0 + CHUNK].T
        top = z.max(1)
        lse = np.logaddexp(lse, np.log(np.exp(z - top[:, None]).sum(1)) + top)
    labels = clusters(x, wt, lse, count)
    mass = np.zeros((tokens, count))
    for v0 in range(0, len(wt), CHUNK):
        p = np.exp(x @ wt[v0:v0 + CHUNK].T - lse[:, None])
        for c in range(count):
            mass[:, c] += p[:, labels[v0:v0 + CHUNK] == c].sum(1)
    kb = -(-k // 128)
    codes = np.zeros((len(wt), kb * 128), np.uint8)
    scales = np.zeros((len(wt), kb), np.float32)
    zeros = np.zeros((len(wt), kb), np.int32)
    for c in range(count):
        rows = labels == c
        if not rows.any():
            continue
        h = h_global
        if count > 1:
            own = (x.astype(np.float64).T * (mass[:, c] / mass[:, c].sum())) @ x
            h = (1 - lam) * own * np.trace(h_global) / np.trace(own) + lam * h_global
        q, s, z = gptq(wt[rows], h, 128, True, act_order=True, damp=damp)
        codes[rows], scales[rows], zeros[rows] = q, refit_scales(wt[rows], q, s, z, h, 128), z
    approx = dequantize(codes, scales, zeros, 128, k)
    embedding = dequantize(codes, refit_rows(wt, codes, scales, zeros, 128), zeros, 128, k)
    seconds = round(time.monotonic() - start)
    result = perplexity({constant.name: approx if transposed else approx.T, table: embedding})
    print(json.dumps({"clusters": count, "lam": lam, "damp": damp, "head_error": output_error(wt, approx, h_global),
                      "solve_s": seconds, "perplexity_head_embed": round(result, 3)}), flush=True)


if __name__ == "__main__":
    main()
