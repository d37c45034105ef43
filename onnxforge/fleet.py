"""Fleets: one recipe over many models, on local processes or Ray tasks.

    onnxforge run RECIPE MODEL_OR_DIR... -o OUTDIR [--jobs N] [--ray [ADDRESS]]

Each model runs in a process of its own (``python -m onnxforge.fleet_worker``),
started by a driver thread (local, ``--jobs N`` at a time) or by a Ray task on
whichever node Ray picks: a model that is corrupt, fails its budget, raises or
kills its process is reported with its one-line error and the others go on
(the fleet then exits 2). The worker process runs the same ``Pipeline`` as
``onnxforge run RECIPE MODEL -o OUT``, so a model's output is byte-identical to
running it alone.

Where figures come from: accuracy (check, quantize and fp16 budgets) is
computed on the worker (it is deterministic); latency never is. The workers
run the recipe without its ``bench`` steps and with quantize's own latency
measurement off (neither changes the output); after every model is done the
driver, which runs on the target machine, measures each bench step there,
one model at a time on an otherwise idle fleet, and the report names the host
of every figure. A fleet refuses ``tune`` steps: their result is a timing.

Isolation: a model's worker process that dies (a segfault, the OOM killer)
or runs past the per-model limit (``model_timeout`` seconds, default
DEFAULT_MODEL_TIMEOUT; a hung onnxruntime session, a pass that never ends) is
killed and that model reported as failed; the fleet goes on.

Per-model data: ``{model}`` in the recipe text stands for each model's file
stem, so one recipe points every model at its own data
(``calibration = "data/{model}/calib"``); a model whose data is missing fails
alone, with its one-line error.

Reruns: a finished model's output and report are stored in the step cache as
a ``fleet-run`` entry keyed by the recipe text, the digests of its data and
pass files, the input model's files and the environment; a rerun restores
them (byte-identical) without running a step. A model that did not finish
resumes from the cached steps it had done (quantize, fp16, prune). The cache
folder must be one every worker sees (a shared file system on a cluster).

Outputs are written atomically (``onnxforge.io``): in place by local workers,
or, with Ray, shipped back through the object store and written by the driver,
so OUTDIR need only exist where the driver runs. The fleet report
(``fleet.json``, ``fleet.csv``, ``fleet.md`` in OUTDIR) is rewritten as each
model finishes and once more at the end; each model's pipeline report is
``OUTDIR/<name>.report.json`` (the rows and the three formats: fleet_report.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .errors import DataError, OptionError, first_line
from .fleet_report import REPORT_NAMES, empty_fleet_report, model_row, write_fleet_report
from .workers import Workers, host_name

DEFAULT_MODEL_TIMEOUT = 10800.0  # seconds: generous for one model on a small machine, but never unbounded


# ------------------------------------------------------------------ inputs


def discover(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The models: each file given, and the ``*.onnx`` files of each folder (sorted)."""
    models: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix == ".onnx" and p.is_file())
            if not found:
                raise DataError(f"{path}: the folder holds no .onnx models")
            models.extend(found)
        elif path.exists():
            models.append(path)
        else:
            raise DataError(f"{path}: no such model file or folder")
    if not models:
        raise DataError("no models given")
    return models


def model_names(models: Sequence[Path]) -> list[str]:
    """Output names from the file stems, made unique (``name``, ``name~2``...)."""
    seen: dict[str, int] = {}
    names = []
    for path in models:
        stem = path.name[:-5] if path.name.endswith(".onnx") else path.name
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}~{seen[stem]}")
    return names


MODEL_PLACEHOLDER = "{model}"


def recipe_for(path: str | os.PathLike, model: str | os.PathLike):
    """The recipe at ``path`` with ``{model}`` replaced by the model's file stem."""
    from .recipe import load_recipe, parse_recipe

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
    except (OSError, UnicodeDecodeError):
        text = ""
    if MODEL_PLACEHOLDER not in text:
        return load_recipe(path)  # its own messages for unreadable files
    stem = Path(model).name[:-5] if str(model).endswith(".onnx") else Path(model).name
    return parse_recipe(text.replace(MODEL_PLACEHOLDER, stem), source=str(path), base_dir=path.resolve().parent)


def fleet_recipe(path: str | os.PathLike, models: Sequence[Path]):
    """The recipe as the first model whose data exists sees it (for the checks the
    driver makes); when no model's data exists, that model's error."""
    first_error = None
    for model in models:
        try:
            return recipe_for(path, model)
        except DataError as exc:
            first_error = first_error or exc
    raise first_error


