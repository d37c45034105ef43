"""Rules that write INT4 weight-only models for onnxruntime (com.microsoft contrib ops).

  * ``MatMulToNBits``: MatMul(A, W) with W a constant [K, N] float32 (or Transpose of a constant [N, K],
    as dynamo exports a tied LM head) -> MatMulNBits(A, B, scales[, zero_points]) with
    K, N, bits, block_size (packing: ``nbits``). The codes come from the plan a calibrated method
    (GPTQ / AWQ, ``int4.py``) solved, found under the weight's key; without a plan the rule rounds to
    nearest itself, data-free, with the pass options. When the plan scaled the weight's input
    channels (AWQ: W' = diag(s) W), the input becomes A * (1/s), one Mul shared by every MatMul that
    reads A with the same s (a later collapse of Mul chains folds it into an RMSNorm weight).
  * ``TiedEmbeddingToGatherBlockQuantized``: Gather(E, ids) where E is the tied LM head's weight
    (E = Wt of a quantized MatMul) -> GatherBlockQuantized reading the same packed B tensor, so the
    embedding is stored once: B [V, kb, blob] gathered on axis 0, quantized on axis 2, its scales
    [V, kb] unsqueezed to [V, kb, 1]; the output [..., kb, block] is reshaped to [..., kb * block] and
    sliced to the hidden size when the last block is padded. When the plan gives the table scales of its own
    (``PlannedWeight.embedding_scales``: the codes a calibrated method chose for the head's output error
    can sit far from the table's rows), they are a constant [V, kb, 1]; the codes are still stored once.

Exactness: these rewrites change numbers by design (INT4 rounding); the pass's tolerance says so and
``int4.py`` judges the result on perplexity / logit cosine instead of elementwise equality.
"""
from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, Rule, RulePass
from onnxforge.shared_weights import weight_array
from onnxforge.passes.fusion._match import MS_DOMAIN
from onnxforge.passes.matching import DEFAULT_DOMAINS, producer

from .nbits import BITS, k_blocks, pack, pack_zero_points, quantize_rtn

PASS_NAME = "int4-weights"


@dataclasses.dataclass(frozen=True)
class PlannedWeight:
    """A weight a method solved: codes [N, Kpad], scales / zeros [N, kb]; ``input_scale`` [K] when AWQ
    scaled its input channels; ``embedding``: the Gather table (name) equal to its Wt, if tied;
    ``embedding_scales`` [N, kb]: the Gather side's own block scales for the same codes (None: the LM head's)."""

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    k: int
    n: int
    block: int
    symmetric: bool
    method: str
    input_scale: np.ndarray | None = None
    embedding: str | None = None
    embedding_scales: np.ndarray | None = None


def weight_key(constant: gs.Constant, transposed: bool) -> str:
    """The plan's key for a MatMul weight: the constant's name (``^T`` when read through a Transpose)."""
    return constant.name + ("^T" if transposed else "")


def matmul_weight(node: gs.Node) -> tuple[gs.Constant, bool] | None:
    """(constant, transposed) when ``node`` is a default-domain MatMul whose B is a 2-D constant
    (transposed: a Transpose of a 2-D constant [N, K])."""
    if node.op != "MatMul" or node.domain not in DEFAULT_DOMAINS or len(node.inputs) != 2:
        return None
    b = node.inputs[1]
    if isinstance(b, gs.Constant):
        return (b, False) if len(b.shape) == 2 else None
    t = producer(b, "Transpose")
    if t is None or t.domain not in DEFAULT_DOMAINS or not isinstance(t.inputs[0], gs.Constant):
        return None
    if len(t.inputs[0].shape) != 2 or list(t.attrs.get("perm", [1, 0])) != [1, 0]:
        return None
    return t.inputs[0], True


def weight_rows(constant: gs.Constant, transposed: bool) -> np.ndarray:
    """Wt [N, K] (a row per output) of the MatMul weight. A weight in external data is read for the
    caller and not kept on the constant, so a large model's float weights are never all in memory."""
    values = weight_array(constant)  # graphsurgeon caches what ``.values`` loads; this keeps nothing
    return values if transposed else values.T


