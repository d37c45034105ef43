"""What the QDQ rules share: the DequantizeLinear behind a tensor, per-tensor u8 grids,
fresh names and small constants."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.matching import DEFAULT_DOMAINS, producer


def activation_dq(tensor: gs.Tensor) -> gs.Node | None:
    """The DequantizeLinear making ``tensor`` from an activation (not a constant), or None."""
    dq = producer(tensor, "DequantizeLinear")
    ok = dq is not None and dq.domain in DEFAULT_DOMAINS and not isinstance(dq.inputs[0], gs.Constant)
    return dq if ok else None


def scalar_u8_grid(qdq: gs.Node) -> bool:
    """A Q/DQ with a constant float32 scalar scale and a constant u8 zero point (per tensor)."""
    if len(qdq.inputs) < 3:
        return False
    scale, zero = qdq.inputs[1], qdq.inputs[2]
    return (isinstance(scale, gs.Constant) and isinstance(zero, gs.Constant) and np.asarray(zero.values).dtype == np.uint8
            and np.asarray(scale.values).dtype == np.float32 and np.asarray(scale.values).size == 1)


def grid(qdq: gs.Node) -> tuple[float, int]:
    """(scale, zero point) of a per-tensor Q/DQ (scalar_u8_grid holds)."""
    return float(np.asarray(qdq.inputs[1].values).reshape(-1)[0]), int(np.asarray(qdq.inputs[2].values).reshape(-1)[0])


def fresh_name(graph: gs.Graph, stem: str) -> str:
    taken = set(graph.tensors().keys()) | {n.name for n in graph.nodes}
    name, i = stem, 0
    while name in taken:
        i += 1
        name = f"{stem}_{i}"
    return name


def i64(name: str, values) -> gs.Constant:
    return gs.Constant(name, np.array(values, dtype=np.int64))
