"""What ``quantize`` reads: the model (its source kept for external weights), and the
calibration and validation feeds (npz folders, iterables, or random for a smoke run),
consumed once (``_Tee`` keeps the first few for validation)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import onnx

from onnxforge.errors import DataError
from onnxforge.model import Model
from onnxforge.opsets import one_default_domain

RANDOM_FEEDS = 8
MAX_VALIDATION_FEEDS = 16


def _source_and_original(model: Model | onnx.ModelProto | str | os.PathLike) -> tuple[Model | None, onnx.ModelProto]:
    """(the model as onnxforge loads it, weights in external files still on disk, or
    None for a ModelProto input; the original as a ModelProto). The proto's external
    weights are not read (types and inputs are what callers read; the -O2 passes
    run on the lazy Model): ``_with_weights`` reads them."""
    if isinstance(model, onnx.ModelProto):
        from onnxforge.versions import cap_proto_versions

        model = one_default_domain(model, copy=True)  # the caller's proto keeps its entries
        return None, cap_proto_versions(model)[0]  # IR/opset this onnxruntime loads
    if not isinstance(model, Model):
        from onnxforge.io import load

        model = load(model)
    return model, one_default_domain(model.to_proto())


def _with_weights(original: onnx.ModelProto, source: Model | None) -> onnx.ModelProto:
    """``original`` with the weights of external files read into memory (in place)."""
    from .ortsession import with_external_data_loaded

    return with_external_data_loaded(original, source.source.parent if source is not None and source.source else None)


def _feeds(data, proto: onnx.ModelProto, what: str, source: Model | None = None) -> tuple[Iterable[dict], str]:
    """(feeds, description) from a folder/file path, an iterable of feed dicts, or "random".
    ``source``: the loaded model ``proto`` was exported from; random feeds are tried on it when
    ``proto`` refers to external files (onnxruntime refuses those in a model given as bytes)."""
    from onnxforge.inputs import iter_feed_files, load_feeds
    from onnxforge.verify_feeds import runnable_feeds

    from .ortsession import has_external_data

    if isinstance(data, str) and data == "random":
        runs = source if source is not None and has_external_data(proto) else proto
        return runnable_feeds(runs, {}, RANDOM_FEEDS), "random (seeded)"
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.exists():
            raise DataError(f"{what} data {path}: no such file or folder")
        if any(path.glob("*.npz")) or path.suffix == ".npz":
            return iter_feed_files(path), str(path)
        return load_feeds(path), str(path)
    if isinstance(data, Mapping):
        return [dict(data)], "one feed dict"
    if isinstance(data, Iterable):
        return data, "feed dicts (API)"
    raise DataError(f"{what} data: expected a folder, a file, an iterable of feed dicts or 'random', got {type(data).__name__}")


def _validation_feeds(val, calib_list: list[dict] | None, proto, calib_desc: str,
                      source: Model | None = None) -> tuple[list[dict], str]:
    if val is not None:
        feeds, desc = _feeds(val, proto, "validation", source)
        return _take(feeds, MAX_VALIDATION_FEEDS), desc
    if calib_list:
        return calib_list[:MAX_VALIDATION_FEEDS], f"calibration data ({calib_desc}; no separate --val given)"
    return [], "none"


def _take(feeds: Iterable[dict], n: int) -> list[dict]:
    out = []
    for feed in feeds:
        out.append(feed)
        if len(out) >= n:
            break
    return out


class _Tee:
    """Iterates the calibration feeds once, keeping the first few for validation."""

    def __init__(self, feeds: Iterable[dict], keep: int):
        self.feeds, self.keep, self.kept = feeds, keep, []

    def __iter__(self):
        for feed in self.feeds:
            if len(self.kept) < self.keep:
                self.kept.append(feed)
            yield feed
