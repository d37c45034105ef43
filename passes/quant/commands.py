"""``onnxforge quantize`` and ``onnxforge convert-fp16`` subcommands.

Each ``func(args)`` returns an exit code: 0 done, 2 bad input (raised as an
onnxforge InputError and mapped by the CLI), 3 accuracy budget missed (the
best model found is still written, the report says what was missed, and
whether a time limit stopped the search before its evaluations were spent).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from onnxforge.errors import VerificationError

BUDGET_MISSED = 3


def add_quantize_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("quantize", help="INT8 quantization with calibration and an accuracy budget")
    p.add_argument("model", help="input .onnx (float)")
    p.add_argument("-o", "--output", required=True, help="output .onnx")
    p.add_argument("--calib", required=True, help="folder of .npz/.npy feeds, or 'random' (accuracy then means nothing)")
    add_input_shape_argument(p)
    p.add_argument("--provider", default="cpu", choices=("cpu", "cuda", "tensorrt"))
    p.add_argument("--method", default="auto", choices=("auto", "minmax", "entropy", "percentile", "mse"),
                   help="activation ranges; auto (default): minmax and percentile from one histogram pass, the better scored kept")
    p.add_argument("--mode", default="auto", choices=("auto", "static", "dynamic"),
                   help="static QDQ, dynamic MatMul (CPU transformers), or auto (default)")
    p.add_argument("--max-drop", type=float, default=0.01, help="allowed drop of the metric vs float (default 0.01)")
    p.add_argument("--max-input-error", type=float, default=0.06, metavar="E",
                   help="dynamic INT8 (and --bits auto's INT8 candidate): keep float each MatMul/Gemm whose input "
                        "loses more than E (median per-token relative L2) to per-tensor u8 quantization on the first calibration "
                        "feeds, i.e. has outlier channels (default 0.06; 1 keeps none float for it); the report "
                        "lists them with the reason")
    p.add_argument("--metric", default="cosine", choices=("cosine", "sqnr", "top1"))
    p.add_argument("--val", help="validation feeds (default: the calibration feeds)")
    p.add_argument("--max-evaluations", type=int, default=None, metavar="N",
                   help="models the format and float-fallback search may build and score (default: all it can "
                        "need: 2 per range option + 1 + 8 layers re-corrected + 8 sensitivities + 16 fallback groups, 41 with "
                        "--method auto); decides the result")
    p.add_argument("--budget-seconds", type=float, default=None, metavar="S",
                   help="optional time limit that stops the search early (reported; the result is then not "
                        "reproducible); default none")
    p.add_argument("--equalize", default="cle", choices=("cle", "smooth", "none"),
                   help="static formats: data-free cross-layer equalization (default), activation smoothing, or none")
    p.add_argument("--rounding", default="nearest", choices=("nearest", "learned"),
                   help="static formats: weights rounded to nearest (default), or learned per layer against the "
                        "float layer's output on calibration data (AdaRound-style, biases refit, each layer on the inputs the "
                        "quantized model gives it; slower; PP-OCRv4 det/rec at 0 float nodes: cosine 0.985/0.988 vs "
                        "0.981/0.970 with nearest: benchmarks/results/learned_rounding.md)")
    slower = p.add_mutually_exclusive_group()  # both at once: one would silently lose
    slower.add_argument("--keep-float-if-slower", action="store_true",
                   help="return the float model when the INT8 one measures slower (a timing then decides the "
                        "bytes: not reproducible)")
    slower.add_argument("--keep-int8-if-slower", action="store_true",
                   help="return the INT8 model even when it measures slower (the default; kept for scripts)")
    p.add_argument("--trt-cache", help="also write a TensorRT calibration cache here")
    p.add_argument("--no-latency", action="store_true", help="skip the interleaved latency comparison")
    p.add_argument("--report", help="write the report as JSON")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="split calibration feeds (and the sensitivity measurements) across N local processes; "
                        "the result is the same as with one")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="the same on Ray: the cluster at ADDRESS (auto: the one `ray start` made), or a private "
                        "local one (docs/fleets.md); latency is still measured here")
    int4 = p.add_argument_group("INT4 weight-only (--bits 4): MatMul -> MatMulNBits")
    int4.add_argument("--bits", type=_bits, default=8, choices=(8, 4, "auto"),
                      help="8: INT8 (default, the options above); 4: INT4 weights, float activations; auto: "
                           "fp32, INT8 dynamic and INT4 judged on --val and timed interleaved, the fastest "
                           "within the accuracy budget kept (near ties: the smaller)")
    int4.add_argument("--weight-method", default="gptq", choices=("rtn", "gptq", "awq", "awq+gptq"),
                      help="rtn: round to nearest (data-free); gptq (default): GPTQ with per-block clip search; "
                           "awq: activation-aware input scaling; awq+gptq: both")
    int4.add_argument("--block-size", type=int, default=128, choices=(16, 32, 64, 128, 256))
    int4.add_argument("--asymmetric", action="store_true", help="uint4 zero points per block (default symmetric)")
    int4.add_argument("--lm-head", default="int4", choices=("int4", "float"),
                      help="the MatMul making a graph output (and a tied embedding): INT4 (default) or kept float")
    int4.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                      help="GPTQ visits input channels by decreasing energy, grids fixed beforehand (default on: "
                           "SmolLM2 val perplexity 45.9 against 47.6 without)")
    int4.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                      help="rotate a decoder's residual stream by a seeded orthogonal (Hadamard-based) matrix "
                           "before quantizing, the RMSNorm weights folded into their readers: exact in float, "
                           "it spreads outlier channels across the INT4 blocks (QuaRot); models without an "
                           "embedding feeding RMSNorms are left as they are, the report says why (default: on for gptq, off "
                           "for the other methods; SmolLM2 val perplexity GPTQ 45.8 -> 43.2 rotated, RTN 58.9 -> 157.9)")
    int4.add_argument("--refine-passes", type=int, default=0,
                      help="after GPTQ, passes of coordinate descent on the codes, each followed by a refit of "
                           "the block scales (default 0: on SmolLM2 3 passes lowered the layer errors 9%% on the "
                           "calibration text but not the val perplexity, 45.8 -> 46.0)")
    int4.add_argument("--stages", type=int, default=1,
                      help="GPTQ/AWQ calibration in N stages of MatMul inputs in graph order, each on the model "
                           "whose earlier stages are already quantized (default 1: every input from the float "
                           "model, the float weights held once; N stages cost up to N passes over the data and "
                           "hold the float and the quantized weights at once; SmolLM2, whole model, 30 stages "
                           "(one per decoder layer): val perplexity 44.78 against 45.82 one-shot, fp32 35.88)")
    int4.add_argument("--stage-target", default="quantized", choices=("quantized", "float"),
                      help="with --stages: solve each weight for its own outputs on the quantized inputs "
                           "(default) or for the float model's outputs (over-fits on SmolLM2: 37.97)")
    int4.add_argument("--accuracy-level", type=int, default=0, choices=(0, 1, 2, 3, 4),
                      help="MatMulNBits accuracy_level (4: int8 activations inside the kernel)")
    int4.add_argument("--max-ppl-increase", type=float, default=0.10,
                      help="budget for models with `logits` and `input_ids`: relative perplexity increase "
                           "(default 0.10); other models use --max-drop on the output cosine")
    int4.add_argument("--budget-metric", default="auto", choices=("auto", "cosine"),
                      help="--bits 4/auto: auto (default) judges perplexity where the model has logits and "
                           "input_ids, else the output cosine (--max-drop); cosine: always the cosine (random weights)")
    int4.add_argument("--auto-rounds", type=int, default=8, metavar="N",
                      help="--bits auto: interleaved timing rounds (default 8)")
    int4.add_argument("--auto-margin", type=float, default=0.10, metavar="F",
                      help="--bits auto: a larger candidate replaces a smaller one only when its whole 95%% "
                           "interval is faster by more than F (default 0.10)")
    int4.add_argument("--calib-limit", type=int, default=None, metavar="N", help="use the first N calibration feeds")
    p.set_defaults(func=run_quantize)
    return p


def _bits(value: str):
    return value if value == "auto" else int(value)


def add_fp16_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert-fp16", help="float16 conversion keeping overflowing nodes in float32")
    p.add_argument("model", help="input .onnx (float32)")
    p.add_argument("-o", "--output", required=True, help="output .onnx")
    p.add_argument("--calib", help="feeds whose activation ranges decide which nodes overflow fp16 "
                                   "('random' allowed, with a warning)")
    p.add_argument("--fp16-io", action="store_true", help="also convert graph inputs/outputs to float16")
    add_input_shape_argument(p)
    p.add_argument("--max-drop", type=float, default=0.01)
    p.add_argument("--metric", default="cosine", choices=("cosine", "sqnr", "top1"))
    p.add_argument("--val", help="validation feeds (default: the calibration feeds)")
    p.add_argument("--report", help="write the report as JSON")
    p.set_defaults(func=run_fp16)
    return p


def add_input_shape_argument(p) -> None:
    p.add_argument("--input-shape", action="append", metavar="NAME:DIMS",
                   help="pin a dynamic input, e.g. x:1x3x224x224: the output keeps it pinned; made-up (random) "
                        "inputs and every check use it")


def _pinned_shapes(args) -> dict:
    from onnxforge.errors import OptionError
    from onnxforge.inputs import parse_shape_specs

    shapes = parse_shape_specs(args.input_shape)
    if shapes and getattr(args, "bits", None) == "auto":  # its fp32 candidate is the input file as it is
        raise OptionError("--input-shape cannot be combined with --bits auto",
                          hint="pin the shapes first: onnxforge optimize IN -o PINNED --input-shape ..., "
                               "then quantize PINNED")
    return shapes


def _prepare(args, *extra_outputs):
    """Load the model (a protected input) with the shapes the user pinned, refuse outputs that
    would replace an input, and check the data against the model's inputs, all before any work."""
    from onnxforge.inputs import check_data
    from onnxforge.io import check_output_paths, load_input
    from onnxforge.model_prep import apply_input_shapes

    shapes = _pinned_shapes(args)
    check_output_paths(args.output, args.report, *extra_outputs)
    model = load_input(args.model)
    apply_input_shapes(model, shapes)  # so calibration, made-up inputs and every check run at those sizes
    check_output_paths(args.output, Path(args.output).with_name(Path(args.output).name + ".data"), args.report,
                       *extra_outputs)
    for option, path in (("--calib", args.calib), ("--val", args.val)):
        if path and path != "random":
            check_data(model, path, option)
    return model