def check_fleet_recipe(recipe) -> None:
    """A fleet cannot defer a tune step (its result is a timing) nor a bench step
    that other model-changing steps follow (it would measure another model)."""
    kinds = [s.kind for s in recipe.steps]
    for step in recipe.steps:
        where = f"{recipe.source}:{step.line}" if step.line else recipe.source
        if step.kind == "tune":
            raise OptionError(f"{where}: steps[{step.index + 1}]: a fleet does not run tune steps (tuning is a "
                              "timing, and fleets time only on the target machine)",
                              hint="tune the fleet's outputs on the target machine: onnxforge tune MODEL")
        if step.kind == "bench" and any(k not in ("bench", "check") for k in kinds[step.index + 1:]):
            raise OptionError(f"{where}: steps[{step.index + 1}]: in a fleet, bench steps are measured on the target "
                              "machine after the other steps, so they must come last",
                              hint="move the bench step to the end of the recipe")


def deferred(recipe):
    """The recipe a worker runs: no bench steps, quantize's latency measurement off
    (neither changes the output; the driver measures latency on the target)."""
    from types import MappingProxyType

    steps = []
    for step in recipe.steps:
        if step.kind == "bench":
            continue
        if step.kind == "quantize" and step.params.get("measure_latency"):
            step = dataclasses.replace(step, params=MappingProxyType({**step.params, "measure_latency": False}))
        steps.append(step)
    return dataclasses.replace(recipe, steps=tuple(steps))


# ------------------------------------------------------------------ one model (on a worker)


def run_model(common: Mapping[str, Any], task: Mapping[str, Any]) -> dict:
    """Run one model in a child process; returns its result (never raises for the model's own failures).

    ``common``: recipe, cache_dir, use_cache, ship. With ``ship`` the output is
    written to a temporary folder and its files come back as bytes (Ray)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxforge-fleet-") as tmp:
        output = Path(tmp) / "out" / task["file"] if common["ship"] else Path(task["output"])
        output.parent.mkdir(parents=True, exist_ok=True)
        job = {**common, "model": task["model"], "output": str(output), "result": str(Path(tmp) / "result.json")}
        limit = common.get("model_timeout") or DEFAULT_MODEL_TIMEOUT
        proc = None
        try:
            proc = _run_worker(job, limit, Path(tmp) / "tmp")
            result = json.loads(Path(job["result"]).read_text(encoding="utf-8"))
        except subprocess.TimeoutExpired:
            result = {"exit_code": 1, "report": None, "run_cached": False,
                      "error": f"timed out after {limit:g} s (the fleet's per-model limit, model_timeout / "
                               "--model-timeout): its worker process was stopped"}
        except (OSError, json.JSONDecodeError) as exc:
            error = _died(proc) if proc is not None else f"cannot start the worker process: {first_line(exc)}"
            result = {"exit_code": 1, "error": error, "report": None, "run_cached": False}
        result.update(host=host_name(), seconds=round(time.perf_counter() - started, 3), files=None)
        if common["ship"] and result["exit_code"] == 0:
            from .cache import saved_model_files

            result["files"] = {f.name: f.read_bytes() for f in saved_model_files(output)}
    return result


def _run_worker(job: dict, limit: float, tmp: Path) -> subprocess.CompletedProcess:
    """The worker process on ``job``; past ``limit`` seconds (TimeoutExpired) or when this
    process is interrupted it is stopped with SIGTERM, so it removes its temporary files and
    half-written output, and killed after a grace period. Its temporary files go to ``tmp``,
    inside this model's temporary folder: what a killed worker leaves goes with that folder."""
    from .termination import stop_process

    tmp.mkdir(exist_ok=True)
    args = [sys.executable, "-m", "onnxforge.fleet_worker"]
    with subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**_child_env(), "TMPDIR": str(tmp)}) as proc:
        try:
            stdout, stderr = proc.communicate(json.dumps(job), timeout=limit)
        except BaseException:
            stop_process(proc)
            raise
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def _child_env() -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)  # a source checkout runs without being installed too
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), root) if p)
    return env


def _died(proc: subprocess.CompletedProcess) -> str:
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return f"the worker process died ({name})"
    lines = [line for line in (proc.stderr or "").splitlines() if line.strip()]
    return f"the worker process exited {proc.returncode}: {lines[-1] if lines else 'no message'}"


# ------------------------------------------------------------------ the driver


@dataclasses.dataclass
class FleetResult:
    report: dict[str, Any]
    exit_code: int
    paths: dict[str, Path]


