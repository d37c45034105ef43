"""Small models, feed folders and worker stand-ins for the fleet and data-parallel tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxforge.workers import Workers


def conv_model(seed: int = 0) -> onnx.ModelProto:
    """x[1,4,8,8] -> Conv -> Relu -> Conv -> Sigmoid -> y."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((8, 8, 1, 1)) * 0.3).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
             helper.make_node("Sigmoid", ["c2"], ["y"], name="sig")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def feed_folder(folder: Path, n: int, seed: int = 1, name: str = "x", shape=(1, 4, 8, 8)) -> Path:
    """``n`` .npz feeds whose scales differ (so shards see different ranges)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        np.savez(folder / f"{i:04d}.npz", **{name: (rng.standard_normal(shape) * (0.3 + i)).astype(np.float32)})
    return folder


class ShardedInProcess(Workers):
    """In-process, but claims ``n`` workers: the sharded code paths without spawning."""

    def __init__(self, n: int):
        self.n, self.calls = n, []

    def run(self, fn, items, common=None):
        self.calls.append(fn.__name__)
        return super().run(fn, items, common)

    @property
    def count(self) -> int:
        return self.n


def same_histograms(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].edge == b[k].edge and a[k].minimum == b[k].minimum and a[k].maximum == b[k].maximum
        and np.array_equal(a[k].counts, b[k].counts) for k in a)
