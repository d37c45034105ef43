"""The float baseline every quantization starts from.

Quantizers need three things the raw exports often lack:
  * weights as initializers (Paddle writes them as Constant nodes, which a
    QDQ quantizer treats as activations: per-tensor, per_channel silently off);
  * opset >= 13 (DequantizeLinear's ``axis``, needed for per-channel weights);
  * BatchNormalization, bias Add and scale Mul folded into Conv/Gemm, so the
    integer kernel covers them instead of a float op between Q and DQ: the
    affine after a Conv into that Conv (fold_conv_affine), and the affine
    after an activation into the next Conv (equalize.fold_affine).

The baseline is onnxforge's own -O2 pipeline (when its passes are registered)
followed by constant lowering/folding and onnxruntime's *basic* offline
rewrites (constant folding, Conv+BN/Add/Mul, Pad+Conv), which emit standard
ONNX ops only and so stay portable across providers. The same baseline is the
"optimized float model" the int8 result is compared with.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from onnxforge.io import iter_tensor_protos
from onnxforge.model import Model, copy_fields

from .equalize import fold_affine, graph_maps
from onnxforge.opsets import DEFAULT_DOMAINS, default_opset, one_default_domain
from .ortsession import (
    infer_shapes, loads_from_file, return_freed_memory, with_external_data_loaded,
    write_with_external_data,
)

log = logging.getLogger("onnxforge.quant")

MIN_QDQ_OPSET = 13


def float_baseline(model: Model | onnx.ModelProto, *, ort_basic: bool = True, affine_into_next: bool = True) -> onnx.ModelProto:
    """The cleaned, opset>=13, BN-folded float model as a ModelProto."""
    # -O2 folds affines into the next conv too (fuse-affine-into-conv): off with them
    proto = _onnxforge_pipeline(model, skip=() if affine_into_next else ("fuse-affine-into-conv",))
    base_dir = model.source.parent if isinstance(model, Model) and model.source is not None else None
    if ort_basic and base_dir is not None and _external_only_in_initializers(proto) and default_opset(proto) >= MIN_QDQ_OPSET:
        # onnxruntime reads the weights from their files and folds constants and lifts
        # Constant nodes itself: they are loaded once, from its output (2.2 GB Llama:
        # 6 GB less at the peak than loading them, folding with graphsurgeon, and copying)
        proto = ort_offline(proto, level="basic", base_dir=base_dir)
    else:
        proto = lower_constants(with_external_data_loaded(proto, base_dir))
        proto = raise_opset(proto, MIN_QDQ_OPSET)
        if ort_basic:
            proto = ort_offline(proto, level="basic")
    proto, _ = fold_conv_affine(proto)
    proto, _ = whole_window_pools_to_global(proto)
    proto, _ = gemm_bias_as_vector(proto)
    proto, _ = fuse_hardswish(proto)
    if affine_into_next:
        proto, _ = fold_affine(proto)
    return proto


def _onnxforge_pipeline(model: Model | onnx.ModelProto, skip: tuple[str, ...] = ()) -> onnx.ModelProto:
    """Run onnxforge's -O2 passes (less ``skip``) to a fixpoint when they exist."""
    from onnxforge.passes.registry import level_pipeline, resolve

    proto = model if isinstance(model, onnx.ModelProto) else model.to_proto()
    names = [n for n in level_pipeline(2) if n not in skip]
    if not names:
        return proto
    try:
        from onnxforge.pass_manager import PassManager

        working = Model.from_proto(proto) if isinstance(model, onnx.ModelProto) else model.copy()
        optimized, _report = PassManager([resolve(n) for n in names], verify="none").run(working)
        return optimized.to_proto()
    except Exception as exc:  # noqa: BLE001 - the baseline still works without onnxforge's passes
        log.warning("onnxforge -O2 pipeline failed before quantization (%s); continuing without it", exc)
        return proto


