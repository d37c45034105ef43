"""The public INT8 entry: ``quantize(model, calib=...) -> (Model, QuantReport)``.

Order of work:
  1. refuse models that already hold Q/DQ or integer kernels (never quantize
     twice); int8 weights dequantized by Cast+Mul are reused as they are;
  2. the float baseline (prepare.float_baseline): cleanup, opset >= 13,
     BN/bias folded; it is also the reference for accuracy and latency;
  3. static formats: cross-layer equalization (equalize.py, exact in float;
     data-free CLE by default, SmoothQuant-style smoothing on request); on CPU
     non-overlapping ConvTranspose as 1x1 Conv + pixel shuffle (layout.py), then
     streaming calibration (calibrate.py) of the equalized model; method
     "auto" derives minmax and percentile ranges from the same histograms;
     u8 ranges of tensors only HardSwish reads start just below -3 (exact);
  4. provider placement (formats.py; on CPU HardSwish/HardSigmoid and
     constant shifts become integer ops, integer_act.py, and nearest Resize,
     pixel shuffles and squeeze-excitation scales move integers in
     onnxruntime's NHWC layout, layout.py); per range option the
     model is built, scored, bias-corrected layer by layer (bias_correct.py)
     and scored again, and the best is kept; when it still misses the budget,
     the same placement with elementwise ops left float is scored too and the
     better one is kept;
  5. the accuracy budget (budget.py): evaluate on validation feeds, and if the
     budget is missed return the most sensitive nodes to float, group by group,
     keeping the best model;
  6. the report: int8 / float nodes with reasons, accuracy, latency, kernels;
     when the int8 model is measurably slower than the float one (the whole
     95% interval above 1) the report recommends float, and with
     ``keep_float_if_slower`` returns the float model and says so.

Determinism: steps 4 and 5 are bounded by a count of evaluations (a model built
and scored: ``max_evaluations``, by default what the whole search needs), never
by seconds, so the same input gives the same bytes on a busy machine too.
``budget_seconds`` is an optional time limit that only stops the search early;
the report then says so and marks the result not reproducible. Latency is
measured for the report only: the model returned depends on it only with
``keep_float_if_slower`` (opt-in; the report marks that result not reproducible).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx

from onnxforge.errors import DataError, OptionError
from onnxforge.model import Model

from . import budget as budget_mod
from .bias_correct import apply_deltas, correct_biases
from .calibrate import METHODS, calibrate, compute_range, saturated_by_readers
from .equalize import equalize as equalize_model
from .detect import detect, int8_weights_to_dynamic_matmul
from .formats import (
    CPU_STATIC_LEAN_OPS, FormatSpec, cpu_has_vnni, dynamic_matmul, holds_subgraph, integer_kernels, provider_exclusions, spec_for,
    stale_float_weights, static_qdq, summarize_kernels, write_tensorrt_cache,
)
from .layout import convtranspose_as_conv_shuffle
from onnxforge.opsets import one_default_domain
from .ortsession import return_freed_memory
from .prepare import constant_nodes_to_initializers, float_baseline

RANDOM_WARNING = (
    "calibrating on RANDOM data (--calib random): the ranges fit noise, not your inputs, "
    "and the accuracy figures below mean nothing"
)
RANDOM_FEEDS = 8
# method "auto": ranges from each of these (one histogram pass), the best scored is kept
AUTO_METHODS = ("minmax", "percentile")
BIAS_CORRECTION_FEEDS = 16
MAX_RECORRECTED = 8  # layers the bias-corrected fallback returns to float before the generic search
# weighted nodes whose end-to-end sensitivity the ranking measures (the top of the
# prior); the rest keep the prior's order. Each is a model built and scored.
MAX_MEASURED = 8
EQUALIZE_MODES = ("cle", "smooth", "none")
SMOOTH_FEEDS = 4
MAX_VALIDATION_FEEDS = 16


@dataclasses.dataclass
class QuantReport:
    provider: str
    format: dict
    method: str
    calibration: str
    calibration_feeds: int
    validation: str
    metric: str
    max_drop: float
    score: float | None = None
    score_before_fallback: float | None = None
    budget_met: bool | None = None
    budget_timed_out: bool = False  # the time limit stopped the search early
    evaluations: int = 0  # models built and scored by the search
    max_evaluations: int = 0
    search: str = ""  # how the search ended (evaluations used; stopped by the time limit)
    reproducible: bool = True  # False: a time limit or a latency measurement decided the result
    int8_nodes: list[str] = dataclasses.field(default_factory=list)
    float_nodes: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> why
    kernels: dict[str, int] = dataclasses.field(default_factory=dict)
    latency: dict | None = None
    fallback_steps: list[dict] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    equalized: int = 0
    bias_corrected: int = 0  # layers whose bias absorbed the mean rounding error
    kept_float: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.as_dict(), indent=1, default=_jsonable))

    def summary(self) -> str:
        lines = [
            f"provider {self.provider}, {'dynamic MatMul' if self.format.get('dynamic_matmul') else 'static QDQ'}, "
            f"method {self.method}, calibration: {self.calibration} ({self.calibration_feeds} feeds)",
            f"int8 nodes: {len(self.int8_nodes)}, float nodes: {len(self.float_nodes)}",
        ]
        if self.score is not None:
            lines.append(
                f"{self.metric} vs float: {self.score:.5f} (budget >= {1 - self.max_drop:.5f}: "
                f"{'met' if self.budget_met else 'MISSED'}) on {self.validation}"
            )
        if self.latency:
            lat = self.latency
            lines.append(
                f"latency {lat['variant_ms']:.3f} ms vs float {lat['base_ms']:.3f} ms: "
                f"{lat['ratio']:.3f}x [{lat['ci_low']:.3f}, {lat['ci_high']:.3f}]"
            )
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _jsonable(value: Any):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


# ------------------------------------------------------------------ inputs


def _source_and_original(model: Model | onnx.ModelProto | str | os.PathLike) -> tuple[Model | None, onnx.ModelProto]:
    """(the model as onnxforge loads it, weights in external files still on disk, or
    None for a ModelProto input; the original as a ModelProto). The proto's external
    weights are not read (types and inputs are what callers read; the -O2 passes
    run on the lazy Model): ``_with_weights`` reads them."""
    if isinstance(model, onnx.ModelProto):
        from onnxforge.versions import cap_proto_versions

        model = one_default_domain(model, copy=True)  # the caller's proto keeps its entries
        return None, cap_proto_versions(model)[0]  # IR/opset this onnxruntime loads
    if not isinstance(model, Model):
        from onnxforge.io import load

        model = load(model)
    return model, one_default_domain(model.to_proto())


def _with_weights(original: onnx.ModelProto, source: Model | None) -> onnx.ModelProto:
    """``original`` with the weights of external files read into memory (in place)."""
    from .ortsession import with_external_data_loaded

    return with_external_data_loaded(original, source.source.parent if source is not None and source.source else None)


def _feeds(data, proto: onnx.ModelProto, what: str) -> tuple[Iterable[dict], str]:
    """(feeds, description) from a folder/file path, an iterable of feed dicts, or "random"."""
    from onnxforge.inputs import iter_feed_files, load_feeds
    from onnxforge.verify_feeds import runnable_feeds

    if isinstance(data, str) and data == "random":
        return runnable_feeds(proto, {}, RANDOM_FEEDS), "random (seeded)"
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.exists():
            raise DataError(f"{what} data {path}: no such file or folder")
        if any(path.glob("*.npz")) or path.suffix == ".npz":
            return iter_feed_files(path), str(path)
        return load_feeds(path), str(path)
    if isinstance(data, Mapping):
        return [dict(data)], "one feed dict"
    if isinstance(data, Iterable):
        return data, "feed dicts (API)"
    raise DataError(f"{what} data: expected a folder, a file, an iterable of feed dicts or 'random', got {type(data).__name__}")


def _validation_feeds(val, calib_list: list[dict] | None, proto, calib_desc: str) -> tuple[list[dict], str]:
    if val is not None:
        feeds, desc = _feeds(val, proto, "validation")
        return _take(feeds, MAX_VALIDATION_FEEDS), desc
    if calib_list:
        return calib_list[:MAX_VALIDATION_FEEDS], f"calibration data ({calib_desc}; no separate --val given)"
    return [], "none"


def _take(feeds: Iterable[dict], n: int) -> list[dict]:
    out = []
    for feed in feeds:
        out.append(feed)
        if len(out) >= n:
            break
    return out


class _Tee:
    """Iterates the calibration feeds once, keeping the first few for validation."""

    def __init__(self, feeds: Iterable[dict], keep: int):
        self.feeds, self.keep, self.kept = feeds, keep, []

    def __iter__(self):
        for feed in self.feeds:
            if len(self.kept) < self.keep:
                self.kept.append(feed)
            yield feed


# ------------------------------------------------------------------ entry


def quantize(
    model: Model | onnx.ModelProto | str | os.PathLike,
    calib: Any = None,
    *,
    provider: str = "cpu",
    method: str = "auto",
    max_drop: float = 0.01,
    metric: str | Callable = "cosine",
    val: Any = None,
    budget_seconds: float | None = None,
    mode: str = "auto",
    measure_latency: bool = True,
    tensorrt_cache: str | os.PathLike | None = None,
    equalize: str = "cle",
    keep_float_if_slower: bool = False,
    log: Callable[[str], None] | None = None,
    max_evaluations: int | None = None,
    workers: "Workers | None" = None,
) -> tuple[Model, QuantReport]:
    """Quantize ``model`` to INT8 for ``provider``; see the module docstring.

    ``max_evaluations``: models the search may build and score (None: all the
    search can need, budget.default_max_evaluations); ``budget_seconds``: an
    optional time limit on the search that stops it early (not reproducible).
    ``workers`` (onnxforge.workers): calibration feed files split across them
    and the sensitivity measurements scored on them (shards.py); the result is
    the same as in one process."""
    started = time.monotonic()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if method not in METHODS + ("auto",):
        raise OptionError(f"unknown calibration method {method!r}", hint=f"choose one of auto, {', '.join(METHODS)}")
    if equalize not in EQUALIZE_MODES:
        raise OptionError(f"unknown equalization {equalize!r}", hint=f"choose one of {', '.join(EQUALIZE_MODES)}")
    if not 0 <= max_drop < 1:
        raise OptionError(f"--max-drop {max_drop}: must be in [0, 1)")
    if max_evaluations is not None and max_evaluations < 1:
        raise OptionError(f"--max-evaluations {max_evaluations}: must be at least 1")
    if budget_seconds is not None and not budget_seconds >= 0:
        raise OptionError(f"--budget-seconds {budget_seconds}: must be >= 0")
    if calib is None:
        raise DataError(
            "quantization needs calibration data",
            hint="pass --calib DIR (a folder of .npz feed dicts), or --calib random to accept meaningless accuracy",
        )
    metric_fn = budget_mod.metric_function(metric)
    # detection reads types, feeds read inputs: the original's weights stay on disk
    # unless its int8 weights are reused (weight-only models)
    source, original = _source_and_original(model)
    detection = detect(original)
    if detection.weight_only:
        original = _with_weights(original, source)
    if detection.refuses:
        raise OptionError(
            f"the model is already quantized: {detection.describe()}; quantizing it again would round "
            "rounded values a second time",
            hint="quantize the float model instead",
        )
    # the -O2 passes run on the lazily loaded model when there is one: weights in
    # external files are read once, after them (2.2 GB Llama: 8 GB less at the peak)
    baseline = float_baseline(source if source is not None else original)
    return_freed_memory()
    spec = spec_for(provider, baseline, mode)
    calib_feeds, calib_desc = _feeds(calib, original, "calibration")
    report = QuantReport(provider, spec.as_dict(), method, calib_desc, 0, "", metric if isinstance(metric, str) else "user", max_drop)
    if calib_desc.startswith("random"):
        report.warnings.append(RANDOM_WARNING)
        log(f"WARNING: {RANDOM_WARNING}")

    sharded = _sharding(calib, workers, equalize)
    plan = _plan(original, baseline, spec, detection, calib_feeds, method, report, log, equalize, sharded)
    val_feeds, report.validation = _validation_feeds(val, plan.kept_feeds, original, calib_desc)
    if not val_feeds:
        raise DataError("no validation feeds", hint="pass --val DIR or calibration data with at least one feed")

    reference = budget_mod.run_outputs(baseline, val_feeds)
    evaluate = lambda m: metric_fn(reference, budget_mod.run_outputs(m, val_feeds))  # noqa: E731
    threshold = 1.0 - max_drop
    weighted = sum(1 for op in plan.candidates.values() if op in WEIGHTED)
    search = budget_mod.SearchBudget.start(
        max_evaluations or budget_mod.default_max_evaluations(len(plan.range_options), min(weighted, MAX_MEASURED), MAX_RECORRECTED),
        budget_seconds)
    if plan.range_options:
        first, first_score = _tune_static(plan, evaluate, report, log, search)
    else:
        search.take(force=True)
        first = plan.build([])
        first_score = evaluate(first)
    if first_score < threshold and plan.lean is not None and search.take():
        first, first_score = _leaner(plan, first, first_score, evaluate, report, log)
    report.score_before_fallback = first_score
    result = budget_mod.BudgetResult(first, first_score, first_score >= threshold, [], [])
    if first_score < threshold and plan.candidates and plan.bias_deltas:
        result = _fallback_recorrected(plan, result, evaluate, threshold, search, report, log)
    if not result.met and plan.candidates and search.left and not search.time_up():
        log(f"{report.metric} {first_score:.5f} misses the budget {threshold:.5f}: ranking node sensitivity")
        ranked = _ranked(baseline, first, plan, val_feeds[:2], metric_fn, search,
                         workers if isinstance(metric, str) and workers is not None and workers.count > 1 else None, metric)
        searched = budget_mod.fallback_search(plan.build, evaluate, ranked, threshold, initial=(first, first_score), search=search)
        if searched.score > result.score:
            result = dataclasses.replace(searched, steps=result.steps + searched.steps)
    final = result.model
    report.score, report.budget_met = result.score, result.met
    report.budget_timed_out = search.stopped_by_time
    report.evaluations, report.max_evaluations = search.used, search.max_evaluations
    report.reproducible = not search.stopped_by_time
    report.search = search.describe()
    log(report.search)
    (report.warnings if search.stopped_by_time else report.notes).append(report.search)
    report.fallback_steps = [{"float": len(s.excluded), "score": s.score, "seconds": round(s.seconds, 2)} for s in result.steps]
    _fill_nodes(report, baseline, final, plan, result.excluded)
    _check_clean(final, report)
    if provider == "cpu":
        report.kernels = summarize_kernels(integer_kernels(final))
    if tensorrt_cache is not None and plan.ranges:
        write_tensorrt_cache(plan.ranges, tensorrt_cache)
        report.notes.append(f"TensorRT calibration cache written to {tensorrt_cache} (symmetric amax ranges)")
    if measure_latency and provider == "cpu":
        from .latency import compare

        report.latency = compare(baseline, final, val_feeds[0]).as_dict()
        if keep_float_if_slower:  # a measurement decides the bytes: load can flip it
            report.reproducible = False
        if report.latency["ci_low"] > 1.0:
            final = _slower(report, baseline, final, keep_float_if_slower)
    if not plan.candidates and any(holds_subgraph(n) for n in baseline.graph.node):
        report.warnings.append(
            "the model's computation lies in If/Loop/Scan subgraphs, which are not quantized: the result is the float model"
        )
    report.seconds = round(time.monotonic() - started, 2)
    out = Model.from_proto(final)
    return out, report


def _slower(report: QuantReport, baseline, final, keep_float: bool) -> onnx.ModelProto:
    """The model to return when int8 is measurably slower than float."""
    ratio = report.latency["ratio"]
    if not keep_float:
        report.warnings.append(
            f"the INT8 model is {ratio:.2f}x the float latency on this machine (95% interval above 1): "
            "use the float model (--keep-float-if-slower / keep_float_if_slower=True returns it)"
        )
        return final
    report.kept_float = True
    report.warnings.append(
        f"the INT8 model is {ratio:.2f}x the float latency on this machine (95% interval above 1): "
        "the float model was returned instead (a timing decided it: not reproducible; without --keep-float-if-slower "
        "/ keep_float_if_slower=True the INT8 one is returned)"
    )
    report.float_nodes.update({n: "INT8 model slower than float: float model kept" for n in report.int8_nodes})
    report.int8_nodes = []
    report.kernels = {}
    return baseline


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


def _tune_static(plan: _Plan, evaluate, report: QuantReport, log, search: budget_mod.SearchBudget):
    """Per range option: build, score, bias-correct layer by layer, score again; keep the best.
    Each score is one of ``search``'s evaluations (the first is always made)."""
    best = None
    for method, ranges in plan.range_options.items():
        if not search.take(force=best is None):
            break
        plan.ranges, plan.bias_deltas = ranges, {}
        model = plan.build([])
        score = evaluate(model)
        deltas = _bias_deltas(plan, model, search)
        line = f"ranges {method}: {report.metric} {score:.5f}"
        if deltas and search.take():
            plan.bias_deltas = deltas
            model_bc = plan.build([])
            score_bc = evaluate(model_bc)
            line += f", {score_bc:.5f} after bias correction of {len(deltas)} layers"
            if score_bc > score:
                model, score = model_bc, score_bc
            else:
                deltas = {}
        log(line)
        report.notes.append(line)
        if best is None or score > best[0]:
            best = (score, method, model, deltas, ranges)
    score, method, model, deltas, ranges = best
    plan.ranges, plan.bias_deltas = ranges, deltas
    if plan.lean is not None:
        plan.lean.ranges, plan.lean.bias_deltas = ranges, deltas
    report.method = method if len(plan.range_options) == 1 else f"auto ({method})"
    report.bias_corrected = len(deltas)
    return model, score


