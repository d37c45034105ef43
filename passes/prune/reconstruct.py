"""Refit consumers after pruning so their outputs match the unpruned model (ThiNet / He et al. 2017).

For a consumer (Conv with group 1, Gemm, MatMul) whose input channels were
removed, with X' its input in the *pruned* model (kept channels, im2col patches
for a conv) and Y its output in the *unpruned* model (kept output channels), the
new weights solve the ridge least-squares problem

    min_W,b ||Y - X' W - b||^2 + lam ||[W; b] - [W0; b0]||^2     =>  (X'^T X' + lam I) [W; b] = X'^T Y + lam [W0; b0]

accumulated over calibration samples (normal equations, float64). Using the
pruned model's own X' lets each layer absorb the error of the layers before it.
Rows are spatial positions (or tokens); a seeded subset is used per sample.
Preconditions: the consumer's weight (and bias) are constants; convs use explicit
pads (auto_pad NOTSET); Gemm has transA = 0.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from .calib import iter_outputs, mean_cosine, outputs

ROWS_PER_SAMPLE = 2048
RIDGE = 1e-3
ROWS_PER_UNKNOWN = 4  # refit only with at least this many rows per weight of an output channel


@dataclasses.dataclass
class LayerFit:
    name: str
    error_before: float  # relative squared output error of the sliced weights
    error_after: float


def refit(original, pruned, sinks: dict[str, np.ndarray], feeds: list[dict], seed: int = 0) -> list[LayerFit]:
    """Refit the consumers named in ``sinks`` (name -> kept-output mask) of ``pruned`` in place,
    one at a time in topological order, each on inputs produced by the already refitted layers
    before it (refitting all at once double-corrects: a later layer compensates an error that
    an earlier refit has already removed)."""
    pruned.graph.toposort()
    order = {n.name: i for i, n in enumerate(pruned.graph.nodes)}
    nodes = {n.name: n for n in pruned.graph.nodes}
    layers = [_Layer(nodes[name], out_mask) for name, out_mask in sinks.items() if _supported(nodes.get(name))]
    layers.sort(key=lambda layer: order[layer.node.name])
    if not layers:
        return []
    targets = _targets(original, layers, feeds, np.random.default_rng(seed))
    held_out = max(1, len(feeds) // 4) if len(feeds) > 1 else 0
    held_feeds = feeds[len(feeds) - held_out:]
    reference = outputs(original, held_feeds) if held_out else None
    best = mean_cosine(reference, outputs(pruned, held_feeds)) if held_out else None
    fits = []
    for layer in layers:
        stats = _accumulate(pruned, [layer], feeds, targets, len(feeds) - held_out)
        saved = list(layer.node.inputs)
        before, after = layer.solve(*stats[layer.node.name])
        if after < before and reference is not None:
            # keep a layer's refit only if the model's output on held-out feeds gets closer too
            score = mean_cosine(reference, outputs(pruned, held_feeds))
            if score < best:
                _restore_inputs(layer.node, saved)
                after = before
            else:
                best = score
        fits.append(LayerFit(layer.node.name, before, after))
    return fits


def _restore_inputs(node: gs.Node, saved: list) -> None:
    while len(node.inputs) > len(saved):
        node.inputs.pop()
    for i, tensor in enumerate(saved):
        if node.inputs[i] is not tensor:
            node.inputs[i] = tensor


def _supported(node: gs.Node | None) -> bool:
    if node is None or not isinstance(node.inputs[1], gs.Constant):
        return False
    if node.op == "Conv":
        return int(node.attrs.get("group", 1)) == 1 and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET")
    if node.op == "Gemm":
        return not node.attrs.get("transA", 0) and (len(node.inputs) < 3 or isinstance(node.inputs[2], gs.Constant))
    return node.op == "MatMul" and len(node.inputs[1].shape) == 2


class _Layer:
    """One consumer: turns its input into a design matrix and writes refitted weights back."""

    def __init__(self, node: gs.Node, out_mask: np.ndarray | None):
        self.node = node
        self.out_mask = out_mask
        self.has_bias = node.op != "MatMul"

    # rows ----------------------------------------------------------------------------------
    def pick_rows(self, y: np.ndarray, rng) -> np.ndarray:
        """Row indices into the flattened output positions of one sample."""
        positions = y.size // self._out_channels(y)
        count = min(ROWS_PER_SAMPLE, positions)
        return np.sort(rng.choice(positions, size=count, replace=False))

    def _out_channels(self, y: np.ndarray) -> int:
        return y.shape[1] if self.node.op == "Conv" else y.shape[-1]

    def target_rows(self, y: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if self.node.op == "Conv":
            flat = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
        else:
            flat = y.reshape(-1, y.shape[-1])
        flat = flat[rows]
        return flat[:, self.out_mask] if self.out_mask is not None else flat

    def design_rows(self, x: np.ndarray, y_shape: tuple, rows: np.ndarray) -> np.ndarray:
        if self.node.op != "Conv":
            return x.reshape(-1, x.shape[-1])[rows]
        return self._patches(x, y_shape, rows)

    def _patches(self, x: np.ndarray, y_shape: tuple, rows: np.ndarray) -> np.ndarray:
        w = self.node.inputs[1].values
        kernel = w.shape[2:]
        nd = len(kernel)
        strides = self.node.attrs.get("strides", [1] * nd)
        dilations = self.node.attrs.get("dilations", [1] * nd)
        pads = self.node.attrs.get("pads", [0] * (2 * nd))
        xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
        spatial = y_shape[2:]
        coords = np.unravel_index(rows, (y_shape[0],) + tuple(spatial))
        n = coords[0]
        index = [n.reshape((-1,) + (1,) * (nd + 1)), np.arange(x.shape[1]).reshape((1, -1) + (1,) * nd)]
        for d in range(nd):
            pos = coords[d + 1][:, None] * strides[d] + np.arange(kernel[d])[None, :] * dilations[d]
            shape = [len(rows), 1] + [1] * nd
            shape[2 + d] = kernel[d]
            index.append(pos.reshape(shape))
        return xp[tuple(index)].reshape(len(rows), -1)

    # weights -------------------------------------------------------------------------------
    def current(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(W as [D, Cout], b) of the node now."""
        node, w = self.node, np.asarray(self.node.inputs[1].values, np.float64)
        if node.op == "Conv":
            mat = w.reshape(w.shape[0], -1).T
        elif node.op == "Gemm":
            mat = (w.T if node.attrs.get("transB", 0) else w) * node.attrs.get("alpha", 1.0)
        else:
            mat = w
        return mat, self._bias(mat.shape[1])

    def _bias(self, cout: int) -> np.ndarray | None:
        node = self.node
        if node.op == "MatMul":
            return None
        if len(node.inputs) < 3 or node.inputs[2] is None or not node.inputs[2].name:
            return np.zeros(cout)
        b = np.asarray(node.inputs[2].values, np.float64) * (node.attrs.get("beta", 1.0) if node.op == "Gemm" else 1)
        return np.broadcast_to(b.reshape(-1), (cout,)).copy()

    def solve(self, fit: list, held: list) -> tuple[float, float]:
        """Refit on ``fit`` statistics; keep the new weights only if they also lower the error
        on ``held`` (calibration samples the fit did not see). Returns held-out errors."""
        w, b = self.current()
        old = np.vstack([w, b[None]]) if self.has_bias else w
        gram, cross, energy, rows = fit
        check = held if held[3] else fit
        before = _residual(check[0], check[1], check[2], old)
        if rows < ROWS_PER_UNKNOWN * len(gram):  # e.g. squeeze-excitation convs: one row per image
            return before, before
        # ridge towards the current weights: the refit corrects them rather than replacing them
        ridge = RIDGE * max(float(np.trace(gram)) / len(gram), 1e-12)
        new = np.linalg.solve(gram + ridge * np.eye(len(gram)), cross + ridge * old)
        after = _residual(check[0], check[1], check[2], new)
        if after < before:
            self._write(new)
            return before, after
        return before, before

    def _write(self, solution: np.ndarray) -> None:
        node = self.node
        w = solution[:-1] if self.has_bias else solution
        old = node.inputs[1]
        dtype = old.values.dtype
        if node.op == "Conv":
            values = w.T.reshape(old.shape)
        elif node.op == "Gemm":
            scaled = w / node.attrs.get("alpha", 1.0)
            values = scaled.T if node.attrs.get("transB", 0) else scaled
        else:
            values = w
        node.inputs[1] = gs.Constant(f"{node.name}_weight_refit", np.ascontiguousarray(values.astype(dtype)))
        if self.has_bias:
            bias = solution[-1] / (node.attrs.get("beta", 1.0) if node.op == "Gemm" else 1.0)
            name = f"{node.name}_bias_refit"
            if len(node.inputs) < 3:
                node.inputs.append(gs.Constant(name, bias.astype(dtype)))
            else:
                shape = node.inputs[2].shape if node.inputs[2].name else (len(bias),)
                shape = shape if int(np.prod(shape)) == len(bias) else (len(bias),)
                node.inputs[2] = gs.Constant(name, bias.astype(dtype).reshape(shape))


