"""CLI subcommands ``onnxforge env`` and ``onnxforge tune``.

Each ``add_*_parser(subparsers)`` registers a subparser whose ``func(args)``
runs the command and returns the exit code; errors are raised as
``OnnxForgeError`` for the main CLI to print as one line plus a hint.
"""
from __future__ import annotations

import json

from onnxforge.runtime.providers import PROVIDERS


def add_env_parser(subparsers) -> None:
    p = subparsers.add_parser("env", help="providers that really work here, CPU, ISA features, versions, GPU")
    p.add_argument("--json", action="store_true", help="print the environment as JSON")
    p.set_defaults(func=cmd_env)


def cmd_env(args) -> int:
    from onnxforge.runtime.env import environment, render_environment

    env = environment()
    if args.json:
        print(json.dumps(env, indent=2))
    else:
        render_environment(env)
    return 0


def add_tune_parser(subparsers) -> None:
    p = subparsers.add_parser("tune", help="search session/provider options for the fastest deployment profile")
    p.add_argument("model", help="model .onnx")
    p.add_argument("--provider", default="cpu", choices=PROVIDERS)
    p.add_argument("--budget", default="60s", help="time budget, e.g. 60s, 2m (default 60s)")
    p.add_argument("-o", "--output", help="profile to write (default: MODEL.profile.json beside the model)")
    p.add_argument("--input-shape", action="append", metavar="NAME:SHAPE[-OPT-MAX]",
                   help="pin or range a dynamic input, e.g. ids:1x128 or ids:1x16-8x128-16x512")
    p.add_argument("--data", help="real inputs: folder of .npz feed dicts or .npy files")
    p.add_argument("--seed", type=int, default=0, help="seed of synthetic inputs and round order")
    p.add_argument("--allow-lossy", action="store_true", help="also try FP16 (TensorRT) and TF32 (CUDA)")
    p.add_argument("--cache-dir", help="TensorRT engine/timing cache folder (default: MODEL.trt_cache/)")
    p.add_argument("--json", action="store_true", help="print the tuning report as JSON")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    from rich.console import Console

    from onnxforge.bench.commands import checked_shape_ranges
    from onnxforge.runtime.tune import parse_budget, tune
    from onnxforge.runtime.tune_report import render_tune

    budget = parse_budget(args.budget)
    ranges = checked_shape_ranges(args.input_shape)
    console = Console(stderr=True)
    status = console.status("tuning") if console.is_terminal else None
    if status:
        status.start()
    try:
        result = tune(args.model, args.provider, budget, output=args.output, shape_ranges=ranges, data=args.data,
                      seed=args.seed, allow_lossy=args.allow_lossy, cache_dir=args.cache_dir,
                      on_progress=(lambda msg: status.update(f"tuning {msg}")) if status else None)
    finally:
        if status:
            status.stop()
    if args.json:
        print(json.dumps({"profile": str(result.path), **result.report()}, indent=2))
    else:
        render_tune(result)
    return 0


