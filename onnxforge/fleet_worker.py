"""One model of a fleet, in a process of its own: ``python -m onnxforge.fleet_worker``
reads its job (JSON) on stdin and writes ``{exit_code, error, report, run_cached}``
to the job's ``result`` file. See fleet.py.

The run cache: a finished model's output files and report are stored as a
``fleet-run`` entry of the step cache, keyed by everything the result depends
on (recipe text, the digests of its data and pass files, the input model's
files, the environment); a rerun restores them without running a step.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import OnnxForgeError, first_line
from .termination import EXIT_CODE as TERMINATED_EXIT, Terminated, raising_on_sigterm

RUN_KIND = "fleet-run"
REPORT_FILE = "report.json"
MODEL_FILE = "model.onnx"


def run_key_material(recipe, model_path: Path, output_name: str) -> dict:
    """What a fleet model's result depends on, by content (and the output's name,
    which a model with external data refers to its data file by)."""
    import hashlib

    from .cache import data_digest, environment_key, files_digest
    from .io import load
    from .pass_files import user_code

    data = {}
    for step in recipe.steps:
        for key, value in step.data_paths().items():
            data[f"{step.index + 1}.{key}"] = data_digest(value)
    model = load(model_path)
    return {
        "recipe": hashlib.sha256((recipe.text or "").encode()).hexdigest(),
        "data": data,
        "user_code": [c.get("sha256") or c.get("file") for c in user_code(recipe)],
        "model": files_digest(sorted(model.source_files), model_path.parent),
        "environment": environment_key(recipe.provider),
        "output_name": output_name,
        "deferred_latency": True,
    }


def run_job(job: dict) -> dict:
    from .cache import StepCache, saved_model_files
    from .fleet import deferred
    from .io import write_file
    from .pipeline import Pipeline
    from .fleet import recipe_for

    output = Path(job["output"])
    try:
        recipe = recipe_for(job["recipe"], job["model"])
    except OnnxForgeError as exc:
        return _failure(exc)
    cache = StepCache(job["cache_dir"], enabled=job["use_cache"])
    key = material = None
    try:
        material = run_key_material(recipe, Path(job["model"]), output.name)
        key = StepCache.key_for(RUN_KIND, material)
    except OnnxForgeError:  # an unreadable model: the pipeline says why below
        pass
    entry = cache.get(RUN_KIND, key) if key else None
    if entry is not None and MODEL_FILE in entry.files and REPORT_FILE in entry.files:
        output.parent.mkdir(parents=True, exist_ok=True)
        for name in sorted(entry.files, key=lambda n: n == MODEL_FILE):  # data file before the model
            if name != REPORT_FILE:  # model.onnx -> OUT, model.onnx.data -> OUT.data
                target = output.with_name(output.name + name[len(MODEL_FILE):])
                write_file(target, lambda tmp, src=entry.files[name]: tmp.write_bytes(src.read_bytes()))
        report = json.loads(entry.files[REPORT_FILE].read_text(encoding="utf-8"))
        report["output"]["path"] = str(output)
        return {"exit_code": 0, "error": None, "report": report, "run_cached": True}
    try:
        result = Pipeline(deferred(recipe)).run(job["model"], output, cache_dir=job["cache_dir"],
                                                use_cache=job["use_cache"])
    except BaseException as exc:  # noqa: BLE001 - reported as this model's failure
        return _failure(exc)
    if key is not None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="onnxforge-fleet-entry-") as tmp:
            report_file = Path(tmp) / REPORT_FILE
            report_file.write_text(json.dumps(result.report, default=str), encoding="utf-8")
            files = {MODEL_FILE + f.name[len(output.name):]: f for f in saved_model_files(output)}
            files[REPORT_FILE] = report_file
            cache.put(RUN_KIND, key, material, {"output": output.name}, files)
    return {"exit_code": 0, "error": None, "report": result.report, "run_cached": False}


def _failure(exc: BaseException) -> dict:
    if isinstance(exc, OnnxForgeError):
        code, message = exc.exit_code, exc.message.splitlines()[0] if exc.message else type(exc).__name__
    elif isinstance(exc, Terminated):
        code, message = TERMINATED_EXIT, "terminated (SIGTERM)"
    elif isinstance(exc, KeyboardInterrupt):
        code, message = 130, "interrupted"
    else:
        code, message = 1, f"internal error: {type(exc).__name__}: {first_line(exc)}"
    return {"exit_code": code, "error": message, "report": getattr(exc, "report", None), "run_cached": False}


def main() -> int:
    from .runtime.capture import quiet_onnxruntime

    quiet_onnxruntime()
    job = json.loads(sys.stdin.read())
    with raising_on_sigterm():  # the fleet's per-model limit stops a worker with SIGTERM: clean up first
        result = run_job(job)
    Path(job["result"]).write_text(json.dumps(result, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
