"""``prune(model, ...) -> (Model, PruneReport)``: structured channel pruning, refit and sparsity.

Steps: prepare (cleanup, folding) -> channel analysis (groups, refusals) ->
importance -> allocation (ratio or FLOPs target, sensitivity-aware) -> remove
channels -> refit consumers on calibration data -> optional unstructured / 2:4
sparsity. Every step is recorded in the report.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxforge.context import PassContext, Refusal
from onnxforge.errors import OptionError
from onnxforge.inputs import load_feeds, seeded_feeds
from onnxforge.model import Model, parameter_count

from . import allocate, calib, reconstruct, sparsity
from .flops import estimate_flops, flops_by_node
from .groups import ChannelAnalysis, Group
from .importance import importance
from .prepare import analysis_shapes, prepare
from .structured import apply_pruning

SENSITIVITY_SAMPLES = 2


@dataclasses.dataclass
class PruneReport:
    flops_before: int = 0
    flops_after: int = 0
    params_before: int = 0
    params_after: int = 0
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    groups: list[dict] = dataclasses.field(default_factory=list)
    refusals: list[str] = dataclasses.field(default_factory=list)
    reconstruction: dict[str, Any] = dataclasses.field(default_factory=dict)
    sparsity: dict[str, Any] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def flops_ratio(self) -> float:
        return self.flops_after / self.flops_before if self.flops_before else 1.0

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["flops_ratio"] = self.flops_ratio
        out["params_ratio"] = self.params_ratio
        return out


def _feeds(data, limit: int | None) -> list[dict] | None:
    if data is None:
        return None
    if isinstance(data, (str, Path)):
        return load_feeds(data, limit=limit)
    return list(data)[:limit] if limit else list(data)


def prune(model: Model, target_flops: float | None = None, ratio: float | None = None, method: str = "l1",
          calib_data=None, reconstruct_weights: bool = True, sparsity_level: float | None = None,
          pattern: str | None = None, target_params: float | None = None, round_to: int = 16,
          max_ratio: float = 0.75, sensitivity: bool | None = None, calib_limit: int | None = 16,
          eval_data=None, input_shapes: dict | None = None,
          ctx: PassContext | None = None) -> tuple[Model, PruneReport]:
    """Prune ``model``; see the module docstring. ``calib_data`` and ``eval_data`` are a folder of
    ``.npz`` feed dicts or a list of feed dicts. ``target_flops=0.7`` keeps at most 70% of the FLOPs
    and, unless ``target_params`` says otherwise, of the parameters."""
    _check_options(target_flops, ratio, method, sparsity_level, pattern)
    if target_params is None:
        target_params = target_flops  # a FLOPs target also bounds the parameters, unless told otherwise
    ctx = ctx or PassContext(model=model)
    report = PruneReport(settings=dict(target_flops=target_flops, ratio=ratio, method=method,
                                       reconstruct=reconstruct_weights, round_to=round_to, max_ratio=max_ratio,
                                       target_params=target_params, sparsity=sparsity_level, pattern=pattern))
    feeds = _feeds(calib_data, calib_limit)
    shapes_in = input_shapes or (_shapes_of(feeds[0]) if feeds else None)
    prepared = prepare(model, ctx)
    report.flops_before = estimate_flops(prepared, shapes_in)
    report.params_before = parameter_count(prepared.graph)
    result = prepared
    if target_flops is not None or ratio is not None:
        result = _structured(prepared, report, ctx, feeds, shapes_in, target_flops, ratio, method, target_params,
                             round_to, max_ratio, sensitivity, reconstruct_weights, eval_data)
    if sparsity_level is not None or pattern is not None:
        report.sparsity = sparsity.sparsify(result.graph, level=sparsity_level, pattern=pattern)
    report.flops_after = estimate_flops(result, shapes_in)
    report.params_after = parameter_count(result.graph)
    onnx.checker.check_model(result.to_proto(), full_check=False)
    report.warnings = list(ctx.warnings)
    return result, report


def _check_options(target_flops, ratio, method, sparsity_level, pattern) -> None:
    if target_flops is not None and ratio is not None:
        raise OptionError("give either --target-flops or --ratio, not both")
    if target_flops is not None and not 0 < target_flops < 1:
        raise OptionError(f"--target-flops {target_flops}: must be in (0, 1), the fraction of FLOPs to keep")
    if ratio is not None and not 0 < ratio < 1:
        raise OptionError(f"--ratio {ratio}: must be in (0, 1), the fraction of channels to remove")
    if method not in ("l1", "l2", "activation"):
        raise OptionError(f"--importance {method}: use l1, l2 or activation")
    if sparsity_level is not None and pattern is not None:
        raise OptionError("give either --sparsity or --pattern, not both")
    if sparsity_level is not None and not 0 < sparsity_level < 1:
        raise OptionError(f"--sparsity {sparsity_level}: must be in (0, 1)")
    if pattern is not None:
        sparsity.parse_pattern(pattern)


def _shapes_of(feed: dict) -> dict[str, tuple]:
    return {k: tuple(np.shape(v)) for k, v in feed.items()}


def _structured(prepared, report, ctx, feeds, shapes_in, target_flops, ratio, method, target_params,
                round_to, max_ratio, sensitivity, reconstruct_weights, eval_data) -> Model:
    shapes = analysis_shapes(prepared, shapes_in)
    analysis = ChannelAnalysis(prepared.graph, shapes, prepared.opset() or 13)
    groups = analysis.groups()
    _record_refusals(groups, report, ctx)
    if method == "activation" and not feeds:
        raise OptionError("--importance activation needs --calib data")
    scores = importance(prepared, analysis, method, feeds)
    layer_flops = flops_by_node(prepared, shapes=shapes)  # allocation needs ratios, batch is irrelevant
    cost = allocate.build_cost_model(analysis, layer_flops, sum(layer_flops.values()),
                                     parameter_count(prepared.graph))
    candidates = [g for g in groups if g.prunable.any()]
    if ratio is not None:
        plan = allocate.ratio_plan(candidates, scores, ratio, round_to, cost)
        pruned = prepared.copy()
        sinks = apply_pruning(pruned.graph, analysis, plan.removed)
    else:
        use_sens = sensitivity if sensitivity is not None else bool(feeds)
        sens = _sensitivity(prepared, analysis, candidates, scores, feeds or [seeded_feeds(prepared, shapes_in)],
                            round_to) if use_sens else None
        report.settings["sensitivity"] = bool(use_sens)
        plan, pruned, sinks = _plan_to_target(prepared, analysis, candidates, scores, cost, target_flops,
                                              target_params, round_to, max_ratio, sens, report, shapes_in)
    report.groups = _group_rows(groups, plan)
    if reconstruct_weights and feeds:
        plain = pruned.copy()
        fits = reconstruct.refit(prepared, pruned, sinks, feeds)
        report.reconstruction = _reconstruction_summary(prepared, plain, pruned, fits, eval_data or feeds)
    elif reconstruct_weights:
        ctx.warn("prune: no calibration data, so consumers were not refitted (give --calib)")
    elif eval_data is not None:
        report.reconstruction = _reconstruction_summary(prepared, pruned, None, [], eval_data)
    return pruned


def _plan_to_target(prepared, analysis, candidates, scores, cost, target_flops, target_params, round_to,
                    max_ratio, sens, report, shapes_in, attempts: int = 4):
    """Allocate, prune, measure; tighten the model's targets until the measured ratios meet them
    (the cost model leaves out biases and elementwise work, so it can be off by a little)."""
    aim_flops, aim_params = target_flops, target_params
    for _ in range(attempts):
        plan = allocate.global_plan(candidates, scores, cost, aim_flops, aim_params, round_to, max_ratio, sens)
        pruned = prepared.copy()
        sinks = apply_pruning(pruned.graph, analysis, plan.removed)
        flops = estimate_flops(pruned, shapes_in) / report.flops_before
        params = parameter_count(pruned.graph) / report.params_before
        over_flops, over_params = flops - target_flops, params - (target_params or 1.0)
        if over_flops <= 0 and over_params <= 0:
            break
        aim_flops -= max(over_flops, 0) + 1e-3 * (over_flops > 0)
        if aim_params is not None:
            aim_params -= max(over_params, 0) + 1e-3 * (over_params > 0)
    return plan, pruned, sinks


def _record_refusals(groups: list[Group], report: PruneReport, ctx: PassContext) -> None:
    for g in groups:
        for reason in g.reasons():
            text = f"group {g.index} ({g.size} channels from {', '.join(g.sources[:2])}): {reason}"
            report.refusals.append(text)
            ctx.refuse(Refusal("prune-channels", reason, tuple(g.sources[:4])))


def _group_rows(groups: list[Group], plan: allocate.Plan) -> list[dict]:
    rows = []
    for g in groups:
        kept, size = plan.per_group.get(g.index, (g.size, g.size))
        rows.append(dict(index=g.index, size=size, kept=kept, sources=g.sources, sinks=g.sinks,
                         blocked=len(g.blocked), reasons=g.reasons()))
    return rows


def _sensitivity(prepared, analysis, groups, scores, feeds, round_to) -> dict[int, float]:
    """Output error (1 - cosine) when each group alone loses half its prunable channels."""
    sample = feeds[:SENSITIVITY_SAMPLES]
    reference = calib.outputs(prepared, sample)
    sens = {}
    for g in groups:
        order = allocate._group_order(g, scores)
        half = min(len(order), max(round_to, len(order) // 2 // round_to * round_to))
        if half == 0 or half >= g.size:
            continue
        trial = prepared.copy()
        apply_pruning(trial.graph, analysis, {int(c) for c in order[:half]})
        sens[g.index] = max(1.0 - calib.mean_cosine(reference, calib.outputs(trial, sample)), 1e-9)
    if sens:
        typical = float(np.median(list(sens.values())))
        sens = {k: v / typical for k, v in sens.items()}
    return sens


def _reconstruction_summary(prepared, plain, refitted, fits, eval_data) -> dict:
    feeds = _feeds(eval_data, None)
    reference = calib.outputs(prepared, feeds)
    summary = {"eval_samples": len(feeds), "cosine_plain": calib.mean_cosine(reference, calib.outputs(plain, feeds))}
    if refitted is not None:
        summary["cosine_refit"] = calib.mean_cosine(reference, calib.outputs(refitted, feeds))
        summary["layers"] = [dataclasses.asdict(f) for f in fits]
    return summary
