"""Structure matching shared by the attention fusions.

Every exporter writes scaled dot-product attention as some arrangement of

    Q4 = Transpose(Reshape(q3, [B, S, N, D]), perm=[0, 2, 1, 3])        (BNSH)
    K4 = Transpose(Reshape(k3, [B, T, N, D]), ...) and transposed to BNDT
    P  = Softmax(scale * MatMul(Q4, K4^T) [+ bias], axis=-1)
    y  = Reshape(Transpose(MatMul(P, V4), [0, 2, 1, 3]), [B, S, N*D])

with the scale split over Q, K and the scores, casts around the softmax, and
the dynamo exporter's NaN guard ``Where(IsNaN(P), 0, P)``. The helpers here walk
back from the Softmax and describe what they find (tensors, nodes, constants);
they never change the graph. Whether the description is exact is decided by the
rules' ``check`` in ``attention.py``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import onnx_graphsurgeon as gs

from onnxforge.passes.shape_vectors import Piece, shape_entries

from ._match import const_ints, const_value, is_const, producer, scalar



def perm_of(node: gs.Node | None) -> tuple[int, ...] | None:
    if node is None or node.op != "Transpose":
        return None
    return tuple(int(p) for p in node.attrs.get("perm", ()))


# ------------------------------------------------------------------- head split

@dataclasses.dataclass
class HeadSplit:
    """``Transpose(Reshape(x3, [B, S, N, D]), perm)``: a [B, S, N*D] tensor split into heads."""

    x3: gs.Tensor
    reshape: gs.Node
    transpose: gs.Node
    entries: list[Any] | None

    @property
    def nodes(self) -> list[gs.Node]:
        return [self.transpose, self.reshape]

    @property
    def head_size(self) -> int | None:
        if self.entries is None or len(self.entries) != 4 or not isinstance(self.entries[3], int):
            return None
        return self.entries[3] if self.entries[3] > 0 else None

    def num_heads(self) -> int | None:
        """N from the reshape constant, or hidden/D when the constant is -1."""
        if self.head_size is None:
            return None
        heads = self.entries[2]
        if isinstance(heads, int) and heads > 0:
            return heads
        if heads == -1:
            hidden = last_dim(self.x3)
            if hidden is not None and hidden % self.head_size == 0:
                return hidden // self.head_size
        return None

    def keeps_batch_and_sequence(self) -> bool:
        """The first two reshape entries are x3's own batch and sequence dims."""
        if self.entries is None or len(self.entries) != 4:
            return False
        allow_zero = int(self.reshape.attrs.get("allowzero", 0))
        free = sum(1 for e in self.entries if e == -1)
        for position, entry in enumerate(self.entries[:2]):
            if entry == -1 or (entry == 0 and not allow_zero):
                continue
            if not (isinstance(entry, Piece) and entry.is_dim(None, position)):
                return False
        return free <= 1


def head_split(tensor: gs.Tensor, perm: tuple[int, ...]) -> HeadSplit | None:
    transpose = producer(tensor, "Transpose")
    if perm_of(transpose) != perm:
        return None
    reshape = producer(transpose.inputs[0], "Reshape")
    if reshape is None:
        return None
    return HeadSplit(reshape.inputs[0], reshape, transpose, shape_entries(reshape.inputs[1], const_ints, 3))


def last_dim(tensor: gs.Tensor) -> int | None:
    """The static last dim of a projection output, from its weights, bias or split sizes."""
    if tensor.shape and isinstance(tensor.shape[-1], int):
        return int(tensor.shape[-1])
    node = producer(tensor)
    if node is None:
        return None
    if node.op in ("MatMul", "Gemm"):
        weight = node.inputs[1]
        if isinstance(weight, gs.Constant) or is_const(weight):
            shape = weight.shape or const_value(weight).shape
            transposed = node.op == "Gemm" and node.attrs.get("transB", 0)
            return int(shape[0] if transposed else shape[-1])
    if node.op == "Add":
        for operand in node.inputs:
            if is_const(operand) and (operand.shape or ()) and operand.shape[-1] != 1:
                return int(operand.shape[-1])
        return next((d for d in map(last_dim, node.inputs) if d is not None), None)
    if node.op in ("Mul", "Div", "Cast", "Identity"):
        return last_dim(node.inputs[0])
    if node.op == "Split":
        sizes = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        axis = int(node.attrs.get("axis", 0))
        if sizes is not None and axis in (-1, 2):
            return int(sizes.reshape(-1)[node.outputs.index(tensor)])
    if node.op == "Reshape":
        entries = shape_entries(node.inputs[1], const_ints, 3)
        if entries and isinstance(entries[-1], int) and entries[-1] > 0:
            return entries[-1]
    return None