def _progress_log():
    """Progress lines on a terminal; elsewhere they go to the debug log, so an
    error is the first thing a script or CI log shows."""
    if sys.stderr.isatty():
        return lambda msg: print(msg, file=sys.stderr)
    return logging.getLogger("onnxforge.quant").info


def _write_outputs(args, result, report, verify: bool = True, tolerance: tuple[float, float] = (1e-5, 1e-6),
                   arrays: bool = False) -> None:
    """``verify``: check the written file runs equal to ``result`` (off where ``result`` was itself read back
    from a written candidate that ran: --bits auto), within ``tolerance`` (rtol, atol). ``arrays``: the
    result's weights become arrays held once (``share_weights``) before the check; only where they are raw
    bytes already (fp16), as an array is written as raw bytes (a tensor of float_data would be written in
    another encoding)."""
    import gc

    from onnxforge.io import save, write_file
    from onnxforge.shared_weights import share_weights
    from onnxforge.verify import written_equals

    from .ortsession import return_freed_memory

    # The graphs a command built over its float baseline hold reference cycles: collected
    # now, the baseline is freed before the written file is checked (Llama 570M fp16: 2.2 GB).
    # Weights as arrays: the proto they were built in is freed, and the check's sessions are
    # fed them without loading a copy (fp16: 1.1 GB).
    gc.collect()
    if arrays:
        share_weights(result)
    return_freed_memory()
    pinned = _pinned_shapes(args)
    check = written_equals(result, tolerance, pinned=pinned, provider=getattr(args, "provider", "cpu")) if verify \
        else None
    save(result, args.output, check=check)
    print(report.summary())
    if args.report:
        write_file(args.report, report.save)


