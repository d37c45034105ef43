"""The ``onnxforge`` command line.

Every error the user can fix prints one line (what, where) and a hint, and
exits with 2; failed verification exits with 3; internal errors exit with 1.
No traceback unless ``--debug``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import InputError, OnnxForgeError

# Subcommands that live beside their feature: (module, function adding the parser).
PLUGIN_COMMANDS = (
    ("onnxforge.runtime.commands", "add_env_parser"),
    ("onnxforge.bench.commands", "add_bench_parser"),
    ("onnxforge.runtime.commands", "add_tune_parser"),
    ("onnxforge.passes.quant.commands", "add_quantize_parser"),
    ("onnxforge.passes.quant.commands", "add_fp16_parser"),
    ("onnxforge.passes.prune.commands", "add_prune_parser"),
    ("onnxforge.pipeline_commands", "add_run_parser"),
)


class _Parser(argparse.ArgumentParser):
    """argparse, but bad usage is a one-line error with exit code 2 like everything else."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"error: {message}\nhint: run `{self.prog} --help`\n")


def main(argv: list[str] | None = None) -> int:
    from .runtime.capture import quiet_onnxruntime

    # onnxruntime's C++ logger writes coloured lines to stderr; failures reach the user as one ``error:`` line
    quiet_onnxruntime()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (exit 2, one line) and --help/--version (0)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(message)s")
    _quiet_graphsurgeon(args.debug)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .termination import raising_on_sigterm

    with raising_on_sigterm():  # `timeout` and schedulers stop a run with SIGTERM: it cleans up as for Ctrl-C
        return _run(args)


