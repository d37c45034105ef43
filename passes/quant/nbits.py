"""Block-wise N-bit weight grids and onnxruntime's ``MatMulNBits`` packing (numpy).

Layout (onnxruntime com.microsoft MatMulNBits, 4 bits): an ONNX MatMul weight W is [K, N] (y = x W).
The kernel reads its transpose, one row per output n, cut along K into blocks of ``block`` values
(k_blocks = ceil(K / block); the last block is padded). For each (n, block b):

    w[n, k] ~ (q[n, k] - z[n, b]) * s[n, b],   q in [0, 2^bits - 1]

Symmetric: no zero point input; the kernel's default z = 2^(bits-1) (8 for 4 bits). The grid is then
the signed range [-8, 7] * s; as onnxruntime's own quantizer does, the scale of round-to-nearest is
the block's value of largest magnitude divided by -8 (a signed scale), so that value lands exactly on
code 0 and the other side keeps 7 steps. Asymmetric: s = (max - min) / 15 over a range that always
contains 0, z = round(-min / s) in [0, 15], stored packed two per byte like B.

Packing: B is uint8 [N, k_blocks, block * bits / 8]; value 2i of a block sits in the low nibble of
byte i, value 2i+1 in its high nibble. Padding values are code z (they dequantize to 0).
Here every function works on Wt = W.T ([N, K], a row per output) with codes as uint8 [N, Kpad].
"""
from __future__ import annotations

import numpy as np

BITS = 4
BLOCK_SIZES = (16, 32, 64, 128, 256)


