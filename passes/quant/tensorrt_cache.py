"""TensorRT's calibration cache from activation ranges (and reading it back)."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Mapping

def symmetric_amax(low: float, high: float) -> float:
    return float(max(abs(low), abs(high)))


def write_tensorrt_cache(ranges: Mapping[str, tuple[float, float]], path: str | Path, header: str = "TRT-8601-EntropyCalibration2") -> Path:
    """TensorRT's calibration cache: one ``name: <float32 scale, big-endian hex>``
    line per tensor with scale = max(|min|, |max|) / 127, plus ``<path>.json``
    holding the dynamic ranges (amax) that onnxruntime's TensorRT EP reads."""
    path = Path(path)
    lines = [header]
    amax = {}
    for name in sorted(ranges):
        bound = symmetric_amax(*ranges[name])
        amax[name] = bound
        scale = bound / 127.0 if bound > 0 else 1.0 / 127.0
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    from onnxforge.io import write_text  # guarded and atomic, like every output

    write_text(path, "\n".join(lines) + "\n")
    write_text(path.with_suffix(path.suffix + ".json"), json.dumps({"dynamic_range": amax}, indent=1, sort_keys=True))
    return path


def read_tensorrt_cache(path: str | Path) -> dict[str, float]:
    """name -> scale from a TensorRT text calibration cache."""
    scales = {}
    for line in Path(path).read_text().splitlines()[1:]:
        name, _, hexval = line.rpartition(": ")
        if name:
            scales[name] = struct.unpack(">f", bytes.fromhex(hexval.strip()))[0]
    return scales
