"""Transformer speed and accuracy of the fusions: raw vs onnxsim vs onnxruntime's
transformers optimizer vs onnxforge -O3 (CPU profile).

    .venv/bin/python benchmarks/fusion_transformers.py [--rounds 10] [--peer-python PY] [model ...]

* onnxforge: the whole -O3 CPU pipeline available in the registry (cleanup, neutral
  fusions, the CPU profile's fusions: LayerNorm/GELU/SkipLayerNorm and attention),
  run to a fixpoint; attention counts are the attention rules' rewrite counts.
* ort-transformers: ``onnxruntime.transformers.optimizer.optimize_model`` with the
  model's model_type, true num_heads and hidden_size, ``opt_level=0`` (its Python
  fusions only; opt_level >= 1 needs torch), CPU.
* onnxsim: ``onnxsim.simplify``.
Both peers run in ``--peer-python``, a separate virtualenv (e.g. /tmp/peers with
onnxsim, sympy and onnxruntime of the same version); the project's venv is left
alone. A peer that fails is reported with its error and left out of the timing.

Timing: ``onnxforge.bench.harness.compare_latency`` (2 intra-op threads, ORT_ENABLE_ALL,
interleaved rounds, ratio to raw as geometric mean with a 95% t-interval); and,
because wall time on a shared 2-core machine is dominated by other processes,
single-thread CPU time per run (ORT_ENABLE_ALL, interleaved, median), which
measures the work each graph costs.
Accuracy: each optimized model against the raw one on onnxruntime CPU with graph
optimizations off, on feeds with a left-padded and a holey attention mask;
max_rel = max|diff| / max|reference| over all outputs and feeds.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as dt
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from onnxforge.bench.harness import compare_latency
from onnxforge.context import PassContext
from onnxforge.inputs import load_feeds, seeded_feeds
from onnxforge.io import load, save
from onnxforge.passes.registry import level_pipeline, resolve

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path.home() / ".cache" / "onnxforge" / "corpus"
SHARED = ROOT.parent / "shared"
ATTENTION_RULES = ("bert-attention", "causal-attention", "sdpa-attention", "gqa-rotary-attention")
TEXT = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    path: Path
    model_type: str | None  # onnxruntime transformers optimizer model_type; None = not supported
    heads: int
    hidden: int
    layers: int
    shapes: dict  # timing input shapes
    data: Path | None = None  # realistic feeds (.npz folder)


def _text(seq: int = 128) -> dict:
    return {n: (1, seq) for n in TEXT}


SPECS = (
    Spec("bert_base", CORPUS / "bert_base.onnx", "bert", 12, 768, 12, _text()),
    Spec("distilbert_base", CORPUS / "distilbert_base.onnx", "bert", 12, 768, 6, _text()),
    Spec("distilbert_base_dynamo", CORPUS / "distilbert_base_dynamo.onnx", "bert", 12, 768, 6, _text()),
    Spec("gpt2_small", CORPUS / "gpt2_small.onnx", "gpt2", 12, 768, 12, _text()),
    Spec("vit_base16", CORPUS / "vit_base16.onnx", "vit", 12, 768, 12, {"pixel_values": (1, 3, 224, 224)}),
    Spec("whisper_tiny_encoder", CORPUS / "whisper_tiny_encoder.onnx", "bert", 6, 384, 4,
         {"input_features": (1, 80, 3000)}),
    Spec("minilm_l6_w8", SHARED / "models" / "minilm_l6_w8.onnx", "bert", 12, 384, 6, _text(),
         SHARED / "data" / "minilm_l6_w8" / "val"),
    Spec("minilm_l6_real", CORPUS / "minilm_l6_real.onnx", "bert", 12, 384, 6, _text(),
         SHARED / "data" / "minilm_l6_real" / "val"),
    Spec("llama_570m", CORPUS / "llama_570m_seq128_extdata.onnx", None, 12, 1536, 18, _text()),
)


# ------------------------------------------------------------------ the variants

def optimize_onnxforge(path: Path, out: Path) -> collections.Counter:
    """The -O3 CPU pipeline to a fixpoint (at most 4 sweeps); returns the rewrite counts."""
    model = load(path)
    ctx = PassContext(model=model, provider="cpu")
    counts: collections.Counter = collections.Counter()
    for _ in range(4):
        changed = False
        for name in level_pipeline(3, "cpu"):
            result = resolve(name).run(model.graph, ctx)
            changed |= result.changed
            if name.startswith(("fuse", "fold-matmul")):
                counts.update(result.stats)
        if not changed:
            break
    save(model, out)
    return counts


ORT_TRANSFORMERS_SCRIPT = """
import sys
from onnxruntime.transformers.optimizer import optimize_model
path, out, model_type, heads, hidden, external = sys.argv[1:7]
optimized = optimize_model(path, model_type=model_type, num_heads=int(heads), hidden_size=int(hidden),
                           opt_level=0, use_gpu=False)
