"""CNN speed check of the fusion passes: raw vs cleanup-only vs cleanup + fusions.

    .venv/bin/python -m onnxforge.bench.fusion_cnn [--rounds 10] [model ...]

Each model is optimized with the -O1 cleanup pipeline, then with the -O3 CPU
pipeline (cleanup, neutral fusions, CPU profile fusions; attention passes find
nothing in a CNN), saved to a temporary folder and timed against the raw model
with ``bench.harness.compare_latency`` (2 threads, onnxruntime's default
ORT_ENABLE_ALL, interleaved rounds, geometric-mean ratio with a 95% t-interval).
"""
from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path

from onnxforge.bench.harness import compare_latency
from onnxforge.context import PassContext
from onnxforge.io import load, save
from onnxforge.passes.registry import level_pipeline, resolve

CORPUS = Path.home() / ".cache" / "onnxforge" / "corpus"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "models"
MODELS = [CORPUS / f"{n}.onnx" for n in ("mobilenet_v2_hf", "efficientnet_b0_hf", "resnet50_hf", "convnext_tiny_hf")] + [
    SHARED / f"{n}.onnx" for n in ("ppocrv4_det", "ppocrv4_rec", "ppocr_mobile_v2_cls")]
INPUT_SHAPES = {"ppocrv4_det": {"x": (1, 3, 640, 640)}, "ppocrv4_rec": {"x": (1, 3, 48, 320)},
                "ppocr_mobile_v2_cls": {"x": (1, 3, 48, 192)}}


def optimize(path: Path, level: int, out: Path) -> collections.Counter:
    """Run the level's pipeline to a fixpoint (at most 4 sweeps); return the fusion counts."""
    model = load(path)
    ctx = PassContext(model=model, provider="cpu")
    counts: collections.Counter = collections.Counter()
    for _ in range(4):
        changed = False
        for name in level_pipeline(level, "cpu"):
            result = resolve(name).run(model.graph, ctx)
            changed |= result.changed
            if name.startswith(("fuse", "fold-matmul")):
                counts.update(result.stats)
        if not changed:
            break
    save(model, out)
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path, default=MODELS)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    print("| model | fusions | cleanup / raw | fused / raw |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.models:
            if not path.exists():
                print(f"| {path.stem} | (missing) | | |")
                continue
            cleaned, fused = Path(tmp) / f"{path.stem}_O1.onnx", Path(tmp) / f"{path.stem}_O3.onnx"
            optimize(path, 1, cleaned)
            counts = optimize(path, 3, fused)
            res = compare_latency([str(path), str(cleaned), str(fused)], threads=2, rounds=args.rounds,
                                  input_shapes=INPUT_SHAPES.get(path.stem))
            fusions = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            print(f"| {path.stem} | {fusions} | {res.models[1].ratio} | {res.models[2].ratio} |", flush=True)


if __name__ == "__main__":
    main()