# ------------------------------------------------------------------- the block

@dataclasses.dataclass
class ScaleFactor:
    node: gs.Node
    factor: gs.Tensor
    divide: bool


def peel_scales(tensor: gs.Tensor, stop_ops: tuple[str, ...] = ()) -> tuple[gs.Tensor, list[ScaleFactor]]:
    """Walk up through Mul/Div by a factor tensor; returns the scaled tensor and the factors."""
    factors: list[ScaleFactor] = []
    while True:
        node = producer(tensor, "Mul", "Div")
        if node is None:
            return tensor, factors
        a, b = node.inputs
        if node.op == "Div" or _looks_like_factor(b, stop_ops):
            main, factor = a, b
        elif _looks_like_factor(a, stop_ops):
            main, factor = b, a
        else:
            return tensor, factors
        factors.append(ScaleFactor(node, factor, node.op == "Div"))
        tensor = main


def _looks_like_factor(tensor: gs.Tensor, stop_ops: tuple[str, ...]) -> bool:
    if is_const(tensor):
        return True
    node = producer(tensor)
    return node is None or node.op not in ("MatMul", "Transpose", "Reshape", "Add", "Concat") + stop_ops


def scale_value(factors: list[ScaleFactor]) -> float | None:
    """The product of the scalar factors, or None when one is not a constant scalar."""
    total = 1.0
    for f in factors:
        value = scalar(f.factor)
        if value is None or value == 0:
            return None
        total = total / value if f.divide else total * value
    return total


@dataclasses.dataclass
class KeyTranspose:
    """How K reaches the scores MatMul as BNDT: the BNSH tensor and the nodes in between."""

    k4: gs.Tensor
    nodes: list[gs.Node]
    form: str  # "direct" (perm 0,2,3,1 on the reshape), "swap" (perm 0,1,3,2), "reshape" (dynamo)
    split: HeadSplit | None  # for "direct": the reshape whose transpose goes straight to BNDT


def key_transpose(tensor: gs.Tensor) -> KeyTranspose | None:
    direct = head_split(tensor, (0, 2, 3, 1))
    if direct is not None:
        return KeyTranspose(tensor, direct.nodes, "direct", direct)
    swap = producer(tensor, "Transpose")
    if perm_of(swap) == (0, 1, 3, 2):
        return KeyTranspose(swap.inputs[0], [swap], "swap", None)
    outer = producer(tensor, "Reshape")
    middle = producer(outer.inputs[0], "Transpose") if outer is not None else None
    inner = producer(middle.inputs[0], "Reshape") if perm_of(middle) == (0, 2, 1) else None
    if inner is None:
        return None
    k4 = inner.inputs[0]
    inner_entries = shape_entries(inner.inputs[1], const_ints)
    outer_entries = shape_entries(outer.inputs[1], const_ints)
    want_inner = [-1, Piece.dim(k4, 2), Piece.dim(k4, 3)]
    want_outer = [Piece.dim(k4, 0), Piece.dim(k4, 1), Piece.dim(k4, 3), Piece.dim(k4, 2)]
    if not (_same_entries(inner_entries, want_inner) and _same_entries(outer_entries, want_outer)):
        return None
    return KeyTranspose(k4, [outer, middle, inner], "reshape", None)


def _same_entries(got: list[Any] | None, want: list[Any]) -> bool:
    if got is None or len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if isinstance(w, Piece):
            if not (isinstance(g, Piece) and g.is_dim(w.source, w.start)):
                return False
        elif g != w:
            return False
    return True


