"""Pipelines as code: run a recipe's steps on a model, deterministically, with a
versioned JSON report.

    pipeline = onnxforge.Pipeline.from_file("recipe.toml")
    result = pipeline.run("model.onnx", "model.opt.onnx")
    result.report["output"]["sha256"]

The whole recipe is validated when the pipeline is made (``recipe.py``), so no
step starts on a recipe that would fail later for a typo. Steps hand an
in-memory ``Model`` to each other; the original model stays untouched for the
``check`` and ``bench`` steps. Expensive steps (quantize, prune, tune) are
cached (``cache.py``); a step's result is re-read from the file it was saved
to whether it was computed or cached, so both paths give the same bytes.

Same input, recipe and versions give a byte-identical output: every step is
deterministic (seeded inputs, sorted iteration), the pass manager's names come
from the graph, and the output is written by ``onnxforge.io.save`` (tensor
order from the graph, external data laid out in that order, 4 KiB aligned).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import onnx

from .cache import StepCache, data_digest, environment_key, files_digest, saved_model_files, sha256_file
from .errors import DataError, OnnxForgeError, OptionError, VerificationError, first_line
from .io import check_output_path, check_output_paths, guarding_inputs, load, load_input, protect, save, write_file
from .verify import written_equals
from .model import Model, constants
from .pass_files import resolve_pass, user_code
from .recipe import STEPS, Recipe, Step, load_recipe, parse_recipe, validate
from .report import model_stats, rolled_back_line

REPORT_SCHEMA = "onnxforge.pipeline-report"
REPORT_SCHEMA_VERSION = 1
MODEL_FILE = "model.onnx"
STAT_KEYS = ("nodes", "parameters", "weight_bytes")


@dataclasses.dataclass
class PipelineResult:
    """The optimized model, the JSON-ready report, and where the output went."""

    model: Model
    report: dict[str, Any]
    output: Path | None
    profile: Path | None = None

    @property
    def output_sha256(self) -> str:
        return self.report["output"]["sha256"]


class Pipeline:
    """A validated recipe, ready to run on any number of models."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        for step in recipe.steps:
            if step.kind not in EXECUTORS:
                where = f"{recipe.source}:{step.line}" if step.line else recipe.source
                raise OptionError(f"{where}: steps[{step.index + 1}].step: step {step.kind!r} is not wired in this build")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Pipeline":
        return cls(load_recipe(path))

    @classmethod
    def from_toml(cls, text: str, base_dir: str | os.PathLike = ".", source: str = "<recipe>") -> "Pipeline":
        return cls(parse_recipe(text, source=source, base_dir=base_dir))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: str | os.PathLike = ".") -> "Pipeline":
        """A recipe given as a dict (the TOML document's structure); relative paths
        are resolved against ``base_dir``."""
        return cls(validate(data, source="<dict>", base_dir=base_dir))

    @property
    def steps(self) -> tuple[Step, ...]:
        return self.recipe.steps

    def run(
        self,
        model: Model | onnx.ModelProto | str | os.PathLike,
        output: str | os.PathLike | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        progress: Callable[[str], None] | None = None,
        also_writes: Sequence[str | os.PathLike] = (),
    ) -> PipelineResult:
        """Run every step on ``model`` and write the result to ``output`` (when given).

        Raises an ``OnnxForgeError`` (exit codes 2/3) or another exception (1) on
        failure; the report so far is attached to it as ``.report``. ``also_writes``:
        files the caller writes afterwards (a report), refused like ``output``
        when they name a file the run reads."""
        started = time.perf_counter()
        report = _empty_report(self.recipe)
        try:
            with guarding_inputs(), tempfile.TemporaryDirectory(prefix="onnxforge-run-") as work:
                _protect_recipe_files(self.recipe)
                if isinstance(model, (str, os.PathLike)):
                    protect(model, "the input model")
                if output is not None:
                    check_output_path(Path(output))
                state = _Run(self.recipe, Path(work), report, progress or (lambda _m: None),
                             cache_dir=cache_dir, use_cache=use_cache)
                state.start(model)
                check_output_paths(output, *also_writes)  # the model's external data is known now
                for step in self.recipe.steps:
                    state.run_step(step)
                result = state.finish(Path(output) if output is not None else None)
        except BaseException as exc:
            report["status"] = "failed"
            report["exit_code"] = exc.exit_code if isinstance(exc, OnnxForgeError) else 1
            report["error"] = _error_dict(exc)
            report["seconds"] = round(time.perf_counter() - started, 4)
            exc.report = report
            raise
        report["seconds"] = round(time.perf_counter() - started, 4)
        return result


