"""``onnxforge run RECIPE IN -o OUT``: run a recipe file on a model;
``onnxforge run RECIPE MODEL_OR_DIR... -o OUTDIR [--jobs N] [--ray [ADDRESS]]``:
on a fleet of models (fleet.py).

Exit codes (as every onnxforge command): 0 done; 2 bad input or recipe (unknown
step or key, wrong type, missing data, unreadable model); 3 verification failed
or an accuracy budget was not met; 1 internal error. With ``--report`` the JSON
report is written in every case, failures included, so CI can read why.
"""
from __future__ import annotations

import sys
from pathlib import Path


def add_run_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="run a recipe (TOML): optimize, quantize, tune, check and bench as one reproducible pipeline",
        description="Run the steps of RECIPE on the model IN and write OUT. docs/recipes.md describes the format.",
    )
    p.add_argument("recipe", help="recipe file (.toml)")
    p.add_argument("input", nargs="+", help="model .onnx; several models or folders of them run as a fleet")
    p.add_argument("-o", "--output", required=True,
                   help="where to write the resulting model (a fleet: the folder for its outputs and fleet report)")
    p.add_argument("--jobs", type=_positive, help="fleet: models run at a time on this machine (default 1)")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="fleet: run the models as Ray tasks, on the cluster at ADDRESS (auto: the one `ray start` "
                        "made here) or, without one, on a private local Ray; needs `pip install onnxforge[ray]`")
    p.add_argument("--model-timeout", type=_positive_float, metavar="SECONDS",
                   help="fleet: kill a model's worker process after this long and report the model as failed "
                        "(default: the recipe's model_timeout, else 10800)")
    p.add_argument("--report", help="write the JSON report here (also when the run fails)")
    p.add_argument("--cache-dir", help="cache folder of expensive steps (default: ~/.cache/onnxforge/steps)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached step results")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=cmd_run)


def _positive(text: str) -> int:
    from .cli import positive_int

    return positive_int(text)


def _positive_float(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def cmd_run(args) -> int:
    fleet = len(args.input) > 1 or args.jobs is not None or args.ray is not None or Path(args.input[0]).is_dir()
    if not fleet:
        if args.model_timeout is not None:
            from .errors import OptionError

            raise OptionError("--model-timeout: only for fleets (several models, a folder, --jobs or --ray)")
        args.input = args.input[0]
        return _run_one(args)
    if args.ray is None:
        from .fleet import discover, fleet_recipe

        ray = fleet_recipe(args.recipe, discover(args.input)).settings.get("ray")
    else:
        ray = args.ray
    return _run_fleet(args, ray if ray is not None else False)


def _run_fleet(args, ray) -> int:
    from .errors import OptionError
    from .fleet import run_fleet
    from .workers import make_workers

    if args.report:
        raise OptionError("--report: a fleet writes its reports into the output folder (fleet.json, fleet.csv, "
                          "fleet.md and one NAME.report.json per model)")
    if ray is False and args.jobs is None:
        args.jobs = 1
    with make_workers(args.jobs, ray if ray is not False else None, threads=True) as workers:  # each model: its own process
        with _fleet_progress(args.quiet, args.input) as on_done:
            result = run_fleet(args.recipe, args.input, args.output, workers, cache_dir=args.cache_dir,
                               use_cache=not args.no_cache, progress=on_done, model_timeout=args.model_timeout)
    if not args.quiet:
        s = result.report["summary"]
        for row in result.report["models"]:
            if row["status"] != "ok":
                print(f"error: {row['name']}: {row['error']}", file=sys.stderr)
        print(f"{s['ok']} of {s['models']} model(s) ok, {s['failed']} failed ({s['from_run_cache']} from the run cache) "
              f"in {result.report['seconds']:.1f} s; reports: {result.paths['md']}")
    return result.exit_code


def _fleet_progress(quiet: bool, inputs):
    """A rich progress bar advanced as models finish (nothing with --quiet)."""
    import contextlib

    if quiet:
        return contextlib.nullcontext(None)

    @contextlib.contextmanager
    def bar():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from .fleet import discover

        total = len(discover(inputs))
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=Console(stderr=True)) as progress:
            task = progress.add_task("fleet", total=total)

            def on_done(row):
                mark = "ok" if row["status"] == "ok" else "FAILED"
                progress.console.print(f"{row['name']}: {mark}" + (f" ({row['error']})" if row["error"] else ""))
                progress.update(task, advance=1, description=f"fleet (last: {row['name']})")

            yield on_done

    return bar()


