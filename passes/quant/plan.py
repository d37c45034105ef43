"""The plan ``quantize`` searches over: how to build the int8 model for a set of nodes
kept float (``_Plan.build``), from calibrated ranges (per method option, optionally
calibrated across workers), equalization, int8 weights reused as they are, and bias
corrections."""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx

from .bias_correct import apply_deltas
from .calibrate import calibrate, compute_range, saturated_by_readers
from .detect import detect, int8_weights_to_dynamic_matmul
from .equalize import equalize as equalize_model
from .formats import (
    CPU_STATIC_LEAN_OPS, FormatSpec, cpu_has_vnni, dynamic_formats, provider_exclusions, static_formats, static_qdq,
)
from .inputs import MAX_VALIDATION_FEEDS, _take, _Tee
from .layout import convtranspose_as_conv_shuffle
from .outliers import FEEDS as OUTLIER_FEEDS, measured_outliers
from .prepare import constant_nodes_to_initializers
from .registered import apply_passes
from .report import QuantReport
from .rounding import RoundingResult

# method "auto": ranges from each of these (one histogram pass), the best scored is kept
AUTO_METHODS = ("minmax", "percentile")
SMOOTH_FEEDS = 4


@dataclasses.dataclass
class _Plan:
    build: Callable[[list[str]], onnx.ModelProto]
    candidates: dict[str, str]  # node name -> op type, nodes that may be int8
    fixed_float: dict[str, str]  # node name -> why (provider rules)
    ranges: dict[str, tuple[float, float]]
    kept_feeds: list[dict]
    float_model: onnx.ModelProto | None = None  # the float model the int8 one rounds (equalized baseline)
    lean: "_Plan | None" = None  # the same with elementwise ops left float (CPU static)
    range_options: dict[str, dict] = dataclasses.field(default_factory=dict)  # method -> ranges (static)
    # float bias name -> correction; applied only to layers that stay int8 (a
    # correction for rounding is an error in a float layer)
    bias_deltas: dict = dataclasses.field(default_factory=dict)
    rounding: "RoundingResult | None" = None  # learned weight codes and bias refits (rounding.py)
    # dynamic formats: label -> (spec, build), fastest first on the CPU class (formats.dynamic_formats)
    format_options: dict = dataclasses.field(default_factory=dict)
    spec: FormatSpec | None = None  # static: the format ``build`` writes (quantize may switch it)
    # static: label -> format scored by quantize, the best kept (formats.static_formats)
    static_formats: dict = dataclasses.field(default_factory=dict)