def _fallback_recorrected(plan: _Plan, start, evaluate, threshold: float, search: budget_mod.SearchBudget, report: QuantReport, log):
    """Return the noisiest layers to float one at a time, re-running bias correction for
    each configuration (a float layer makes the corrections downstream of it stale:
    without the re-run, PP-OCRv4 det scored lower with 9 float layers than with none).
    Stops at the budget, after MAX_RECORRECTED layers, or when ``search`` has no
    evaluation left (or its time limit passed)."""
    weighted = {n.name: n for n in plan.float_model.graph.node if n.name in plan.candidates and n.op_type in WEIGHTED}
    noise = budget_mod.node_sensitivity(plan.float_model, start.model, weighted, plan.kept_feeds[:2])
    ranked = sorted(noise, key=lambda k: -noise[k])[:MAX_RECORRECTED]
    best, steps, start_deltas, best_deltas = start, [], plan.bias_deltas, plan.bias_deltas
    log(f"{report.metric} {start.score:.5f} misses the budget {threshold:.5f}: returning the noisiest layers to float, "
        "bias correction re-run each time")
    for k in range(1, len(ranked) + 1):
        if not search.take():
            break
        began = time.monotonic()
        excluded = ranked[:k]
        plan.bias_deltas = {}
        deltas = _bias_deltas(plan, plan.build(excluded), search, counted=True)
        plan.bias_deltas = deltas
        model = plan.build(excluded)
        score = evaluate(model)
        steps.append(budget_mod.BudgetStep(list(excluded), score, time.monotonic() - began))
        log(f"  {k} layer(s) float ({excluded[-1]}): {report.metric} {score:.5f}")
        if score > best.score:
            best = budget_mod.BudgetResult(model, score, score >= threshold, list(excluded), [])
            best_deltas = deltas
        if score >= threshold:
            break
    # met: the plan now builds the kept model; missed: the generic search goes on from the start
    plan.bias_deltas = best_deltas if best.met else start_deltas
    return dataclasses.replace(best, steps=steps, timed_out=search.stopped_by_time)