def lower_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Constant nodes become initializers and constant subexpressions are folded."""
    graph = gs.import_onnx(proto)
    try:
        with _graphsurgeon_quiet():  # its failed partial folds print onnxruntime errors
            graph.fold_constants(error_ok=True)
    except Exception as exc:  # noqa: BLE001 - folding is an improvement, not a precondition
        log.warning("constant folding failed (%s)", exc)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return _with_graph(proto, graph)


@contextlib.contextmanager
def _graphsurgeon_quiet():
    """graphsurgeon's warnings off (onnxruntime's basic level folds what it leaves)."""
    from onnx_graphsurgeon.logger import G_LOGGER

    previous = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.ERROR + 1
    try:
        yield
    finally:
        G_LOGGER.severity = previous


def constant_nodes_to_initializers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Main-graph Constant nodes holding a tensor become initializers; nothing is folded
    (int8 weights dequantized by Cast+Mul must stay int8 for reuse)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    kept = []
    for node in out.graph.node:
        attr = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if attr is not None and attr.name == "value" and node.domain in ("", "ai.onnx"):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
            tensor.name = node.output[0]
            out.graph.initializer.append(tensor)
        else:
            kept.append(node)
    del out.graph.node[:]
    out.graph.node.extend(kept)
    return out


def _external_only_in_initializers(proto: onnx.ModelProto) -> bool:
    """Some tensor is in an external file, and each such one is a main-graph initializer
    (the ones write_with_external_data streams; others are loaded the usual way)."""
    external = onnx.TensorProto.EXTERNAL
    in_initializers = sum(t.data_location == external for t in proto.graph.initializer)
    anywhere = sum(t.data_location == external for t, _where in iter_tensor_protos(proto))
    return 0 < in_initializers == anywhere


def raise_opset(proto: onnx.ModelProto, minimum: int) -> onnx.ModelProto:
    if default_opset(proto, missing=minimum) >= minimum:
        return proto
    converted = onnx.version_converter.convert_version(proto, minimum)
    if converted.ir_version < 7:
        converted.ir_version = 7
    return converted


def ort_offline(proto: onnx.ModelProto, level: str = "basic", providers=("CPUExecutionProvider",),
                base_dir: Path | None = None, weights: bool = True) -> onnx.ModelProto:
    """The graph onnxruntime writes after its session-time rewrites at ``level``.
    Weights still in external files under ``base_dir`` are streamed to onnxruntime's
    copy, never held in memory here; the result holds them all in memory, or, with
    ``weights=False`` and a model past SESSION_FILE_BYTES, none of the large ones
    (their headers point at a file that is gone: read the graph, not the values)."""
    if not loads_from_file(proto):
        return _ort_offline_source(proto.SerializeToString(), proto, level, providers)
    with tempfile.TemporaryDirectory(prefix="onnxforge-quant-") as tmp:
        source = write_with_external_data(proto, Path(tmp) / "source.onnx", base_dir)
        return _ort_offline_source(str(source), proto, level, providers, weights)


def _ort_offline_source(source: bytes | str, header: onnx.ModelProto, level: str, providers,
                        weights: bool = True) -> onnx.ModelProto:
    """Run onnxruntime on ``source`` (serialized model or path) and read back the model it
    writes, with ``header``'s model-level fields (onnxruntime rewrites the producer)."""
    import onnxruntime as ort

    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    with tempfile.TemporaryDirectory(prefix="onnxforge-quant-") as tmp:
        target = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = levels[level]
        options.optimized_model_filepath = str(target)
        if isinstance(source, str):  # large: the rewritten model keeps its weights in a file beside it
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(source, options, providers=list(providers))
        del source
        return_freed_memory()  # what onnxruntime's session held
        optimized = onnx.load(str(target), load_external_data=weights)
    # the graph is moved, not copied (a copy is the model's size again at the peak)
    ort_opsets = [onnx.helper.make_opsetid(o.domain, o.version) for o in optimized.opset_import]
    out = _with_model_fields(optimized, header)
    have = {o.domain for o in out.opset_import}
    for imp in ort_opsets:
        if imp.domain not in have and not (imp.domain in DEFAULT_DOMAINS and have & set(DEFAULT_DOMAINS)):
            out.opset_import.append(imp)
    return out


# ------------------------------------------------------------------ fusions that help quantization