@dataclasses.dataclass
class Core:
    """Softmax(scale * Q4 K4^T + bias) V4 followed by the merge of heads."""

    softmax: gs.Node
    scores_matmul: gs.Node
    context_matmul: gs.Node
    q4: gs.Tensor
    key: KeyTranspose
    v4: gs.Tensor
    factors: list[ScaleFactor]  # on the scores and on Q4/K4^T in BNSH
    bias: gs.Tensor | None
    bias_add: gs.Node | None
    between: list[gs.Node]  # casts and NaN guard between Softmax and the context MatMul
    nan_guard: bool
    merge_transpose: gs.Node
    merge_reshape: gs.Node

    @property
    def output(self) -> gs.Tensor:
        return self.merge_reshape.outputs[0]

    @property
    def nodes(self) -> list[gs.Node]:
        return ([self.softmax, self.scores_matmul, self.context_matmul, self.merge_transpose,
                 self.merge_reshape] + [f.node for f in self.factors] + self.key.nodes + self.between
                + ([self.bias_add] if self.bias_add is not None else []))


def _after_softmax(softmax: gs.Node) -> tuple[gs.Node, list[gs.Node], bool] | None:
    """The context MatMul fed by the softmax, through float Casts and the dynamo NaN guard."""
    tensor, between, guard = softmax.outputs[0], [], False
    for _ in range(4):
        users = tensor.outputs
        if len(users) == 1 and users[0].op == "MatMul" and users[0].inputs[0] is tensor:
            return users[0], between, guard
        if len(users) == 1 and users[0].op == "Cast":
            between.append(users[0])
            tensor = users[0].outputs[0]
            continue
        if len(users) == 2 and {u.op for u in users} == {"IsNaN", "Where"}:
            isnan = next(u for u in users if u.op == "IsNaN")
            where = next(u for u in users if u.op == "Where")
            zero = scalar(where.inputs[1])
            if where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not tensor or zero != 0.0:
                return None
            between += [isnan, where]
            guard = True
            tensor = where.outputs[0]
            continue
        return None
    return None


def match_core(softmax: gs.Node) -> Core | None:
    """Describe the attention block around ``softmax``; None if it is not one."""
    after = _after_softmax(softmax)
    if after is None:
        return None
    context, between, guard = after
    merge_t = context.outputs[0].outputs[0] if len(context.outputs[0].outputs) == 1 else None
    if perm_of(merge_t) != (0, 2, 1, 3):
        return None
    # Shape users only compute the merge Reshape's target; they die with it.
    users = [u for u in merge_t.outputs[0].outputs if u.op != "Shape"]
    if len(users) != 1 or users[0].op != "Reshape":
        return None
    merge_r = users[0]

    scores, bias, bias_add = softmax.inputs[0], None, None
    add = producer(scores, "Add")
    if add is not None:
        a, b = add.inputs
        if producer(a, "MatMul", "Mul", "Div") and _reaches_matmul(a):
            scores, bias = a, b
        elif producer(b, "MatMul", "Mul", "Div") and _reaches_matmul(b):
            scores, bias = b, a
        else:
            return None
        bias_add = add
    raw, factors = peel_scales(scores)
    matmul = producer(raw, "MatMul")
    if matmul is None:
        return None
    q4, q_factors = peel_scales(matmul.inputs[0])
    kt, k_factors = peel_scales(matmul.inputs[1])
    key = key_transpose(kt)
    if key is None:
        return None
    return Core(softmax, matmul, context, q4, key, context.inputs[1], factors + q_factors + k_factors,
                bias, bias_add, between, guard, merge_t, merge_r)


def _reaches_matmul(tensor: gs.Tensor) -> bool:
    raw, _ = peel_scales(tensor)
    return producer(raw, "MatMul") is not None


def merge_entries(core: Core) -> list[Any] | None:
    return shape_entries(core.merge_reshape.inputs[1], const_ints, 4)


def merges_heads(core: Core, num_heads: int, head_size: int) -> bool:
    """The final Reshape gives [B, S, N*D] (last entry N*D or -1, batch/sequence kept)."""
    entries = merge_entries(core)
    if entries is None or len(entries) != 3:
        return False
    allow_zero = int(core.merge_reshape.attrs.get("allowzero", 0))
    if entries[2] not in (-1, num_heads * head_size):
        return False
    for position, entry in enumerate(entries[:2]):
        if entry == -1 and entries[2] != -1:
            continue
        if entry == 0 and not allow_zero:
            continue
        if not (isinstance(entry, Piece) and entry.is_dim(None, position)):
            return False
    return True
