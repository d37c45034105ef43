"""The rule that rotates a decoder's residual stream by an orthogonal matrix before weight-only quantization:
the pass ``rotate-residual-stream`` (rule of the same name), which ``quantize --bits 4 --rotate`` runs.

Identity (QuaRot, Ashkboos et al. 2024; SpinQuant, Liu et al. 2024). In a pre-norm decoder (Llama, ...) the
residual stream x (hidden size d) starts at the embedding Gather, is read only by RMSNorms (whose outputs feed
MatMuls with constant weights W [d, n]: q/k/v, gate/up, the LM head) and by the residual Adds, and is written
only by MatMuls W [n, d] added into it (o_proj, down_proj). For Q orthogonal (d x d) and x~ = x Q:
  * RMSNorm commutes with Q: mean(x~^2) = |x Q|^2 / d = |x|^2 / d, so RMSNorm(x~) = RMSNorm(x) Q;
  * a reader: (RMSNorm(x) * g) W = RMSNorm(x~) Q^T diag(g) W, so W' = Q^T diag(g) W and the norm's Mul by g
    goes (g folded into each reader);
  * a writer: adding y W Q to x~ keeps x~ = x Q, so W' = W Q; the embedding E' = E Q (the Gather then yields x~);
  * a tied LM head (its weight is E^T, stored as a copy or read through a Transpose of E): it must read E'^T
    for the table to stay stored once, so logits = (RMSNorm(x) * g) E^T = RMSNorm(x~) M E'^T with
    M = Q^T diag(g) Q, one float MatMul (d x d, named ``..._rotate_residual_head_basis``) before the head.
The float model is unchanged up to float rounding. What it buys: INT4 blocks of W' see the weights' outlier
input channels spread over all d channels, so their grids can be finer. What it costs: each gamma is folded into
its readers, and where gamma has a wide range diag(g) W is spikier than W. On SmolLM2 (benchmarks/int4_smollm2.md)
GPTQ absorbs that cost and the rotation wins (val perplexity 45.8 -> 43.2), round to nearest does not (58.9 ->
157.9), so ``quantize --bits 4`` runs it by default for GPTQ only (``--rotate`` / ``--no-rotate``).

Q is deterministic (``seed``): ``hadamard`` (default) = diag(random signs) kron(H_2^a / sqrt(2^a), O_m) for
d = 2^a m, H Sylvester's Hadamard matrix, O_m the QR of a seeded Gaussian m x m (m = 1 for a power of two);
``orthogonal`` = the QR of a seeded Gaussian d x d.

Preconditions (``check`` refuses, naming the node, where one fails): every reader of a stream tensor is a
float Cast, a Shape, a residual Add whose other input is a writer MatMul (constant weight, no bias between), or an
RMSNorm (Pow 2 -> ReduceMean over the last axis -> Add eps -> Sqrt -> Div/Reciprocal -> Mul, then an optional
Cast and Mul by a constant [d] gamma; or SimplifiedLayerNormalization / RMSNormalization on the last axis) whose
output only MatMuls with constant float32 [d, n] weights (and Shapes) read; no stream tensor is a graph output; no gamma
entry is zero (its reader's rows would be lost); no weight is shared with another node (except the tied E).
Weights are replaced one at a time (the float weights are never all loaded twice).
"""
from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxforge.context import Refusal
from onnxforge.passes.base import Match, Rule, RulePass
from onnxforge.shared_weights import weight_array
from onnxforge.passes.fusion._match import const_ints, fresh_constant, other_input, scalar
from onnxforge.passes.matching import DEFAULT_DOMAINS, producer

from .int4_rules import matmul_weight

PASS_NAME = "rotate-residual-stream"
HEAD_BASIS = "rotate_residual_head_basis"
KINDS = ("hadamard", "orthogonal")
FUSED_NORMS = ("SimplifiedLayerNormalization", "RMSNormalization")


@dataclasses.dataclass(frozen=True)
class Norm:
    """An RMSNorm reading the stream: its nodes, gamma (None: no scale), the node applying gamma (the Mul, or
    the fused norm itself) and the tensor its readers read."""

    nodes: tuple[gs.Node, ...]
    gamma: gs.Constant | None
    scale_node: gs.Node | None
    output: gs.Tensor