optimized.save_model_to_file(out, use_external_data_format=external == "1")
"""


def optimize_ort_transformers(python: str | None, spec: Spec, out: Path) -> str:
    if spec.model_type is None:
        return "no model_type for this architecture"
    external = "1" if any(spec.path.parent.glob(spec.path.name + ".data")) else "0"
    return _peer(python, ORT_TRANSFORMERS_SCRIPT, [str(spec.path), str(out), spec.model_type, str(spec.heads),
                                                   str(spec.hidden), external], out)


def _peer(python: str | None, script: str, args: list[str], out: Path) -> str:
    """Run a peer optimizer in its own interpreter; '' on success, else why not."""
    if not python:
        return "not run (no --peer-python)"
    proc = subprocess.run([python, "-c", script] + args, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0 or not out.exists():
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return (lines[-1] if lines else f"exit {proc.returncode}")[:160]
    return ""


ONNXSIM_SCRIPT = """
import sys, onnx, onnxsim
model = onnx.load(sys.argv[1])
simplified, ok = onnxsim.simplify(model)
if not ok:
    sys.exit("onnxsim check failed")
onnx.save(simplified, sys.argv[2])
"""


def optimize_onnxsim(python: str | None, path: Path, out: Path) -> str:
    return _peer(python, ONNXSIM_SCRIPT, [str(path), str(out)], out)


# ------------------------------------------------------------------ measuring

def timing_feeds(spec: Spec) -> list[dict]:
    if spec.data is not None and spec.data.is_dir():
        return load_feeds(spec.data, limit=4)
    return [seeded_feeds(load(spec.path), spec.shapes)]


def accuracy_feeds(spec: Spec) -> list[dict]:
    """Batch 2 with a left-padded row and a holey row where the model takes a mask."""
    shapes = {k: ((2, 32) if k in TEXT else v) for k, v in spec.shapes.items()}
    feed = seeded_feeds(load(spec.path), shapes, seed=3)
    if "attention_mask" not in feed:
        return [feed]
    left, holey = feed["attention_mask"].copy(), feed["attention_mask"].copy()
    left[0, :5] = 0
    holey[1, 7:11] = 0
    return [{**feed, "attention_mask": left}, {**feed, "attention_mask": holey}]


def run_all(path: Path, feeds: list[dict]) -> list[list[np.ndarray]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return [sess.run(None, {n: f[n] for n in names if n in f}) for f in feeds]


def cpu_time_ratios(paths: list[Path], feeds: list[dict], rounds: int, seed: int = 0) -> list[float]:
    """Single-thread CPU time per run (``time.process_time``), interleaved in shuffled order;
    median per model, as a ratio to the first. Work, not wall time: robust to other
    processes on a shared machine (one thread, so no spin-waiting is counted)."""
    import random

    import onnxruntime as ort

    sessions = []
    for path in paths:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        options.log_severity_level = 3
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        feed = {n: feeds[0][n] for n in names if n in feeds[0]}
        sess.run(None, feed)  # warm up
        sessions.append((sess, feed))
    rng = random.Random(seed)
    times: list[list[float]] = [[] for _ in paths]
    for _ in range(rounds):
        order = list(range(len(paths)))
        rng.shuffle(order)
        for i in order:
            sess, feed = sessions[i]
            start = time.process_time()
            sess.run(None, feed)
            times[i].append(time.process_time() - start)
    medians = [float(np.median(t)) for t in times]
    return [m / medians[0] for m in medians]


def max_rel(reference, candidate) -> float:
    worst = 0.0
    for ref_outs, cand_outs in zip(reference, candidate):
        for r, c in zip(ref_outs, cand_outs):
            scale = float(np.abs(r).max()) or 1.0
            worst = max(worst, float(np.abs(r.astype(np.float64) - c).max()) / scale)
    return worst


def bench_model(spec: Spec, tmp: Path, rounds: int, peer_python: str | None) -> dict:
    row = {"model": spec.name, "layers": spec.layers, "notes": []}
    variants = {"raw": spec.path}
    sim = tmp / f"{spec.name}_onnxsim.onnx"
    why = optimize_onnxsim(peer_python, spec.path, sim)
    if why:
        row["notes"].append(f"onnxsim: {why}")
    else:
        variants["onnxsim"] = sim
    ortt = tmp / f"{spec.name}_ortt.onnx"
    why = optimize_ort_transformers(peer_python, spec, ortt)
    if why:
        row["notes"].append(f"ort-transformers: {why}")
    else:
        variants["ort-transformers"] = ortt
    forge = tmp / f"{spec.name}_onnxforge.onnx"
    started = time.perf_counter()
    counts = optimize_onnxforge(spec.path, forge)
    row["optimize_s"] = time.perf_counter() - started
    variants["onnxforge"] = forge
    row["attention"] = sum(counts[r] for r in ATTENTION_RULES)
    row["fusions"] = dict(counts)

    acc_feeds = accuracy_feeds(spec)
    reference = run_all(spec.path, acc_feeds)
    row["max_rel"] = {label: max_rel(reference, run_all(path, acc_feeds))
                      for label, path in variants.items() if label != "raw"}
    result = compare_latency([str(p) for p in variants.values()], timing_feeds(spec), threads=2, rounds=rounds)
    row["raw_ms"] = result.models[0].stats["p50"]
    row["ratio"] = {label: result.models[i].ratio for i, label in enumerate(variants) if i}
    cpu = cpu_time_ratios(list(variants.values()), timing_feeds(spec), max(rounds, 8))
    row["cpu"] = {label: cpu[i] for i, label in enumerate(variants) if i}
    return row


# ------------------------------------------------------------------ MHA or packed Attention?

def pack_qkv(source: Path, out: Path) -> int:
    """The pack-qkv pass (passes/fusion/pack_qkv.py): each MultiHeadAttention over Q/K/V projections
    of one input becomes com.microsoft Attention with concatenated weights (the other candidate form).
    Returns how many it packed."""
    model = load(source)
    result = resolve("pack-qkv").run(model.graph, PassContext(model=model, provider="cpu"))
    save(model, out)
    return result.stats.get("pack-qkv-attention", 0)


def packing_check(spec: Spec, tmp: Path, rounds: int) -> str:
    """CPU-time ratio of the packed-Attention form to the MultiHeadAttention form (attention fused only)."""
    model = load(spec.path)
    ctx = PassContext(model=model, provider="cpu")
    for name in ("fuse-attention", "fuse-causal-attention", "fuse-sdpa"):
        resolve(name).run(model.graph, ctx)
    mha, packed = tmp / f"{spec.name}_mha.onnx", tmp / f"{spec.name}_packed.onnx"
    save(model, mha)
    count = pack_qkv(mha, packed)
    ratios = cpu_time_ratios([spec.path, mha, packed], timing_feeds(spec), rounds)
    return (f"| {spec.name} | {count} | {ratios[1]:.3f} | {ratios[2]:.3f} |")


# ------------------------------------------------------------------ report

def fmt_ratio(r) -> str:
    return "—" if r is None else f"{r.ratio:.3f} [{r.low:.3f}, {r.high:.3f}]"


def table(rows: list[dict]) -> str:
    lines = ["| model | attention fused / layers | raw p50 ms (2 thr) | onnxsim / raw | ort-transformers / raw "
             "| onnxforge / raw | CPU-time 1 thr: onnxsim, ort-transformers, onnxforge / raw "
             "| max_rel onnxforge | max_rel ort-transformers | max_rel onnxsim |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio, rel, cpu = row["ratio"], row["max_rel"], row["cpu"]
        cpu_text = ", ".join(f"{cpu[k]:.3f}" if k in cpu else "—" for k in ("onnxsim", "ort-transformers", "onnxforge"))
        lines.append(
            f"| {row['model']} | {row['attention']} / {row['layers']} | {row['raw_ms']:.1f} "
            f"| {fmt_ratio(ratio.get('onnxsim'))} | {fmt_ratio(ratio.get('ort-transformers'))} "
            f"| {fmt_ratio(ratio.get('onnxforge'))} | {cpu_text} | {_rel(rel, 'onnxforge')} "
            f"| {_rel(rel, 'ort-transformers')} | {_rel(rel, 'onnxsim')} |")
    notes = [f"- {row['model']}: {n}" for row in rows for n in row["notes"]]
    fusions = [f"- {row['model']}: {row['fusions']} (optimize {row['optimize_s']:.1f} s)" for row in rows]
    return "\n".join(lines + ["", "Peers that did not run:"] + (notes or ["- none"])
                     + ["", "onnxforge rewrites per rule:"] + fusions)


def _rel(rel: dict, label: str) -> str:
    return f"{rel[label]:.2e}" if label in rel else "—"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="names from the spec list (default: all present)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--peer-python", help="python of a separate virtualenv with onnxsim, sympy and the "
                        "same onnxruntime (the peers run there; the project's venv stays as it is)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--packing-check", action="store_true",
                        help="only compare MultiHeadAttention with packed-QKV Attention (CPU time)")
    args = parser.parse_args(argv)
    specs = [s for s in SPECS if (not args.models or s.name in args.models) and s.path.exists()]
    if args.packing_check:
        print("| model | layers packed | MHA / raw | packed Attention / raw |\n|---|---|---|---|")
        with tempfile.TemporaryDirectory(prefix="onnxforge-bench-") as tmp:
            for spec in specs:
                print(packing_check(spec, Path(tmp), max(args.rounds, 8)), flush=True)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxforge-bench-") as tmp:
        for spec in specs:
            print(f"... {spec.name}", file=sys.stderr, flush=True)
            rows.append(bench_model(spec, Path(tmp), args.rounds, args.peer_python))
            print(table(rows[-1:]).split("\n\n")[0], file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    if args.out:
        import onnxruntime

        header = (f"# Transformer fusions: speed and accuracy\n\n{dt.date.today()}, onnxruntime "
                  f"{onnxruntime.__version__}, CPU provider, 2 intra-op threads, ORT_ENABLE_ALL, {args.rounds} "
                  f"interleaved rounds; ratio < 1 is faster than raw (95% CI).\n\nCommand:\n\n    "
                  f"{' '.join(['.venv/bin/python benchmarks/fusion_transformers.py'] + (argv or sys.argv[1:]))}\n\n")
        args.out.write_text(header + text + "\n")


if __name__ == "__main__":
    main()