def packed_names(key: str) -> tuple[str, str, str]:
    base = key.replace("^T", "_T")
    return f"{base}_Q4", f"{base}_Q4_scales", f"{base}_Q4_zero_points"


@dataclasses.dataclass(frozen=True)
class WeightMatch:
    """A MatMul's constant weight, whether it is read through a Transpose, and its key in the plan."""

    constant: gs.Constant
    transposed: bool
    key: str


@dataclasses.dataclass(frozen=True)
class TableMatch:
    """The name of the Gather's constant table."""

    table: str


@dataclasses.dataclass(frozen=True)
class TiedPlan:
    """What the tied-embedding check found: the LM head's planned weight and its packed codes and scales."""

    entry: PlannedWeight
    packed: gs.Constant
    scales: gs.Constant


class MatMulToNBits(Rule):
    name = "matmul-to-nbits"
    anchor_ops = ("MatMul",)

    def match(self, graph, node):
        found = matmul_weight(node)
        if found is None:
            return None
        constant, transposed = found
        return Match([node], WeightMatch(constant, transposed, weight_key(constant, transposed)))

    def check(self, graph, match, ctx):
        constant = match.info.constant
        if np.dtype(constant.dtype) != np.float32:
            return self.refusal(f"weight {constant.name} is {np.dtype(constant.dtype)}, not float32", match)
        a = match.nodes[0].inputs[0]
        if a.shape is not None and len(a.shape) < 2:
            return self.refusal("input A has rank 1 (MatMulNBits multiplies [..., M, K])", match)
        plan = ctx.option(PASS_NAME, "plan")
        if plan is not None:
            if match.info.key in plan.get("float", {}):
                return self.refusal(f"kept float: {plan['float'][match.info.key]}", match)
            if match.info.key not in plan.get("weights", {}):
                return self.refusal("the quantization plan has no codes for this weight", match)
            entry = plan["weights"][match.info.key]
            k, n = constant.shape[::-1] if match.info.transposed else constant.shape
            if (entry.k, entry.n) != (k, n):
                return self.refusal("the plan's codes were solved for another weight shape", match)
        return None

    def rewrite(self, graph, match, ctx):
        node = match.nodes[0]
        entry = self._entry(match, ctx)
        b_name, s_name, z_name = packed_names(match.info.key)
        inputs = [self._input(graph, node.inputs[0], entry, node),
                  gs.Constant(b_name, pack(entry.codes, entry.block)),
                  gs.Constant(s_name, np.ascontiguousarray(entry.scales, np.float32))]
        if not entry.symmetric:
            inputs.append(gs.Constant(z_name, pack_zero_points(entry.zeros)))
        attrs = {"K": entry.k, "N": entry.n, "bits": BITS, "block_size": entry.block}
        level = ctx.option(PASS_NAME, "accuracy_level", 0)
        if level:
            attrs["accuracy_level"] = level
        fused = gs.Node("MatMulNBits", name=f"{node.name or node.outputs[0].name}_Q4", domain=MS_DOMAIN,
                        attrs=attrs, inputs=inputs, outputs=list(node.outputs))
        node.outputs.clear()
        node.inputs.clear()
        graph.nodes.append(fused)
        if ctx.model is not None:
            ctx.model.ensure_domain(MS_DOMAIN, 1)

    @staticmethod
    def _entry(match: Match, ctx) -> PlannedWeight:
        plan = ctx.option(PASS_NAME, "plan")
        if plan is not None:
            return plan["weights"][match.info.key]
        block = ctx.option(PASS_NAME, "block_size", 128)
        symmetric = ctx.option(PASS_NAME, "symmetric", True)
        wt = weight_rows(match.info.constant, match.info.transposed)
        codes, scales, zeros = quantize_rtn(wt, block, symmetric)
        return PlannedWeight(codes, scales, zeros, wt.shape[1], wt.shape[0], block, symmetric, "rtn")

    @staticmethod
    def _input(graph, a: gs.Variable, entry: PlannedWeight, node: gs.Node) -> gs.Tensor:
        """A, or A * (1/s) for an AWQ-scaled weight (one Mul per distinct s on A)."""
        if entry.input_scale is None:
            return a
        inverse = (1.0 / entry.input_scale).astype(np.float32)
        for reader in a.outputs:
            if reader.op == "Mul" and reader.name.endswith("/awq_scale") and reader.inputs[0] is a \
                    and np.array_equal(np.asarray(reader.inputs[1].values), inverse):
                return reader.outputs[0]
        base = f"{a.name}_{node.name or node.outputs[0].name}"
        scaled = gs.Variable(f"{base}_awq", dtype=a.dtype, shape=a.shape)
        graph.nodes.append(gs.Node("Mul", name=f"{base}/awq_scale",
                                   inputs=[a, gs.Constant(f"{base}_awq_inverse_scale", inverse)], outputs=[scaled]))
        return scaled


