"""``onnxforge prune IN -o OUT ...``: the command line of the pruning subpackage."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from onnxforge.cli import positive_int


def add_prune_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "prune", help="remove channels (smaller, faster model) and/or zero weights (sparsity)",
        description="Structured channel pruning with calibration-based refitting, unstructured and N:M sparsity.")
    parser.add_argument("model", help="input .onnx model")
    parser.add_argument("-o", "--output", required=True, help="output .onnx path")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--target-flops", type=float, help="keep this fraction of the FLOPs (and parameters), e.g. 0.7")
    amount.add_argument("--ratio", type=float, help="remove this fraction of the channels of every prunable group")
    parser.add_argument("--target-params", type=float, help="keep at most this fraction of parameters "
                        "(default: the --target-flops value)")
    parser.add_argument("--importance", choices=("l1", "l2", "activation"), default=None,
                        help="channel importance (default: activation with --calib, else l1)")
    parser.add_argument("--calib", help="folder of .npz feed dicts for importance, sensitivity and refitting")
    parser.add_argument("--eval", help="folder of .npz feed dicts to report output cosine on (default: --calib)")
    parser.add_argument("--calib-limit", type=positive_int, default=16, help="use at most this many calibration feeds")
    parser.add_argument("--no-reconstruct", action="store_true", help="do not refit consumers after pruning")
    parser.add_argument("--no-sensitivity", action="store_true", help="allocate without measuring sensitivity")
    parser.add_argument("--round-to", type=positive_int, default=16, help="kept channel counts are multiples of this "
                        "(16: the channel block of onnxruntime's AVX-512 NCHWc conv kernels)")
    parser.add_argument("--max-ratio", type=float, default=0.75, help="never remove more of one group than this")
    sparse = parser.add_mutually_exclusive_group()
    sparse.add_argument("--sparsity", type=float, help="zero this fraction of each layer's smallest weights")
    sparse.add_argument("--pattern", help="N:M semi-structured sparsity, e.g. 2:4 (TensorRT sparse tensor cores)")
    parser.add_argument("--input-shape", action="append", metavar="NAME:DxD", help="pin a dynamic input shape")
    parser.add_argument("--report", help="write the pruning report as JSON here")
    parser.set_defaults(func=run_prune)
    return parser


def run_prune(args: argparse.Namespace) -> int:
    from onnxforge.errors import OptionError
    from onnxforge.inputs import check_data, parse_shape_specs
    from onnxforge.io import check_output_paths, load_input, save, write_text
    from onnxforge.verify import written_equals

    from .prune import prune

    if args.target_flops is None and args.ratio is None and args.sparsity is None and args.pattern is None:
        raise OptionError("nothing to do", hint="give --target-flops, --ratio, --sparsity or --pattern")
    method = args.importance or ("activation" if args.calib else "l1")
    shapes = parse_shape_specs(args.input_shape) or None
    check_output_paths(args.output, args.report)
    model = load_input(args.model)
    check_output_paths(args.output, Path(args.output).with_name(Path(args.output).name + ".data"), args.report)
    for option, path in (("--calib", args.calib), ("--eval", args.eval)):
        if path:
            check_data(model, path, option)
    result, report = prune(
        model, target_flops=args.target_flops, ratio=args.ratio, method=method, calib_data=args.calib,
        reconstruct_weights=not args.no_reconstruct, sparsity_level=args.sparsity, pattern=args.pattern,
        target_params=args.target_params, round_to=args.round_to, max_ratio=args.max_ratio,
        sensitivity=False if args.no_sensitivity else None, calib_limit=args.calib_limit,
        eval_data=args.eval, input_shapes=shapes)
    save(result, args.output, check=written_equals(result, pinned=shapes))
    if args.report:
        write_text(args.report, json.dumps(report.to_dict(), indent=2, default=str))
    print(summary(report))
    return 0


def summary(report) -> str:
    lines = [f"FLOPs {report.flops_before / 1e9:.3f} G -> {report.flops_after / 1e9:.3f} G "
             f"({report.flops_ratio:.3f}x), parameters {report.params_before:,} -> {report.params_after:,} "
             f"({report.params_ratio:.3f}x)"]
    rec = report.reconstruction
    if "cosine_plain" in rec:
        line = f"output cosine to the unpruned model: {rec['cosine_plain']:.5f} plain"
        if "cosine_refit" in rec:
            line += f", {rec['cosine_refit']:.5f} refitted"
        lines.append(line + f" ({rec['eval_samples']} feeds)")
    if report.sparsity:
        lines.append(f"weights zero: {report.sparsity['weight_zero_fraction']:.3f}; {report.sparsity['note']}")
    if report.refusals:
        lines.append(f"{len(report.refusals)} channel groups kept whole or in part (see --report for reasons)")
    lines.extend(f"warning: {w}" for w in report.warnings)
    return "\n".join(lines)