def run_fleet(
    recipe_path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    outdir: str | os.PathLike,
    workers: Workers,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: Callable[[dict], None] | None = None,
    measure_latency: bool = True,
    model_timeout: float | None = None,
) -> FleetResult:
    """Run the recipe on every model; see the module docstring. ``progress`` gets each
    model's row as it finishes; ``model_timeout``: seconds per model (default: the
    recipe's ``model_timeout``, else DEFAULT_MODEL_TIMEOUT). Exit code 0 when every
    model succeeded, else 2."""
    from .cache import default_cache_dir

    started = time.perf_counter()
    models = discover(inputs)
    recipe = fleet_recipe(recipe_path, models)
    check_fleet_recipe(recipe)
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise OptionError(f"-o {outdir}: a fleet writes a folder, and this is a file")
    outdir.mkdir(parents=True, exist_ok=True)
    names = model_names(models)
    ship = workers.kind == "ray"
    common = {"recipe": str(Path(recipe_path).resolve()), "cache_dir": str(Path(cache_dir or default_cache_dir()).resolve()),
              "use_cache": use_cache, "ship": ship,
              "model_timeout": float(model_timeout or recipe.settings.get("model_timeout") or DEFAULT_MODEL_TIMEOUT)}
    tasks = [{"index": i, "name": n, "model": str(m.resolve()), "file": f"{n}.onnx", "output": str((outdir / f"{n}.onnx").resolve())}
             for i, (n, m) in enumerate(zip(names, models))]
    report = empty_fleet_report(recipe, workers, common, tasks)
    paths = {name.split(".")[1]: outdir / name for name in REPORT_NAMES}
    write_fleet_report(report, paths)
    for index, outcome in workers.run(run_model, tasks, common):
        task = tasks[index]
        result = outcome.value if outcome.ok else {"exit_code": 1, "error": outcome.error, "report": None,
                                                    "run_cached": False, "host": None, "seconds": None, "files": None}
        row = _finish_model(task, result, outdir)
        report["models"][index] = row
        write_fleet_report(report, paths)
        if progress:
            progress(row)
    if measure_latency:
        _measure_latency(recipe_path, tasks, report, outdir, paths)
    failed = [r for r in report["models"] if r["status"] != "ok"]
    report["status"] = "failed" if failed else "ok"
    report["exit_code"] = 2 if failed else 0
    report["summary"] = {"models": len(tasks), "ok": len(tasks) - len(failed), "failed": len(failed),
                         "from_run_cache": sum(1 for r in report["models"] if r["cached"] == "run")}
    report["seconds"] = round(time.perf_counter() - started, 3)
    write_fleet_report(report, paths)
    return FleetResult(report, report["exit_code"], paths)


def _finish_model(task: dict, result: dict, outdir: Path) -> dict:
    """Write what came back (shipped files, the model's report) and make its row."""
    from .io import write_file
    from .report import write_json

    error = result.get("error")
    if result.get("files"):
        try:  # the data file first: a model file never names a missing one
            for name in sorted(result["files"], key=lambda n: n == task["file"]):
                write_file(outdir / name, lambda tmp, b=result["files"][name]: tmp.write_bytes(b))
        except Exception as exc:  # noqa: BLE001 - this model fails, the fleet goes on
            result = {**result, "exit_code": 2}
            error = f"writing the output failed: {first_line(exc)}"
    if result.get("report") is not None:
        try:
            write_json(result["report"], outdir / f"{task['name']}.report.json")
        except Exception as exc:  # noqa: BLE001
            error = error or f"writing the report failed: {first_line(exc)}"
    return model_row(task, result, error)


def _measure_latency(recipe_path, tasks: list[dict], report: dict, outdir: Path, paths: dict) -> None:
    """Each bench step of the recipe, on this machine (the target), model after model."""
    for task, row in zip(tasks, report["models"]):
        if row["status"] != "ok":
            continue
        recipe = recipe_for(recipe_path, task["model"])
        benches = [s for s in recipe.steps if s.kind == "bench"]
        entries = []
        for step in benches:
            try:
                entries.append(_bench_one(recipe, step, task))
            except Exception as exc:  # noqa: BLE001 - a timing failure is reported, not fatal
                row["latency_error"] = first_line(exc)
                continue
        if entries:
            ratio = entries[-1]["ratio"] or {}
            row.update(latency_ratio=ratio.get("ratio"), latency_low=ratio.get("low"), latency_high=ratio.get("high"),
                       latency_measured_on=entries[-1]["measured_on"])
            _add_latency_to_model_report(outdir / f"{task['name']}.report.json", entries)
        write_fleet_report(report, paths)


def _bench_one(recipe, step, task: dict) -> dict:
    from .bench.harness import compare_latency
    from .inputs import checked_feeds
    from .io import load

    p = step.params
    feeds = None
    if p["data"]:
        feeds = checked_feeds(load(task["model"]), p["data"], "data", limit=8)
    result = compare_latency([task["model"], task["output"]], feeds, threads=p["threads"], rounds=p["rounds"],
                             warmup=p["warmup"], iterations=p["iterations"], provider=recipe.provider,
                             seed=recipe.settings["seed"], input_shapes=recipe.settings["input_shapes"])
    base, model = result.models
    return {
        "step": step.index + 1, "provider": recipe.provider, "rounds": p["rounds"], "threads": p["threads"],
        "input_ms": base.stats, "output_ms": model.stats,
        "ratio": None if model.ratio is None else {**dataclasses.asdict(model.ratio), "verdict": model.ratio.verdict},
        "measured_on": f"{host_name()} (the fleet's driver: the target machine)",
    }


def _add_latency_to_model_report(path: Path, entries: list[dict]) -> None:
    from .report import write_json

    try:
        rep = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return
    rep["latency"] = entries
    write_json(rep, path)
