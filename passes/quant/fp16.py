"""Float16 conversion that keeps what fp16 cannot hold in float32.

fp16 holds |x| <= 65504 with 11 significant bits. A node stays float32 when
  * an initializer it reads has a finite value beyond that range, lies wholly
    below fp16's normal range (epsilons: |x| < 6.1e-5 everywhere), or rounds
    with a relative error above 1e-3 (a few elements flushing to zero do not
    count: every large weight has some), or
  * a float activation it reads or writes reached that range on the
    calibration data (ranges from the streaming calibrator), or
  * its schema (ONNX's, or onnxruntime's for contrib ops such as
    DynamicQuantizeLSTM) takes float but not float16 for an input or output it
    uses, or onnxruntime's CPU provider has no float16 kernel for it or refuses
    its float16 types (found by building the session; such nodes would not run
    at all), or it holds subgraphs (If/Loop/Scan: the bodies stay as written, and
    the outer tensors they read are cast back to float32 for them).
The graph change is the registered pass convert-to-fp16 (fp16_rules.py: its rules, and
their refusals with these reasons); this module decides what stays float32, builds and
checks the result. Casts go wherever a float32 node meets a float16 tensor and back. Graph inputs
and outputs keep their types unless asked (``keep_io_types=False``). Shape and
scale inputs that must be float32 by the ONNX spec (Resize roi/scales) stay so.
The result is checked against the float model with the accuracy budget; when
missed, the nodes with the largest activation ranges return to float32 one
group at a time.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.context import PassContext
from onnxforge.model import Model, constants
from onnxforge.shared_weights import staged_headers

from . import budget as budget_mod
from .calibrate import collect_histograms, float_activation_names
from .formats import holds_subgraph
from .fp16_rules import (CONTAINER_OPS, CONTAINER_REASON, FP16_MAX, PASS_NAME, HalfValues, fill_half_values,
                         initializer_fp16_problem, schema_fp16_problem)
from .ortsession import infer_shapes, return_freed_memory, session as ort_session
from .prepare import float_baseline

MAX_KERNEL_RETRIES = 32


@dataclasses.dataclass
class Fp16Report:
    keep_io_types: bool
    calibration: str
    metric: str
    max_drop: float
    fp16_nodes: int = 0
    float32_nodes: dict[str, str] = dataclasses.field(default_factory=dict)
    score: float | None = None
    budget_met: bool | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.as_dict(), indent=1, default=str))

    def summary(self) -> str:
        lines = [f"fp16 nodes: {self.fp16_nodes}, kept float32: {len(self.float32_nodes)}"]
        reasons: dict[str, int] = {}
        for why in self.float32_nodes.values():
            reasons[why.split(":")[0]] = reasons.get(why.split(":")[0], 0) + 1
        lines += [f"  {n} x {why}" for why, n in sorted(reasons.items())]
        if self.score is not None:
            lines.append(f"{self.metric} vs float32: {self.score:.6f} ({'met' if self.budget_met else 'MISSED'} "
                         f">= {1 - self.max_drop:.6f})")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# ------------------------------------------------------------------ what stays float32


def nodes_without_fp16_types(model: onnx.ModelProto) -> dict[str, str]:
    """Nodes that stay float32 by type: those holding subgraphs (their bodies are not
    converted), and those whose schema (ONNX's, or onnxruntime's for its contrib ops)
    allows float but not float16 for an input or output they use (Range,
    DynamicQuantizeLSTM, ...: onnxruntime rejects the graph, it is not a missing kernel).
    The same verdicts as node-to-fp16's check, computed once for the report."""
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    kept: dict[str, str] = {}
    for node in model.graph.node:
        if holds_subgraph(node):
            kept[node.name] = f"{node.op_type} holds a subgraph: its body is not converted"
            continue
        if node.op_type in CONTAINER_OPS and node.domain in ("", "ai.onnx"):
            kept[node.name] = CONTAINER_REASON
            continue
        domain = "" if node.domain == "ai.onnx" else node.domain
        why = schema_fp16_problem(node.op_type, domain, opsets.get(domain, 1), node.input, node.output)
        if why:
            kept[node.name] = why
    return kept


