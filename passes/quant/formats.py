"""Where Q/DQ go, per execution provider, and how the result is checked.

Quantization identity: x ~= (q - z) * s with q = clamp(round(x / s) + z) in the
integer type; QDQ writes it as QuantizeLinear -> DequantizeLinear pairs and the
provider fuses DQ -> op -> Q into an integer kernel when it has one.

  * CPU (onnxruntime MLAS): u8 activations (asymmetric), s8 weights per output
    channel, int32 bias; DQ->Conv/Gemm/MatMul->Q become QLinearConv, QGemm,
    QLinearMatMul. For transformers the MatMul weights are quantized dynamically
    (activations quantized per call: DynamicQuantizeMatMul / MatMulInteger),
    because static ranges of attention activations lose accuracy. The formats
    depend on the CPU class (runtime/cpuclass.py), recorded in the model: without
    int8 dot products (AVX2, AVX-512 without VNNI) the u8 x s8 GEMM kernels add
    pairs of products in 16 bits and saturate (255 * 127 * 2 > 32767), so static
    weights use 7 bits (reduce_range), or 8 bits with the inputs of GEMM-based
    kernels on a 7-bit grid, whichever scores better (static_formats: the same
    kernels, so the same time); dynamic MatMul weights are tried as 7-bit
    s8 (faster there) and then as uint8 (u8 x u8 widens first: 8 bits, no
    saturation), the first meeting the accuracy budget kept (dynamic_formats).
    Measured on this project's AVX2 CPU (benchmarks/results/quant_formats_avx2.md,
    quant_avx2.md): u8 x u8
    QLinearConv runs slower than float, so a static layer that needs more than 7
    bits goes back to float instead; depthwise weights in 8 bits (that kernel
    does not saturate: ``depthwise_full_range``) scored no better than 7 bits.
  * TensorRT / CUDA: symmetric s8 activations and weights (zero point 0),
    weights per channel, Q/DQ only at the inputs of weighted ops (Conv,
    ConvTranspose, Gemm, MatMul with a constant weight); never around
    LayerNormalization, Softmax or activation x activation MatMuls (attention
    internals), nor tiny GEMMs where the Q/DQ cost exceeds the saving.

Just over 400 lines on purpose: the format choice per provider and CPU class and the dynamic
MatMul call it configures change together; the proto helpers at the end are a few lines each.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Mapping

import numpy as np
import onnx

from onnxforge.errors import OptionError
from onnxforge.passes.fusion._match import MS_DOMAIN

from .integer_act import integer_activations
from .layout import nhwc_data_movement, ort_transposes, wide_channel_scales
from onnxforge.opsets import one_default_domain

PROVIDERS = ("cpu", "cuda", "tensorrt")
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Below this many weight elements a GEMM is "tiny": quantizing it costs more
# (two extra kernels, precision) than the integer product saves.
TINY_GEMM_ELEMENTS = 4096
# Static QDQ on CPU: ops with an integer kernel, or data movement that lets
# Q/DQ propagate through so the integer kernels chain without float round trips.
CPU_STATIC_OPS = (
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Relu", "Clip", "LeakyRelu", "Sigmoid",
    "MaxPool", "AveragePool", "GlobalAveragePool", "Concat", "Resize", "Transpose", "Reshape",
    "Squeeze", "Unsqueeze", "Flatten", "Split", "Pad",
)
# The same without elementwise arithmetic (Add, Mul, Sigmoid, LeakyRelu): every
# QLinearAdd/QLinearMul requantizes its result, and in models where residual
# sums, learnable affines and normalization pieces are elementwise (PP-OCRv4
# rec) those roundings cost more accuracy than their kernels save time.
CPU_STATIC_LEAN_OPS = tuple(op for op in CPU_STATIC_OPS if op not in ("Add", "Mul", "Sigmoid", "LeakyRelu"))


def cpu_has_vnni(cpuinfo: str | None = None) -> bool:
    """True when the CPU has int8 dot products (AVX512-VNNI, AVX-VNNI, AMX int8, ARM
    dotprod/i8mm: runtime/cpuclass.py); an unreadable cpuinfo counts as one."""
    from onnxforge.runtime.cpuclass import cpu_class, has_int8_dot

    return has_int8_dot(cpu_class(cpuinfo))


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    provider: str
    activation_type: str  # "u8" | "s8"
    weight_type: str = "s8"
    symmetric_activations: bool = False
    per_channel: bool = True
    reduce_range: bool = False
    # with reduce_range: depthwise Conv weights keep all 8 bits (MLAS's depthwise
    # kernel widens before it adds, so it cannot saturate; cpuclass.saturation probes it)
    depthwise_full_range: bool = False
    op_types: tuple[str, ...] = CPU_STATIC_OPS
    # u8 inputs of GEMM-based integer kernels on a 7-bit grid ([0, 128]), so that 8-bit
    # s8 weights cannot saturate either (128 * 128 * 2 = 32768): see static_formats
    narrow_gemm_inputs: bool = False
    dynamic_matmul: bool = False  # quantize MatMul/Gemm weights dynamically (CPU transformers)
    cpu_class: str = ""  # the CPU class the CPU formats are chosen for (runtime/cpuclass.py)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def spec_for(provider: str, model: onnx.ModelProto, mode: str = "auto", vnni: bool | None = None,
             cpu: str | None = None) -> FormatSpec:
    """The format for ``provider``; ``mode``: auto | static | dynamic (dynamic: CPU only).
    ``cpu``: the CPU class to quantize for (runtime/cpuclass.py; None: this machine's);
    ``vnni`` overrides whether it has int8 dot products.

    Without them (AVX2, AVX-512 without VNNI), measured in
    benchmarks/results/quant_formats_avx2.md: static Conv/Gemm weights are s8 with 7 bits
    (u8 x u8 QLinearConv, exact at 8 bits, ran 2.1x the float latency: slower than leaving
    the layer float), dynamic MatMul weights are u8 (u8 x u8 MatMulInteger: 8 bits, no
    saturation); ``dynamic_formats`` adds the faster 7-bit s8 form that quantize tries first."""
    from onnxforge.runtime.cpuclass import cpu_class, has_int8_dot

    if provider not in PROVIDERS:
        raise OptionError(f"unknown provider {provider!r}", hint=f"choose one of {', '.join(PROVIDERS)}")
    if mode not in ("auto", "static", "dynamic"):
        raise OptionError(f"unknown quantization mode {mode!r}", hint="choose auto, static or dynamic")
    if provider in ("cuda", "tensorrt"):
        if mode == "dynamic":
            raise OptionError(f"dynamic quantization has no {provider} kernels", hint="use static")
        return FormatSpec(provider, "s8", symmetric_activations=True, op_types=WEIGHTED_OPS)
    cls = cpu or cpu_class()
    vnni = has_int8_dot(cls) if vnni is None else vnni
    dynamic = mode == "dynamic" or (mode == "auto" and is_transformer(model))
    if vnni:
        return FormatSpec("cpu", "u8", dynamic_matmul=dynamic, cpu_class=cls)
    if dynamic:
        return FormatSpec("cpu", "u8", weight_type="u8", dynamic_matmul=True, cpu_class=cls)
    return FormatSpec("cpu", "u8", reduce_range=True, cpu_class=cls)


def static_formats(spec: FormatSpec) -> dict[str, FormatSpec]:
    """The static formats ``quantize`` scores for ``spec`` (it keeps the best scored).

    Without int8 dot products a u8 x s8 pair sum must stay within int16: 7-bit weights
    with 8-bit inputs (``spec``: 255 * 64 * 2 = 32640), or 8-bit weights with the inputs of
    GEMM-based kernels on a 7-bit grid (128 * 128 * 2 = 32768; rule seven-bit-gemm-input,
    ort_qdq.py). Both run on the same MLAS kernels (u8 x s8, symmetric weights), so they
    cost the same time and only the accuracy decides, deterministically; which bit matters
    more depends on the model (benchmarks/results/quant_avx2.md: PP-OCRv4 det, percentile
    ranges, cosine 0.906 with 7-bit weights vs 0.943 with 7-bit GEMM inputs; minmax ranges
    0.846 vs 0.816). Any other spec: itself alone."""
    if (spec.provider == "cpu" and spec.reduce_range and spec.weight_type == "s8" and spec.activation_type == "u8"
            and not spec.symmetric_activations and not spec.dynamic_matmul):
        return {"s8 7-bit weights": spec,
                "s8 8-bit weights, 7-bit GEMM inputs": dataclasses.replace(spec, reduce_range=False,
                                                                          narrow_gemm_inputs=True)}
    return {f"{spec.weight_type} weights": spec}


def narrowed_range(low: float, high: float) -> tuple[float, float]:
    """The range whose u8 grid puts [low, high] (0 included) on the codes [0, 128]: the scale
    doubles (x 255/127) and the zero point stays within [0, 127]; values above ``high``
    (outside the calibration) may still reach 255 and saturate."""
    low, high = min(low, 0.0), max(high, 0.0)
    return low, low + (high - low) * 255.0 / 127.0


# onnxruntime's fused attention kernels (what `optimize -O3` writes): their Softmax is inside
ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedMultiHeadAttention")


def dynamic_formats(spec: FormatSpec) -> dict[str, FormatSpec]:
    """The dynamic MatMul weight formats to try for ``spec``, fastest first on its CPU class.

    Without int8 dot products the u8 x s8 kernel with 7-bit weights (no saturation) ran
    faster than the exact u8 x u8 one in the same interleaved runs on this project's AVX2
    CPU (benchmarks/results/quant_avx2.md: distilbert_base 0.628x vs 0.720x of the -O3
    float latency, minilm_l6_real 0.669x vs 0.748x) but lost more accuracy (minilm_l6_real
    cosine 0.914 vs 0.990): ``quantize`` keeps the first whose score meets the budget, so the
    choice depends on accuracy only, never on a timing. With int8 dot products: ``spec`` alone."""
    if spec.provider == "cpu" and spec.dynamic_matmul and spec.weight_type == "u8":
        return {"s8 7-bit weights": dataclasses.replace(spec, weight_type="s8", reduce_range=True),
                "u8 8-bit weights": spec}
    return {f"{spec.weight_type} weights": spec}


def is_transformer(model: onnx.ModelProto) -> bool:
    """Attention-shaped models: a Softmax or a fused attention op present and weighted MatMuls
    outnumber Convs (an `-O3` model's Softmax lies inside MultiHeadAttention: without the
    fused ops it was taken for a CNN and quantized statically, 25 nodes back to float on
    distilbert_base where the dynamic format needs none)."""
    ops = [n.op_type for n in model.graph.node]
    initializers = {t.name for t in model.graph.initializer}
    weighted_matmuls = sum(
        1 for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in initializers
    )
    attention = "Softmax" in ops or any(
        n.op_type in ATTENTION_OPS and n.domain == MS_DOMAIN for n in model.graph.node)
    return attention and weighted_matmuls > ops.count("Conv")


# ------------------------------------------------------------------ exclusions


def provider_exclusions(model: onnx.ModelProto, spec: FormatSpec) -> dict[str, str]:
    """Node name -> why it stays float, for the provider's placement rules."""
    initializers = {t.name: t for t in model.graph.initializer}
    excluded: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv", "ConvTranspose"):
            continue
        weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
        if weight is None and node.op_type in ("MatMul", "Gemm"):
            if spec.provider != "cpu":
                excluded[node.name] = "activation x activation product (attention internals)"
            continue
        if spec.provider != "cpu" and weight is not None and int(np.prod(weight.dims)) < TINY_GEMM_ELEMENTS:
            excluded[node.name] = f"tiny GEMM ({int(np.prod(weight.dims))} weight elements)"
    return excluded


# ------------------------------------------------------------------ quantizers


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if name == "u8" else QuantType.QInt8


def static_qdq(
    model: onnx.ModelProto,
    ranges: Mapping[str, tuple[float, float]],
    spec: FormatSpec,
    exclude: list[str] | Mapping[str, str] = (),
    op_types: tuple[str, ...] | None = None,
) -> onnx.ModelProto:
    """QDQ model with ``ranges`` as activation ranges: onnxruntime's QDQ placer, run as the
    registered pass onnxruntime-qdq (ort_qdq.py); ``exclude``: names kept float (name ->
    why, or a list). CPU u8 formats then get the integer activations and NHWC movement."""
    from .registered import apply_passes

    kept = dict(exclude) if isinstance(exclude, Mapping) else dict.fromkeys(exclude, "the quantization plan keeps it float")
    options = {"onnxruntime-qdq": {"ranges": dict(ranges), "spec": spec, "op_types": op_types, "exclude": kept}}
    out, _ = apply_passes(model, ("onnxruntime-qdq",), max_iterations=1, options=options)
    if spec.provider == "cpu" and not spec.symmetric_activations:
        out, _ = integer_activations(out)  # HardSwish/HardSigmoid as QLinearAdd/QLinearMul
        out = _movement_in_nhwc(out)
    from .subgraph_pairs import unpair_before_subgraph_reads

    unpair_before_subgraph_reads(out)  # pairs the steps above placed, which onnxruntime would abort on
    return out


def depthwise_weights(model: onnx.ModelProto) -> dict[str, str]:
    """Weight initializer -> Conv name, for depthwise Convs (one input and one output
    channel per group: MLAS runs them on its depthwise kernel, not a GEMM)."""
    inits = {t.name: t for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        dims = inits[node.input[1]].dims
        if group > 1 and len(dims) >= 2 and dims[1] == 1 and dims[0] == group:
            found[node.input[1]] = node.name
    return found


def weight_overrides(model: onnx.ModelProto, spec: FormatSpec) -> dict[str, list[dict]]:
    """onnxruntime TensorQuantOverrides for weights whose format differs from the spec's:
    depthwise weights at 8 bits when the spec reduces the range of the rest."""
    if not (spec.reduce_range and spec.depthwise_full_range and spec.weight_type == "s8"):
        return {}
    axis = {"axis": 0} if spec.per_channel else {}
    return {name: [{**axis, "reduce_range": False}] for name in sorted(depthwise_weights(model))}


def _movement_in_nhwc(model: onnx.ModelProto) -> onnx.ModelProto:
    """Nearest Resize / DepthToSpace of integers and per-channel scales written in
    NHWC, each kind kept when onnxruntime's layout transposes cancel around it
    (the optimized graph holds no more Transpose nodes; see layout.py)."""
    baseline_transposes = None
    for rewrite in (nhwc_data_movement, wide_channel_scales):
        candidate, count = rewrite(_copy(model))
        if not count:
            continue
        try:
            if baseline_transposes is None:
                baseline_transposes = ort_transposes(model)
            after = ort_transposes(candidate)
        except Exception:  # noqa: BLE001 - a rewrite onnxruntime cannot load is simply not kept
            continue
        if after <= baseline_transposes:
            model, baseline_transposes = candidate, after
    return model


def dynamic_matmul(model: onnx.ModelProto, spec: FormatSpec, exclude: list[str] = ()) -> onnx.ModelProto:
    """MatMul/Gemm with constant weights quantized dynamically (u8 activations, s8 weights):
    onnxruntime's dynamic quantizer on a copy of ``model``. ``quantize`` runs it as the
    registered pass onnxruntime-dynamic (ort_dynamic.py), which says per node what it hands over."""
    return dynamic_matmul_in_place(_copy(model), spec, exclude)


def dynamic_matmul_in_place(working: onnx.ModelProto, spec: FormatSpec, exclude: list[str] = ()) -> onnx.ModelProto:
    """``dynamic_matmul`` on ``working`` itself (the caller's own copy, the default domain listed
    once): onnxruntime's quantizer changes it; the quantized model is returned."""
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
    from onnxruntime.quantization.quant_utils import QuantizationMode

    marked = _mark_inferred(_with_inferred_types(working))
    with _shapes_inferred_in_place():
        quantizer = ONNXQuantizer(
            working,
            spec.per_channel,
            spec.reduce_range,
            QuantizationMode.IntegerOps,
            False,
            _qtype(spec.weight_type),
            _qtype("u8"),
            None,
            None,
            list(exclude),
            ["MatMul", "Gemm"],
            {"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        quantizer.quantize_model()
    worked = _without_unused_initializers(quantizer.model.model)
    if marked:  # the user's own mark, if the model had one, stays
        kept = [p for p in worked.metadata_props if (p.key, p.value) != _INFER_MARK]
        del worked.metadata_props[:]
        worked.metadata_props.extend(kept)
    # protobuf frees a message's parts only with the whole message: the float weights
    # the quantizer dropped stay allocated until ``worked`` goes (Llama 570M: 2.2 GB)
    return _copy(worked)


# onnxruntime's quantizer skips its own shape inference for a model marked so
_INFER_MARK = ("onnx.infer", "onnxruntime.quant")


def _with_inferred_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself with the value_info of onnx shape inference (run on a weight-less
    copy past 2 GB, see ortsession.infer_shapes)."""
    from .ortsession import infer_shapes

    inferred = infer_shapes(model)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def _mark_inferred(model: onnx.ModelProto) -> bool:
    """Add onnxruntime's "shapes inferred" mark unless it is there; True if added."""
    if any((p.key, p.value) == _INFER_MARK for p in model.metadata_props):
        return False
    model.metadata_props.add(key=_INFER_MARK[0], value=_INFER_MARK[1])
    return True


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _shapes_inferred_in_place():
    """onnxruntime's dynamic quantizer re-infers shapes by deep-copying the model, saving
    it and loading it back: two more copies of every weight at once (Llama 570M: 4.4 GB).
    Within this block it adds the inferred types to the model it holds instead (one
    block at a time: the patch is onnxruntime's module attribute)."""
    from onnxruntime.quantization import onnx_quantizer

    with _PATCH_LOCK:
        original = getattr(onnx_quantizer, "save_and_reload_model_with_shape_infer", None)
        if original is None:  # another onnxruntime layout: leave it as it is
            yield
            return
        onnx_quantizer.save_and_reload_model_with_shape_infer = _with_inferred_types
        try:
            yield
        finally:
            onnx_quantizer.save_and_reload_model_with_shape_infer = original


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for onnxruntime's quantizers, which need the default domain listed once."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return one_default_domain(out)


def _without_unused_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop initializers nothing reads: the float originals of quantized weights. For the
    dynamic quantizer's output on the ModelProto itself, not through a pass's cleanup: a
    graphsurgeon round trip would hold the weights of a 2 GB model twice."""
    used = {name for node in _all_nodes(model.graph) for name in node.input}
    used.update(o.name for o in model.graph.output)
    keep = [t for t in model.graph.initializer if t.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return model


def holds_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.HasField("g") or len(a.graphs) for a in node.attribute)


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _all_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_nodes(sub)