def _run(args) -> int:
    from .io import guarding_inputs
    from .termination import EXIT_CODE as TERMINATED_EXIT, Terminated

    try:
        with guarding_inputs():
            _protect_inputs(args)
            return int(args.func(args) or 0)
    except OnnxForgeError as exc:
        if args.debug:
            raise
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # a reader that stopped early (`| head`) is not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Terminated:
        print("error: terminated (SIGTERM)", file=sys.stderr)
        return TERMINATED_EXIT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug of ours: one line, traceback with --debug
        if args.debug:
            raise
        print(f"error: internal error: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        print("hint: rerun with --debug for the traceback and report it", file=sys.stderr)
        return 1


# Arguments naming files a command reads: no output of the run may replace them.
READ_ARGUMENTS = {
    "input": "the input model", "model": "the input model", "models": "a benchmarked model",
    "a": "a compared model", "b": "a compared model", "reference": "the --reference model",
    "profile": "the --profile file", "data": "a --data file", "calib": "a --calib file", "val": "a --val file",
    "eval": "an --eval file", "recipe": "the recipe", "original": "the original model", "changed": "the changed model",
}


def _protect_inputs(args) -> None:
    from .io import protect

    for attr, what in READ_ARGUMENTS.items():
        value = getattr(args, attr, None)
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, str) or item == "random":
                continue
            model, sep, profile = item.rpartition("@")  # bench's MODEL@PROFILE.json
            if attr == "models" and sep and model and profile.endswith(".json"):
                protect(model, what)
                protect(profile, "a model's profile")
            else:
                protect(item, what)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _bounded_int(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _bounded_int(text, 0, "an integer >= 0")


def _bounded_int(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def _quiet_graphsurgeon(debug: bool) -> None:
    """graphsurgeon prints its warnings on stdout (before `inspect --json`'s JSON, among
    the report): the CLI says what matters itself."""
    from onnx_graphsurgeon.logger import G_LOGGER

    if not debug:
        G_LOGGER.severity = G_LOGGER.CRITICAL


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxforge", description="Optimize, verify and benchmark ONNX models.")
    parser.add_argument("--version", action="version", version=f"onnxforge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    from .model_commands import add_compare, add_debug, add_inspect, add_reduce

    _add_optimize(sub)
    add_inspect(sub)
    add_compare(sub)
    add_debug(sub)
    add_reduce(sub)
    _add_passes(sub)
    _add_demo(sub)
    for module_name, func_name in PLUGIN_COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # that feature is not part of this build
            raise
        getattr(module, func_name)(sub)
    # Global flags are accepted after the subcommand too.
    for choice in sub.choices.values():
        if not any("--debug" in a.option_strings for a in choice._actions):
            choice.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


# ------------------------------------------------------------------ optimize


def _add_optimize(sub) -> None:
    p = sub.add_parser("optimize", help="optimize a model with a pass pipeline, verified")
    p.add_argument("input", help="model .onnx")
    p.add_argument("-o", "--output", required=True, help="where to write the optimized model")
    p.add_argument("-O", dest="level", type=int, default=2, choices=[0, 1, 2, 3],
                   help="0 nothing, 1 cleanup, 2 + exact fusions (default), 3 + provider fusions")
    p.add_argument("--provider", default="cpu", help="target execution provider: cpu, cuda, tensorrt")
    p.add_argument("--passes", help="comma-separated pass names (or module:Class) instead of the level's pipeline")
    p.add_argument("--disable", default="", help="comma-separated pass names to skip")
    p.add_argument("--input-shape", action="append", metavar="NAME:DIMS", help="pin a dynamic input, e.g. x:1x3x224x224")
    p.add_argument("--pin-input", action="append", metavar="NAME[=V,...]",
                   help="make an input a constant: its default initializer, or the values given; branches on "
                        "it fold (an input's default is otherwise never assumed)")
    p.add_argument("--verify-shape", action="append", metavar="NAME:DIMS",
                   help="input size for verification only (the saved model keeps its dynamic dims)")
    p.add_argument("--verify", default="numeric", choices=["none", "structural", "numeric"])
    p.add_argument("--data", help="inputs for numeric verification: folder of .npz feed dicts or .npy files")
    p.add_argument("--strict", action="store_true", help="stop when verification fails instead of rolling back")
    p.add_argument("--explain", action="store_true", help="list fusion candidates that did not fuse, and why")
    p.add_argument("--report", help="write the report as JSON here")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--external-data", action="store_true", help="write weights to OUTPUT.data")
    p.add_argument("--max-iterations", type=positive_int, default=10)
    p.add_argument("--debug-dir", help="where to save models around a failing pass")
    p.add_argument("--tune", action="store_true", help="tune session options for --provider and write OUTPUT's profile")
    p.add_argument("--tune-budget", default="60s", help="time for --tune (e.g. 30s, 2m)")
    p.set_defaults(func=cmd_optimize)


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _progress():
    """A spinner on a terminal, nothing otherwise (logs stay clean in CI)."""
    if not sys.stderr.isatty():
        return None, None
    from rich.console import Console

    status = Console(stderr=True).status("optimizing")
    status.start()
    return status, lambda msg: status.update(f"optimizing: {msg}")


def cmd_optimize(args) -> int:
    from .api import optimize
    from .inputs import checked_feeds, parse_pin_specs, parse_shape_specs
    from .io import check_output_paths, load_input, save
    from .report import render, write_json

    output = Path(args.output)
    shapes = parse_shape_specs(args.input_shape)
    pins = parse_pin_specs(args.pin_input)
    check_output_paths(output)
    model = load_input(args.input)
    check_output_paths(output, output.with_name(output.name + ".data") if args.external_data else None,
                       args.report, _profile_beside(output) if args.tune else None)
    feeds = checked_feeds(model, args.data, "--data", limit=8) if args.data else None
    status, progress = _progress()
    try:
        result, report = optimize(
            model, level=args.level, passes=_split(args.passes) or None, disable=_split(args.disable),
            provider=args.provider, input_shapes=shapes, verify_shapes=parse_shape_specs(args.verify_shape),
            pinned_inputs=pins,
            verify=args.verify, strict=args.strict, feeds=feeds,
            max_iterations=args.max_iterations, debug_dir=args.debug_dir, progress=progress,
        )
    finally:
        if status:
            status.stop()
    save(result, output, external_data=True if args.external_data else None, check=report.check_written)
    report.output = str(output)
    from .cache import saved_model_bytes

    report.before["file_bytes"] = saved_model_bytes(args.input)
    report.after["file_bytes"] = saved_model_bytes(output)
    if args.tune:
        _tune_after_optimize(output, args)
    if args.report:
        write_json(report.as_dict(), args.report)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        render(report, explain=args.explain)
        print(f"wrote {output}")
    return 0


def _profile_beside(output: Path) -> Path:
    from onnxforge.runtime.profile import profile_path_for

    return profile_path_for(output)


def _tune_after_optimize(output: Path, args) -> None:
    """End the pipeline with tuning: writes OUTPUT's deployment profile beside it."""
    try:
        tune = importlib.import_module("onnxforge.runtime.tune")
    except ImportError:
        raise InputError("--tune needs onnxforge.runtime.tune, which this build lacks") from None
    from onnxforge.runtime.shapes import parse_shape_ranges

    result = tune.tune(output, provider=args.provider, budget_s=tune.parse_budget(args.tune_budget), data=args.data,
                       shape_ranges=parse_shape_ranges(args.input_shape))
    if not args.json:
        tune.render_tune(result)


# ------------------------------------------------------------------ passes, demo


def _add_passes(sub) -> None:
    p = sub.add_parser("passes", help="list the available passes and the -O levels")
    p.add_argument("--provider", default="cpu")
    p.set_defaults(func=cmd_passes)


def cmd_passes(args) -> int:
    from .passes.registry import all_passes, level_pipeline, rule_locations

    table = all_passes()
    for name in sorted(table):
        cls = table[name]
        doc = cls.description or (cls.__doc__ or "").strip().splitlines()[0:1]
        print(f"{name:36s} {doc if isinstance(doc, str) else ' '.join(doc)}")
        for rule, where in rule_locations(cls):  # where to read or change each rewrite
            print(f"    rule {rule:30s} {where}")
        for key, (kind, what) in cls.options.items():
            print(f"    option {key} ({kind.__name__}): {what}")
    for level in (1, 2, 3):
        print(f"-O{level} ({args.provider}): {', '.join(level_pipeline(level, args.provider))}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="build a small CNN and transformer encoder, optimize them, print the reports")
    p.add_argument("--out", default=None, help="folder for the demo models (default: a temporary folder)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.out)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