class TiedEmbeddingToGatherBlockQuantized(Rule):
    name = "tied-embedding-to-gather-block-quantized"
    anchor_ops = ("Gather",)

    def match(self, graph, node):
        if node.domain not in DEFAULT_DOMAINS or len(node.inputs) != 2 or not isinstance(node.inputs[0], gs.Constant):
            return None
        if len(node.inputs[0].shape) != 2:
            return None
        return Match([node], TableMatch(node.inputs[0].name))

    def check(self, graph, match, ctx):
        node = match.nodes[0]
        plan = ctx.option(PASS_NAME, "plan") or {}
        keys = [k for k, e in plan.get("weights", {}).items() if e.embedding == match.info.table]
        if not keys:
            return self.refusal("the table is not the weight of a quantized (tied) LM head", match)
        entry = plan["weights"][keys[0]]
        if not entry.symmetric:
            return self.refusal("asymmetric codes: GatherBlockQuantized packs zero points along the block, "
                                "MatMulNBits across blocks; the table cannot be shared", match)
        if node.attrs.get("axis", 0) != 0:
            return self.refusal("gathers along axis 1, not rows", match)
        ids = node.inputs[1]
        if ids.shape is None:
            return self.refusal("the index tensor's rank is unknown (the output reshape needs it)", match)
        tensors = graph.tensors()
        b_name, s_name, _ = packed_names(keys[0])
        if not isinstance(tensors.get(b_name), gs.Constant) or not isinstance(tensors.get(s_name), gs.Constant):
            return self.refusal(f"the LM head {keys[0]} it is tied to was not rewritten to MatMulNBits", match)
        return TiedPlan(entry, tensors[b_name], tensors[s_name])

    def rewrite(self, graph, match, ctx):
        node = match.nodes[0]
        plan = match.plan
        entry, ids = plan.entry, node.inputs[1]
        base = node.name or node.outputs[0].name
        kb = k_blocks(entry.k, entry.block)
        if entry.embedding_scales is not None:  # the table's own scales on the shared codes (V * kb floats)
            scales3 = gs.Constant(f"{base}_scales3", entry.embedding_scales.reshape(entry.n, kb, 1).astype(np.float32))
        else:
            scales3 = gs.Variable(f"{base}_scales3", dtype=np.float32, shape=[entry.n, kb, 1])
            graph.nodes.append(gs.Node("Unsqueeze", name=f"{base}_unsqueeze_scales",
                                       inputs=[plan.scales, gs.Constant(f"{base}_axis2", np.array([2], np.int64))],
                                       outputs=[scales3]))
        blocks = gs.Variable(f"{base}_blocks", dtype=np.float32)
        graph.nodes.append(gs.Node("GatherBlockQuantized", name=f"{base}_Q4", domain=MS_DOMAIN,
                                   attrs={"bits": BITS, "block_size": entry.block, "gather_axis": 0, "quantize_axis": 2},
                                   inputs=[plan.packed, ids, scales3], outputs=[blocks]))
        rank = len(ids.shape)
        flat = gs.Variable(f"{base}_rows", dtype=np.float32) if kb * entry.block != entry.k else node.outputs[0]
        graph.nodes.append(gs.Node("Reshape", name=f"{base}_merge_blocks",
                                   inputs=[blocks, gs.Constant(f"{base}_row_shape", np.array([0] * rank + [-1], np.int64))],
                                   outputs=[flat]))
        if flat is not node.outputs[0]:
            graph.nodes.append(gs.Node("Slice", name=f"{base}_drop_padding", inputs=[
                flat, gs.Constant(f"{base}_start", np.array([0], np.int64)),
                gs.Constant(f"{base}_end", np.array([entry.k], np.int64)),
                gs.Constant(f"{base}_last_axis", np.array([-1], np.int64))], outputs=[node.outputs[0]]))
        node.outputs.clear()
        node.inputs.clear()
        if ctx.model is not None:
            ctx.model.ensure_domain(MS_DOMAIN, 1)


