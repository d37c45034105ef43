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

What each step does is pipeline_steps.py; the report's skeleton and its
environment record are pipeline_report.py.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import onnx

from .cache import StepCache, data_digest, environment_key, files_digest, saved_model_bytes, saved_model_files, sha256_file
from .errors import OnnxForgeError, OptionError, VerificationError
from .io import check_output_path, check_output_paths, guarding_inputs, load, load_input, protect, save, write_file
from .verify import written_equals
from .model import Model, constants
from .model_prep import apply_input_shapes
from .pass_files import user_code
from .recipe import STEPS, Recipe, Step, load_recipe, parse_recipe, validate
from .pipeline_report import (  # noqa: F401  (REPORT_SCHEMA* re-exported: the report's format is read here)
    REPORT_SCHEMA, REPORT_SCHEMA_VERSION, _changes, _empty_report, _error_dict, _jsonable_params,
)
from .pipeline_steps import EXECUTORS
from .report import model_stats

MODEL_FILE = "model.onnx"


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
        # every step (a quantize or fp16 step's random calibration too) and every check runs at the pinned sizes
        apply_input_shapes(self.model, dict(self.settings["input_shapes"]))

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
        from .inputs import checked_feeds
        from .verify_feeds import runnable_feeds

        if data:
            return checked_feeds(self.original, data, "data", limit=samples)
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
            self.check_step_data(step)
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

    def check_step_data(self, step: Step) -> None:
        """The step's feeds against the model it runs on (pinned by input_shapes, changed by earlier
        steps): a wrong name, dtype, rank or dim is refused in one line naming the file, before any work."""
        from .inputs import check_data

        for key, value in step.data_paths().items():
            check_data(self.model, value, f"steps[{step.index + 1}].{key}")

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
        save(self.model, target, external_data=self.settings["external_data"], check=written_equals(self.model, pinned=self.settings["input_shapes"],
                                           provider=self.recipe.provider))
        files = files_digest(saved_model_files(target), target.parent)
        self.report["output"] = {
            "path": str(output) if output else None, "sha256": files[target.name], "files": files,
            "stats": model_stats(self.model, file_bytes=saved_model_bytes(target)),
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
    from .model_prep import snapshot

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
        for key, value in step.data_paths().items():
            protect(value, f"the data of steps[{step.index + 1}].{key}")
    for entry in user_code(recipe):
        if entry.get("file"):
            protect(entry["file"], f"the pass file of {entry['pass']}")
