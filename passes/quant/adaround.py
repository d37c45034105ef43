"""Learned rounding of one layer's INT8 weights (AdaRound, Nagel et al. 2020), in numpy.

A layer y = W x + b quantized per output channel stores codes q with W~ = s (q - z). Nearest rounding
q = clip(round(W / s) + z, qmin, qmax) minimises each weight's own error, not the layer's output error:
with correlated inputs the errors of neighbouring weights add up. AdaRound chooses, per weight, the
floor or the ceiling of W / s:

    q(V) = clip(floor(W / s) + z + h(V), qmin, qmax),  h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)

(the rectified sigmoid, zeta = 1.1, gamma = -0.1: h reaches 0 and 1 exactly) and minimises over V

    L(V) = ||Yf - Xq E(V)^T||^2 / L_nearest  +  lambda * mean(1 - |2 h(V) - 1|^beta)

with E(V) = s (q(V) - z), Xq [n, K] the layer's inputs as the quantized model gives them, Yf = Xf W^T the
float layer's outputs on its own inputs (the teacher). Dividing by the nearest rounding's loss makes lambda
independent of the layer's scale. The regulariser is off for the first ``warmup`` of the iterations, then
beta anneals linearly from 20 to 2, which drives every h to 0 or 1; the codes are floor + (h >= 0.5).
Optimiser: Adam on V, a fixed number of iterations, no randomness: V starts where h(V) is the fractional
part of W / s (the unrounded weight), so two runs give the same codes.

Only second moments of the samples are needed (``Moments``): with H = Xq^T Xq / n and P = Yf^T Xq / n,

    ||Yf - Xq E^T||^2 / n = tr(E H E^T) - 2 tr(E P^T) + tr(Yf^T Yf) / n,   gradient 2 (E H - P).

Bias refit (distillation of the float layer at the layer): given E, the bias minimising the error is
b' = b + mean(Yf) - E mean(xq); with it the error is the centred one, so a layer with a bias is optimised
on the centred moments (H - mu_q mu_q^T, P - mu_y mu_q^T) and refit afterwards. A grouped convolution is
G independent problems: H [G, K, K], W [G, O/G, K]. With fewer samples than inputs (n < K / 2: late,
low-resolution layers) H = F^T F with F = Xq / sqrt(n) [G, n, K] is used as the product E F^T F, which
costs n/K of E H per iteration.
"""
from __future__ import annotations

import dataclasses

import numpy as np

ZETA, GAMMA = 1.1, -0.1
ITERATIONS = 300
LEARNING_RATE = 0.05
REGULARIZATION = 3.0  # on the nearest-normalised loss; 0.01..30 measured on correlated inputs: 1..30 best
WARMUP = 0.2
BETA = (20.0, 2.0)
_ADAM = (0.9, 0.999, 1e-8)


@dataclasses.dataclass
class Moments:
    """Sums over n samples of one layer: xx = Xq^T Xq [G, K, K], yx = Yf^T Xq [G, Og, K], x [G, K],
    y [G, Og], yy (sum of Yf^2) [G, Og]; accumulated in float64."""

    xx: np.ndarray
    yx: np.ndarray
    x: np.ndarray
    y: np.ndarray
    yy: np.ndarray
    n: int = 0
    rows: list | None = dataclasses.field(default_factory=list)  # the xq samples while n <= K

    @classmethod
    def zeros(cls, groups: int, per_group: int, k: int) -> "Moments":
        return cls(np.zeros((groups, k, k)), np.zeros((groups, per_group, k)), np.zeros((groups, k)),
                   np.zeros((groups, per_group)), np.zeros((groups, per_group)))

    def add(self, xq: np.ndarray, yf: np.ndarray) -> None:
        """xq [P, G, K] samples of the quantized input, yf [P, G, Og] the float outputs at them."""
        xg = np.ascontiguousarray(xq.transpose(1, 0, 2), dtype=np.float32)  # [G, P, K]
        yg = np.ascontiguousarray(yf.transpose(1, 0, 2), dtype=np.float32)  # [G, P, Og]
        self.xx += np.matmul(xg.transpose(0, 2, 1), xg)  # float32 products of one batch, summed in float64
        self.yx += np.matmul(yg.transpose(0, 2, 1), xg)
        self.x += xg.sum(axis=1, dtype=np.float64)
        self.y += yg.sum(axis=1, dtype=np.float64)
        self.yy += np.square(yg, dtype=np.float64).sum(axis=1)
        self.n += xq.shape[0]
        if self.rows is not None:
            self.rows = self.rows + [xg] if self.n <= self.xx.shape[1] else None

    def factor(self, centred: bool) -> np.ndarray | None:
        """F [G, n, K] with F^T F = H (``normalized``'s), while the samples are kept (n <= K)."""
        if not self.rows:
            return None
        x = np.concatenate(self.rows, axis=1).astype(np.float64)
        if centred:
            x = x - x.mean(axis=1, keepdims=True)
        return (x / np.sqrt(max(self.n, 1))).astype(np.float32)

    def normalized(self, centred: bool) -> tuple[np.ndarray, np.ndarray, float]:
        """(H, P, c): the loss of E is tr(E H E^T) - 2 tr(E P^T) + c per sample, summed over outputs."""
        n = max(self.n, 1)
        h, p, yy = self.xx / n, self.yx / n, self.yy / n
        if centred:
            mx, my = self.x / n, self.y / n
            h = h - mx[:, :, None] * mx[:, None, :]
            p = p - my[:, :, None] * mx[:, None, :]
            yy = yy - my * my
        return h, p, float(yy.sum())