def _bias_deltas(plan: _Plan, model, search: budget_mod.SearchBudget, counted: bool = False) -> dict:
    """Bias corrections for ``model``; none when no evaluation is left to score them
    (``counted``: the caller already took the one that scores them) or time is up."""
    feeds = plan.kept_feeds[:BIAS_CORRECTION_FEEDS]
    if not feeds or (not counted and not search.left) or search.time_up():
        return {}
    return correct_biases(plan.float_model, model, feeds, search.time_up)


def _leaner(plan: _Plan, first, first_score: float, evaluate, report: QuantReport, log):
    """Elementwise ops float instead, when that scores better before any fallback."""
    lean = plan.lean
    model = lean.build([])
    score = evaluate(model)
    report.notes.append(
        f"{report.metric} before fallback: {first_score:.5f} with elementwise ops (Add, Mul, Sigmoid, LeakyRelu) "
        f"quantized, {score:.5f} with them float: {'float' if score > first_score else 'quantized'} kept"
    )
    log(report.notes[-1])
    if score <= first_score:
        return first, first_score
    plan.build, plan.candidates = lean.build, lean.candidates
    plan.fixed_float.update(lean.fixed_float)
    return model, score


def _sharding(calib, workers, equalize: str):
    """(feed files, workers) when calibration can be split across workers: more than
    one worker, a folder of .npz feeds, and no smoothing (which reads feeds first)."""
    if workers is None or workers.count < 2 or equalize == "smooth" or not isinstance(calib, (str, os.PathLike)):
        return None
    from onnxforge.inputs import data_files

    path = Path(calib)
    files = data_files(path, (".npz",)) if path.is_dir() else []
    return (files, workers) if len(files) > 1 else None