@dataclasses.dataclass(frozen=True)
class Stream:
    """The residual stream from an embedding Gather: its norms, the writer MatMuls added into it, and what
    reads it otherwise (each a reason and the node)."""

    table: gs.Constant
    norms: tuple[Norm, ...]
    writers: tuple[gs.Node, ...]
    odd: tuple[tuple[str, str], ...]


def _is_float_cast(node: gs.Node) -> bool:
    return node.op == "Cast" and node.domain in DEFAULT_DOMAINS and node.attrs.get("to") == onnx.TensorProto.FLOAT


def _only_reader(tensor: gs.Tensor, *ops: str) -> gs.Node | None:
    if len(tensor.outputs) != 1:
        return None
    node = tensor.outputs[0]
    return node if node.op in ops and node.domain in DEFAULT_DOMAINS else None


def _last_axis(node: gs.Node) -> bool:
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        axes = const_ints(node.inputs[1])
    return axes is not None and list(np.asarray(axes).reshape(-1)) == [-1] and node.attrs.get("keepdims", 1) == 1


def rms_norm(x: gs.Tensor) -> Norm | None:
    """The RMSNorm that reads ``x`` (see the module docstring), or None."""
    for node in x.outputs:
        if node.op in FUSED_NORMS and node.domain in DEFAULT_DOMAINS and node.inputs[0] is x \
                and node.attrs.get("axis", -1) == -1 and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
            return Norm((node,), node.inputs[1], node, node.outputs[0])
    for pow_ in x.outputs:
        if pow_.op != "Pow" or pow_.domain not in DEFAULT_DOMAINS or pow_.inputs[0] is not x or scalar(pow_.inputs[1]) != 2:
            continue
        mean = _only_reader(pow_.outputs[0], "ReduceMean")
        add = mean and _last_axis(mean) and _only_reader(mean.outputs[0], "Add")
        if not add or scalar(other_input(add, mean.outputs[0])) is None:
            continue
        sqrt = _only_reader(add.outputs[0], "Sqrt")
        inv = sqrt and _only_reader(sqrt.outputs[0], "Div", "Reciprocal")
        if not inv:
            continue
        nodes = [pow_, mean, add, sqrt, inv]
        if inv.op == "Div" and inv.inputs[0] is x and inv.inputs[1] is sqrt.outputs[0]:
            out = inv.outputs[0]  # x / sqrt(...)
        else:
            if inv.op == "Div" and (inv.inputs[1] is not sqrt.outputs[0] or scalar(inv.inputs[0]) != 1):
                continue
            mul = _only_reader(inv.outputs[0], "Mul")
            if mul is None or other_input(mul, inv.outputs[0]) is not x:
                continue
            nodes.append(mul)
            out = mul.outputs[0]
        cast = _only_reader(out, "Cast")
        if cast is not None and _is_float_cast(cast):
            nodes.append(cast)
            out = cast.outputs[0]
        scale = _only_reader(out, "Mul")
        gamma = scale and other_input(scale, out)
        if isinstance(gamma, gs.Constant) and len(gamma.shape) == 1:
            return Norm(tuple(nodes + [scale]), gamma, scale, scale.outputs[0])
        return Norm(tuple(nodes), None, None, out)
    return None


def walk(gather: gs.Node, graph: gs.Graph) -> Stream:
    """Every tensor the residual stream from ``gather`` passes through (structure only)."""
    outputs = {id(t) for t in graph.outputs}
    stream, seen = [gather.outputs[0]], {id(gather.outputs[0])}
    norms, writers, odd = [], [], []
    for x in stream:  # grows while walked
        if id(x) in outputs:
            odd.append((f"the residual stream tensor {x.name} is a graph output", x.name))
        norm = rms_norm(x)
        inside = {id(n) for n in norm.nodes} if norm else set()
        if norm is not None:
            norms.append(norm)
        nxt = []
        for node in x.outputs:
            if id(node) in inside:
                continue
            if _is_float_cast(node):
                nxt.append(node.outputs[0])
                continue
            if node.op == "Shape":  # reads no values
                continue
            other = other_input(node, x) if node.op == "Add" and node.domain in DEFAULT_DOMAINS else None
            writer = producer(other, "MatMul") if other is not None else None
            if writer is not None and matmul_weight(writer) is not None and len(other.outputs) == 1:
                writers.append(writer)
                nxt.append(node.outputs[0])
                continue
            why = ("a residual Add whose other input is not a MatMul with a constant weight (a bias, another "
                   "stream?)") if node.op == "Add" else f"{node.op}, not an RMSNorm, a residual Add or a float Cast"
            odd.append((f"the residual stream {x.name} is read by {why}", node.name))
        for t in nxt:
            if id(t) not in seen:
                seen.add(id(t))
                stream.append(t)
    return Stream(gather.inputs[0], tuple(norms), tuple(writers), tuple(odd))


