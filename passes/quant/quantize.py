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
  4. provider placement (formats.py; on CPUs without int8 dot products static
     models are built with 7-bit weights and with 8-bit weights on 7-bit GEMM
     inputs, each range option, and the best scored is kept, formats.static_formats;
     dynamic MatMul weight formats are tried
     fastest first on the CPU class and the first meeting the budget is kept,
     formats.dynamic_formats; dynamic MatMul formats keep float the
     MatMul/Gemm whose input has outlier channels, outliers.py; on CPU HardSwish/HardSigmoid and
     constant shifts become integer ops, integer_act.py, and nearest Resize,
     pixel shuffles and squeeze-excitation scales move integers in
     onnxruntime's NHWC layout, layout.py); per range option the
     model is built (with ``rounding="learned"``: weights rounded to minimise each
     layer's output error and biases refit, layer by layer, rounding.py), scored,
     bias-corrected layer by layer (bias_correct.py) and scored again, and the
     best is kept; when it still misses the budget,
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

The parts: inputs.py (model and feeds), plan.py (how each candidate model is
built), report.py (QuantReport), sensitivity.py (which nodes return to float
first); the search over them is here.

Just over 400 lines on purpose: the order of work above is this file's control flow; each step
lives in its own module.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import onnx

from onnxforge.errors import DataError, OptionError
from onnxforge.model import Model

from . import budget as budget_mod
from .bias_correct import correct_biases
from .calibrate import METHODS
from .detect import detect
from .finish import check_clean, fill_nodes, marked_for, slower
from .formats import holds_subgraph, spec_for
from .kernels import integer_kernels, summarize_kernels
from .outliers import MAX_ERROR as MAX_INPUT_ERROR
from .tensorrt_cache import write_tensorrt_cache
from .inputs import (  # noqa: F401  (re-exported: fp16, benchmarks and tests read them here)
    MAX_VALIDATION_FEEDS, RANDOM_FEEDS, _feeds, _source_and_original, _take, _Tee, _validation_feeds, _with_weights,
)
from .contribution import ranked_by_contribution
from .ortsession import return_freed_memory
from .plan import _Plan, _plan, _with_deltas, without_tensors_of  # noqa: F401  (re-exported for tests)
from .prepare import float_baseline
from .report import QuantReport
from .rounding import FEEDS as ROUNDING_FEEDS, learn_rounding
from .sensitivity import MAX_MEASURED, WEIGHTED, ranked_by_sensitivity  # noqa: F401  (WEIGHTED: benchmarks read it here)

RANDOM_WARNING = (
    "calibrating on RANDOM data (--calib random): the ranges fit noise, not your inputs, "
    "and the accuracy figures below mean nothing"
)
BIAS_CORRECTION_FEEDS = 16
MAX_RECORRECTED = 8  # layers the bias-corrected fallback returns to float before the generic search
# weighted nodes whose end-to-end sensitivity the ranking measures (the top of the
# prior); the rest keep the prior's order. Each is a model built and scored.
EQUALIZE_MODES = ("cle", "smooth", "none")
ROUNDINGS = ("nearest", "learned")


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
    rounding: str = "nearest",
    max_input_error: float | None = MAX_INPUT_ERROR,
) -> tuple[Model, QuantReport]:
    """Quantize ``model`` to INT8 for ``provider``; see the module docstring.

    ``max_evaluations``: models the search may build and score (None: all the
    search can need, budget.default_max_evaluations); ``budget_seconds``: an
    optional time limit on the search that stops it early (not reproducible).
    ``workers`` (onnxforge.workers): calibration feed files split across them
    and the sensitivity measurements scored on them (shards.py); the result is
    the same as in one process. ``rounding``: "nearest" or "learned" (static
    formats: AdaRound-style codes and bias refits per layer, rounding.py). ``max_input_error``: dynamic
    formats keep float each MatMul/Gemm whose input loses more than this (median per-token relative L2) to per-tensor u8
    quantization on the calibration feeds, i.e. has outlier channels (outliers.py; None: no such check)."""
    started = time.monotonic()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if method not in METHODS + ("auto",):
        raise OptionError(f"unknown calibration method {method!r}", hint=f"choose one of auto, {', '.join(METHODS)}")
    if equalize not in EQUALIZE_MODES:
        raise OptionError(f"unknown equalization {equalize!r}", hint=f"choose one of {', '.join(EQUALIZE_MODES)}")
    if rounding not in ROUNDINGS:
        raise OptionError(f"unknown rounding {rounding!r}", hint=f"choose one of {', '.join(ROUNDINGS)}")
    if not 0 <= max_drop < 1:
        raise OptionError(f"--max-drop {max_drop}: must be in [0, 1)")
    if max_input_error is not None and not max_input_error > 0:
        raise OptionError(f"--max-input-error {max_input_error}: must be > 0")
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
    calib_feeds, calib_desc = _feeds(calib, original, "calibration", source)
    report = QuantReport(provider, spec.as_dict(), method, calib_desc, 0, "", metric if isinstance(metric, str) else "user", max_drop)
    if calib_desc.startswith("random"):
        report.warnings.append(RANDOM_WARNING)
        log(f"WARNING: {RANDOM_WARNING}")

    sharded = _sharding(calib, workers, equalize)
    here = f"this process on {platform.node()}"
    report.where = {"calibration": f"split across {workers.where}" if sharded else here, "accuracy": here}
    plan = _plan(original, baseline, spec, detection, calib_feeds, method, report, log, equalize, sharded,
                 max_input_error)
    val_feeds, report.validation = _validation_feeds(val, plan.kept_feeds, original, calib_desc, source)
    if not val_feeds:
        raise DataError("no validation feeds", hint="pass --val DIR or calibration data with at least one feed")

    reference = budget_mod.run_outputs(baseline, val_feeds)
    evaluate = lambda m: metric_fn(reference, budget_mod.run_outputs(m, val_feeds))  # noqa: E731
    threshold = 1.0 - max_drop
    weighted = sum(1 for op in plan.candidates.values() if op in WEIGHTED)
    search = budget_mod.SearchBudget.start(
        max_evaluations or budget_mod.default_max_evaluations(
            len(plan.range_options) * max(1, len(plan.static_formats)), min(weighted, MAX_MEASURED), MAX_RECORRECTED),
        budget_seconds)
    if plan.range_options:
        learn = None
        if rounding == "learned":
            learn = lambda m: learn_rounding(plan.float_model, m, plan.kept_feeds[:ROUNDING_FEEDS],  # noqa: E731
                                             reduce_range=plan.spec.reduce_range, log=log)
        first, first_score = _tune_static(plan, evaluate, report, log, search, learn)
    else:
        if rounding == "learned":
            report.notes.append("learned rounding applies to static QDQ weights; this model's are quantized "
                                "dynamically or reused: nearest rounding kept")
        first, first_score = _first_format(plan, evaluate, threshold, report, log, search)
    if first_score < threshold and plan.lean is not None and search.take():
        first, first_score = _leaner(plan, first, first_score, evaluate, report, log)
    report.score_before_fallback = first_score
    result = budget_mod.BudgetResult(first, first_score, first_score >= threshold, [], [])
    if first_score < threshold and plan.candidates and plan.bias_deltas:
        result = _fallback_recorrected(plan, result, evaluate, threshold, search, report, log)
    if not result.met and plan.candidates and search.left and not search.time_up():
        log(f"{report.metric} {first_score:.5f} misses the budget {threshold:.5f}: ranking node sensitivity")
        scorers = workers if isinstance(metric, str) and workers is not None and workers.count > 1 else None
        report.where["sensitivity"] = f"scored on {scorers.where}" if scorers is not None else here
        ranked = ranked_by_sensitivity(baseline, first, plan, val_feeds[:2], metric_fn, search, scorers, metric)
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
    fill_nodes(report, baseline, final, plan, result.excluded)
    check_clean(final, report)
    if provider == "cpu":
        report.kernels = summarize_kernels(integer_kernels(final))
    if tensorrt_cache is not None and plan.ranges:
        write_tensorrt_cache(plan.ranges, tensorrt_cache)
        report.notes.append(f"TensorRT calibration cache written to {tensorrt_cache} (symmetric amax ranges)")
    if measure_latency and provider == "cpu":
        from .latency import compare

        report.latency = compare(baseline, final, val_feeds[0]).as_dict()
        report.where["latency"] = f"{here} (never on a worker)"
        if keep_float_if_slower:  # a measurement decides the bytes: load can flip it
            report.reproducible = False
        if report.latency["ci_low"] > 1.0:
            final = slower(report, baseline, final, keep_float_if_slower)
    if not plan.candidates and any(holds_subgraph(n) for n in baseline.graph.node):
        report.warnings.append(
            "the model's computation lies in If/Loop/Scan subgraphs, which are not quantized: the result is the float model"
        )
    if provider == "cpu" and final is not baseline and report.int8_nodes:
        final = marked_for(final, spec.cpu_class, report)
    report.seconds = round(time.monotonic() - started, 2)
    out = Model.from_proto(final)
    return out, report


def _first_format(plan: _Plan, evaluate, threshold: float, report: QuantReport, log, search: budget_mod.SearchBudget):
    """Dynamic formats, fastest first on the CPU class (formats.dynamic_formats): the first whose score
    meets the budget is kept, else the best scored; the fallback then builds with it. One evaluation each
    (the first is always made); the choice depends on scores only."""
    options = plan.format_options or {"": (None, plan.build)}
    best = None
    for label, (spec, build) in options.items():
        if not search.take(force=best is None):
            break
        model = build([])
        score = evaluate(model)
        if len(options) > 1:
            log(f"{label}: {report.metric} {score:.5f}")
        if best is None or score > best[1]:
            best = (model, score, label, spec, build)
        if score >= threshold:
            break
    model, score, label, spec, plan.build = best
    if len(options) > 1:
        report.format = spec.as_dict()
        report.notes.append(f"dynamic MatMul weights: {label} (tried fastest first on this CPU class: "
                            f"{', '.join(options)}; kept the first meeting the budget, else the best scored)")
    return model, score


def _tune_static(plan: _Plan, evaluate, report: QuantReport, log, search: budget_mod.SearchBudget, learn=None):
    """Per static format (formats.static_formats: on CPUs without int8 dot products 7-bit
    weights, or 8-bit weights with 7-bit GEMM inputs: the same kernels, so the score alone
    decides) and range option: build (``learn(model)``: learned rounding of the built model,
    rebuilt with it), score, bias-correct layer by layer, score again; keep the best.
    Each score is one of ``search``'s evaluations (the first is always made)."""
    best = None
    formats = plan.static_formats or {"": plan.spec}
    for (label, spec), (method, ranges) in itertools.product(formats.items(), plan.range_options.items()):
        if not search.take(force=best is None):
            break
        plan.spec, plan.ranges, plan.bias_deltas, plan.rounding = spec, ranges, {}, None
        model = plan.build([])
        if learn is not None:
            plan.rounding = learn(model)
            model = plan.build([])
            log(f"ranges {method}: {plan.rounding.describe()}")
        score = evaluate(model)
        deltas = _bias_deltas(plan, model, search)
        line = f"ranges {method}{', ' + label if len(formats) > 1 else ''}: {report.metric} {score:.5f}"
        if plan.rounding is not None:
            line += " (learned rounding)"
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
            best = (score, method, model, deltas, ranges, plan.rounding, label, spec)
    score, method, model, deltas, ranges, rounding, label, spec = best
    plan.spec, plan.ranges, plan.bias_deltas, plan.rounding = spec, ranges, deltas, rounding
    if plan.lean is not None:
        plan.lean.ranges, plan.lean.bias_deltas, plan.lean.rounding = ranges, deltas, rounding
        plan.lean.spec = dataclasses.replace(spec, op_types=plan.lean.spec.op_types)
    if len(formats) > 1:
        report.format = spec.as_dict()
        report.notes.append(f"static format: {label} (scored {', '.join(formats)} on this CPU class: the same "
                            "integer kernels, the best score kept)")
    if rounding is not None:
        report.rounding = rounding.as_dict()
        report.notes.append(rounding.describe())
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
    ranked = ranked_by_contribution(start.model, weighted, plan.kept_feeds[:2])[:MAX_RECORRECTED]
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
