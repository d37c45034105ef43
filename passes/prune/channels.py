"""The records of the channel analysis (groups.py): tracked ids, edit sites, groups,
and the union-find that ties channel ids together; the op families it knows."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

UNARY_ELEMENTWISE = {
    "Relu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Exp", "Log", "Abs", "Neg", "Sqrt", "Erf", "Gelu",
    "Elu", "LeakyRelu", "Selu", "Softplus", "Softsign", "Mish", "Identity", "Cast", "Floor", "Ceil", "Round",
    "Reciprocal", "Sign", "Sin", "Cos", "Celu", "ThresholdedRelu", "Clip", "Dropout",
}
BINARY_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu"}
POOLING = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceProd",
              "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"}


@dataclasses.dataclass
class Tracked:
    """Channel ids along ``axis`` of one tensor (one id per position)."""

    ids: np.ndarray
    axis: int


@dataclasses.dataclass
class Site:
    """Something to edit when channels go: ``kind`` says what.

    source  - node.inputs[index] loses entries along ``axis`` (producer weight / bias)
    sink    - node.inputs[index] loses entries along ``axis`` (consumer weight)
    param   - a per-channel constant (BN statistics, bias, scale) loses entries along ``axis``
    group   - a depthwise conv's ``group`` attribute becomes the kept count
    reshape - entry ``axis`` of a Reshape shape (or Resize sizes) constant becomes the kept count
    slice   - a Slice on the channel axis gets new starts/ends
    split   - a Split on the channel axis gets new sizes
    """

    kind: str
    node: gs.Node
    index: int
    axis: int
    ids: np.ndarray
    extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Group:
    """Classes produced by the same layers; pruned together by allocation."""

    index: int
    classes: np.ndarray  # root ids, one per channel class
    sources: list[str]
    sinks: list[str]
    blocked: dict[int, str]  # root -> reason
    width: int = 1  # channels per class in each producer (an attention head: its head dim)

    @property
    def size(self) -> int:
        return len(self.classes)

    @property
    def prunable(self) -> np.ndarray:
        return np.array([c not in self.blocked for c in self.classes], dtype=bool)

    def reasons(self) -> list[str]:
        return sorted(set(self.blocked.values()))


class UnionFind:
    def __init__(self):
        self.parent: list[int] = []

    def fresh(self, count: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return np.arange(start, start + count, dtype=np.int64)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.array([self.find(int(i)) for i in ids], dtype=np.int64)
