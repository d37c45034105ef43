"""The float baseline every quantization starts from.

Quantizers need three things the raw exports often lack:
  * weights as initializers (Paddle writes them as Constant nodes, which a
    QDQ quantizer treats as activations: per-tensor, per_channel silently off);
  * opset >= 13 (DequantizeLinear's ``axis``, needed for per-channel weights);
  * BatchNormalization, bias Add and scale Mul folded into Conv/Gemm, so the
    integer kernel covers them instead of a float op between Q and DQ.

The baseline is onnxforge's own -O2 pipeline (when its passes are registered)
followed by constant lowering/folding and onnxruntime's *basic* offline
rewrites (constant folding, Conv+BN/Add/Mul, Pad+Conv), which emit standard
ONNX ops only and so stay portable across providers. The same baseline is the
"optimized float model" the int8 result is compared with.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from onnxforge.model import Model

log = logging.getLogger("onnxforge.quant")

MIN_QDQ_OPSET = 13


def float_baseline(model: Model | onnx.ModelProto, *, ort_basic: bool = True) -> onnx.ModelProto:
    """The cleaned, opset>=13, BN-folded float model as a ModelProto."""
    proto = _onnxforge_pipeline(model)
    proto = lower_constants(proto)
    proto = raise_opset(proto, MIN_QDQ_OPSET)
    if ort_basic:
        proto = ort_offline(proto, level="basic")
    return proto


def _onnxforge_pipeline(model: Model | onnx.ModelProto) -> onnx.ModelProto:
    """Run onnxforge's -O2 passes to a fixpoint when they exist."""
    from onnxforge.passes.registry import level_pipeline, resolve

    proto = model if isinstance(model, onnx.ModelProto) else model.to_proto()
    names = level_pipeline(2)
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
        graph.fold_constants(error_ok=True)
    except Exception as exc:  # noqa: BLE001 - folding is an improvement, not a precondition
        log.warning("constant folding failed (%s)", exc)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    exported = gs.export_onnx(graph, do_type_check=False)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    out.graph.CopyFrom(exported.graph)
    return out


def raise_opset(proto: onnx.ModelProto, minimum: int) -> onnx.ModelProto:
    current = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), minimum)
    if current >= minimum:
        return proto
    converted = onnx.version_converter.convert_version(proto, minimum)
    if converted.ir_version < 7:
        converted.ir_version = 7
    return converted


def ort_offline(proto: onnx.ModelProto, level: str = "basic", providers=("CPUExecutionProvider",)) -> onnx.ModelProto:
    """The graph onnxruntime writes after its session-time rewrites at ``level``."""
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
        ort.InferenceSession(proto.SerializeToString(), options, providers=list(providers))
        optimized = onnx.load(str(target))
    # Keep the user's model-level fields; ORT rewrites producer fields.
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    out.graph.CopyFrom(optimized.graph)
    have = {o.domain for o in out.opset_import}
    for imp in optimized.opset_import:
        if imp.domain not in have:
            out.opset_import.append(imp)
    return out