def run_quantize(args) -> int:
    from .quantize import quantize

    if args.bits == 4:
        return run_int4(args)
    if args.bits == "auto":
        return run_auto(args)
    from onnxforge.workers import make_workers

    model = _prepare(args, args.trt_cache)
    with make_workers(args.jobs, args.ray) as workers:
        result, report = quantize(
            model, args.calib, provider=args.provider, method=args.method, max_drop=args.max_drop,
            metric=args.metric, val=args.val, budget_seconds=args.budget_seconds, mode=args.mode,
            measure_latency=not args.no_latency, tensorrt_cache=args.trt_cache, max_evaluations=args.max_evaluations,
            equalize=args.equalize, rounding=args.rounding, keep_float_if_slower=args.keep_float_if_slower and not args.keep_int8_if_slower,
            log=_progress_log(), workers=workers if workers.count > 1 else None, max_input_error=args.max_input_error,
        )
    _write_outputs(args, result, report)
    stopped = report.search if report.budget_timed_out else None
    return _budget_exit(report.budget_met, report.score, args.max_drop, stopped)


def _int4_hint(args) -> str:
    """What to try after a missed INT4 budget: only what this run did not already use."""
    tries = [f"--weight-method {m}" for m in ("gptq", "awq+gptq") if m != args.weight_method]
    if args.block_size > 32:
        tries.append(f"--block-size {args.block_size // 2}")
    if args.lm_head == "int4":
        tries.append("--lm-head float")
    if args.weight_method in ("gptq", "awq+gptq") and args.stages == 1:
        tries.append("--stages N (sequential calibration)")
    return "try " + ", ".join(tries) if tries else "keep more of the model float, or use 8 bits (--bits 8)"


