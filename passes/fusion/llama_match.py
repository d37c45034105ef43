"""Structure matching of Llama's attention pieces, for the GroupQueryAttention rules
(attention_gqa.py, attention_gqa_cache.py): rotate_half rotary (``x4 * cos + Concat(-x4[..., h:],
x4[..., :h]) * sin``), repeat_kv (``Reshape(Expand(Unsqueeze(k4, 2), [B, Nkv, r, T, D]))``), and
the small integer evaluator over Shape(x4) their Slice bounds need. The identities and the
preconditions they serve are in attention_gqa.py's docstring.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.shape_vectors import INT64_MAX, Piece, shape_entries

from ._match import const_ints, const_value, either_order, producer, scalar
from .attention import is_scalar_constant


# ------------------------------------------------------------------ small evaluator

def eval_int(tensor: gs.Tensor, x4: gs.Tensor, head_size: int) -> int | None:
    """Value of a scalar/1-element integer expression over Shape(x4) (x4 has last dim ``head_size``)."""
    value = const_value(tensor)
    if value is not None:
        return int(value.reshape(-1)[0]) if value.size == 1 else None
    node = producer(tensor)
    if node is None:
        return None
    if node.op in ("Unsqueeze", "Cast", "Squeeze", "Identity"):
        return eval_int(node.inputs[0], x4, head_size)
    if node.op == "Gather":
        shape = producer(node.inputs[0], "Shape")
        index = scalar(node.inputs[1])
        if shape is None or shape.inputs[0] is not x4 or shape.attrs or index is None:
            return None
        return head_size if int(index) in (3, -1) else None
    if node.op in ("Div", "Mul", "Add", "Sub"):
        a, b = (eval_int(t, x4, head_size) for t in node.inputs)
        if a is None or b is None:
            return None
        if node.op == "Div":
            return a // b if b else None
        return {"Mul": a * b, "Add": a + b, "Sub": a - b}[node.op]
    return None


# ------------------------------------------------------------------ rotary

@dataclasses.dataclass
class Rotary:
    x4: gs.Tensor
    cos: gs.Tensor  # [B|1, S, D] before the Unsqueeze over heads
    sin: gs.Tensor
    first_half: gs.Node
    second_half: gs.Node
    nodes: list[gs.Node]


def _unsqueezed_heads(tensor: gs.Tensor) -> gs.Tensor | None:
    """``Unsqueeze(t, axes=[1])`` -> t."""
    node = producer(tensor, "Unsqueeze")
    if node is None:
        return None
    axes = const_value(node.inputs[1]) if len(node.inputs) > 1 else np.array(node.attrs.get("axes", []))
    return node.inputs[0] if axes is not None and axes.reshape(-1).tolist() == [1] else None


def _split_mul(node: gs.Node | None, x: gs.Tensor | None = None):
    """Mul(a, b) -> (main, factor) with main == x when x is given, else the non-Unsqueeze operand."""
    if node is None or node.op != "Mul":
        return None
    for main, factor in either_order(node):
        if (x is not None and main is x) or (x is None and producer(main, "Concat")):
            return main, factor
    return None


def match_rotary(tensor: gs.Tensor) -> Rotary | None:
    add = producer(tensor, "Add")
    if add is None:
        return None
    for direct_t, rotated_t in either_order(add):
        rot_mul = producer(rotated_t, "Mul")
        rot = _split_mul(rot_mul)
        if rot is None:
            continue
        concat = producer(rot[0], "Concat")
        if concat is None or len(concat.inputs) != 2 or int(concat.attrs.get("axis", 0)) not in (-1, 3):
            continue
        neg = producer(concat.inputs[0], "Neg")
        second = producer(neg.inputs[0], "Slice") if neg is not None else None
        first = producer(concat.inputs[1], "Slice")
        if second is None or first is None or second.inputs[0] is not first.inputs[0]:
            continue
        x4 = first.inputs[0]
        direct_mul = producer(direct_t, "Mul")
        direct = _split_mul(direct_mul, x4)
        if direct is None:
            continue
        cos, sin = _unsqueezed_heads(direct[1]), _unsqueezed_heads(rot[1])
        if cos is None or sin is None:
            continue
        # The cos/sin Unsqueezes are shared by every layer: inputs of the block, not part of it.
        nodes = [add, rot_mul, direct_mul, concat, neg, first, second]
        return Rotary(x4, cos, sin, first, second, nodes)
    return None


def slices_halves(rotary: Rotary, head_size: int) -> bool:
    """first = x[..., 0:D/2], second = x[..., D/2:] along the last axis."""
    half = head_size // 2

    def bounds(node):
        starts, ends = (eval_int(t, rotary.x4, head_size) for t in node.inputs[1:3])
        axes = const_value(node.inputs[3]) if len(node.inputs) > 3 else None
        steps = const_value(node.inputs[4]) if len(node.inputs) > 4 else None
        if axes is None or axes.reshape(-1).tolist() not in ([3], [-1]):
            return None
        if steps is not None and steps.reshape(-1).tolist() != [1]:
            return None
        return starts, ends

    first, second = bounds(rotary.first_half), bounds(rotary.second_half)
    if first is None or second is None or head_size % 2:
        return False
    return first[0] == 0 and first[1] == half and second[0] == half and second[1] is not None \
        and (second[1] >= head_size or second[1] == INT64_MAX)


def halves_equal(tensor: gs.Tensor) -> bool:
    """tensor = elementwise f(Concat(a, a)) along the last axis, so both halves are equal."""
    for _ in range(8):
        node = producer(tensor)
        if node is None:
            return False
        if node.op == "Concat":
            return (len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]
                    and int(node.attrs.get("axis", 0)) == -1)
        if node.op in ("Cos", "Sin", "Cast", "Identity"):
            tensor = node.inputs[0]
        elif node.op in ("Mul", "Div") and is_scalar_constant(node.inputs[1]):
            tensor = node.inputs[0]
        elif node.op == "Mul" and is_scalar_constant(node.inputs[0]):
            tensor = node.inputs[1]
        else:
            return False
    return False


# ------------------------------------------------------------------ repeat_kv

@dataclasses.dataclass
class Repeat:
    x4: gs.Tensor
    expand: gs.Node
    reshape: gs.Node
    nodes: list[gs.Node]


def match_repeat(tensor: gs.Tensor) -> Repeat | None:
    reshape = producer(tensor, "Reshape")
    expand = producer(reshape.inputs[0], "Expand") if reshape is not None else None
    unsqueeze = producer(expand.inputs[0], "Unsqueeze") if expand is not None else None
    if unsqueeze is None:
        return None
    axes = const_value(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else np.array(unsqueeze.attrs.get("axes", []))
    if axes is None or axes.reshape(-1).tolist() != [2]:
        return None
    return Repeat(unsqueeze.inputs[0], expand, reshape, [reshape, expand, unsqueeze])


def _expand_entries(tensor: gs.Tensor) -> list | None:
    """Expand targets as torch writes them: Where(Equal(s, -1), ones, s) and Reshape(s, [-1])."""
    where = producer(tensor, "Where")
    if where is not None:
        equal = producer(where.inputs[0], "Equal")
        if equal is None or where.inputs[2] is not equal.inputs[0]:
            return None
        tensor = where.inputs[2]
    reshape = producer(tensor, "Reshape")
    if reshape is not None and (v := const_value(reshape.inputs[1])) is not None and v.reshape(-1).tolist() == [-1]:
        tensor = reshape.inputs[0]
    return shape_entries(tensor, const_ints, 4)


def repeat_is_exact(repeat: Repeat, n_rep: int) -> bool:
    """Expand to [B, Nkv, r, T, D] (other axes kept or 1) and merge axes 1, 2 keeping B, T, D."""
    entries = _expand_entries(repeat.expand.inputs[1])
    if entries is None or len(entries) != 5 or entries[2] != n_rep:
        return False
    for entry, axis in zip(entries[:2] + entries[3:], (0, 1, 2, 3)):
        if entry != 1 and not (isinstance(entry, Piece) and entry.is_dim(repeat.x4, axis)):
            return False
    merged = shape_entries(repeat.reshape.inputs[1], const_ints, 4)
    if merged is None or len(merged) != 4:
        return False
    for entry, axis in ((merged[0], 0), (merged[2], 2), (merged[3], 3)):
        if not (isinstance(entry, Piece) and entry.is_dim(repeat.x4, axis)):
            return False
    return True


def projection_dtype(tensor: gs.Tensor):
    """The element type of a projection output: its own, else its constant weights' (never loaded)."""
    for _ in range(6):
        if tensor.dtype is not None:
            return np.dtype(tensor.dtype) if not isinstance(tensor.dtype, str) else tensor.dtype
        node = producer(tensor)
        if node is None:
            return None
        weights = [t for t in node.inputs if isinstance(t, gs.Constant)]
        if weights:
            return np.dtype(weights[0].dtype)
        tensor = node.inputs[0]
    return None