def fold_conv_affine(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Conv -> Mul(c) [-> Add(d)] with per-channel or scalar constants becomes one
    Conv: W' = W * c[oc], b' = b * c + d. Exact; needs the Conv output to feed the
    Mul only (PP-LCNetV3's learnable affine blocks write this after every Conv)."""
    import numpy as np

    graph = gs.import_onnx(proto)
    folded = 0
    for conv in [n for n in graph.nodes if n.op == "Conv"]:
        weight = conv.inputs[1] if len(conv.inputs) > 1 else None
        if not isinstance(weight, gs.Constant) or len(conv.outputs[0].outputs) != 1:
            continue
        if conv.outputs[0] in graph.outputs:
            continue
        channels = weight.shape[0]
        bias = conv.inputs[2].values if len(conv.inputs) > 2 and isinstance(conv.inputs[2], gs.Constant) else np.zeros(channels, np.float32)
        if len(conv.inputs) > 2 and not isinstance(conv.inputs[2], gs.Constant):
            continue
        w, b, tail = weight.values.astype(np.float32), bias.astype(np.float32), conv.outputs[0]
        changed = False
        for op in ("Mul", "Add"):
            users = tail.outputs
            if len(users) != 1 or users[0].op != op or tail in graph.outputs:
                break
            node = users[0]
            other = node.inputs[1] if node.inputs[0] is tail else node.inputs[0]
            per_channel = _channel_vector(other, channels)
            if per_channel is None:
                break
            if op == "Mul":
                w = w * per_channel.reshape(-1, *([1] * (w.ndim - 1)))
                b = b * per_channel
            else:
                b = b + per_channel
            out = node.outputs[0]
            node.outputs.clear()
            conv.outputs[0] = out
            tail = out
            changed = True
        if changed:
            conv.inputs[1] = gs.Constant(weight.name + "_folded", w.astype(np.float32))
            bias_const = gs.Constant(conv.name + "_bias_folded", b.astype(np.float32))
            if len(conv.inputs) > 2:
                conv.inputs[2] = bias_const
            else:
                conv.inputs.append(bias_const)
            folded += 1
    if not folded:
        return proto, 0
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return _with_graph(proto, graph), folded


def _channel_vector(tensor, channels: int):
    """The constant as a [channels] vector when it broadcasts per output channel (NCHW)."""
    import numpy as np

    if not isinstance(tensor, gs.Constant):
        return None
    values = np.asarray(tensor.values, dtype=np.float32)
    if values.size == 1:
        return np.full(channels, float(values.reshape(-1)[0]), np.float32)
    squeezed = values.reshape(-1)
    shape = values.shape
    # [C,1,1], [1,C,1,1]: the channel axis is the third from the end.
    if squeezed.size == channels and len(shape) >= 3 and shape[-3] == channels:
        return squeezed
    return None


def whole_window_pools_to_global(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """AveragePool/MaxPool whose window covers the whole (static) input become
    GlobalAveragePool/GlobalMaxPool.

    Identity: with pads 0 and kernel >= H, W the single window holds exactly the
    H x W input values, so the pool is the global one (ceil_mode only decides
    that there is one window; count_include_pad has no pad to count). Exporters
    write torch's ``AvgPool2d(k, ceil_mode=True)`` with k far above the input
    (EfficientNet: 1280 on 7x7); onnxruntime's QLinearAveragePool computes such
    a window wrongly (outputs the zero point), its QLinearGlobalAveragePool is
    right and faster. Preconditions: 4-D input with known H, W; pads 0; no
    dilations; exactly one window per axis (kernel == size, or kernel > size
    with ceil_mode and kernel - size < stride); one output.
    """
    shapes = _static_shapes(proto)
    changed = 0
    for node in proto.graph.node:
        if node.op_type not in ("AveragePool", "MaxPool") or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            continue
        dims = shapes.get(node.input[0])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        kernel, pads = attrs.get("kernel_shape", []), attrs.get("pads", [0] * 4)
        if dims is None or len(dims) != 4 or any(d is None for d in dims[2:]) or len(kernel) != 2:
            continue
        if any(pads) or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID") or "dilations" in attrs and any(d != 1 for d in attrs["dilations"]):
            continue
        strides = attrs.get("strides", [1, 1])
        one_window = all(k >= d and (k == d or (attrs.get("ceil_mode", 0) and k - d < s)) for k, d, s in zip(kernel, dims[2:], strides))
        if not one_window:
            continue
        node.op_type = "Global" + node.op_type
        del node.attribute[:]
        changed += 1
    return proto, changed


def gemm_bias_as_vector(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Gemm's C of shape [1, N] becomes [N] (the same broadcast over rows).

    onnxruntime's MatMul+Add fusion writes C as [1, N]; its QDQ quantizer then
    compares a row of the per-channel bias with a scalar and fails ("truth value of
    an array ... is ambiguous", magika_v3_3)."""
    from onnx import numpy_helper

    _producers, readers, inits, _outputs = graph_maps(proto)
    changed = 0
    for node in proto.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in inits or len(readers[node.input[2]]) != 1:
            continue
        c = inits[node.input[2]]
        if len(c.dims) == 2 and c.dims[0] == 1:
            c.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(c).reshape(-1), c.name))
            changed += 1
    return proto, changed


def _static_shapes(proto: onnx.ModelProto) -> dict[str, list]:
    try:
        inferred = infer_shapes(proto)
    except Exception:  # noqa: BLE001 - without shapes nothing is rewritten
        return {}
    shapes = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
    return shapes


def fuse_hardswish(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """x * Clip(x + 3, 0, 6) / 6 and x * HardSigmoid(x; 1/6, 0.5) become HardSwish(x)
    (opset 14): one float op between Q/DQ instead of four elementwise ones."""
    graph = gs.import_onnx(proto)
    if not any(_hardswish_match(node)[0] is not None for node in graph.nodes):
        return proto, 0
    graph = gs.import_onnx(raise_opset(proto, 14))  # HardSwish exists from opset 14
    fused = 0
    for node in list(graph.nodes):
        x, out = _hardswish_match(node)
        if x is None:
            continue
        for producer in list(out.inputs):
            producer.outputs.clear()
        graph.nodes.append(gs.Node("HardSwish", name=(node.name or out.name) + "_hardswish", inputs=[x], outputs=[out]))
        fused += 1
    if fused:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        proto = _with_graph(raise_opset(proto, 14), graph)
    return proto, fused


def _scalar(tensor, value: float) -> bool:
    import numpy as np

    return isinstance(tensor, gs.Constant) and tensor.values.size == 1 and abs(float(np.asarray(tensor.values).reshape(-1)[0]) - value) < 1e-4


def _hardswish_match(node):
    """(x, output) when ``node`` ends a written-out HardSwish, else (None, None)."""
    if node.op == "Div" and _scalar(node.inputs[1], 6.0):
        mul = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        if mul is not None and mul.op == "Mul" and len(node.inputs[0].outputs) == 1:
            x = _clip_partner(mul)
            if x is not None:
                return x, node.outputs[0]
    if node.op == "Mul":
        for a, b in ((0, 1), (1, 0)):
            hs = node.inputs[b].inputs[0] if node.inputs[b].inputs else None
            if hs is not None and hs.op == "HardSigmoid" and hs.inputs[0] is node.inputs[a] and len(node.inputs[b].outputs) == 1:
                if abs(hs.attrs.get("alpha", 0.2) - 1 / 6) < 1e-4 and abs(hs.attrs.get("beta", 0.5) - 0.5) < 1e-4:
                    return node.inputs[a], node.outputs[0]
    return None, None


def _clip_partner(mul):
    for a, b in ((0, 1), (1, 0)):
        clip = mul.inputs[b].inputs[0] if mul.inputs[b].inputs else None
        if clip is None or clip.op != "Clip" or len(clip.inputs) < 3 or len(mul.inputs[b].outputs) != 1:
            continue
        if not (_scalar(clip.inputs[1], 0.0) and _scalar(clip.inputs[2], 6.0)):
            continue
        add = clip.inputs[0].inputs[0] if clip.inputs[0].inputs else None
        if add is None or add.op != "Add" or len(clip.inputs[0].outputs) != 1:
            continue
        for c, d in ((0, 1), (1, 0)):
            if add.inputs[c] is mul.inputs[a] and _scalar(add.inputs[d], 3.0):
                return mul.inputs[a]
    return None


def _with_graph(proto: onnx.ModelProto, graph: gs.Graph) -> onnx.ModelProto:
    """``proto``'s model-level fields around ``graph`` exported. The exported graph
    is kept, not copied: each copy is the model's size again at the peak."""
    return _with_model_fields(gs.export_onnx(graph, do_type_check=False), proto)


def _with_model_fields(out: onnx.ModelProto, source: onnx.ModelProto) -> onnx.ModelProto:
    """``out`` (its graph kept in place) with ``source``'s model-level fields instead of its
    own, the default domain listed once."""
    for field, _ in list(out.ListFields()):
        if field.name != "graph":
            out.ClearField(field.name)
    copy_fields(source, out, {"graph"})
    return one_default_domain(out)