# ------------------------------------------------------------------ one run


class _Run:
    """The state of one pipeline run: the original and current models, the work
    folder, the cache and the report being filled."""

    def __init__(self, recipe: Recipe, work: Path, report: dict, progress, *, cache_dir, use_cache: bool):
        self.recipe, self.work, self.report, self.progress = recipe, work, report, progress
        self.cache = StepCache(cache_dir, enabled=use_cache, warn=self.warn)
        report["cache"].update({"enabled": use_cache, "folder": str(self.cache.folder)})
        self.settings = recipe.settings
        self.original: Model | None = None
        self.original_file: Path | None = None
        self.model: Model | None = None
        self._current_file: Path | None = None
        self._files = 0
        self.profile: dict | None = None

    def warn(self, message: str) -> None:
        if message not in self.report["warnings"]:
            self.report["warnings"].append(message)

    # ---------------------------------------------------------------- models and files

    def start(self, model) -> None:
        if isinstance(model, (str, os.PathLike)):
            path = Path(model)
            self.original = load_input(path)
            self.original_file = path
            files = files_digest(sorted(self.original.source_files), path.parent)
            self.report["input"] = {"path": str(path), "sha256": sha256_file(path), "files": files}
        else:
            self.original = model if isinstance(model, Model) else Model.from_proto(model)
            self.original_file = self.save_work(self.original, "input")
            files = files_digest(saved_model_files(self.original_file), self.original_file.parent)
            self.report["input"] = {"path": None, "sha256": files[MODEL_FILE], "files": files}
        self.report["input"]["stats"] = model_stats(self.original)
        self.model = _independent_copy(self.original)

    def save_work(self, model: Model, label: str) -> Path:
        """Save ``model`` as ``<work>/<n>-<label>/model.onnx`` (a folder of its own,
        so a data file is always ``model.onnx.data``)."""
        self._files += 1
        folder = self.work / f"{self._files:03d}-{label}"
        folder.mkdir()
        return save(model, folder / MODEL_FILE)

    def current_file(self) -> Path:
        if self._current_file is None:
            self._current_file = self.save_work(self.model, "current")
        return self._current_file

    def set_model(self, model: Model) -> None:
        self.model, self._current_file = model, None

    def set_model_file(self, path: Path) -> None:
        self.model, self._current_file = load(path), path

    def feeds(self, data: str | None, samples: int) -> list[dict]:
        from .inputs import load_feeds
        from .verify_feeds import runnable_feeds

        names = [t.name for t in self.original.graph.inputs]
        if data:
            return load_feeds(data, names, limit=samples)
        shapes, seed = self.settings["input_shapes"], self.settings["seed"]
        return runnable_feeds(self.original, shapes, samples, seed)

    # ---------------------------------------------------------------- steps

    def run_step(self, step: Step) -> None:
        self.progress(f"[{step.index + 1}/{len(self.recipe.steps)}] {step.name}")
        before = model_stats(self.model)
        record: dict[str, Any] = {
            "index": step.index + 1, "step": step.kind, "name": step.name, "line": step.line,
            "params": _jsonable_params(step.params), "cached": None,
        }
        self.report["steps"].append(record)
        t0 = time.perf_counter()
        try:
            details = EXECUTORS[step.kind](self, step)
        finally:
            record["seconds"] = round(time.perf_counter() - t0, 4)
        failure = details.pop("failure", None)
        record.update(details)
        record["changes"] = _changes(before, model_stats(self.model))
        for key in ("verification", "accuracy", "latency"):
            if record.get(key) is not None:
                self.report[key].append({"step": step.index + 1, **record[key]})
        if failure:
            where = f"{self.recipe.source}:{step.line}" if step.line else self.recipe.source
            raise VerificationError(f"{where}: step {step.index + 1} ({step.name}): {failure}",
                                    hint="the report lists every output's figures")

    def cached(self, step: Step, compute: Callable[[], tuple[Model | None, dict]]) -> dict:
        """Run ``compute`` (-> model or None, JSON payload) or reuse its cached result.

        The key covers the current model's bytes, the step's parameters with its
        data files' digests, the recipe's settings and the environment."""
        material = self._key_material(step)
        key = StepCache.key_for(step.kind, material)
        use = step.params.get("cache", True)
        entry = self.cache.get(step.kind, key) if use else None
        if entry is not None:
            if MODEL_FILE in entry.files:
                self.set_model_file(entry.files[MODEL_FILE])
            return {**entry.payload, "cached": True, "cache_key": key}
        model, payload = compute()
        files = {}
        if model is not None:
            path = self.save_work(model, step.kind)
            files = {f.name: f for f in saved_model_files(path)}
            self.set_model_file(path)  # read back: the same bytes a cache hit gives
        if use:
            self.cache.put(step.kind, key, material, payload, files)
        return {**payload, "cached": False, "cache_key": key}

    def _key_material(self, step: Step) -> dict:
        current = self.current_file()
        fields = STEPS[step.kind].fields
        params = {}
        for name, value in step.params.items():
            if name == "cache":
                continue
            is_data = fields[name].kind in ("path", "data") and value not in (None, "random")
            params[name] = {"sha256": data_digest(value)} if is_data else value
        return {
            "model": files_digest(saved_model_files(current), current.parent),
            "params": params,
            "provider": self.recipe.provider,
            "input_shapes": {k: list(v) for k, v in sorted(self.settings["input_shapes"].items())},
            "seed": self.settings["seed"],
            "environment": environment_key(self.recipe.provider),
        }

    # ---------------------------------------------------------------- output

    def finish(self, output: Path | None) -> PipelineResult:
        target = output or (self.work / "output" / MODEL_FILE)
        target.parent.mkdir(exist_ok=True)
        save(self.model, target, external_data=self.settings["external_data"], check=written_equals(self.model))
        files = files_digest(saved_model_files(target), target.parent)
        self.report["output"] = {
            "path": str(output) if output else None, "sha256": files[target.name], "files": files,
            "stats": model_stats(self.model, file_bytes=sum(f.stat().st_size for f in saved_model_files(target))),
        }
        profile_path = None
        if self.profile is not None and output is not None:
            profile_path = _write_profile(self.profile, output)
            self.report["output"]["profile"] = str(profile_path)
        result_model = load(target) if output else _materialized(self.model)
        self.report["cache"].update({"hits": len(self.cache.hits), "misses": len(self.cache.misses)})
        self.report["status"], self.report["exit_code"] = "ok", 0
        return PipelineResult(result_model, self.report, output, profile_path)


