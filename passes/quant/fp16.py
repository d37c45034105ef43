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
Casts go wherever a float32 node meets a float16 tensor and back. Graph inputs
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
from typing import Any, Callable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxforge.model import Model, copy_fields

from . import budget as budget_mod
from .calibrate import collect_histograms, float_activation_names
from .formats import holds_subgraph
from .ortsession import infer_shapes, return_freed_memory, session as ort_session
from .prepare import float_baseline
from .schemas import float_only_formal, op_schema
from .scope import outer_reads, rename_outer_reads

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 6.104e-5
# fp16 rounding alone gives ~2e-4 relative (L2) error on typical weights
FP16_MAX_RELATIVE_ERROR = 1e-3
# (op type, input index) that the ONNX spec keeps float32 whatever T is.
FLOAT32_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}
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
    DynamicQuantizeLSTM, ...: onnxruntime rejects the graph, it is not a missing kernel)."""
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    kept: dict[str, str] = {}
    for node in model.graph.node:
        if holds_subgraph(node):
            kept[node.name] = f"{node.op_type} holds a subgraph: its body is not converted"
            continue
        domain = "" if node.domain == "ai.onnx" else node.domain
        found = op_schema(node.op_type, domain, opsets.get(domain, 1))
        if found is None:  # unknown to both: left to the kernel check
            continue
        schema, source = found
        float32_inputs = [i for op, i in FLOAT32_INPUTS if op == node.op_type]
        formal = float_only_formal(schema, node, float32_inputs)
        if formal is not None:
            op = f"{domain}.{node.op_type}" if domain else node.op_type
            kept[node.name] = f"{source} {op}-{schema.since_version} takes no float16 ({formal})"
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


def initializer_fp16_problem(values: np.ndarray) -> str | None:
    """Why fp16 cannot hold ``values``, or None. A few elements of a weight below
    fp16's smallest subnormal flush to zero harmlessly (a 40M-element weight
    always has some); what matters is a finite value past 65504, a tensor that
    lies wholly below fp16's normal range (an epsilon like 1e-6 or 1e-12 would
    lose its digits or become 0), or a relative rounding error well above
    fp16's own (~3e-4)."""
    finite = np.abs(values[np.isfinite(values)]).astype(np.float64)
    if not finite.size or not finite.max():
        return None
    if finite.max() > FP16_MAX:
        return f"overflows fp16 (max |x| {finite.max():.3g})"
    if finite.max() < FP16_MIN_NORMAL:
        return f"underflows fp16 (max |x| {finite.max():.3g} below {FP16_MIN_NORMAL:.3g})"
    rounded = finite.astype(np.float16).astype(np.float64)
    error = float(np.linalg.norm(finite - rounded) / np.linalg.norm(finite))
    if error > FP16_MAX_RELATIVE_ERROR:
        return f"loses precision in fp16 (relative error {error:.2g})"
    return None


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


def to_fp16(model: onnx.ModelProto, blocked: set[str], keep_io_types: bool = True) -> onnx.ModelProto:
    """``model`` with every float32 tensor of a node outside ``blocked`` in float16."""
    out = onnx.ModelProto()
    copy_fields(model, out, {"graph"})
    # the weights are added at the end, each float32 one only if still read as such:
    # a whole copy first would hold every weight twice (and protobuf frees dropped
    # parts of a message only with the message)
    copy_fields(model.graph, out.graph, {"initializer"})
    graph = out.graph
    floats = _float_tensors(model)
    blocked.update(node.name for node in graph.node if holds_subgraph(node))
    precision: dict[str, str] = {}  # float tensor -> "16" | "32"
    inits = {t.name: t for t in model.graph.initializer}
    for inp in graph.input:
        if inp.name in floats and inp.name not in inits:
            precision[inp.name] = "32" if keep_io_types else "16"
            if not keep_io_types:
                inp.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    for node in graph.node:
        for name in node.output:
            if name in floats:
                precision[name] = "32" if node.name in blocked else "16"
    new_nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, str], str] = {}
    half_inits: dict[str, str] = {}
    for node in graph.node:
        want = "32" if node.name in blocked else "16"
        for i, name in enumerate(node.input):
            if not name or name not in floats:
                continue
            target = "32" if (node.op_type, i) in FLOAT32_INPUTS else want
            if name in inits:
                if target == "16":
                    node.input[i] = half_inits.setdefault(name, name + "_fp16")
                continue
            if precision.get(name, "32") != target:
                node.input[i] = _cast(name, target, casts, new_nodes)
        if want == "16":
            _retype_attributes(node)
        else:
            _outer_reads_in_float32(node, floats, inits, precision, casts, new_nodes)
        new_nodes.append(node)
    _fix_outputs(graph, precision, keep_io_types, new_nodes, casts)
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]
    _add_used_initializers(graph, model.graph.initializer, half_inits)
    return out