def _plan(original, baseline, spec: FormatSpec, detection, calib_feeds, method, report, log, equalize: str = "none",
          sharded=None, max_input_error: float | None = None) -> _Plan:
    """``max_input_error``: dynamic formats keep float the MatMul/Gemm whose input loses more than this to
    per-tensor u8 quantization on the calibration feeds (outliers.py; None: none kept float for it)."""
    tee = _Tee(calib_feeds, MAX_VALIDATION_FEEDS)
    if detection.weight_only:
        return _plan_reuse(original, detection, tee, report, log, saturating=not cpu_has_vnni())
    fixed = provider_exclusions(baseline, spec)
    if spec.dynamic_matmul:
        kept = _take(tee, MAX_VALIDATION_FEEDS)
        report.calibration_feeds = 0
        report.notes.append("transformer on CPU: MatMul/Gemm weights quantized dynamically (no activation ranges needed)")
        settings = {"spec": spec, "exclude": dict(fixed)}
        if max_input_error is not None and kept:
            stats, outliers = measured_outliers(baseline, kept[:OUTLIER_FEEDS], max_input_error)
            # the rule onnxruntime-dynamic-matmul refuses these from the same statistics
            settings.update(input_stats=stats, max_input_error=max_input_error)
            report.calibration_feeds = len(kept[:OUTLIER_FEEDS])
            report.notes.append(f"{len(outliers)} MatMul/Gemm kept float: their input loses more than "
                                f"{100 * max_input_error:g}% to per-tensor dynamic quantization (outlier channels) "
                                f"on {report.calibration_feeds} calibration feeds")
            log(report.notes[-1])
            fixed = {**fixed, **outliers}
        candidates = _weighted(baseline, ("MatMul", "Gemm"))

        def builder(format_spec: FormatSpec) -> Callable[[list[str]], onnx.ModelProto]:
            def build(excluded: list[str]) -> onnx.ModelProto:
                exclude = {**settings["exclude"], **dict.fromkeys(excluded, "the accuracy search returns it to float")}
                return apply_passes(baseline, ("onnxruntime-dynamic",), max_iterations=1, toposort=False,
                                    options={"onnxruntime-dynamic": {**settings, "spec": format_spec, "exclude": exclude}})[0]
            return build

        options = {label: (s, builder(s)) for label, s in dynamic_formats(spec).items()}
        return _Plan(next(iter(options.values()))[1], {k: v for k, v in candidates.items() if k not in fixed}, fixed, {},
                     kept, format_options=options)
    baseline, tee = _equalized(baseline, tee, equalize, report, log)
    if spec.provider == "cpu" and not spec.symmetric_activations:
        baseline = _shuffled_convtransposes(baseline, report)
    log(f"calibrating ({method}) ...")
    symmetric = spec.symmetric_activations
    methods = AUTO_METHODS if method == "auto" else (method,)
    if sharded is not None:
        from .shards import calibrate_sharded

        _take(tee, MAX_VALIDATION_FEEDS)  # the validation feeds stay in this process
        files, workers = sharded
        first_ranges, hists, count = calibrate_sharded(baseline, files, workers, methods[0], symmetric=symmetric)
        report.notes.append(f"calibration: {count} feeds split across {workers.where}, histograms merged exactly")
    else:
        first_ranges, hists, count = calibrate(baseline, tee, methods[0], symmetric=symmetric)
    report.calibration_feeds = count
    options = {m: first_ranges if m == methods[0] else {name: compute_range(h, m, symmetric) for name, h in hists.items()}
               for m in methods}
    if not symmetric:  # u8 grids: no levels below what HardSwish readers saturate anyway
        options = {m: saturated_by_readers(baseline, r) for m, r in options.items()}
    plan = _static_plan(baseline, spec, fixed, options[methods[0]], tee.kept)
    plan.range_options = options
    plan.static_formats = static_formats(spec)
    if spec.provider == "cpu" and spec.op_types != CPU_STATIC_LEAN_OPS:
        lean = dataclasses.replace(spec, op_types=CPU_STATIC_LEAN_OPS)
        elementwise = {n.name: "elementwise op kept float (scored better than requantizing it)"
                       for n in baseline.graph.node if n.op_type in set(spec.op_types) - set(CPU_STATIC_LEAN_OPS)}
        plan.lean = _static_plan(baseline, lean, {**fixed, **elementwise}, plan.ranges, tee.kept)
    return plan


def _shuffled_convtransposes(baseline, report: QuantReport):
    """Non-overlapping ConvTranspose as 1x1 Conv + pixel shuffle: the conv gets an
    integer kernel on CPU, onnxruntime has none for ConvTranspose (layout.py)."""
    shuffled = onnx.ModelProto()
    shuffled.CopyFrom(baseline)
    shuffled, count = convtranspose_as_conv_shuffle(shuffled)
    if count:
        report.notes.append(f"{count} ConvTranspose (kernel == stride) rewritten as 1x1 Conv + DepthToSpace for integer kernels (exact)")
    return shuffled


def _static_plan(baseline, spec: FormatSpec, fixed: dict, ranges, kept_feeds) -> _Plan:
    candidates = {n.name: n.op_type for n in baseline.graph.node if n.op_type in spec.op_types and n.name not in fixed}

    def build(excluded: list[str]) -> onnx.ModelProto:
        # the plan's current float model and ranges: bias correction and the
        # range choice replace them after the plan is made
        kept, floats = without_tensors_of(plan.float_model, plan.ranges, excluded)
        source = plan.float_model
        deltas = _summed(plan.rounding.bias_deltas if plan.rounding else {}, plan.bias_deltas)
        if deltas:
            source = _with_deltas(plan.float_model, deltas, set(floats) | set(fixed))
        model = static_qdq(source, kept, plan.spec, list(fixed) + floats)
        return with_codes(model, plan.rounding.codes) if plan.rounding and plan.rounding.codes else model

    plan = _Plan(build, candidates, dict(fixed), ranges, kept_feeds, baseline, spec=spec)
    return plan


def _summed(first: Mapping[str, np.ndarray], second: Mapping[str, np.ndarray]) -> dict:
    """Bias deltas of both (the bias corrections are measured on top of the refits)."""
    out = dict(first)
    for name, delta in second.items():
        out[name] = out[name] + delta if name in out else delta
    return out