@dataclasses.dataclass(frozen=True)
class Plan:
    """What ``check`` found: the hidden size, the readers per norm (node, tied to the table?)."""

    d: int
    readers: tuple[tuple[Norm, tuple[tuple[gs.Node, bool], ...]], ...]


class RotateResidualStream(Rule):
    name = PASS_NAME
    anchor_ops = ("Gather",)

    def match(self, graph, node):
        table = node.inputs[0] if len(node.inputs) == 2 else None
        if node.domain not in DEFAULT_DOMAINS or not isinstance(table, gs.Constant) or len(table.shape) != 2 \
                or node.attrs.get("axis", 0) != 0 or np.dtype(table.dtype) != np.float32:
            return None
        stream = walk(node, graph)
        if not stream.norms:  # an embedding lookup with no RMSNorm downstream: not a decoder's stream
            return None
        return Match([node], stream)

    def check(self, graph, match, ctx):
        stream: Stream = match.info
        table = stream.table
        d = table.shape[1]
        if stream.odd:
            return Refusal(self.name, stream.odd[0][0], (stream.odd[0][1],))
        if ctx.option(PASS_NAME, "kind", KINDS[0]) not in KINDS:
            return self.refusal(f"unknown rotation kind {ctx.option(PASS_NAME, 'kind')!r} (one of {', '.join(KINDS)})",
                                match)
        uses = {}
        for t in graph.tensors().values():
            if isinstance(t, gs.Constant):
                uses[id(t)] = len(t.outputs)
        plans = []
        for norm in stream.norms:
            if norm.gamma is not None:
                gamma = np.asarray(norm.gamma.values)
                if gamma.shape != (d,) or not np.all(gamma != 0):
                    why = f"has {int((gamma == 0).sum())} zero entries" if gamma.shape == (d,) else f"is {gamma.shape}"
                    return Refusal(self.name, f"the RMSNorm weight {norm.gamma.name} {why}: it cannot be folded",
                                   (norm.scale_node.name,))
            if any(t is norm.output for t in graph.outputs):
                return Refusal(self.name, f"the RMSNorm output {norm.output.name} is a graph output", (norm.nodes[-1].name,))
            readers = []
            for reader in norm.output.outputs:
                if reader.op == "Shape":  # reads no values
                    continue
                found = matmul_weight(reader)
                if found is None or reader.inputs[0] is not norm.output:
                    return Refusal(self.name, f"the RMSNorm output {norm.output.name} is read by {reader.op}, not a "
                                   "MatMul with a constant weight", (reader.name,))
                constant, transposed = found
                rows = constant.shape[1] if transposed else constant.shape[0]
                if rows != d or np.dtype(constant.dtype) != np.float32:
                    return Refusal(self.name, f"reader weight {constant.name} is {np.dtype(constant.dtype)} "
                                   f"{tuple(constant.shape)}, not float32 with {d} inputs", (reader.name,))
                tied = constant is table or (not transposed and tuple(constant.shape) == (d, table.shape[0])
                                             and np.array_equal(weight_array(constant).T, weight_array(table)))
                shared = uses[id(constant)] != 1 or transposed and len(reader.inputs[1].outputs) != 1
                if not tied and shared or constant is table and not transposed:
                    return Refusal(self.name, f"reader weight {constant.name} is shared with other nodes", (reader.name,))
                readers.append((reader, tied))
            plans.append((norm, tuple(readers)))
        for writer in stream.writers:
            constant, transposed = matmul_weight(writer)
            cols = constant.shape[0] if transposed else constant.shape[1]
            if cols != d or np.dtype(constant.dtype) != np.float32 or uses[id(constant)] != 1:
                return Refusal(self.name, f"writer weight {constant.name} is {np.dtype(constant.dtype)} "
                               f"{tuple(constant.shape)} with {uses[id(constant)]} readers, not float32 with {d} "
                               "outputs read once", (writer.name,))
        return Plan(d, tuple(plans))

    def rewrite(self, graph, match, ctx):
        stream: Stream = match.info
        plan: Plan = match.plan
        q = rotation(plan.d, ctx.option(PASS_NAME, "kind", KINDS[0]), ctx.option(PASS_NAME, "seed", 0))
        table = stream.table
        rotated = np.empty(table.shape, np.float32)
        values = weight_array(table)
        for i in range(0, values.shape[0], 4096):  # E' = E Q, rows in chunks (float64 products)
            rotated[i:i + 4096] = values[i:i + 4096].astype(np.float64) @ q
        del values
        table.values = rotated  # the Gather and a tied head's Transpose read it in place
        for norm, readers in plan.readers:
            gamma = np.asarray(norm.gamma.values, np.float64) if norm.gamma is not None else np.ones(plan.d)
            source = _drop_gamma(norm, plan.d)
            for reader, tied in readers:
                reader.inputs[0] = source
                constant, transposed = matmul_weight(reader)
                if tied:  # logits = RMSNorm(x~) M E'^T, M = Q^T diag(g) Q
                    base = f"{reader.name}_{HEAD_BASIS}"
                    basis = gs.Variable(f"{base}_output", dtype=np.float32)
                    m = fresh_constant(graph, f"{base}_weight", (q.T @ (gamma[:, None] * q)).astype(np.float32))
                    graph.nodes.append(gs.Node("MatMul", name=base, inputs=[source, m], outputs=[basis]))
                    reader.inputs[0] = basis
                    if constant is not table:
                        constant.values = np.ascontiguousarray(rotated.T)
                    continue
                w = weight_array(constant).astype(np.float64)
                if transposed:  # stored [n, d] = W^T: W'^T = W^T diag(g) Q
                    constant.values = ((w * gamma[None, :]) @ q).astype(np.float32)
                else:
                    constant.values = (q.T @ (gamma[:, None] * w)).astype(np.float32)
        for writer in stream.writers:
            constant, transposed = matmul_weight(writer)
            w = weight_array(constant).astype(np.float64)
            constant.values = ((q.T @ w) if transposed else (w @ q)).astype(np.float32)