def _outer_reads_in_float32(node, floats, inits, precision, casts: dict, new_nodes: list) -> None:
    """A float32 node's bodies (If/Loop/Scan, left as written) read float32: the
    outer tensors they read that became float16 are read through casts back."""
    mapping = {name: _cast(name, "32", casts, new_nodes) for name in outer_reads(node)
               if name in floats and name not in inits and precision.get(name, "32") == "16"}
    if mapping:
        rename_outer_reads(node, mapping)


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    try:
        inferred = infer_shapes(model)  # past 2 GB too (a weight-less copy)
    except Exception:  # noqa: BLE001 - fall back to the types the model declares
        inferred = model
    infos = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    names = {v.name for v in infos if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    names.update(t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    return names


def _cast(name: str, target: str, casts: dict, new_nodes: list) -> str:
    key = (name, target)
    if key not in casts:
        out = f"{name}_to_fp{target}"
        to = onnx.TensorProto.FLOAT16 if target == "16" else onnx.TensorProto.FLOAT
        new_nodes.append(helper.make_node("Cast", [name], [out], name=f"{name}_cast_fp{target}", to=to))
        casts[key] = out
    return casts[key]


def _retype_attributes(node: onnx.NodeProto) -> None:
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == onnx.TensorProto.FLOAT:
            attr.i = onnx.TensorProto.FLOAT16
        if attr.HasField("t") and attr.t.data_type == onnx.TensorProto.FLOAT:
            attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))


def _add_used_initializers(graph: onnx.GraphProto, source: Sequence[onnx.TensorProto], half_inits: dict[str, str]) -> None:
    """The initializers ``graph`` reads: float32 ones copied from ``source``, the
    float16 ones (``half_inits``: float32 name -> float16 name) converted from them."""
    used = _read_names(graph)
    for tensor in source:
        if tensor.name in used:
            graph.initializer.add().CopyFrom(tensor)
        half = half_inits.get(tensor.name)
        if half in used:
            graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), half))


def _fix_outputs(graph, precision, keep_io_types: bool, new_nodes: list, casts: dict) -> None:
    """Graph outputs keep float32 (keep_io_types) or become float16."""
    for output in graph.output:
        p = precision.get(output.name)
        if p is None:
            continue
        if keep_io_types and p == "16":
            _rename_producer(new_nodes, output.name, output.name + "_fp16_out")
            new_nodes.append(helper.make_node("Cast", [output.name + "_fp16_out"], [output.name],
                                              name=output.name + "_cast_out", to=onnx.TensorProto.FLOAT))
        elif not keep_io_types and p == "32":
            _rename_producer(new_nodes, output.name, output.name + "_fp32_out")
            new_nodes.append(helper.make_node("Cast", [output.name + "_fp32_out"], [output.name],
                                              name=output.name + "_cast_out", to=onnx.TensorProto.FLOAT16))
            output.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
        elif not keep_io_types:
            output.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16


def _rename_producer(nodes, old: str, new: str) -> None:
    for node in nodes:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _read_names(graph: onnx.GraphProto) -> set[str]:
    """Names read by ``graph``'s nodes (subgraphs at any depth included), its outputs,
    and its inputs (an initializer that is also an input is the input's default)."""
    used = {o.name for o in graph.output} | {i.name for i in graph.input}
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                used |= _read_names(sub)
    return used


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
    return None


def _runnable(model_fn: Callable[[set[str]], onnx.ModelProto], blocked: dict[str, str]) -> onnx.ModelProto:
    """Build, and keep float32 the nodes the CPU provider has no fp16 kernel for or
    refuses float16 inputs of."""
    import onnxruntime as ort

    for _ in range(MAX_KERNEL_RETRIES):
        candidate = model_fn(set(blocked))
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
            rejected = _rejected_node(exc)
            if rejected is None or rejected[0] in blocked:
                raise
            blocked[rejected[0]] = rejected[1]
    return model_fn(set(blocked))


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
        stream, report.calibration = _feeds(calib, original, "calibration")
        feeds = _take(stream, 64)
        if report.calibration.startswith("random"):
            report.warnings.append(RANDOM_WARNING)
            log(f"WARNING: {RANDOM_WARNING}")
        absmax = activation_absmax(baseline, feeds)
        blocked.update(overflowing_activation_nodes(baseline, absmax))
    else:
        absmax = {}
        report.warnings.append("no calibration data: only initializers were checked for fp16 overflow")
    converted = _runnable(lambda b: to_fp16(baseline, b, keep_io_types), blocked)
    val_feeds = _take(_feeds(val, original, "validation")[0], 16) if val is not None else feeds[:16]
    if val_feeds:
        converted = _check_budget(baseline, converted, val_feeds, metric, max_drop, blocked, absmax, keep_io_types, report)
    report.float32_nodes = dict(blocked)
    report.fp16_nodes = sum(1 for n in baseline.graph.node if n.name not in blocked)
    report.seconds = round(time.monotonic() - started, 2)
    return Model.from_proto(converted), report


def _check_budget(baseline, converted, feeds, metric, max_drop, blocked, absmax, keep_io_types, report) -> onnx.ModelProto:
    metric_fn = budget_mod.metric_function(metric)
    reference = budget_mod.run_outputs(baseline, feeds)
    inputs16 = not keep_io_types

    def evaluate(m: onnx.ModelProto) -> float:
        cast = [{k: (v.astype(np.float16) if inputs16 and v.dtype == np.float32 else v) for k, v in f.items()} for f in feeds]
        outs = budget_mod.run_outputs(m, cast)
        return metric_fn(reference, [[np.asarray(o, np.float32) if o.dtype == np.float16 else o for o in out] for out in outs])

    score = evaluate(converted)
    ranked = sorted((n.name for n in baseline.graph.node if n.name not in blocked),
                    key=lambda name: -_node_absmax(baseline, name, absmax))

    def build(excluded: list[str]) -> onnx.ModelProto:
        extra = {**blocked, **{n: "returned to float32 by the accuracy budget" for n in excluded}}
        return to_fp16(baseline, set(extra), keep_io_types)

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
