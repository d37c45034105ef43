"""The commands that look at models: ``inspect``, ``compare``, ``debug`` and ``reduce``
(their parsers and what each runs); cli.py builds the command line from them.
"""
from __future__ import annotations

import argparse
import json

from .cli import positive_int
from .errors import InputError


# ------------------------------------------------------------------ inspect


def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="opsets, inputs/outputs, op histogram, parameters, size, FLOPs")
    p.add_argument("model")
    p.add_argument("--input-shape", action="append", metavar="NAME:DIMS")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    from .inputs import parse_shape_specs
    from .inspect_model import inspect_model, render_inspection

    info = inspect_model(args.model, parse_shape_specs(args.input_shape))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        render_inspection(info)
    return 0


# ------------------------------------------------------------------ compare


def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="numerical diff of two models on seeded or given inputs")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--data", help="folder of .npz feed dicts or .npy files")
    p.add_argument("--input-shape", action="append", metavar="NAME:DIMS")
    p.add_argument("--samples", type=int, default=4, help="seeded feeds (or files) to compare on")
    p.add_argument("--rtol", type=float, help="fail (exit 3) when an output's relative error exceeds this")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    import sys

    from onnxforge.runtime.cpuclass import warn_for

    from .compare import compare_models, render_comparison
    from .inputs import parse_shape_specs

    warn_for([args.a, args.b], lambda line: print(line, file=sys.stderr))
    result = compare_models(args.a, args.b, data=args.data, input_shapes=parse_shape_specs(args.input_shape),
                            samples=args.samples, rtol=args.rtol)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        render_comparison(result)
    return 3 if args.rtol is not None and not result["ok"] else 0


# ------------------------------------------------------------------ debug


def add_debug(sub) -> None:
    p = sub.add_parser("debug", help="layer-by-layer comparison: where two models' intermediate tensors diverge")
    p.add_argument("original", help="the reference model")
    p.add_argument("changed", help="the optimized/quantized model")
    p.add_argument("--data", help="folder of .npz feed dicts or .npy files (default: made-up inputs)")
    p.add_argument("--samples", type=positive_int, default=1, help="feeds (or files) to compare on (default 1)")
    p.add_argument("--threshold", type=float, default=1e-3,
                   help="a tensor jumps when max rel > X or cosine < 1 - X (default 1e-3)")
    p.add_argument("--chunk", type=positive_int, default=256, help=argparse.SUPPRESS)  # debug.CHUNK
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--plot", metavar="F.png", help="write max rel error by depth, one line per output, to F.png")
    p.add_argument("--no-contributions", action="store_true",
                   help="quantized models: skip ranking each quantized node's own contribution (one run per node)")
    p.set_defaults(func=cmd_debug)


def cmd_debug(args) -> int:
    from .debug import debug_files
    from .debug_render import json_safe, render_debug

    if not (args.threshold >= 0):
        raise InputError(f"--threshold must be >= 0, got {args.threshold}")
    if args.plot:
        from .io import check_output_paths

        check_output_paths(args.plot)
    result = debug_files(args.original, args.changed, data=args.data, samples=args.samples,
                         threshold=args.threshold, chunk=args.chunk, plot=args.plot,
                         contributions=not args.no_contributions)
    if args.json:
        print(json.dumps(json_safe(result), indent=2))
    else:
        render_debug(result)
    return 0


# ------------------------------------------------------------------ reduce


def add_reduce(sub) -> None:
    from .reduce import DEFAULT_ATOL, DEFAULT_MAX_STEPS, DEFAULT_RTOL, DEFAULT_TIMEOUT

    p = sub.add_parser("reduce", help="shrink a failing model to a small subgraph that still fails")
    p.add_argument("model", help="the failing model")
    p.add_argument("-o", "--output", required=True, help="the reduced .onnx (its feed goes beside it as .inputs.npz)")
    p.add_argument("--data", help="folder of .npz feed dicts or .npy files (first feed; default: made-up inputs)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--until", metavar="CMD",
                     help="shell command that exits non-zero while the bug reproduces; {model} and {data} are "
                          "replaced by the candidate and its feed")
    how.add_argument("--reference", metavar="ORIGINAL",
                     help="fails while an output differs from ORIGINAL's same-named tensor "
                          "(default: onnxruntime vs onnx's reference evaluator)")
    p.add_argument("--max-steps", type=positive_int, default=DEFAULT_MAX_STEPS,
                   help=f"candidates checked at most (default {DEFAULT_MAX_STEPS})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds per --until run; past it counts as not failing (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help=f"comparison tolerance (default {DEFAULT_RTOL:g})")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL, help=f"comparison tolerance (default {DEFAULT_ATOL:g})")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_reduce)


def cmd_reduce(args) -> int:
    from .reduce import reduce_file

    if not args.timeout > 0:
        raise InputError(f"--timeout must be > 0, got {args.timeout}")
    result = reduce_file(args.model, args.output, data=args.data, until=args.until, reference_path=args.reference,
                         max_steps=args.max_steps, timeout=args.timeout, rtol=args.rtol, atol=args.atol)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    ops = ", ".join(f"{n['name'] or '(unnamed)'} ({n['op']})" for n in result.nodes)
    print(f"reduced {result.original_nodes} nodes to {len(result.nodes)}: {ops}")
    print(f"still fails: {result.why}")
    print(f"{result.steps} of {result.max_steps} steps; wrote {result.output} and its inputs {result.feed} "
          f"({', '.join(result.inputs) or 'none'})")
    return 0