def with_codes(model: onnx.ModelProto, codes: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """``model`` with learned weight codes, through the registered pass (qdq/weight_codes.py);
    codes of weights the model does not hold (layers kept float) are not used."""
    from onnxforge.passes.qdq.weight_codes import PASS_NAME

    return apply_passes(model, (PASS_NAME,), max_iterations=1, options={PASS_NAME: {"codes": dict(codes)}})[0]


def _with_deltas(model: onnx.ModelProto, deltas: Mapping[str, np.ndarray], float_nodes: set[str]) -> onnx.ModelProto:
    """``model`` with the bias corrections of the layers not in ``float_nodes``."""
    skip = {n.input[2] for n in model.graph.node if n.name in float_nodes and len(n.input) > 2}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    apply_deltas(out, {k: v for k, v in deltas.items() if k not in skip})
    return out


def _equalized(baseline, tee: "_Tee", mode: str, report: QuantReport, log):
    """(equalized baseline, feeds still to calibrate on); smoothing reads its first feeds."""
    if mode == "none":
        return baseline, tee
    feeds = None
    if mode == "smooth":
        tee.feeds = iter(tee.feeds)  # one-shot, so calibration continues after the taken feeds
        feeds = _take(tee, SMOOTH_FEEDS)
        tee = _Chain(feeds, tee)
    equalized, count = equalize_model(baseline, feeds)
    report.equalized = count
    if count:
        what = "data-free cross-layer equalization" if mode == "cle" else "activation smoothing"
        report.notes.append(f"{what} rescaled the input channels of {count} Conv/MatMul nodes (exact in float)")
        log(report.notes[-1])
    return equalized, tee


class _Chain:
    """Feeds already taken from a one-shot _Tee, then the rest of it."""

    def __init__(self, head: list[dict], tee: "_Tee"):
        self.head, self.tee = head, tee

    @property
    def kept(self) -> list[dict]:
        return self.tee.kept

    def __iter__(self):
        yield from self.head
        yield from self.tee


def without_tensors_of(model: onnx.ModelProto, ranges: Mapping[str, tuple[float, float]], excluded: Sequence[str]) -> tuple[dict, list[str]]:
    """(ranges, nodes kept float) for returning ``excluded`` to float.

    A tensor with a range gets Q/DQ for all its readers, so excluding a node alone
    would still feed it quantized values: its tensors lose their ranges, and the
    neighbours that share those tensors stay float too (a quantized node needs
    ranges on all its activations)."""
    names = set(excluded)
    touched = {t for n in model.graph.node if n.name in names for t in list(n.input) + list(n.output)}
    neighbours = {n.name for n in model.graph.node if touched & (set(n.input) | set(n.output))}
    return {k: v for k, v in ranges.items() if k not in touched}, sorted(names | neighbours)


def _plan_reuse(original, detection, tee, report, log, saturating: bool) -> _Plan:
    """``saturating``: this CPU lacks VNNI (DynamicQuantizeMatMul is a CPU kernel
    whichever provider was asked for), so full-range int8 weights run shifted to uint8."""
    message = (
        f"the model already holds int8 weights ({detection.describe()}); they are not quantized again: "
        "MatMuls reading them run as DynamicQuantizeMatMul on the same int8 values"
    )
    if saturating:
        message += (" (no VNNI on this CPU: weights past 7 bits are stored as the same values + 128 in uint8, "
                    "zero point 128, because u8 x s8 products saturate without it)")
    log(message)
    report.notes.append(message)
    kept = _take(tee, MAX_VALIDATION_FEEDS)
    lowered = constant_nodes_to_initializers(original)
    lowered_detection = detect(lowered)

    def build(excluded: list[str]) -> onnx.ModelProto:
        keep = [w for w in lowered_detection.weight_only if not set(w.consumers) & set(excluded)]
        rewritten, _names = int8_weights_to_dynamic_matmul(
            lowered, dataclasses.replace(lowered_detection, weight_only=keep), saturating)
        return rewritten  # onnxruntime folds the remaining Cast+Mul chains at session time

    matmuls = {n.name for n in lowered.graph.node if n.op_type == "MatMul"}
    candidates = {c: "MatMul" for w in lowered_detection.weight_only for c in w.consumers if c in matmuls}
    report.calibration_feeds = 0
    return _Plan(build, candidates, {}, {}, kept)


def _weighted(model: onnx.ModelProto, ops: tuple[str, ...]) -> dict[str, str]:
    inits = {t.name for t in model.graph.initializer}
    return {n.name: n.op_type for n in model.graph.node if n.op_type in ops and len(n.input) > 1 and n.input[1] in inits}
