"""A user-defined pass, run from a recipe (examples/custom_pass.toml):

    [[steps]]
    step = "optimize"
    extra_passes = ["my_passes.py:FuseMatMulBiasToGemm"]

It fuses ``Add(MatMul(A, B), C)`` into ``Gemm(A, B, C)``, the classifier head
that exporters write as two nodes.

Identity: Gemm(A, B, C) = alpha * A @ B + beta * C with alpha = beta = 1 and no
transposes is exactly MatMul followed by Add (the same products, summed in the
same order, then the bias added).

Preconditions (checked, otherwise the candidate is refused with the reason,
which ``--explain`` prints):
  * A has rank 2 (Gemm takes matrices; MatMul also takes batches);
  * B is a 2-D constant and C a constant of shape [N] or [1, N] with N = B's
    columns (Gemm broadcasts C one way only);
  * float types (Gemm in opset 13 has no other floats than these);
  * the MatMul's result feeds only this Add and is no graph output.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, Rule, RulePass

FLOAT_TYPES = (np.float16, np.float32, np.float64)


def matrix_rank(tensor: gs.Variable) -> int | None:
    """The rank of ``tensor``: from its shape, or from the Flatten/Reshape that made it."""
    if tensor.shape is not None:
        return len(tensor.shape)
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is not None and producer.op == "Flatten":
        return 2
    if producer is not None and producer.op == "Reshape" and isinstance(producer.inputs[1], gs.Constant):
        return int(producer.inputs[1].values.size)
    return None


class MatMulBiasRule(Rule):
    name = "matmul_bias_to_gemm"
    anchor_ops = ("Add",)

    def match(self, graph: gs.Graph, node: gs.Node) -> Match | None:
        for index, operand in enumerate(node.inputs):
            producer = operand.inputs[0] if operand.inputs else None
            if producer is not None and producer.op == "MatMul":
                bias = node.inputs[1 - index]
                return Match([node, producer], {"bias": bias, "product": operand})
        return None

    def check(self, graph: gs.Graph, match: Match, ctx):
        add, matmul = match.nodes
        a, b = matmul.inputs
        bias, product = match.info["bias"], match.info["product"]
        if len(product.outputs) != 1 or product in graph.outputs:
            return self.refusal("the MatMul result has other consumers", match)
        if matrix_rank(a) != 2:
            return self.refusal("the MatMul input is not known to be a matrix", match)
        if not isinstance(b, gs.Constant) or b.values.ndim != 2:
            return self.refusal("the weight is not a 2-D constant", match)
        if not isinstance(bias, gs.Constant) or bias.values.shape not in ((b.shape[1],), (1, b.shape[1])):
            return self.refusal("the bias is not a constant of shape [N] or [1, N]", match)
        if b.values.dtype not in FLOAT_TYPES or bias.values.dtype != b.values.dtype:
            return self.refusal("Gemm needs matching float types", match)
        return None

    def rewrite(self, graph: gs.Graph, match: Match, ctx) -> None:
        add, matmul = match.nodes
        a, b = matmul.inputs
        outputs = list(add.outputs)
        add.outputs.clear()  # detached nodes are removed by the pass's cleanup
        matmul.outputs.clear()
        name = f"{matmul.name or outputs[0].name}/gemm"  # from the graph: the same every run
        graph.nodes.append(gs.Node("Gemm", name=name, inputs=[a, b, match.info["bias"]], outputs=outputs))


class FuseMatMulBiasToGemm(RulePass):
    """MatMul + bias Add -> Gemm."""

    name = "fuse-matmul-bias-gemm"
    description = "fuse MatMul followed by a bias Add into Gemm (2-D input, constant weight and bias)"
    rules = (MatMulBiasRule,)
