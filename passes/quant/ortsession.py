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

import ctypes
import os
import tempfile
from pathlib import Path

import onnx
import onnx.helper

from onnxforge.errors import UnsafeModelError
from onnxforge.io import iter_tensor_protos
from onnxforge.model import copy_fields, tensor_header
from onnxforge.passes.fusion._match import MS_DOMAIN

# Below protobuf's 2 GiB limit with room for the graph itself.
LARGE_MODEL_BYTES = 1_800_000_000
# Sessions of models with more weights than this load from a file: from bytes,
# onnxruntime holds the serialized model, its parse and its tensors at once.
SESSION_FILE_BYTES = 256_000_000
# initializers at least this large go to the data file (small ones stay inline)
EXTERNAL_MIN_BYTES = 1024


def with_external_data_loaded(proto: onnx.ModelProto, base_dir: Path | None) -> onnx.ModelProto:
    """``proto`` with tensors stored in external files read into memory (in place):
    later copies and sessions then need no file next to them."""
    if base_dir is not None and has_external_data(proto):
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(proto, str(base_dir))
    return proto


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; nothing elsewhere).
    Weights of a few MB are heap blocks, and glibc keeps what a dropped session or
    model copy freed: without this each phase of a large model's quantization starts
    from the previous one's high-water mark (Llama 570M: 1.8 GB above what is in use)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def has_external_data(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t, _where in iter_tensor_protos(proto))


def is_large(proto: onnx.ModelProto, limit: int | None = None) -> bool:
    """Has external data, or more than ``limit`` (LARGE_MODEL_BYTES) of weights."""
    limit = LARGE_MODEL_BYTES if limit is None else limit
    return has_external_data(proto) or sum(t.ByteSize() for t, _where in iter_tensor_protos(proto)) > limit


def loads_from_file(proto: onnx.ModelProto) -> bool:
    """Whether onnxruntime should get ``proto`` as a file with external data (see SESSION_FILE_BYTES)."""
    return is_large(proto, SESSION_FILE_BYTES)


def session(proto: onnx.ModelProto, options, providers=("CPUExecutionProvider",)):
    """An ``onnxruntime.InferenceSession`` for ``proto`` (see the module docstring)."""
    import onnxruntime as ort

    if not loads_from_file(proto):
        return ort.InferenceSession(proto.SerializeToString(), options, providers=list(providers))
    with tempfile.TemporaryDirectory(prefix="onnxforge-quant-session-") as tmp:
        path = write_with_external_data(proto, Path(tmp) / "model.onnx")
        return ort.InferenceSession(str(path), options, providers=list(providers))


def write_with_external_data(proto: onnx.ModelProto, path: Path, base_dir: Path | None = None) -> Path:
    """Save ``proto`` to ``path`` with its large initializers in ``path.data``, streamed
    one tensor at a time: ``proto`` is left as it is and never copied whole (a copy
    of a 2 GB model is 2 GB more at the peak). Initializers still stored in external
    files under ``base_dir`` are copied from there in chunks, never read whole."""
    data_name = path.name + ".data"
    offset = 0
    with open(path.parent / data_name, "wb") as data:
        def stored(tensor: onnx.TensorProto) -> dict[str, str]:
            nonlocal offset
            start = offset
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                offset += _copy_external_bytes(tensor, base_dir, data)
            else:
                data.write(tensor.raw_data)
                offset += len(tensor.raw_data)
            return {"location": data_name, "offset": str(start), "length": str(offset - start)}

        light = _with_large_initializers_external(proto, stored, keep_external=base_dir is None)
    path.write_bytes(light.SerializeToString())
    return path