def run_int4(args) -> int:
    from .int4 import quantize_int4
    from .rotate_residual import RotateResidual

    model = _prepare(args)
    result, report = quantize_int4(
        model, args.calib, method=args.weight_method, block_size=args.block_size, symmetric=not args.asymmetric,
        lm_head=args.lm_head == "int4", act_order=args.act_order, rotate=args.rotate, refine=args.refine_passes, stages=args.stages, stage_target=args.stage_target, accuracy_level=args.accuracy_level, val=args.val,
        max_ppl_increase=args.max_ppl_increase, max_drop=args.max_drop, calib_limit=args.calib_limit,
        budget_metric=args.budget_metric, log=_progress_log(),
    )
    # a rotated model keeps a float d x d MatMul before the head: onnxruntime adds in another order for a
    # weight fed at run time (the in-memory check) than for a prepacked one (the file), SmolLM2 1.1e-5 apart
    _write_outputs(args, result, report, tolerance=RotateResidual.tolerance if report.rotated else (1e-5, 1e-6))
    if report.budget_met is False:
        m = report.metrics
        what = (f"perplexity +{100 * report.score:.1f}% > +{100 * args.max_ppl_increase:.0f}%" if report.budget_metric == "perplexity"
                else f"cosine {report.score:.5f} < {1 - args.max_drop:.5f}")
        error = VerificationError(f"accuracy budget missed: {what}; the INT4 model was written",
                                  hint=_int4_hint(args))
        print(f"error: {error.message}\nhint: {error.hint}", file=sys.stderr)
        return error.exit_code
    return 0


def run_auto(args) -> int:
    from .auto_bits import quantize_auto

    model = _prepare(args)
    result, report = quantize_auto(
        args.model, model, args.calib, val=args.val, max_ppl_increase=args.max_ppl_increase, max_drop=args.max_drop,
        int4_options=dict(method=args.weight_method, block_size=args.block_size, symmetric=not args.asymmetric,
                          lm_head=args.lm_head == "int4", act_order=args.act_order, rotate=args.rotate, refine=args.refine_passes, stages=args.stages, stage_target=args.stage_target, calib_limit=args.calib_limit),
        rounds=args.auto_rounds, margin=args.auto_margin, perplexity=args.budget_metric != "cosine",
        log=_progress_log(), max_input_error=args.max_input_error,
    )
    _write_outputs(args, result, report, verify=False)
    return 0


def run_fp16(args) -> int:
    from .fp16 import convert_fp16

    model = _prepare(args)
    result, report = convert_fp16(
        model, calib=args.calib, keep_io_types=not args.fp16_io, max_drop=args.max_drop,
        metric=args.metric, val=args.val, log=_progress_log(),
    )
    del model  # the float weights it read are not needed to check the written file (Llama 570M: 2.2 GB)
    _write_outputs(args, result, report, arrays=True)
    return _budget_exit(report.budget_met, report.score, args.max_drop)


def _budget_exit(met: bool | None, score: float | None, max_drop: float, stopped: str | None = None) -> int:
    """``stopped``: how the time limit ended the search early, when it did."""
    if met is False:
        message = f"accuracy budget missed: score {score:.5f} < {1 - max_drop:.5f}; the best model found was written"
        hint = "allow a larger --max-drop, or try --method percentile/entropy"
        if stopped:
            message += f"; {stopped}"
            hint = "raise or drop --budget-seconds, " + hint
        error = VerificationError(message, hint=hint)
        print(f"error: {error.message}\nhint: {error.hint}", file=sys.stderr)
        return error.exit_code
    return 0