def _independent_copy(model: Model) -> Model:
    """A copy no step can change the original through (external weights stay on disk)."""
    from .pass_manager import snapshot

    return snapshot(model)


def _materialized(model: Model) -> Model:
    """Read external weights into memory: the work folder they live in goes away."""
    for const in constants(model.graph):
        const.values  # noqa: B018 - loads lazily stored values
    return model


def _write_profile(profile: dict, output: Path) -> Path:
    from .runtime.profile import Profile, profile_path_for, save_profile

    data = dict(profile)
    data["model"] = {"file": output.name}
    checked = Profile.from_dict(data, where="tuned profile")
    return write_file(profile_path_for(output), lambda tmp: save_profile(checked, tmp))


def _protect_recipe_files(recipe: Recipe) -> None:
    """The recipe, its data and its pass files are read by the run: no output may replace them."""
    if recipe.text is not None and recipe.source != "<recipe>":
        protect(recipe.source, "the recipe")
    for step in recipe.steps:
        for key, field in step.spec.fields.items():
            value = step.params.get(key)
            if field.kind in ("path", "data") and isinstance(value, str) and value != "random":
                protect(value, f"the data of steps[{step.index + 1}].{key}")
    for entry in user_code(recipe):
        if entry.get("file"):
            protect(entry["file"], f"the pass file of {entry['pass']}")