def _run_one(args) -> int:
    from .io import check_output_paths
    from .pipeline import Pipeline, REPORT_SCHEMA, REPORT_SCHEMA_VERSION
    from .report import write_json

    from onnxforge.runtime.cpuclass import warn_for

    report_path = Path(args.report) if args.report else None
    progress = None if args.quiet else _progress()
    if Path(args.input).is_file():
        warn_for([args.input], lambda line: print(line, file=sys.stderr))
    try:
        check_output_paths(args.output, report_path)  # the recipe and the input are protected by the CLI
        pipeline = Pipeline.from_file(args.recipe)
        result = pipeline.run(args.input, args.output, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                              progress=progress, also_writes=[report_path] if report_path else [])
    except BaseException as exc:
        if report_path is not None and not isinstance(exc, KeyboardInterrupt):
            report = getattr(exc, "report", None) or _refused_report(exc, args, REPORT_SCHEMA, REPORT_SCHEMA_VERSION)
            _write_quietly(write_json, report, report_path)
        raise
    if report_path is not None:
        write_json(result.report, report_path)
    if not args.quiet:
        _print_summary(result)
    return 0


def _progress():
    """Step lines on a terminal; elsewhere the debug log (an error is then the first line a script sees)."""
    import logging

    if sys.stderr.isatty():
        return lambda message: print(message, file=sys.stderr)
    return logging.getLogger("onnxforge.pipeline").info


def _refused_report(exc: BaseException, args, schema: str, version: int) -> dict:
    """The report of a run refused before it started (an invalid recipe)."""
    from .errors import OnnxForgeError

    error = ({"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}
             if isinstance(exc, OnnxForgeError) else {"type": type(exc).__name__, "message": str(exc), "hint": None})
    return {
        "schema": schema, "schema_version": version, "status": "failed",
        "exit_code": exc.exit_code if isinstance(exc, OnnxForgeError) else 1, "error": error,
        "recipe": {"path": args.recipe}, "input": {"path": args.input}, "output": None, "steps": [],
    }


def _write_quietly(write_json, report: dict, path: Path) -> None:
    from .errors import OnnxForgeError

    try:
        write_json(report, path)
    except (OSError, OnnxForgeError) as exc:  # the run's own error is what matters
        import logging

        logging.getLogger("onnxforge.pipeline").info("cannot write the report %s: %s", path, exc)


def _print_summary(result) -> None:
    report = result.report
    for step in report["steps"]:
        changes = step["changes"]
        nodes = changes["nodes"]
        line = f"{step['index']:>2}. {step['name']:<12} {step['seconds']:8.2f} s  nodes {nodes['before']} -> {nodes['after']}"
        if step.get("cached"):
            line += "  (cached)"
        if step.get("latency") and step["latency"].get("ratio"):
            r = step["latency"]["ratio"]
            line += f"  latency x{r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}] {r['verdict']}"
        if step.get("accuracy"):
            acc = step["accuracy"]
            if acc.get("outputs"):
                line += f"  min cosine {min(o['cosine'] for o in acc['outputs']):.6f}"
            elif acc.get("score") is not None:
                line += f"  {acc['metric']} {acc['score']:.5f}"
        print(line)
    for code in report["recipe"].get("user_code") or ():
        print(f"user code: {code['pass']} from {code.get('file') or code.get('module')}"
              + (f" (sha256 {code['sha256'][:16]}...)" if code.get("sha256") else ""))
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    out = report["output"]
    print(f"wrote {out['path']} (sha256 {out['sha256'][:16]}...)" + (f" and {out['profile']}" if out.get("profile") else ""))
