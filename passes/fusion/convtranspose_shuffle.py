"""A ConvTranspose whose windows do not overlap as a 1x1 Conv and a pixel shuffle.

With kernel == stride == k and no padding, every output pixel comes from one input pixel:

    y[n, o, k*i + a, k*j + b] = B[o] + sum_c x[n, c, i, j] W[c, o, a, b]
                              = DepthToSpace_DCR(Conv1x1(x; V, B'), k)
    with V[(a*k + b)*O + o, c] = W[c, o, a, b] and B'[(a*k + b)*O + o] = B[o]

(k = 1: the Conv alone, W transposed). onnxruntime's CPU provider has no integer kernel
for ConvTranspose (it stays float between DequantizeLinear and QuantizeLinear); the 1x1
Conv has one. A unary elementwise op reading the shuffle moves before it (movement
commutes with any per-element map), so the conv's activation fuses into the integer conv.
Preconditions: default domain, 4-D constant weight read by this node only, constant bias,
group 1, square kernel equal to the strides, no pads, dilations 1, no output_padding or
output_shape. The quantizer runs this pass on CPU; it is not in an -O level.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.base import Match, Rule, RulePass
from onnxforge.passes.matching import DEFAULT_DOMAINS

from ._match import const_value, fresh_constant, producer

SHUFFLE_SUFFIX = "_shuffle"  # names the DepthToSpace nodes this pass makes
# the same map on every element; Clip's bounds must be constants
UNARY_ELEMENTWISE = ("Relu", "LeakyRelu", "Sigmoid", "Clip", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Softplus")


@dataclasses.dataclass(frozen=True)
class ConvTransposeMatch:
    weight: gs.Constant  # [C, O, k, k]


class ConvTransposeAsShuffle(Rule):
    name = "convtranspose-as-conv-shuffle"
    anchor_ops = ("ConvTranspose",)

    def match(self, graph, node):
        if node.domain not in DEFAULT_DOMAINS or len(node.inputs) < 2:
            return None
        weight = node.inputs[1]
        return Match([node], ConvTransposeMatch(weight)) if isinstance(weight, gs.Constant) and len(weight.shape) == 4 else None

    def check(self, graph, match, ctx):
        node, weight = match.nodes[0], match.info.weight
        a = node.attrs
        if len(weight.outputs) != 1:
            return self.refusal("the weight is read by other nodes too", match)
        if len(node.inputs) > 2 and node.inputs[2].name and not isinstance(node.inputs[2], gs.Constant):
            return self.refusal("bias not constant", match)
        kernel = list(a.get("kernel_shape", weight.shape[2:]))
        if kernel != list(weight.shape[2:]) or kernel[0] != kernel[1] or kernel[0] < 1:
            return self.refusal("kernel not square (or not the weight's)", match)
        k = kernel[0]
        if int(a.get("group", 1)) != 1:
            return self.refusal("grouped", match)
        if list(a.get("strides", [1, 1])) != [k, k]:
            return self.refusal(f"strides {list(a.get('strides', [1, 1]))} differ from the kernel: windows overlap or leave gaps", match)
        if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or any(a.get("pads", [])):
            return self.refusal("padded", match)
        if any(d != 1 for d in a.get("dilations", [])):
            return self.refusal("dilated", match)
        if any(a.get("output_padding", [])) or "output_shape" in a:
            return self.refusal("output_padding or output_shape", match)
        return k  # the plan: the block size

    def rewrite(self, graph, match, ctx):
        node, k = match.nodes[0], match.plan
        base = node.name or node.outputs[0].name
        w = np.asarray(match.info.weight.values)  # [C, O, k, k]
        c_in, c_out = w.shape[0], w.shape[1]
        v = np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(k * k * c_out, c_in, 1, 1))  # row (a*k + b)*O + o
        inputs = [node.inputs[0], fresh_constant(graph, f"{base}_as_conv_weight", v)]
        if len(node.inputs) > 2 and node.inputs[2].name:
            inputs.append(fresh_constant(graph, f"{base}_as_conv_bias", np.tile(const_value(node.inputs[2]), k * k)))
        out = node.outputs[0]
        node.outputs.clear()
        if k == 1:  # a 1x1 ConvTranspose is a 1x1 Conv with the weight transposed: nothing to shuffle
            graph.nodes.append(gs.Node("Conv", f"{base}_as_conv", {"kernel_shape": [1, 1]}, inputs, [out]))
            return
        blocks = gs.Variable(f"{base}_blocks", dtype=out.dtype)
        graph.nodes.append(gs.Node("Conv", f"{base}_as_conv", {"kernel_shape": [1, 1]}, inputs, [blocks]))
        graph.nodes.append(gs.Node("DepthToSpace", f"{base}{SHUFFLE_SUFFIX}", {"blocksize": k, "mode": "DCR"},
                                   [blocks], [out]))


class ActivationBeforeShuffle(Rule):
    """DepthToSpace (one this pass made) -> unary elementwise op  =>  op -> DepthToSpace."""

    name = "activation-before-shuffle"
    anchor_ops = UNARY_ELEMENTWISE

    def match(self, graph, node):
        shuffle = producer(node.inputs[0], "DepthToSpace") if node.inputs else None
        if shuffle is None or not shuffle.name.endswith(SHUFFLE_SUFFIX) or node.domain not in DEFAULT_DOMAINS:
            return None
        return Match([node, shuffle])

    def check(self, graph, match, ctx):
        act, shuffle = match.nodes
        moved = shuffle.outputs[0]
        if len(moved.outputs) != 1 or any(o is moved for o in graph.outputs):
            return self.refusal("the shuffled tensor is read elsewhere too", match)
        if len(act.outputs) != 1 or any(t.name and not isinstance(t, gs.Constant) for t in act.inputs[1:]):
            return self.refusal("the op's other inputs are not constants", match)
        return None

    def rewrite(self, graph, match, ctx):
        act, shuffle = match.nodes
        source, out = shuffle.inputs[0], act.outputs[0]
        taken, name, i = graph.tensors().keys(), f"{source.name}_{act.op.lower()}", 0
        while name in taken:
            i += 1
            name = f"{source.name}_{act.op.lower()}_{i}"
        activated = gs.Variable(name, dtype=out.dtype)
        act.inputs[0], act.outputs[0] = source, activated
        shuffle.inputs[0], shuffle.outputs[0] = activated, out


class ConvTransposeShuffle(RulePass):
    name = "convtranspose-shuffle"
    description = "ConvTranspose with kernel == stride -> 1x1 Conv + DepthToSpace (the quantizer's CPU integer kernels)"
    tolerance = (1e-5, 1e-6)  # the same products, summed in the Conv's order
    rules = (ConvTransposeAsShuffle, ActivationBeforeShuffle)


PASSES = (ConvTransposeShuffle,)
