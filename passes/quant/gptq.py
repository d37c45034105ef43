"""GPTQ (Frantar et al. 2022) for block-wise INT4 weights, in numpy.

For a layer y = x W with calibration inputs X, the output error of a weight change D is
||X D||^2 = tr(D^T H D) with H = X^T X / n (``hessians.py`` accumulates it). GPTQ quantizes the input
channels (rows of W, columns of Wt = W.T) one at a time and spreads each one's rounding error over the
channels not yet quantized, along the inverse Hessian (the optimal brain surgeon update):

    U = chol(H^-1) (upper), for channel j:  e = (w_j - q(w_j)) / U_jj,  w_{j+1:} -= e U_{j, j+1:}

Lazy batches: the update of later columns is applied by blocks of ``lazy`` columns (one matrix
product per block instead of one outer product per column), the same result up to float reassociation.
Damping: H + damp * mean(diag H) * I keeps the Cholesky factor stable where inputs are collinear;
input channels that never fire (diag 0) get H_jj = 1 and a zero weight column, as in the paper.

Grids: without act-order each block of ``block`` channels gets its scale when GPTQ reaches it, from
the weights as the earlier updates left them (the dynamic grid of the reference implementation), by
the same clip search as ``nbits.search_params`` weighted by diag(H). With act-order (channels taken by
decreasing diag(H), so the error of the important ones is spread first) the grids are fixed beforehand
from the original weights ("static groups"), since channels of one block are then visited out of order.
Rows (outputs) are independent given H: matrices sharing one input (q/k/v) go through as one.
"""
from __future__ import annotations

import numpy as np

from .nbits import (
    BITS, block_importance, dequantize, dequantize_codes, k_blocks, padded, quantize_codes, rtn_params, search_params,
)

DAMP = 0.01
LAZY = 128


def gptq(wt: np.ndarray, hessian: np.ndarray, block: int, symmetric: bool, *, bits: int = BITS,
         damp: float = DAMP, act_order: bool = False, search: bool = True):
    """Wt [N, K], H [K, K] -> (codes [N, Kpad], scales [N, kb], zeros [N, kb])."""
    n, k = wt.shape
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian {hessian.shape} does not fit a weight of {k} inputs")
    h = np.array(hessian, np.float64)
    w = np.array(wt, np.float32)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    diag = np.diag(h).copy()
    kb = k_blocks(k, block)
    scales = np.ones((n, kb), np.float32)
    zeros = np.zeros((n, kb), np.int32)
    if act_order:
        scales, zeros = _grids(padded(w, block).reshape(n, kb, block), diag, k, block, symmetric, bits, search)
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(k)
    w = w[:, perm]
    h = h[perm][:, perm]
    h[np.diag_indices(k)] += damp * diag.mean()
    u = _upper_inverse_cholesky(h)
    codes = np.zeros((n, kb * block), np.uint8)
    codes[:, k:] = zeros[:, -1:]  # padding of the last block stands for 0
    lazy = block if not act_order else LAZY
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1 = w[:, i1:i2].copy()
        err = np.zeros_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            channel = perm[col]
            b = channel // block
            if not act_order and channel % block == 0:
                scales[:, b], zeros[:, b] = _grid(w1[:, i:i + block], diag[channel:channel + block], block,
                                                  symmetric, bits, search)
            q = quantize_codes(w1[:, i:i + 1], scales[:, b], zeros[:, b], bits)
            codes[:, channel] = q[:, 0]
            e = (w1[:, i] - dequantize_codes(q, scales[:, b], zeros[:, b])[:, 0]) / u[col, col]
            w1[:, i:] -= np.outer(e, u[col, col:i2]).astype(np.float32)
            err[:, i] = e
        w[:, i2:] -= (err @ u[i1:i2, i2:].astype(np.float32))
    return codes, scales, zeros


def _upper_inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """U upper triangular with U^T U = H^-1 (adds damping until H is positive definite)."""
    eye = np.eye(len(h))
    extra = 0.0
    for _ in range(8):
        try:
            low = np.linalg.cholesky(h + extra * eye)
            break
        except np.linalg.LinAlgError:
            extra = max(extra * 10, 1e-6 * np.diag(h).mean())
    else:
        raise np.linalg.LinAlgError("the Hessian stays singular after damping")
    inv_low = np.linalg.inv(low)
    hinv = inv_low.T @ inv_low
    return np.linalg.cholesky(hinv).T


def _grid(columns: np.ndarray, diag: np.ndarray, block: int, symmetric: bool, bits: int, search: bool):
    """Scale and zero point [N] of one block from its current columns [N, <= block]."""
    n, width = columns.shape
    blocks = np.pad(columns, ((0, 0), (0, block - width)))[:, None, :]
    s, z = _grids(blocks, diag[:width], width, block, symmetric, bits, search)
    return s[:, 0], z[:, 0]


def _grids(blocks: np.ndarray, diag: np.ndarray, k: int, block: int, symmetric: bool, bits: int, search: bool):
    if search:
        return search_params(blocks, block_importance(diag, k, block), symmetric, bits)
    return rtn_params(blocks, symmetric, bits)