# ------------------------------------------------------------------ executors


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
    from .verify import compare_arrays, merge_diffs, run_outputs

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

    def compute():
        from .passes.quant.quantize import quantize

        model, rep = quantize(
            run.model, p["calibration"], provider=run.recipe.provider, method=p["method"], max_drop=p["max_drop"],
            metric=p["metric"], val=p["validation"], budget_seconds=p["budget_seconds"],
            max_evaluations=p["max_evaluations"], mode=p["mode"],
            measure_latency=p["measure_latency"], log=run.progress,
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
            symmetric=p["symmetric"], lm_head=p["lm_head"], val=p["validation"], max_ppl_increase=p["max_ppl_increase"],
            max_drop=p["max_drop"], log=run.progress,
        )
        return model, {"int4": _json_safe(rep.as_dict())}

    details = run.cached(step, compute)
    q = details["int4"]
    if q["budget_met"] is not None:
        ppl = "perplexity" in q["metrics"]
        details["accuracy"] = {"metric": "perplexity_increase" if ppl else "cosine", "score": q["score"],
                               "ok": bool(q["budget_met"]), "source": q["validation"]}
        if q["budget_met"] is False:
            details["failure"] = (f"accuracy budget not met: perplexity +{100 * q['score']:.1f}% > "
                                  f"+{100 * q['max_ppl_increase']:.0f}%" if ppl else
                                  f"accuracy budget not met: cosine {q['score']:.5f} < {1 - q['max_drop']:.5f}")
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


# ------------------------------------------------------------------ report


def _empty_report(recipe: Recipe) -> dict[str, Any]:
    import hashlib

    text = recipe.text
    return {
        "schema": REPORT_SCHEMA,
        "schema_version": REPORT_SCHEMA_VERSION,
        "status": "running",
        "exit_code": None,
        "error": None,
        "recipe": {
            "path": recipe.source if recipe.text is not None else None,
            "sha256": hashlib.sha256(text.encode()).hexdigest() if text is not None else None,
            "name": recipe.settings["name"],
            "version": recipe.settings["version"],
            "provider": recipe.provider,
            "input_shapes": {k: list(v) for k, v in recipe.settings["input_shapes"].items()},
            "seed": recipe.settings["seed"],
            "user_code": user_code(recipe),
        },
        "input": None,
        "output": None,
        "steps": [],
        "verification": [],
        "accuracy": [],
        "latency": [],
        "warnings": [],
        "cache": {"enabled": True, "folder": None, "hits": 0, "misses": 0},
        "environment": _environment(),
        "packages": package_versions(),
        "seconds": None,
    }


def _environment() -> dict[str, Any]:
    try:
        from .runtime.env import environment
    except ImportError:  # a build without the runtime package
        import platform

        return {"host": platform.node(), "os": f"{platform.system()} {platform.release()}"}
    return environment()


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions = {}
    for dist in ("onnxforge", "onnx", "onnxruntime", "onnxruntime-gpu", "onnx-graphsurgeon", "numpy", "protobuf"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _changes(before: dict, after: dict) -> dict[str, Any]:
    changes: dict[str, Any] = {k: {"before": before[k], "after": after[k]} for k in STAT_KEYS}
    ops = sorted(set(before["ops"]) | set(after["ops"]))
    changes["ops"] = {
        op: after["ops"].get(op, 0) - before["ops"].get(op, 0)
        for op in ops if before["ops"].get(op, 0) != after["ops"].get(op, 0)
    }
    return changes


def _jsonable_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}


def _json_safe(value: Any) -> Any:
    """Plain JSON types only (numpy scalars and other objects become numbers or strings)."""
    import json

    import numpy as np

    def default(obj):
        if isinstance(obj, (np.floating, np.integer, np.bool_)):
            return obj.item()
        return str(obj)

    return json.loads(json.dumps(value, default=default))


def _error_dict(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, OnnxForgeError):
        return {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}
    return {"type": type(exc).__name__, "message": first_line(exc), "hint": None}
