"""Movement that onnxruntime's CPU provider runs slowly in its int8 layout, rewritten exactly.

onnxruntime runs quantized convolutions channels-last (NHWC) and pushes the layout
transposes through the ops around them, so data movement between integer kernels runs in
NHWC too. Three patterns pay for it; each is a registered pass (its math, preconditions
and refusal reasons in its file), run here on a ModelProto:

  * ConvTranspose (no integer kernel) without overlapping windows -> 1x1 Conv + pixel
    shuffle: convtranspose-shuffle (passes/fusion/convtranspose_shuffle.py);
  * DQ -> nearest Resize / DepthToSpace [-> Q] as NHWC movement of the integers:
    nhwc-integer-movement (passes/qdq/nhwc_movement.py);
  * per-channel scales of squeeze-excitation products widened along W:
    wide-channel-scales (passes/qdq/wide_scales.py).

onnxruntime cancels the outer transposes the last two write against the ones it puts
around the NHWC kernels; where it cannot (no integer kernel beside the op), they would
run for real, so the caller (formats.static_qdq) keeps each kind of rewrite only when
the optimized graph has no more Transpose nodes than before (``ort_transposes``).
"""
from __future__ import annotations

import onnx


# ------------------------------------------------------------------ float: ConvTranspose -> Conv + DepthToSpace


def convtranspose_as_conv_shuffle(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Non-overlapping ConvTranspose -> 1x1 Conv + DepthToSpace(DCR), the activation moved
    before the shuffle: the registered pass convtranspose-shuffle (its math and
    preconditions in passes/fusion/convtranspose_shuffle.py); (model, ConvTransposes rewritten)."""
    from .registered import apply_passes

    before = sum(n.op_type == "ConvTranspose" for n in model.graph.node)
    if not before:
        return model, 0
    out, _fired = apply_passes(model, ("convtranspose-shuffle",))
    return out, before - sum(n.op_type == "ConvTranspose" for n in out.graph.node)


# ------------------------------------------------------------------ int8: movement of the integers in NHWC


def nhwc_data_movement(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """DQ -> nearest Resize / DepthToSpace [-> Q] as NHWC movement of the integers: the
    registered pass nhwc-integer-movement (passes/qdq/nhwc_movement.py, its math and
    preconditions there); (model, ops rewritten)."""
    from .registered import apply_passes

    return apply_passes(model, ("nhwc-integer-movement",))


def wide_channel_scales(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Per-channel scales [N, C, 1, 1] of a quantized Mul/Add widened along W: the registered
    pass wide-channel-scales (passes/qdq/wide_scales.py, its math and preconditions there);
    (model, scales widened)."""
    from .registered import apply_passes

    return apply_passes(model, ("wide-channel-scales",))


def ort_transposes(model: onnx.ModelProto) -> int:
    """Transpose nodes in onnxruntime's optimized CPU graph of ``model``: the layout
    transposes written here cancel only where integer kernels run in NHWC around them."""
    from .prepare import ort_offline

    return sum(1 for n in ort_offline(model, level="all", weights=False).graph.node if n.op_type == "Transpose")