def k_blocks(k: int, block: int) -> int:
    return -(-k // block)


def padded(wt: np.ndarray, block: int) -> np.ndarray:
    """Wt [N, K] zero-padded to [N, k_blocks * block]."""
    n, k = wt.shape
    pad = k_blocks(k, block) * block - k
    return np.pad(wt, ((0, 0), (0, pad))) if pad else wt


def rtn_params(blocks: np.ndarray, symmetric: bool, bits: int = BITS, clip: float | np.ndarray = 1.0
               ) -> tuple[np.ndarray, np.ndarray]:
    """Scale and integer zero point of each row of ``blocks`` [..., block], the range shrunk by ``clip``
    (a number or an array broadcast over the leading dims): round-to-nearest at clip 1."""
    top = 2 ** bits - 1
    if symmetric:
        idx = np.abs(blocks).argmax(-1)[..., None]
        signed_max = np.take_along_axis(blocks, idx, -1)[..., 0]
        scale = signed_max * clip / -(2 ** (bits - 1))
        zero = np.full(scale.shape, 2 ** (bits - 1), np.int32)
    else:
        lo = np.minimum(blocks.min(-1), 0) * clip
        hi = np.maximum(blocks.max(-1), 0) * clip
        scale = (hi - lo) / top
        zero = np.clip(np.round(-lo / np.where(scale == 0, 1, scale)), 0, top).astype(np.int32)
    scale = np.where(scale == 0, 1.0, scale)  # an all-zero block: any scale gives exact zeros
    return scale.astype(np.float32), zero


def quantize_codes(values: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int = BITS) -> np.ndarray:
    """Codes of ``values`` [..., m] on the grids (scale, zero) [...]: round to nearest, saturate."""
    q = np.round(values / scale[..., None]) + zero[..., None]
    return np.clip(q, 0, 2 ** bits - 1).astype(np.uint8)


def dequantize_codes(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    return ((codes.astype(np.float32) - zero[..., None]) * scale[..., None]).astype(np.float32)


def quantize_rtn(wt: np.ndarray, block: int, symmetric: bool, bits: int = BITS, clip=1.0):
    """Round-to-nearest of Wt [N, K]: (codes [N, Kpad], scales [N, kb], zeros [N, kb])."""
    n = wt.shape[0]
    blocks = padded(wt.astype(np.float32), block).reshape(n, -1, block)
    scale, zero = rtn_params(blocks, symmetric, bits, clip)
    codes = quantize_codes(blocks, scale, zero, bits).reshape(n, -1)
    return codes, scale, zero


def dequantize(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, block: int, k: int) -> np.ndarray:
    """Wt [N, K] the codes stand for."""
    n = codes.shape[0]
    w = dequantize_codes(codes.reshape(n, -1, block), scales, zeros).reshape(n, -1)
    return w[:, :k]


def pack(codes: np.ndarray, block: int, bits: int = BITS) -> np.ndarray:
    """MatMulNBits B: uint8 [N, k_blocks, block * bits / 8] from codes [N, Kpad] (4 bits: 2 per byte)."""
    if bits != 4:
        raise ValueError("only 4-bit packing is implemented")
    n = codes.shape[0]
    pairs = codes.reshape(n, -1, block // 2, 2).astype(np.uint8)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)


def unpack(b: np.ndarray) -> np.ndarray:
    """Codes [N, Kpad] from a 4-bit B [N, k_blocks, blob]."""
    low, high = b & 0x0F, b >> 4
    return np.stack([low, high], -1).reshape(b.shape[0], -1)


def pack_zero_points(zeros: np.ndarray, bits: int = BITS) -> np.ndarray:
    """uint8 [N, ceil(k_blocks / 2)]: the zero points packed like B (an odd count padded with 0)."""
    n, kb = zeros.shape
    z = np.pad(zeros.astype(np.uint8), ((0, 0), (0, kb % 2)))
    return (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)


def search_params(blocks: np.ndarray, importance: np.ndarray, symmetric: bool, bits: int = BITS,
                  grid: int = 20, shrink: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per block, the grid among clip ratios in [shrink, 1] (and, symmetric, either orientation of the
    signed range: the largest magnitude on code 0 or on code 15) minimizing sum_k importance_k (w_k - w^_k)^2,
    the block's share of the layer's output error when importance is diag(X^T X) (uniform: plain MSE).

    ``blocks`` [N, kb, block], ``importance`` [kb, block] (0 on padding). Returns (scales, zeros) [N, kb]."""
    best_err = best_scale = best_zero = None
    orientations = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (None,)
    for clip in np.linspace(shrink, 1.0, grid + 1):
        for divisor in orientations:
            scale, zero = rtn_params(blocks, symmetric, bits, clip)
            if divisor is not None and divisor > 0:  # the largest magnitude on +7 steps instead of -8
                scale = (scale * -(2 ** (bits - 1)) / divisor).astype(np.float32)
            codes = quantize_codes(blocks, scale, zero, bits)
            err = (((dequantize_codes(codes, scale, zero) - blocks) ** 2) * importance).sum(-1)
            if best_err is None:
                best_err, best_scale, best_zero = err, scale, zero
                continue
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, scale, best_scale)
            best_zero = np.where(better, zero, best_zero)
    return best_scale.astype(np.float32), best_zero.astype(np.int32)


def block_importance(diag: np.ndarray | None, k: int, block: int) -> np.ndarray:
    """[kb, block] weights for ``search_params``: diag(X^T X) (ones without data), 0 on padding."""
    values = np.ones(k) if diag is None else np.maximum(np.asarray(diag, np.float64), 0)
    return np.pad(values, (0, k_blocks(k, block) * block - k)).reshape(-1, block).astype(np.float32)


def quantize_searched(wt: np.ndarray, block: int, symmetric: bool, diag: np.ndarray | None = None,
                      bits: int = BITS):
    """Round to nearest on the per-block grids ``search_params`` picks: (codes, scales, zeros)."""
    n, k = wt.shape
    blocks = padded(wt.astype(np.float32), block).reshape(n, -1, block)
    importance = block_importance(diag, k, block)
    scale, zero = search_params(blocks, importance, symmetric, bits)
    return quantize_codes(blocks, scale, zero, bits).reshape(n, -1), scale, zero