def _plan(original, baseline, spec: FormatSpec, detection, calib_feeds, method, report, log, equalize: str = "none",
          sharded=None) -> _Plan:
    tee = _Tee(calib_feeds, MAX_VALIDATION_FEEDS)
    if detection.weight_only:
        return _plan_reuse(original, detection, tee, report, log, saturating=not cpu_has_vnni())
    fixed = provider_exclusions(baseline, spec)
    if spec.dynamic_matmul:
        kept = _take(tee, MAX_VALIDATION_FEEDS)
        report.calibration_feeds = 0
        report.notes.append("transformer on CPU: MatMul/Gemm weights quantized dynamically (no activation ranges needed)")
        candidates = _weighted(baseline, ("MatMul", "Gemm"))
        build = lambda excluded: dynamic_matmul(baseline, spec, list(fixed) + list(excluded))  # noqa: E731
        return _Plan(build, {k: v for k, v in candidates.items() if k not in fixed}, fixed, {}, kept)
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
        if plan.bias_deltas:
            source = _with_deltas(plan.float_model, plan.bias_deltas, set(floats) | set(fixed))
        return static_qdq(source, kept, spec, list(fixed) + floats)

    plan = _Plan(build, candidates, dict(fixed), ranges, kept_feeds, baseline)
    return plan


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