def _copy_external_bytes(tensor: onnx.TensorProto, base_dir: Path, out, chunk: int = 1 << 24) -> int:
    """Copy ``tensor``'s bytes from its (validated) external file under ``base_dir`` to ``out``."""
    from onnxforge.io import check_external_location

    source, offset, length, identity = check_external_location(tensor, base_dir)
    with open(source, "rb") as f:
        st = os.fstat(f.fileno())
        if (st.st_dev, st.st_ino) != identity:  # swapped between the check and the open
            raise UnsafeModelError(f"tensor {tensor.name!r}: external data {source} changed while being read")
        f.seek(offset)
        left = length
        while left:
            block = f.read(min(chunk, left))
            if not block:
                raise OSError(f"{source}: ends before the {length} bytes of tensor {tensor.name!r}")
            out.write(block)
            left -= len(block)
    return length


def infer_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference that also works past 2 GB: it reads types, dims and small
    constants, so large initializers are left out of the copy it runs on (their
    declared type and dims stay). Returns the inferred model (weights not included
    when the model is large: read types and shapes from it, nothing else).

    onnx knows no onnxruntime contrib op, so inference stops at a fused node
    (FastGelu, SkipLayerNormalization, ...) and nothing after it gets a type: the
    calibrator then measures none of those tensors and onnxruntime's QDQ quantizer
    fails on a bias whose input it has no scale for. The outputs of contrib ops
    whose first output has their first input's element type are typed so (shape
    left unknown) and inference is rerun, until nothing more is learned."""
    if not is_large(proto):
        source = proto
    else:
        # placeholders whose data nothing may read
        source = _with_large_initializers_external(proto, lambda _t: {"location": "weights-left-out-for-shape-inference"})
    inferred = onnx.shape_inference.infer_shapes(source, strict_mode=False)
    for _ in range(_MAX_CONTRIB_ROUNDS):
        added = _contrib_output_types(inferred)
        if not added:
            break
        inferred.graph.value_info.extend(added)
        inferred = onnx.shape_inference.infer_shapes(inferred, strict_mode=False)
    return inferred


# com.microsoft ops whose first output has the element type of their first input
_SAME_TYPE_CONTRIB = frozenset({
    "FastGelu", "Gelu", "BiasGelu", "QuickGelu", "BiasAdd", "BiasSplitGelu", "FusedMatMul", "FusedConv",
    "FusedGemm", "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization", "Attention", "MultiHeadAttention",
    "GroupQueryAttention", "RotaryEmbedding", "NhwcConv", "GemmFastGelu", "BiasSoftmax",
})
_MAX_CONTRIB_ROUNDS = 64  # each round types at least one more node's output


def _contrib_output_types(inferred: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """value_infos (element type only) for untyped first outputs of the contrib ops above
    whose first input's type is known, in the main graph."""
    graph = inferred.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        if info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    added = []
    for node in graph.node:
        if node.domain != MS_DOMAIN and not (node.domain in ("", "ai.onnx") and node.op_type == "LayerNormalization"):
            continue
        if node.op_type not in _SAME_TYPE_CONTRIB or not node.input or not node.output or not node.output[0]:
            continue
        out, source = node.output[0], types.get(node.input[0])
        if out in types or source is None:
            continue
        added.append(onnx.helper.make_tensor_value_info(out, source, None))
        types[out] = source
    return added


def _with_large_initializers_external(proto: onnx.ModelProto, reference, keep_external: bool = False) -> onnx.ModelProto:
    """A copy of ``proto`` whose initializers of EXTERNAL_MIN_BYTES or more (and, unless
    ``keep_external``, those already external) are headers pointing where
    ``reference(tensor)`` says (external_data entries); the others are copied."""
    light = onnx.ModelProto()
    copy_fields(proto, light, {"graph"})
    copy_fields(proto.graph, light.graph, {"initializer"})
    for tensor in proto.graph.initializer:
        external = tensor.data_location == onnx.TensorProto.EXTERNAL
        if (external and keep_external) or (not external and len(tensor.raw_data) < EXTERNAL_MIN_BYTES):
            light.graph.initializer.add().CopyFrom(tensor)
            continue
        header = light.graph.initializer.add()
        header.CopyFrom(tensor_header(tensor))
        header.data_location = onnx.TensorProto.EXTERNAL
        for key, value in reference(tensor).items():
            entry = header.external_data.add()
            entry.key, entry.value = key, value
    return light