class FoldAwqScale(Rule):
    """Mul(Mul(x, g), 1/s) -> Mul(x, g / s) when g is a constant vector (an RMSNorm weight) and the inner
    product has no other reader: the AWQ input scaling then costs nothing at run time."""

    name = "fold-awq-scale-into-constant-mul"
    anchor_ops = ("Mul",)

    def match(self, graph, node):
        if not node.name.endswith("/awq_scale") or not isinstance(node.inputs[1], gs.Constant):
            return None
        inner = producer(node.inputs[0], "Mul")
        if inner is None or inner.domain not in DEFAULT_DOMAINS:
            return None
        return Match([node, inner])

    def check(self, graph, match, ctx):
        outer, inner = match.nodes
        if len(outer.inputs[0].outputs) != 1 or any(o is outer.inputs[0] for o in graph.outputs):
            return self.refusal("the scaled tensor has other readers", match)
        consts = [t for t in inner.inputs if isinstance(t, gs.Constant)]
        if len(consts) != 1 or np.asarray(consts[0].values).ndim != 1 or np.dtype(consts[0].dtype) != np.float32:
            return self.refusal("the Mul before it has no float32 constant vector to absorb the scale", match)
        if np.asarray(consts[0].values).shape[0] not in (1, np.asarray(outer.inputs[1].values).shape[0]):
            return self.refusal("the constant vector does not span the scaled channels", match)
        return consts[0]  # the plan: the vector that absorbs the scale

    def rewrite(self, graph, match, ctx):
        outer, inner = match.nodes
        gamma = match.plan
        folded = gs.Constant(f"{gamma.name}_awq", (np.asarray(gamma.values) * np.asarray(outer.inputs[1].values)).astype(np.float32))
        inner.inputs[inner.inputs.index(gamma)] = folded
        target = outer.outputs[0]
        outer.outputs.clear()
        outer.inputs.clear()
        inner.outputs[0] = target


class Int4Weights(RulePass):
    name = PASS_NAME
    description = "MatMul with a constant weight -> MatMulNBits (INT4, block-wise); a tied embedding -> GatherBlockQuantized"
    tolerance = (float("inf"), float("inf"))  # INT4 rounding: judged by int4.py on model accuracy
    rules = (MatMulToNBits, TiedEmbeddingToGatherBlockQuantized, FoldAwqScale)
    options: Mapping = MappingProxyType({
        "block_size": (int, "block along K: 16, 32, 64, 128 or 256 (default 128), data-free rounding only"),
        "symmetric": (bool, "no zero points (default true), data-free rounding only"),
        "accuracy_level": (int, "MatMulNBits accuracy_level (0 unset: fp32 activations; 4: int8)"),
        "plan": (dict, "codes solved by a calibrated method (quantize --bits 4 fills it)"),
    })


PASSES = (Int4Weights,)
