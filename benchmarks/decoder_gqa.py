"""A decoder with a KV cache, fused (GroupQueryAttention + RotaryEmbedding) vs unfused: fused layers,
greedy tokens, prefill and decode latency.

    .venv/bin/python benchmarks/decoder_gqa.py [--model M.onnx] [--data VAL_DIR] [--rounds 20] \
        [--tokens 16] [--prompt-length 64] [--threads 2] --out benchmarks/results/decoder_gqa_NAME

Models (all made here with the CLI, verified numerically on --data, which is prefill of 128 tokens):
  raw     the export as is;
  nogqa   `onnxforge optimize -O3 --disable fuse-gqa-rotary` (every other cleanup and fusion);
  fused   `onnxforge optimize -O3` (the CPU profile, fuse-gqa-rotary included).
Counts: GroupQueryAttention / RotaryEmbedding / Softmax nodes and the attention layers of the export
(its Softmax count). The same graph serves prefill and decode, so a layer fused is fused in both.
Generation: ``onnxforge.bench.generate`` (what `onnxforge bench --generate` runs): each round every model,
in shuffled order, prefills the prompt (the first val files' tokens) and greedily decodes --tokens tokens,
feeding presents back; batch 1 and batch 2 (row 1 shorter, so left padded). Tokens must be identical to
raw's. Ratios: per-round prefill latency and median decode-step latency, geometric mean with a 95%
t-interval, for each pair (fused/raw, fused/nogqa, nogqa/raw).
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import onnx

from onnxforge.bench.generate import GenerateConfig, markdown_table, run_generate_bench
from onnxforge.bench.variants import make_variants
from onnxforge.bench.stats import ratio_ci
from onnxforge.runtime.env import environment

CORPUS = Path.home() / ".cache/onnxforge/corpus"
ROOT = Path(__file__).resolve().parents[1]


def optimize(model: Path, out: Path, data: str, extra: list[str]) -> list[str]:
    command = [str(Path(sys.executable).parent / "onnxforge"), "optimize", str(model), "-o", str(out), "-O3",
               "--data", data, "--report", str(out.with_suffix(".report.json"))] + extra
    if not out.exists():
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return command


def op_counts(path: Path) -> dict:
    proto = onnx.load(str(path), load_external_data=False)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    return {op: ops[op] for op in ("GroupQueryAttention", "RotaryEmbedding", "MultiHeadAttention", "Softmax")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(CORPUS / "smollm2_135m_kv.onnx"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/smollm2_135m_kv/val"))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/onnxforge_decoder_gqa", help="where the optimized models go")
    ap.add_argument("--out", required=True, help="result prefix: writes OUT.md and OUT.json")
    args = ap.parse_args()

    model = Path(args.model)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = {"raw": model, "nogqa": work / f"{model.stem}.nogqa.onnx", "fused": work / f"{model.stem}.fused.onnx"}
    commands = {"nogqa": optimize(model, paths["nogqa"], args.data, ["--disable", "fuse-gqa-rotary"]),
                "fused": optimize(model, paths["fused"], args.data, [])}
    counts = {name: op_counts(path) for name, path in paths.items()}
    layers = counts["raw"]["Softmax"]

    runs = {}
    for batch in (1, 2):
        config = GenerateConfig(tokens=args.tokens, prompt_length=args.prompt_length, batch=batch,
                                rounds=args.rounds, threads=args.threads, data=args.data)
        result = run_generate_bench(make_variants([paths["raw"], paths["nogqa"], paths["fused"]]), config)
        by_name = dict(zip(paths, result.models))
        pairs = {}
        for a, b in (("fused", "raw"), ("fused", "nogqa"), ("nogqa", "raw")):
            pairs[f"{a}/{b}"] = {
                "prefill": ratio_ci(by_name[b].prefill_ms, by_name[a].prefill_ms),
                "decode": ratio_ci(by_name[b].step_ms, by_name[a].step_ms)}
        runs[batch] = (result, pairs)

    env = environment()
    lines = [f"# {model.stem}: GroupQueryAttention + RotaryEmbedding with the KV cache vs unfused", "",
             f"Made {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC with "
             f"`.venv/bin/python benchmarks/decoder_gqa.py --model {args.model} --rounds {args.rounds} "
             f"--tokens {args.tokens} --prompt-length {args.prompt_length} --threads {args.threads} "
             f"--out {args.out}`", "",
             "Models: " + "; ".join(f"{k}: `{' '.join(c[1:])}`" for k, c in commands.items()), "",
             f"CPU: {env.get('cpu', {})}; onnxruntime {env.get('versions', {}).get('onnxruntime', '?')}", "",
             "| model | GroupQueryAttention | RotaryEmbedding | Softmax left | attention layers fused |",
             "|---|---:|---:|---:|---|"]
    for name, c in counts.items():
        lines.append(f"| {name} | {c['GroupQueryAttention']} | {c['RotaryEmbedding']} | {c['Softmax']} | "
                     f"{c['GroupQueryAttention']}/{layers} |")
    for batch, (result, pairs) in runs.items():
        lines += ["", f"## batch {batch}", "", markdown_table(result).rstrip("\n"), "",
                  "| pair | prefill ratio [95% CI] | verdict | decode ratio [95% CI] | verdict |", "|---|---|---|---|---|"]
        for pair, r in pairs.items():
            lines.append(f"| {pair} | {r['prefill']} | {r['prefill'].verdict} | {r['decode']} | "
                         f"{r['decode'].verdict} |")
        tokens = {m.label: m.tokens for m in result.models}
        lines += ["", "Greedy tokens (raw): " + json.dumps(result.models[0].tokens),
                  "Identical to raw: " + ", ".join(f"{m.label} {'yes' if m.same_tokens else 'NO'}"
                                                    for m in result.models)]
        del tokens
    out = Path(args.out)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    payload = {"commands": commands, "counts": counts, "layers": layers, "environment": env,
               "runs": {str(b): {"result": r.to_dict(), "pairs": {k: {kk: vars(vv) | {"verdict": vv.verdict}
                                                                       for kk, vv in v.items()}
                                                                   for k, v in p.items()}}
                        for b, (r, p) in runs.items()}}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