def _ranked(baseline, quantized, plan: _Plan, feeds, metric_fn, search: budget_mod.SearchBudget,
            workers=None, metric: str | None = None) -> list[str]:
    """Candidates, most sensitive first.

    The cheap prior is the noise each node adds (one run of both models). Then
    the first MAX_MEASURED weighted nodes (in prior order) are returned to float
    one at a time and the gain
    in the metric on ``feeds`` measured: the end-to-end effect, which the local
    noise misjudges when early layers' error grows downstream. Each measurement
    is one of ``search``'s evaluations; the fallback's groups stay reserved."""
    nodes = {n.name: n for n in baseline.graph.node if n.name in plan.candidates}
    # Intermediate tensors are compared by name: against the float model the
    # int8 one rounds (equalization rescales channels of some of them).
    local = budget_mod.node_sensitivity(plan.float_model or baseline, quantized, nodes, feeds)
    prior = sorted(local, key=lambda k: -local[k]) + [n for n in nodes if n not in local]
    reference = budget_mod.run_outputs(baseline, feeds)
    base_score = metric_fn(reference, budget_mod.run_outputs(quantized, feeds))
    gains: dict[str, float] = {}
    reserve = min(budget_mod.FALLBACK_GROUPS, len(prior))
    chosen = []
    for name in [n for n in prior if nodes[n].op_type in WEIGHTED][:MAX_MEASURED]:
        if search.left <= reserve or not search.take():
            break
        chosen.append(name)
    if workers is not None:  # independent per candidate: scored on the workers
        from .shards import score_models

        scores = score_models([plan.build([n]) for n in chosen], feeds, reference, metric, workers)
        gains = {n: s - base_score for n, s in zip(chosen, scores)}
    for name in chosen if workers is None else ():
        gains[name] = metric_fn(reference, budget_mod.run_outputs(plan.build([name]), feeds)) - base_score
    measured = sorted(gains, key=lambda k: -gains[k])
    return measured + [n for n in prior if n not in gains]


WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _fill_nodes(report: QuantReport, baseline, final, plan: _Plan, excluded: list[str]) -> None:
    producers = {o: n for n in final.graph.node for o in n.output}
    final_nodes = {n.name: n for n in final.graph.node}
    for name, why in plan.fixed_float.items():
        report.float_nodes[name] = why
    for name in excluded:
        report.float_nodes[name] = "returned to float by the accuracy budget (most sensitive)"
    for name, op in plan.candidates.items():
        if name in report.float_nodes:
            continue
        node = final_nodes.get(name)
        if node is None or node.op_type != op:
            report.int8_nodes.append(name)  # replaced by an integer op
        elif any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input):
            report.int8_nodes.append(name)
        else:
            report.float_nodes[name] = "no range or no quantizable input (left float by the QDQ placer)"


def _check_clean(final: onnx.ModelProto, report: QuantReport) -> None:
    stale = stale_float_weights(final)
    if stale:
        report.warnings.append(f"{len(stale)} float initializers duplicate quantized weights: {', '.join(stale[:5])}")
