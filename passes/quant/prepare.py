"""The float baseline every quantization starts from.

Quantizers need three things the raw exports often lack:
  * weights as initializers (Paddle writes them as Constant nodes, which a
    QDQ quantizer treats as activations: per-tensor, per_channel silently off);
  * opset >= 13 (DequantizeLinear's ``axis``, needed for per-channel weights);
  * BatchNormalization, bias Add and scale Mul folded into Conv/Gemm, so the
    integer kernel covers them instead of a float op between Q and DQ: the
    affine after a Conv into that Conv (fuse-conv-affine), and the affine
    after an activation into the next Conv (equalize.fold_affine).

The baseline is onnxforge's own -O2 pipeline (when its passes are registered)
followed by constant lowering/folding, the opset raise and onnxruntime's *basic*
offline rewrites (constant folding, Conv+BN/Add/Mul, Pad+Conv), which emit standard
ONNX ops only and so stay portable across providers: the registered passes of
baseline_rules.py, each one library call behind its rule. The same baseline is the
"optimized float model" the int8 result is compared with.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from onnxforge.io import iter_tensor_protos
from onnxforge.model import Model, copy_fields
from onnxforge.passes.base import name_nodes

from .baseline_rules import MIN_QDQ_OPSET
from .equalize import fold_affine
from .registered import apply_call, apply_passes
from onnxforge.opsets import DEFAULT_DOMAINS, default_opset, one_default_domain
from .ortsession import (
    loads_from_file, return_freed_memory, with_external_data_loaded,
    write_with_external_data,
)

log = logging.getLogger("onnxforge.quant")


def float_baseline(model: Model | onnx.ModelProto, *, affine_into_next: bool = True) -> onnx.ModelProto:
    """The cleaned, opset>=13, BN-folded float model as a ModelProto.

    onnxforge's -O2 passes run unverified (verifying a large model costs its size again);
    when onnxruntime's basic level then rejects their output (a fold that lets it inline an
    If whose branch it cannot type), they rerun verified, which rolls back the rewrite to
    blame; an original onnxruntime rejects there itself is bad input."""
    # -O2 folds affines into the next conv too (fuse-affine-into-conv): off with them
    skip = () if affine_into_next else ("fuse-affine-into-conv",)
    proto = _onnxforge_pipeline(model, skip=skip)
    try:
        return _prepared(model, proto, affine_into_next)
    except OnnxRuntimeRejects as exc:
        log.warning("onnxruntime rejects the -O2 output at its basic level (%s); rerunning -O2 verified", exc)
    proto = _onnxforge_pipeline(model, skip=skip, verify="structural")
    try:
        return _prepared(model, proto, affine_into_next)
    except OnnxRuntimeRejects as exc:
        from onnxforge.errors import DataError

        raise DataError(f"onnxruntime cannot load the model at its basic optimization level: {exc}",
                        hint="quantization starts from onnxruntime's basic-level graph; check the model with "
                             "`onnxforge inspect`") from None


class OnnxRuntimeRejects(Exception):
    """onnxruntime failed to build a session of the float baseline (its first line)."""


def _prepared(model: Model | onnx.ModelProto, proto: onnx.ModelProto, affine_into_next: bool) -> onnx.ModelProto:
    """``float_baseline`` after onnxforge's passes: onnxruntime's basic level, QDQ prep."""
    base_dir = model.source.parent if isinstance(model, Model) and model.source is not None else None
    if base_dir is not None and _external_only_in_initializers(proto) and default_opset(proto) >= MIN_QDQ_OPSET:
        # onnxruntime reads the weights from their files and folds constants and lifts
        # Constant nodes itself: they are loaded once, from its output (2.2 GB Llama:
        # 6 GB less at the peak than loading them, folding with graphsurgeon, and copying)
        proto = _checked_offline(proto, base_dir=base_dir)
    else:
        proto = lower_constants(with_external_data_loaded(proto, base_dir))
        proto = raise_opset(proto, MIN_QDQ_OPSET)
        proto = _checked_offline(proto)
    proto, _ = apply_passes(proto, QUANT_PREP_PASSES)
    proto, _ = fuse_hardswish(proto)
    if affine_into_next:
        proto, _ = fold_affine(proto)
    return name_unnamed_nodes(proto)


def name_unnamed_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every main-graph node named (``base.name_nodes``; names already there, shared ones
    included, kept as they are)."""
    name_nodes(model.graph.node, duplicates=False)
    return model


def _checked_offline(proto: onnx.ModelProto, base_dir: Path | None = None) -> onnx.ModelProto:
    """onnxruntime's basic level (the registered pass onnxruntime-basic); its rule's refusal, or
    onnxruntime's, as ``OnnxRuntimeRejects``."""
    from onnxforge.errors import first_line

    try:
        out, ctx = apply_call(proto, "onnxruntime-basic", {"base_dir": base_dir})
    except MemoryError:
        raise
    except Exception as exc:  # onnxruntime's Fail / InvalidGraph / ... at session creation
        if type(exc).__module__.startswith("onnxruntime"):
            raise OnnxRuntimeRejects(first_line(exc, limit=300)) from exc
        raise
    if ctx.refusals:
        raise OnnxRuntimeRejects(ctx.refusals[0].reason)
    return out


