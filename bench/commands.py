"""CLI subcommand ``onnxforge bench``.

``add_bench_parser(subparsers)`` registers it; ``func(args)`` runs the
benchmark, prints the table (rich on a terminal, plain text otherwise),
writes the requested files and returns the exit code.
"""
from __future__ import annotations

from onnxforge.cli import nonnegative_int, positive_int
from onnxforge.runtime.providers import PROVIDERS


def add_bench_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="latency, throughput and memory of models, interleaved, with ratios to the first",
        description="Benchmark one or more models in interleaved rounds. MODEL may be written "
                    "model.onnx@profile.json to run that model with its own profile.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model .onnx (the first is the baseline)")
    p.add_argument("--provider", default="cpu", choices=PROVIDERS, help="provider when a model has no profile")
    p.add_argument("--profile", help="profile JSON for every model; 'none' = defaults "
                                     "(default: each model's MODEL.profile.json if present)")
    p.add_argument("--input-shape", action="append", metavar="NAME:SHAPE",
                   help="pin a dynamic input, e.g. x:1x3x224x224 (a MIN-OPT-MAX range runs at OPT)")
    p.add_argument("--data", help="real inputs: folder of .npz feed dicts or .npy files (cycled)")
    p.add_argument("--rounds", type=positive_int, default=15, help="interleaved rounds (default 15)")
    p.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed runs per model after the first (default 3)")
    p.add_argument("--iterations", type=positive_int, help="runs per model per round (default: about 0.15 s worth)")
    p.add_argument("--threads", type=positive_int, help="intra-op threads for every model (default: the profile's)")
    p.add_argument("--recreate-every", type=positive_int, metavar="N",
                   help="fresh sessions every N rounds, so session-level effects average out (default: never)")
    p.add_argument("--seed", type=int, default=0, help="seed of synthetic inputs and round order")
    p.add_argument("--reference", help="original model: report max error and cosine per output against it")
    p.add_argument("--json", help="write the full result (samples, environment) as JSON")
    p.add_argument("--csv", help="write one summary row per model as CSV")
    p.add_argument("--markdown", help="write the summary table as Markdown")
    p.add_argument("--plot", help="write a PNG plot of the latency distributions and ratios")
    g = p.add_argument_group("generation (decoders with a KV cache)")
    g.add_argument("--generate", type=positive_int, metavar="N",
                   help="greedy-generate N tokens with the cache per round: time to first token, decode "
                        "tokens/s, peak memory, and whether each model's tokens equal the first's")
    g.add_argument("--prompt-length", type=positive_int, default=32,
                   help="prompt tokens (row b of a batch has fewer, so it is left padded; default 32)")
    g.add_argument("--batch", type=positive_int, default=1, help="prompts generated at once (default 1)")
    p.set_defaults(func=cmd_bench)


# Options of the per-run bench that mean nothing for a generation loop.
NOT_WITH_GENERATE = ("input_shape", "iterations", "recreate_every", "reference", "csv", "markdown", "plot")


def bench_from_args(args, progress=None):
    """Run the benchmark described by parsed ``args``; returns a BenchResult."""
    from onnxforge.bench.harness import BenchConfig, run_bench
    from onnxforge.runtime.shapes import opt_shapes

    ranges = checked_shape_ranges(args.input_shape)
    variants = variants_from_args(args)
    config = BenchConfig(rounds=args.rounds, warmup=args.warmup, iterations=args.iterations, threads=args.threads,
                         seed=args.seed, input_shapes=opt_shapes(ranges),
                         data=args.data, reference=args.reference, recreate_every=args.recreate_every)
    return run_bench(variants, config, progress=progress)


def variants_from_args(args) -> list:
    """The models of ``bench A B ...``, each with its own profile (``model.onnx:profile.json``)
    or the shared ``--profile``."""
    from onnxforge.bench.variants import load_profile_arg, make_variants, parse_model_spec

    shared_profile = load_profile_arg(args.profile)
    models, profiles = [], []
    for spec in args.models:
        model, own_profile = parse_model_spec(spec)
        models.append(model)
        profiles.append(load_profile_arg(own_profile) if own_profile else shared_profile)
    return make_variants(models, profiles, args.provider)


def checked_shape_ranges(specs: list[str] | None) -> dict:
    """``--input-shape`` ranges (NAME:SHAPE[-OPT-MAX]), each refused when absurdly large."""
    from onnxforge.inputs import check_feed_size
    from onnxforge.runtime.shapes import parse_shape_ranges

    ranges = parse_shape_ranges(specs)
    for name, rng in ranges.items():
        check_feed_size(name, rng.max)
    return ranges


def cmd_bench(args) -> int:
    if args.generate:
        return cmd_generate(args)
    from rich.console import Console

    from onnxforge.bench.outputs import render_table, write_csv, write_json, write_markdown
    from onnxforge.bench.plot import plot_result
    from onnxforge.io import check_output_paths, write_file

    from onnxforge.bench.harness import parse_model_spec
    from onnxforge.runtime.cpuclass import warn_for

    outputs = ((write_json, args.json), (write_csv, args.csv), (write_markdown, args.markdown),
               (plot_result, args.plot))
    check_output_paths(*(target for _, target in outputs))
    console = Console(stderr=True)
    warn_for([parse_model_spec(spec)[0] for spec in args.models], lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True))
    if console.is_terminal:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("bench"), BarColumn(), TextColumn("round {task.completed}/{task.total}"),
                      TimeRemainingColumn(), console=console, transient=True) as bar:
            task = bar.add_task("rounds", total=args.rounds)
            result = bench_from_args(args, progress=lambda: bar.advance(task))
    else:
        result = bench_from_args(args)
    render_table(result)
    for writer, target in outputs:
        if target:
            write_file(target, lambda tmp, writer=writer: writer(result, tmp))
            console.print(f"wrote {target}", highlight=False)
    return 0


def cmd_generate(args) -> int:
    """``bench --generate N``: the greedy decode loop of bench/generate.py."""
    import json

    from rich.console import Console

    from onnxforge.bench.generate import GenerateConfig, render, run_generate_bench
    from onnxforge.errors import OptionError
    from onnxforge.io import check_output_paths, write_file

    given = [f"--{name.replace('_', '-')}" for name in NOT_WITH_GENERATE if getattr(args, name, None)]
    if given:
        raise OptionError(f"bench --generate does not take {', '.join(given)}")
    check_output_paths(args.json)
    config = GenerateConfig(tokens=args.generate, prompt_length=args.prompt_length, batch=args.batch,
                            rounds=args.rounds, threads=args.threads, seed=args.seed, data=args.data)
    result = run_generate_bench(variants_from_args(args), config)
    render(result)
    if args.json:
        write_file(args.json, lambda tmp: tmp.write_text(json.dumps(result.to_dict(), indent=1, default=str)))
        Console(stderr=True).print(f"wrote {args.json}", highlight=False)
    return 0
