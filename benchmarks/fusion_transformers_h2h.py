"""Head to head: onnxforge -O3 (CPU profile) against each peer, interleaved in one run.

    .venv/bin/python benchmarks/fusion_transformers_h2h.py --peer-python /tmp/simvenv/bin/python \
        --rounds 20 --out benchmarks/results/fusion_transformers_h2h.md [model ...]

For each model: the onnxforge model first, then onnxruntime's transformers optimizer and onnxsim outputs
(made in the peer virtualenv, as in fusion_transformers.py), timed with the bench harness (2 threads,
ORT_ENABLE_ALL, shuffled interleaved rounds). The ratio is peer / onnxforge with a 95% interval: above 1
means onnxforge is faster; an interval containing 1 is "same".
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from onnxforge.bench.harness import compare_latency

sys.path.insert(0, str(Path(__file__).resolve().parent))  # siblings: benchmarks/ is a folder of scripts, not a package

import fusion_transformers as ft  # noqa: E402

PEERS = ("ort-transformers", "onnxsim")


def head_to_head(spec, folder: Path, python: str, rounds: int) -> dict:
    forge = folder / f"{spec.name}.onnxforge.onnx"
    ft.optimize_onnxforge(spec.path, forge)
    made = {"ort-transformers": folder / f"{spec.name}.ortt.onnx", "onnxsim": folder / f"{spec.name}.sim.onnx"}
    why = {"ort-transformers": ft.optimize_ort_transformers(python, spec, made["ort-transformers"]),
           "onnxsim": ft.optimize_onnxsim(python, spec.path, made["onnxsim"])}
    ran = [p for p in PEERS if not why[p]]
    result = compare_latency([str(forge)] + [str(made[p]) for p in ran], ft.timing_feeds(spec), threads=2,
                             rounds=rounds)
    row = {"model": spec.name, "onnxforge_p50_ms": result.models[0].stats["p50"]}
    for i, peer in enumerate(ran, start=1):
        row[peer] = str(result.models[i].ratio)
    for peer in PEERS:
        row.setdefault(peer, f"not run: {why[peer]}")
    return row


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# Transformers: peer / onnxforge latency, head to head", "", f"Command: `{command}`", "",
             "Ratio > 1: onnxforge is faster; 95% interval over interleaved rounds, 2 threads.", "",
             "| model | onnxforge p50 ms | ort-transformers / onnxforge | onnxsim / onnxforge |",
             "|---|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['onnxforge_p50_ms']:.2f} | {r['ort-transformers']} | {r['onnxsim']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--peer-python", required=True)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    specs = [s for s in ft.SPECS if s.path.exists() and (not args.models or s.name in args.models)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxforge-h2h-") as tmp:
        for spec in specs:
            rows.append(head_to_head(spec, Path(tmp), args.peer_python, args.rounds))
            print(rows[-1], flush=True)
    text = markdown(rows, "python benchmarks/fusion_transformers_h2h.py " + " ".join(sys.argv[1:]))
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