def overflowing_initializer_nodes(model: onnx.ModelProto) -> dict[str, str]:
    inits = {t.name: t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    verdicts: dict[str, str | None] = {}  # initializer -> why it stays float32 (None: fp16 holds it)
    blocked = {}
    for node in model.graph.node:
        for name in node.input:
            if name in inits:
                if name not in verdicts:
                    verdicts[name] = initializer_fp16_problem(numpy_helper.to_array(inits[name]))
                if verdicts[name]:
                    blocked[node.name] = f"initializer {name}: {verdicts[name]}"
                    break
    return blocked


def overflowing_activation_nodes(model: onnx.ModelProto, ranges: dict[str, float]) -> dict[str, str]:
    blocked = {}
    for node in model.graph.node:
        for name in list(node.input) + list(node.output):
            if ranges.get(name, 0.0) > FP16_MAX:
                blocked[node.name] = f"activation overflows fp16: {name} reached {ranges[name]:.3g}"
                break
    return blocked


def activation_absmax(model: onnx.ModelProto, feeds) -> dict[str, float]:
    hists, _ = collect_histograms(model, feeds, float_activation_names(model), bins=16)
    return {k: max(abs(h.minimum), abs(h.maximum)) for k, h in hists.items() if h.counts is not None}


# ------------------------------------------------------------------ conversion


def to_fp16(model: onnx.ModelProto, blocked: Mapping[str, str] | set[str], keep_io_types: bool = True,
            ctx: PassContext | None = None) -> onnx.ModelProto:
    """``model`` with every float32 tensor of a node outside ``blocked`` (name -> why it stays
    float32) in float16, by the registered pass convert-to-fp16 (its refusals, with their
    reasons, land in ``ctx``). ``model`` itself is not changed."""
    from onnxforge.passes.registry import resolve

    keep = dict(blocked) if isinstance(blocked, Mapping) else {n: "kept float32 by the caller" for n in blocked}
    converted = Model.from_proto(model)
    ctx = ctx or PassContext()
    ctx.model = converted
    ctx.options[PASS_NAME] = {"keep": keep, "float_tensors": sorted(_float_tensors(model)),
                              "io": not keep_io_types, "check_initializers": False}
    resolve(PASS_NAME).run(converted.graph, ctx)
    halves = [c for c in constants(converted.graph) if isinstance(c._values, HalfValues)]
    with staged_headers(halves, onnx.TensorProto.FLOAT16):  # filled below, one weight at a time
        out = converted.to_proto()
    fill_half_values(out, halves)
    del out.graph.value_info[:]
    return out


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    try:
        inferred = infer_shapes(model)  # past 2 GB too (a weight-less copy)
    except Exception:  # noqa: BLE001 - fall back to the types the model declares
        inferred = model
    infos = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    return {v.name for v in infos if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}


def _rejected_node(error: Exception) -> tuple[str, str] | None:
    """(node name, why) when onnxruntime refused a node's float16: no kernel for it, or
    a float16 tensor its schema does not take (a schema neither onnx nor onnxruntime's
    Python API lists); None for any other error."""
    match = re.search(r"Could not find an implementation for (\w+)\(\d+\) node with name '([^']*)'", str(error))
    if match:
        return match.group(2), "no float16 kernel on the CPU provider"
    match = re.search(r"Type 'tensor\(float16\)' of (?:input|output) parameter \(([^)]*)\) of operator "
                      r"\((\w+)\) in node \(([^)]*)\) is invalid", str(error))
    if match:
        return match.group(3), f"onnxruntime {match.group(2)} takes no float16 ({match.group(1)})"
    # a float16 node reading a tensor of no known type (an untyped If output), which stays float
    match = re.search(r"Type parameter \(\w+\) of Optype \((\w+)\) bound to different types .* in node \(([^)]+)\)",
                      str(error))
    if match:
        return match.group(2), f"{match.group(1)} reads a float32 tensor of no known type"
    return None


def _runnable(model_fn: Callable[[dict[str, str]], onnx.ModelProto], blocked: dict[str, str],
              unnamed: dict[str, str] | None = None) -> onnx.ModelProto:
    """Build, and keep float32 the nodes the CPU provider has no fp16 kernel for or
    refuses float16 inputs of. ``unnamed``: nodes kept float32, once, when onnxruntime
    rejects the graph naming no node of it (a function op it expands: the body's nodes
    are unnamed); a graph still rejected after that is reported in one line."""
    import onnxruntime as ort

    from onnxforge.errors import VerificationError, first_line

    unnamed = dict(unnamed or {})
    for _ in range(MAX_KERNEL_RETRIES):
        candidate = None  # a rejected one is dropped before the next is built (two float16 models at once)
        candidate = model_fn(dict(blocked))
        try:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            # kernels are chosen at any level; without optimizations onnxruntime does
            # not fold its float32 casts of fp16 weights (Llama 570M: 2 GB less)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            ort_session(candidate, options)
            return_freed_memory()
            return candidate
        except Exception as exc:  # noqa: BLE001 - only the no-kernel case is handled
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            rejected = _rejected_node(exc)
            if (rejected is None or rejected[0] in blocked) and unnamed:
                blocked.update(unnamed)
                unnamed = {}
                continue
            if rejected is None or rejected[0] in blocked:
                raise VerificationError(f"onnxruntime rejects the float16 model: {first_line(exc, limit=300)}",
                                        hint="report this model") from None
            blocked[rejected[0]] = rejected[1]
    return model_fn(dict(blocked))


def function_op_nodes(model: onnx.ModelProto) -> dict[str, str]:
    """Nodes of ops ONNX defines by a function body (MeanVarianceNormalization, ...):
    where onnxruntime has no float16 kernel it runs the body, whose constants stay float."""
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    found = {}
    for node in model.graph.node:
        domain = "" if node.domain == "ai.onnx" else node.domain
        try:
            schema = onnx.defs.get_schema(node.op_type, opsets.get(domain, 1), domain)
        except Exception:  # noqa: BLE001 - an op onnx does not know (contrib ops)
            continue
        if schema.has_function or schema.has_context_dependent_function:
            found[node.name] = f"{node.op_type} is a function op: onnxruntime rejected its float16 body"
    return found


# ------------------------------------------------------------------ entry


def convert_fp16(
    model: Model | onnx.ModelProto | str,
    *,
    calib: Any = None,
    keep_io_types: bool = True,
    max_drop: float = 0.01,
    metric: str | Callable = "cosine",
    val: Any = None,
    log: Callable[[str], None] | None = None,
) -> tuple[Model, Fp16Report]:
    from .quantize import RANDOM_WARNING, _feeds, _source_and_original, _take

    started = time.monotonic()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    source, original = _source_and_original(model)  # only the original's inputs are read (feeds)
    baseline = float_baseline(source if source is not None else original)
    report = Fp16Report(keep_io_types, "none", metric if isinstance(metric, str) else "user", max_drop)
    blocked = {**nodes_without_fp16_types(baseline), **overflowing_initializer_nodes(baseline)}
    feeds: list[dict] = []
    if calib is not None:
        stream, report.calibration = _feeds(calib, original, "calibration", source)
        feeds = _take(stream, 64)
        if report.calibration.startswith("random"):
            report.warnings.append(RANDOM_WARNING)
            log(f"WARNING: {RANDOM_WARNING}")
        absmax = activation_absmax(baseline, feeds)
        blocked.update(overflowing_activation_nodes(baseline, absmax))
    else:
        absmax = {}
        report.warnings.append("no calibration data: only initializers were checked for fp16 overflow")
    converted = _runnable(lambda b: to_fp16(baseline, b, keep_io_types), blocked, function_op_nodes(baseline))
    val_feeds = _take(_feeds(val, original, "validation")[0], 16) if val is not None else feeds[:16]
    if val_feeds:
        converted = _check_budget(baseline, converted, val_feeds, metric, max_drop, blocked, absmax, keep_io_types, report)
    report.float32_nodes = dict(blocked)
    report.fp16_nodes = sum(1 for n in baseline.graph.node if n.name not in blocked)
    report.seconds = round(time.monotonic() - started, 2)
    return Model.from_proto(converted), report


def _as_float32(value):
    """A float16 output as float32 (in a sequence too), for the metric against the baseline."""
    if isinstance(value, (list, tuple)):
        return [_as_float32(v) for v in value]
    return np.asarray(value, np.float32) if isinstance(value, np.ndarray) and value.dtype == np.float16 else value


def _check_budget(baseline, converted, feeds, metric, max_drop, blocked, absmax, keep_io_types, report) -> onnx.ModelProto:
    metric_fn = budget_mod.metric_function(metric)
    reference = budget_mod.run_outputs(baseline, feeds)
    inputs16 = not keep_io_types

    def evaluate(m: onnx.ModelProto) -> float:
        cast = [{k: (v.astype(np.float16) if inputs16 and v.dtype == np.float32 else v) for k, v in f.items()} for f in feeds]
        outs = budget_mod.run_outputs(m, cast)
        return metric_fn(reference, [[_as_float32(o) for o in out] for out in outs])

    score = evaluate(converted)
    ranked = sorted((n.name for n in baseline.graph.node if n.name not in blocked),
                    key=lambda name: -_node_absmax(baseline, name, absmax))

    def build(excluded: list[str]) -> onnx.ModelProto:
        extra = {**blocked, **{n: "returned to float32 by the accuracy budget" for n in excluded}}
        return to_fp16(baseline, extra, keep_io_types)

    result = budget_mod.fallback_search(build, evaluate, ranked, 1.0 - max_drop, initial=(converted, score))
    for name in result.excluded:
        blocked[name] = "returned to float32 by the accuracy budget"
    report.score, report.budget_met = result.score, result.met
    return result.model


def _node_absmax(model, name: str, absmax: dict[str, float]) -> float:
    for node in model.graph.node:
        if node.name == name:
            return max([absmax.get(t, 0.0) for t in list(node.input) + list(node.output)] or [0.0])
    return 0.0
