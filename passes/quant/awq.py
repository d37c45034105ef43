"""AWQ-style activation-aware scaling (Lin et al. 2023) for block-wise INT4 weights, in numpy.

x W = (x / s) (diag(s) W) exactly, for any positive per-input-channel s. Scaling up the rows of W
that meet large activations gives them a finer share of their block's grid; the input then carries
1/s (folded into the op before it, or a Mul: the rules in ``int4_rules.py``). AWQ searches
s = a^alpha, a the channel's activation magnitude (here its RMS, sqrt(diag H)), over alpha in [0, 1],
normalized so that sqrt(max s * min s) = 1, and keeps the alpha whose quantized layer is closest to
the float one on the calibration inputs. That distance needs no activations: with H = X^T X / n
the output error of the weights W^ = diag(1/s) Q(diag(s) W) is tr((W^ - W)^T H (W^ - W)), summed over
every matrix that reads the same input (q/k/v, gate/up), since they share one s.
alpha = 0 is s = 1, plain quantization, so the search never returns something worse than no scaling
(on the calibration inputs).
"""
from __future__ import annotations

import numpy as np

from .nbits import BITS, dequantize, quantize_rtn

GRID = 20


def awq_scale(wts: list[np.ndarray], hessian: np.ndarray, block: int, symmetric: bool, *, bits: int = BITS,
              grid: int = GRID) -> tuple[np.ndarray, float, float, float]:
    """Per-input-channel scale s [K] for the matrices ``wts`` (each Wt [N_i, K]) that read one input
    whose second moment is ``hessian`` [K, K]. Returns (s, alpha, error at alpha 0, error at alpha)."""
    h = np.asarray(hessian, np.float32)
    k = h.shape[0]
    magnitude = np.sqrt(np.maximum(np.diag(h), 0)).astype(np.float64)
    floor = magnitude[magnitude > 0].min() if (magnitude > 0).any() else 1.0
    magnitude = np.maximum(magnitude, floor)
    best = None
    plain = None
    for alpha in np.linspace(0.0, 1.0, grid + 1):
        s = magnitude ** alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        err = sum(_error(wt, s, h, block, symmetric, bits, k) for wt in wts)
        if plain is None:
            plain = err
        if best is None or err < best[0]:
            best = (err, float(alpha), s)
    err, alpha, s = best
    return s, alpha, plain, err


def _error(wt: np.ndarray, s: np.ndarray, h: np.ndarray, block: int, symmetric: bool, bits: int, k: int) -> float:
    codes, scales, zeros = quantize_rtn(wt * s[None, :], block, symmetric, bits)
    d = dequantize(codes, scales, zeros, block, k) / s[None, :] - wt
    return float(np.einsum("nk,nk->", d @ h, d))
