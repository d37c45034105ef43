"""onnxruntime sessions for in-memory ModelProtos of any size.

Serialized protobuf stops at 2 GB, and a model loaded from bytes cannot resolve
external data paths (onnxruntime refuses paths that escape the working
directory). The quantizer works on ModelProtos throughout, so every session it
opens goes through ``session``: small self-contained models load from bytes, the
others are written to a temporary folder with their weights as external data
and loaded from there (onnxruntime reads the weights at session creation, so the
folder can go right after).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

# Below protobuf's 2 GiB limit with room for the graph itself.
LARGE_MODEL_BYTES = 1_800_000_000


def with_external_data_loaded(proto: onnx.ModelProto, base_dir: Path | None) -> onnx.ModelProto:
    """``proto`` with tensors stored in external files read into memory (in place):
    later copies and sessions then need no file next to them."""
    if base_dir is not None and has_external_data(proto):
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(proto, str(base_dir))
    return proto


def has_external_data(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _tensors(proto.graph))


def is_large(proto: onnx.ModelProto) -> bool:
    return has_external_data(proto) or sum(len(t.raw_data) for t in _tensors(proto.graph)) > LARGE_MODEL_BYTES


def session(proto: onnx.ModelProto, options, providers=("CPUExecutionProvider",)):
    """An ``onnxruntime.InferenceSession`` for ``proto`` (see the module docstring)."""
    import onnxruntime as ort

    if not is_large(proto):
        return ort.InferenceSession(proto.SerializeToString(), options, providers=list(providers))
    with tempfile.TemporaryDirectory(prefix="onnxforge-quant-session-") as tmp:
        path = write_with_external_data(proto, Path(tmp) / "model.onnx")
        return ort.InferenceSession(str(path), options, providers=list(providers))


def write_with_external_data(proto: onnx.ModelProto, path: Path) -> Path:
    """Save a copy of ``proto`` to ``path`` with its weights in ``path.data`` (``proto`` is left as it is)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    return path


def _tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)
