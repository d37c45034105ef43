"""What each recipe step does (``EXECUTORS``): optimize, check, bench, quantize (INT8 and
INT4), fp16, prune, tune. An executor runs on the pipeline's current model through its
``_Run`` (pipeline.py) and returns the step's record for the report."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .errors import DataError, first_line
from .pass_files import resolve_pass
from .pipeline_report import _json_safe
from .recipe import Step
from .report import rolled_back_line

if TYPE_CHECKING:
    from .pipeline import _Run


def _optimize(run: _Run, step: Step) -> dict:
    from .api import optimize

    p = step.params
    feeds = run.feeds(p["data"], 8) if p["data"] else None
    result, rep = optimize(
        run.model,
        level=p["level"],
        passes=[_pass_name(n, run.recipe.base_dir) for n in p["passes"]] if p["passes"] else None,
        disable=[_pass_name(n, run.recipe.base_dir) for n in p["disable"]],
        extra_passes=[resolve_pass(n, run.recipe.base_dir) for n in p["extra_passes"]],
        provider=run.recipe.provider,
        input_shapes=run.settings["input_shapes"],
        options=p["options"],
        verify=p["verify"],
        strict=p["strict"],
        feeds=feeds,
        max_iterations=p["max_iterations"],
    )
    run.set_model(result)
    data = rep.as_dict()
    for warning in data["warnings"]:
        run.warn(warning)
    for rolled in data["rolled_back"]:
        run.warn(rolled_back_line(rolled))
    keep = ("passes", "iterations", "rolled_back", "refusals")
    return {"report": {k: data[k] for k in keep}, "verification": data["verification"]}


def _pass_name(name: str, base_dir: Path) -> str:
    """``file.py:Class`` becomes ``<imported module>:Class`` so the registry resolves it
    (resolution itself lives in one place: ``pass_files.resolve_pass``)."""
    if name.rpartition(":")[0].endswith(".py"):
        cls = resolve_pass(name, base_dir, instantiate=False)
        return f"{cls.__module__}:{cls.__name__}"
    return name


def _check(run: _Run, step: Step) -> dict:
    from .output_diff import compare_arrays, merge_diffs
    from .verify import run_outputs

    p = step.params
    feeds = run.feeds(p["data"], p["samples"])
    try:
        reference = run_outputs(run.original, feeds)
    except Exception as exc:
        raise DataError(f"check: the input model does not run on these feeds: {first_line(exc)}") from exc
    candidate = run_outputs(run.model, feeds)
    names = [t.name for t in run.original.graph.outputs]
    diffs = merge_diffs(
        [compare_arrays(n, a, b, float("inf"), 0.0) for n, a, b in zip(names, ref, out)]
        for ref, out in zip(reference, candidate)
    )
    outputs = [{k: v for k, v in d.as_dict().items() if k != "ok"} for d in diffs]
    failures = _budget_failures(outputs, p)
    accuracy = {
        "feeds": len(feeds), "source": p["data"] or "seeded",
        "budget": {k: p[k] for k in ("min_cosine", "max_abs", "max_rel") if p[k] is not None},
        "outputs": outputs, "ok": not failures,
    }
    details = {"accuracy": accuracy}
    if failures:
        details["failure"] = "; ".join(failures)
    return details


def _budget_failures(outputs: list[dict], p: Mapping[str, Any]) -> list[str]:
    failures = []
    for o in outputs:
        if p["min_cosine"] is not None and not o["cosine"] >= p["min_cosine"]:
            failures.append(f"output {o['name']!r} cosine {o['cosine']:.6f} < min_cosine {p['min_cosine']}")
        if p["max_abs"] is not None and not o["max_abs"] <= p["max_abs"]:
            failures.append(f"output {o['name']!r} max abs error {o['max_abs']:.3e} > max_abs {p['max_abs']}")
        if p["max_rel"] is not None and not o["max_rel"] <= p["max_rel"]:
            failures.append(f"output {o['name']!r} max rel error {o['max_rel']:.3e} > max_rel {p['max_rel']}")
    return failures


def _bench(run: _Run, step: Step) -> dict:
    from .bench.harness import compare_latency

    p = step.params
    feeds = run.feeds(p["data"], 8) if p["data"] else None
    result = compare_latency(
        [run.original_file, run.current_file()], feeds, threads=p["threads"], rounds=p["rounds"],
        warmup=p["warmup"], iterations=p["iterations"], provider=run.recipe.provider, seed=run.settings["seed"],
        input_shapes=run.settings["input_shapes"],
    )
    base, model = result.models
    latency = {
        "provider": run.recipe.provider, "rounds": p["rounds"], "threads": p["threads"],
        "input_ms": base.stats, "output_ms": model.stats,
        "ratio": None if model.ratio is None else {**dataclasses.asdict(model.ratio), "verdict": model.ratio.verdict},
    }
    return {"latency": latency}


def _quantize(run: _Run, step: Step) -> dict:
    p = step.params

    if p["bits"] == 4:
        return _quantize_int4(run, step)
    if p["bits"] == "auto":
        return _quantize_auto(run, step)

    def compute():
        from .passes.quant.quantize import quantize

        model, rep = quantize(
            run.model, p["calibration"], provider=run.recipe.provider, method=p["method"], max_drop=p["max_drop"],
            metric=p["metric"], val=p["validation"], budget_seconds=p["budget_seconds"],
            max_evaluations=p["max_evaluations"], mode=p["mode"], rounding=p["rounding"],
            measure_latency=p["measure_latency"], max_input_error=p["max_input_error"], log=run.progress,
        )
        return model, {"quantization": _json_safe(rep.as_dict())}

    details = run.cached(step, compute)
    q = details["quantization"]
    return _with_budget(run, step, details, q, source=q["validation"])


def _quantize_int4(run: _Run, step: Step) -> dict:
    p = step.params

    def compute():
        from .passes.quant.int4 import quantize_int4

        model, rep = quantize_int4(
            run.model, p["calibration"], method=p["weight_method"], block_size=p["block_size"],
            symmetric=p["symmetric"], lm_head=p["lm_head"], act_order=p["act_order"], accuracy_level=p["accuracy_level"],
            val=p["validation"], max_ppl_increase=p["max_ppl_increase"], max_drop=p["max_drop"],
            budget_metric=p["budget_metric"], log=run.progress,
        )
        return model, {"int4": _json_safe(rep.as_dict())}

    details = run.cached(step, compute)
    q = details["int4"]
    if q["budget_met"] is not None:
        ppl = q.get("budget_metric") == "perplexity"
        details["accuracy"] = {"metric": "perplexity_increase" if ppl else "cosine", "score": q["score"],
                               "ok": bool(q["budget_met"]), "source": q["validation"]}
        if q["budget_met"] is False:
            details["failure"] = (f"accuracy budget not met: perplexity +{100 * q['score']:.1f}% > "
                                  f"+{100 * q['max_ppl_increase']:.0f}%" if ppl else
                                  f"accuracy budget not met: cosine {q['score']:.5f} < {1 - q['max_drop']:.5f}")
    return details


def _quantize_auto(run: _Run, step: Step) -> dict:
    """bits = "auto": fp32, INT8 dynamic and INT4 (this step's INT4 keys) judged on the validation feeds and
    timed interleaved on the current model (passes/quant/auto_bits.py); the kept one goes on."""
    p = step.params

    def compute():
        from .passes.quant.auto_bits import quantize_auto

        model, rep = quantize_auto(
            str(run.current_file()), run.model, p["calibration"], val=p["validation"],
            int4_options=dict(method=p["weight_method"], block_size=p["block_size"], symmetric=p["symmetric"],
                              lm_head=p["lm_head"], act_order=p["act_order"]),
            max_ppl_increase=p["max_ppl_increase"], max_drop=p["max_drop"], rounds=p["auto_rounds"],
            margin=p["auto_margin"], perplexity=p["budget_metric"] != "cosine", seed=run.settings["seed"],
            max_input_error=p["max_input_error"], log=run.progress,
        )
        return model, {"bits_auto": _json_safe(rep.as_dict())}

    details = run.cached(step, compute)
    auto = details["bits_auto"]
    if auto["decided_by_timing"]:
        run.warn(f"{step.name}: bits auto kept {auto['chosen']} because of a timing ({auto['reason']}): "
                 "a rerun on another machine may choose otherwise")
    return details


def _fp16(run: _Run, step: Step) -> dict:
    p = step.params

    def compute():
        from .passes.quant.fp16 import convert_fp16

        model, rep = convert_fp16(run.model, calib=p["calibration"], keep_io_types=p["keep_io_types"],
                                  max_drop=p["max_drop"], metric=p["metric"], val=p["validation"], log=run.progress)
        return model, {"fp16": _json_safe(rep.as_dict())}

    details = run.cached(step, compute)
    f = details["fp16"]
    return _with_budget(run, step, details, f, source=p["validation"] or f["calibration"])


def _with_budget(run: _Run, step: Step, details: dict, rep: dict, source: str | None) -> dict:
    """Accuracy of a lossy step (quantize, fp16) in the report; a missed budget fails the step."""
    for w in rep.get("warnings", ()):
        run.warn(_labelled(step, w))
    if rep.get("score") is None:  # no validation feeds: nothing was measured
        return details
    details["accuracy"] = {"metric": rep["metric"], "score": rep["score"], "max_drop": rep["max_drop"],
                           "ok": bool(rep["budget_met"]), "source": source}
    if rep["budget_met"] is False:
        details["failure"] = (f"accuracy budget not met: {rep['metric']} {rep['score']:.5f} < "
                              f"{1 - rep['max_drop']:.5f} (max_drop {rep['max_drop']})")
    return details


def _prune(run: _Run, step: Step) -> dict:
    p = step.params

    def compute():
        from .passes.prune.prune import prune

        model, rep = prune(
            run.model, target_flops=p["target_flops"], ratio=p["ratio"], method=p["importance"],
            calib_data=p["calibration"], reconstruct_weights=p["reconstruct"], sparsity_level=p["sparsity"],
            pattern=p["pattern"], target_params=p["target_params"], round_to=p["round_to"],
            max_ratio=p["max_ratio"], sensitivity=p["sensitivity"], eval_data=p["validation"],
            input_shapes=dict(run.settings["input_shapes"]) or None,
        )
        return model, {"pruning": _json_safe(rep.to_dict())}

    details = run.cached(step, compute)
    for w in details["pruning"].get("warnings", ()):
        run.warn(_labelled(step, w))
    return details


def _labelled(step: Step, message: str) -> str:
    return message if message.startswith(f"{step.kind}:") else f"{step.name}: {message}"


def _tune(run: _Run, step: Step) -> dict:
    p = step.params

    def compute():
        from .runtime.shapes import ShapeRange
        from .runtime.tune import tune

        ranges = {k: ShapeRange(tuple(v), tuple(v), tuple(v)) for k, v in run.settings["input_shapes"].items()}
        result = tune(run.current_file(), run.recipe.provider, p["budget_seconds"], output=False, shape_ranges=ranges,
                      data=p["data"], seed=run.settings["seed"], allow_lossy=p["allow_lossy"], on_progress=run.progress)
        return None, {"profile": result.profile.to_dict()}

    details = run.cached(step, compute)
    run.profile = details["profile"]
    tuning = details["profile"].get("tuning") or {}
    details["tuning"] = {k: tuning.get(k) for k in ("kept_default", "confirmation", "elapsed_s", "budget_s")}
    return details


EXECUTORS: Mapping[str, Callable[[_Run, Step], dict]] = MappingProxyType({
    "optimize": _optimize,
    "check": _check,
    "bench": _bench,
    "quantize": _quantize,
    "fp16": _fp16,
    "prune": _prune,
    "tune": _tune,
})