def _residual(gram, cross, energy, w) -> float:
    err = energy - 2 * float(np.sum(w * cross)) + float(np.sum(w * (gram @ w)))
    return max(err, 0.0) / energy if energy > 0 else 0.0


def _targets(original, layers: list[_Layer], feeds: list[dict], rng) -> list[dict[str, tuple]]:
    """Per sample: layer name -> (rows, target rows, output shape) from the unpruned model."""
    names = [layer.node.outputs[0].name for layer in layers]
    per_sample = []
    for values in iter_outputs(original, feeds, names):
        sample = {}
        for layer in layers:
            y = values[layer.node.outputs[0].name]
            rows = layer.pick_rows(y, rng)
            sample[layer.node.name] = (rows, layer.target_rows(y, rows).astype(np.float64), y.shape)
        per_sample.append(sample)
    return per_sample


def _accumulate(pruned, layers: list[_Layer], feeds: list[dict], targets, fit_samples: int) -> dict[str, tuple]:
    """Per layer: (normal-equation statistics of the first ``fit_samples`` feeds, of the rest)."""
    names = sorted({layer.node.inputs[0].name for layer in layers})
    stats = {layer.node.name: ([0.0, 0.0, 0.0, 0], [0.0, 0.0, 0.0, 0]) for layer in layers}
    for k, (values, sample) in enumerate(zip(iter_outputs(pruned, feeds, names), targets)):
        for layer in layers:
            rows, t, y_shape = sample[layer.node.name]
            phi = layer.design_rows(values[layer.node.inputs[0].name], y_shape, rows).astype(np.float64)
            if layer.has_bias:
                phi = np.hstack([phi, np.ones((len(phi), 1))])
            acc = stats[layer.node.name][0 if k < fit_samples else 1]
            acc[0] = acc[0] + phi.T @ phi
            acc[1] = acc[1] + phi.T @ t
            acc[2] += float(np.sum(t * t))
            acc[3] += len(phi)
    return stats