def _onnxforge_pipeline(model: Model | onnx.ModelProto, skip: tuple[str, ...] = (),
                        verify: str = "none") -> onnx.ModelProto:
    """Run onnxforge's -O2 passes (less ``skip``) to a fixpoint when they exist."""
    from onnxforge.passes.registry import level_pipeline, resolve

    proto = model if isinstance(model, onnx.ModelProto) else model.to_proto()
    names = [n for n in level_pipeline(2) if n not in skip]
    if not names:
        return proto
    try:
        from onnxforge.pass_manager import PassManager

        working = Model.from_proto(proto) if isinstance(model, onnx.ModelProto) else model.copy()
        optimized, _report = PassManager([resolve(n) for n in names], verify=verify).run(working)
        return optimized.to_proto()
    except Exception as exc:  # noqa: BLE001 - the baseline still works without onnxforge's passes
        log.warning("onnxforge -O2 pipeline failed before quantization (%s); continuing without it", exc)
        return proto


def lower_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Constant nodes become initializers and constant subexpressions are folded (the
    registered pass graphsurgeon-fold-constants)."""
    return apply_call(proto, "graphsurgeon-fold-constants")[0]


def constant_nodes_to_initializers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Constant nodes holding a tensor become initializers (the cleanup pass
    constant-to-initializer); nothing is folded (int8 weights dequantized by Cast+Mul must
    stay int8 for reuse). A new proto; ``proto`` itself when there is nothing to lift."""
    return apply_passes(proto, ("constant-to-initializer",), max_iterations=1)[0]


def _external_only_in_initializers(proto: onnx.ModelProto) -> bool:
    """Some tensor is in an external file, and each such one is a main-graph initializer
    (the ones write_with_external_data streams; others are loaded the usual way)."""
    external = onnx.TensorProto.EXTERNAL
    in_initializers = sum(t.data_location == external for t in proto.graph.initializer)
    anywhere = sum(t.data_location == external for t, _where in iter_tensor_protos(proto))
    return 0 < in_initializers == anywhere


def raise_opset(proto: onnx.ModelProto, minimum: int) -> onnx.ModelProto:
    """The default domain at ``minimum`` or above (the registered pass raise-opset); its
    refusal is bad input here (quantization needs the opset)."""
    out, ctx = apply_call(proto, "raise-opset", {"minimum": minimum})
    if ctx.refusals:
        from onnxforge.errors import DataError

        raise DataError(f"cannot raise the model to opset {minimum}: {ctx.refusals[0].reason}",
                        hint="quantization needs opset 13 (per-channel DequantizeLinear); convert the model first")
    return out


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
    out = with_model_fields(optimized, header)
    have = {o.domain for o in out.opset_import}
    for imp in ort_opsets:
        if imp.domain not in have and not (imp.domain in DEFAULT_DOMAINS and have & set(DEFAULT_DOMAINS)):
            out.opset_import.append(imp)
    return out


# ------------------------------------------------------------------ fusions that help quantization
# Registered rule passes (``onnxforge passes``, ``--explain``), run again after onnxruntime's
# basic rewrites (which fold constants into new operands): fuse-conv-affine (PP-LCNetV3's
# learnable affine blocks after every Conv), global-pool (onnxruntime's QLinearAveragePool
# computes a whole-input window wrongly), gemm-bias-vector (its QDQ quantizer fails on a
# [1, N] Gemm bias, magika_v3_3), then fuse-hardswish.
QUANT_PREP_PASSES = ("fuse-conv-affine", "global-pool", "gemm-bias-vector")


def fuse_hardswish(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """x * Clip(x + 3, 0, 6) / 6 and x * HardSigmoid(x; 1/6, 0.5) become HardSwish(x)
    (fuse-hardswish): one float op between Q/DQ instead of four elementwise ones. HardSwish
    exists from opset 14: the model is raised to it only when a HardSwish would be made."""
    if default_opset(proto) < 14 and _makes_hardswish(proto):
        # refused (local functions): the model stays below 14, where fuse-hardswish writes x * HardSigmoid(x)
        proto = apply_call(proto, "raise-opset", {"minimum": 14})[0]
    return apply_passes(proto, ("fuse-hardswish",))


def _makes_hardswish(proto: onnx.ModelProto) -> bool:
    """Whether fuse-hardswish's HardSwish rules would fire at opset 14 (match, then check)."""
    from onnxforge.context import PassContext, Refusal
    from onnxforge.passes.fusion.hardswish import HardSwishClip, HardSwishFromHardSigmoid

    graph = gs.import_onnx(proto)
    graph.opset = 14  # this copy only: HardSwishFromHardSigmoid matches from opset 14
    ctx = PassContext()
    for rule in (HardSwishClip(), HardSwishFromHardSigmoid()):
        for node in graph.nodes:
            if node.op in rule.anchor_ops:
                match = rule.match(graph, node)
                if match is not None and not isinstance(rule.check(graph, match, ctx), Refusal):
                    return True
    return False


def with_model_fields(out: onnx.ModelProto, source: onnx.ModelProto) -> onnx.ModelProto:
    """``out`` (its graph kept in place) with ``source``'s model-level fields instead of its
    own, the default domain listed once."""
    for field, _ in list(out.ListFields()):
        if field.name != "graph":
            out.ClearField(field.name)
    copy_fields(source, out, {"graph"})
    return one_default_domain(out)