def layer_loss(e: np.ndarray, h: np.ndarray, p: np.ndarray, c: float) -> float:
    """Mean squared output error per sample, summed over outputs, of the weights ``e`` [G, Og, K]."""
    e = e.astype(np.float64)
    return float(np.sum(np.matmul(e, h) * e) - 2.0 * np.sum(e * p) + c)


def nearest_codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    return np.clip(np.rint(w / scale) + zero, qmin, qmax).astype(np.int32)


def rectified_sigmoid(v: np.ndarray) -> np.ndarray:
    return np.clip(_sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * v))  # no overflow warnings for large |v|


def learn_codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmin: int, qmax: int,
                h: np.ndarray, p: np.ndarray, c: float, *, iterations: int = ITERATIONS,
                learning_rate: float = LEARNING_RATE, regularization: float = REGULARIZATION,
                warmup: float = WARMUP, beta: tuple[float, float] = BETA, factor: np.ndarray | None = None) -> np.ndarray:
    """Learned codes [G, Og, K] (int32) for w [G, Og, K] with scale, zero [G, Og, 1] and the layer's
    moments (H, P, c from ``Moments.normalized``; ``factor`` F with F^T F = H, when cheaper); see the
    module docstring."""
    w = np.asarray(w, np.float32)
    scale = np.asarray(scale, np.float32)
    ratio = w / scale
    base = np.floor(ratio) + zero  # the floor's code; h adds 0 or 1
    rest = np.clip(ratio - np.floor(ratio), 1e-4, 1 - 1e-4)
    v = -np.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0).astype(np.float32)  # h(v) == rest
    hf, pf = h.astype(np.float32), p.astype(np.float32)
    ft = None if factor is None else np.ascontiguousarray(factor.transpose(0, 2, 1))
    nearest = nearest_codes(w, scale, zero, qmin, qmax)
    norm = max(layer_loss(scale * (nearest - zero), h, p, c), 1e-12 * max(c, 1e-30), 1e-30)
    count = v.size
    m, s2 = np.zeros_like(v), np.zeros_like(v)
    b1, b2, eps = _ADAM
    start = int(round(warmup * iterations))
    for t in range(1, iterations + 1):
        sig = _sigmoid(v)
        raw = sig * (ZETA - GAMMA) + GAMMA
        soft = np.clip(raw, 0.0, 1.0)
        q = base + soft
        inside = (q >= qmin) & (q <= qmax)
        e = scale * (np.clip(q, qmin, qmax) - zero)
        eh = np.matmul(e, hf) if ft is None else np.matmul(np.matmul(e, ft), factor)
        grad_e = (2.0 / norm) * (eh - pf)
        grad_h = grad_e * scale * inside
        if t > start:
            b = beta[0] + (beta[1] - beta[0]) * (t - start) / max(iterations - start, 1)
            u = 2.0 * soft - 1.0
            # d/dh of 1 - |2h - 1|^b
            grad_h = grad_h - (regularization / count) * 2.0 * b * np.sign(u) * np.abs(u) ** (b - 1.0)
        grad = grad_h * ((raw > 0) & (raw < 1)) * sig * (1.0 - sig) * (ZETA - GAMMA)
        m = b1 * m + (1 - b1) * grad
        s2 = b2 * s2 + (1 - b2) * grad * grad
        step = float(learning_rate * np.sqrt(1 - b2 ** t) / (1 - b1 ** t))  # a float: keeps V float32
        v = v - step * m / (np.sqrt(s2) + eps)
    return np.clip(base + (rectified_sigmoid(v) >= 0.5), qmin, qmax).astype(np.int32)
