"""``make demo`` / ``onnxforge demo``: the main job on models the project builds itself."""
from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from .api import optimize
from .demo_models import small_cnn, small_encoder
from .io import load, save, write_file
from .report import render


def run_demo(out_dir: str | None = None, level: int = 3) -> int:
    folder = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="onnxforge-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    for name, build in (("small_cnn", small_cnn), ("small_encoder", small_encoder)):
        src = folder / f"{name}.onnx"
        dst = folder / f"{name}.opt.onnx"
        write_file(src, lambda tmp, build=build: onnx.save(build(), tmp))
        print(f"\n== {name}: onnxforge optimize {src} -o {dst} -O{level} --provider cpu")
        model, report = optimize(load(src), level=level, provider="cpu", verify="numeric")
        save(model, dst, check=report.check_written)
        report.before["file_bytes"] = src.stat().st_size
        report.after["file_bytes"] = dst.stat().st_size
        render(report)
    print(f"\nmodels in {folder}")
    return 0