def output_error(wt: np.ndarray, approx: np.ndarray, hessian: np.ndarray) -> float:
    """tr(D H D^T) / tr(W H W^T) for D = approx - wt: the relative output error on the calibration inputs."""
    h = np.asarray(hessian, np.float32)
    d = (approx - wt).astype(np.float32)
    w = wt.astype(np.float32)
    # (D H) . D through BLAS: a three-operand einsum would loop N K^2 times in plain C
    return float(((d @ h) * d).sum(dtype=np.float64) / max(((w @ h) * w).sum(dtype=np.float64), 1e-30))


def refit_scales(wt: np.ndarray, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, hessian: np.ndarray,
                 block: int) -> np.ndarray:
    """The scales that minimize the output error tr((W - W^) H (W - W^)^T) for the codes as they are.

    Row n's dequantized weight is linear in its block scales: W^_n = sum_b s_nb c_nb, c_nb the row's
    centred codes (q - z) on block b and 0 elsewhere. So s_n solves the kb x kb normal equations
    (C_n H C_n^T) s_n = C_n H w_n. Rows whose system is singular (an all-zero block) keep their scales.
    The error never grows over GPTQ's scales, which are one feasible point of the same problem."""
    n, k = wt.shape
    kb = scales.shape[1]
    centred = (codes[:, :k].astype(np.float64) - np.repeat(zeros, block, 1)[:, :k])  # [N, K]
    h = np.asarray(hessian, np.float64)
    hw = wt.astype(np.float64) @ h  # [N, K]: H w_n for every row
    a = np.zeros((n, kb, kb))
    rhs = np.zeros((n, kb))
    hc = np.zeros((kb, n, k))  # H c_nb for each block b
    for b in range(kb):
        cols = slice(b * block, min((b + 1) * block, k))
        hc[b] = centred[:, cols] @ h[cols, :]
    for b in range(kb):
        cols = slice(b * block, min((b + 1) * block, k))
        rhs[:, b] = (centred[:, cols] * hw[:, cols]).sum(1)
        for b2 in range(kb):
            a[:, b, b2] = (centred[:, cols] * hc[b2][:, cols]).sum(1)
    refit = scales.astype(np.float64).copy()
    ok = np.abs(np.linalg.det(a)) > 1e-30 * np.maximum(np.abs(a).max((1, 2)), 1e-30) ** kb
    if ok.any():
        refit[ok] = np.linalg.solve(a[ok], rhs[ok][..., None])[..., 0]
    return refit.astype(np.float32)


def refit_rows(wt: np.ndarray, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, block: int) -> np.ndarray:
    """Per block, the scale minimizing ||w - s (q - z)||^2 for the codes as they are (plain least squares on
    the values: H = I); a block whose codes are all at the zero point keeps its scale. [N, kb] float32."""
    n, k = wt.shape
    kb = scales.shape[1]
    rows = padded(wt.astype(np.float64), block).reshape(n, kb, block)
    centred = codes.reshape(n, kb, block).astype(np.float64) - zeros[..., None]
    centred[:, -1, k - (kb - 1) * block:] = 0  # padding stands for 0 whatever the scale
    energy = (centred * centred).sum(-1)
    fit = (centred * rows).sum(-1) / np.where(energy > 0, energy, 1)
    return np.where(energy > 0, fit, scales).astype(np.float32)


def refine_codes(wt: np.ndarray, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, hessian: np.ndarray,
                 block: int, *, passes: int = 2, bits: int = BITS, lazy: int = LAZY) -> np.ndarray:
    """Cyclic coordinate descent on the codes, grids fixed: returns new codes [N, Kpad] whose output error
    tr(D H D^T) (D = W^ - W) is never above the given codes'.

    With R = W^ - W and G = R H, moving entry (n, j) by d changes the error by 2 d G_nj + d^2 H_jj, so the
    best code for it, the others fixed, is the grid point nearest to W^_nj - G_nj / H_jj; every row moves
    at once (rows are independent). G is kept current lazily: inside a run of ``lazy`` channels by rank-1
    updates restricted to the run, for the rest by one product per run. GPTQ fixes each channel once,
    against the channels after it; this revisits every channel with all the others in place."""
    n, k = wt.shape
    h = np.asarray(hessian, np.float32)
    codes = codes.copy()
    approx = dequantize(codes, scales, zeros, block, k)
    g = (approx - wt.astype(np.float32)) @ h
    diag = np.diag(h)
    top = 2 ** bits - 1
    for _ in range(passes):
        for i1 in range(0, k, lazy):
            i2 = min(i1 + lazy, k)
            moved = np.zeros((n, i2 - i1), np.float32)
            for j in range(i1, i2):
                if diag[j] <= 0:
                    continue
                b = j // block
                s, z = scales[:, b], zeros[:, b]
                want = approx[:, j] - g[:, j] / diag[j]
                q = np.clip(np.round(want / s) + z, 0, top)
                new = ((q - z) * s).astype(np.float32)
                d = new - approx[:, j]
                if not d.any():
                    continue
                codes[:, j] = q.astype(np.uint8)
                approx[:, j] = new
                moved[:, j - i1] = d
                g[:, i1:i2] += np.outer(d, h[j, i1:i2])
            if i1 > 0:
                g[:, :i1] += moved @ h[i1:i2, :i1]
            if i2 < k:
                g[:, i2:] += moved @ h[i1:i2, i2:]
    return codes