def _drop_gamma(norm: Norm, d: int) -> gs.Tensor:
    """The norm without its gamma (folded into the readers): the tensor they now read."""
    if norm.scale_node is None:
        return norm.output
    if norm.scale_node.op in FUSED_NORMS:
        norm.scale_node.inputs[1] = gs.Constant(f"{norm.gamma.name}_folded", np.ones(d, np.float32))
        return norm.output
    mul = norm.scale_node
    data = other_input(mul, norm.gamma)
    for reader in list(norm.output.outputs):  # the MatMuls (rewired again by the caller) and any Shape
        for i, t in enumerate(reader.inputs):
            if t is norm.output:
                reader.inputs[i] = data
    mul.outputs.clear()
    mul.inputs.clear()
    return data


def rotation(d: int, kind: str = KINDS[0], seed: int = 0) -> np.ndarray:
    """The orthogonal d x d matrix Q (float64) of the module docstring."""
    rng = np.random.default_rng(seed)
    if kind == "orthogonal":
        return _random_orthogonal(rng, d)
    h = np.ones((1, 1))
    while d % (2 * h.shape[0]) == 0:
        h = np.block([[h, h], [h, -h]])
    q = np.kron(h / np.sqrt(h.shape[0]), _random_orthogonal(rng, d // h.shape[0]))
    return rng.choice([-1.0, 1.0], d)[:, None] * q


def _random_orthogonal(rng: np.random.Generator, m: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((m, m)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]


class RotateResidual(RulePass):
    name = PASS_NAME
    description = ("orthogonal rotation of a decoder's residual stream (RMSNorm gammas folded into the readers), "
                   "exact in float: spreads outlier channels before INT4 weight quantization")
    tolerance = (1e-4, 1e-4)  # every weight rewritten: float rounding through all layers
    rules = (RotateResidualStream,)
    options: Mapping = MappingProxyType({
        "kind": (str, "hadamard (default: random signs x Hadamard x small seeded orthogonal) or orthogonal"),
        "seed": (int, "seed of the rotation (default 0)"),
    })


PASSES = (RotateResidual,)
