"""External data, checked before anything reads it: every reference is relative, inside the
model's folder once symbolic links are resolved, not a hard link, a regular file, and
``offset + length`` lies within it. The checked tensors are attached to the imported
graph as ``ExternalValues`` (read in chunks on save, never held in memory)."""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Iterator

import onnx

from .errors import ModelLoadError, UnsafeModelError
from .model import ExternalValues, Model, constants

EXTERNAL = onnx.TensorProto.EXTERNAL


def iter_tensor_protos(proto: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    """Every TensorProto that can carry data, with where it sits: ``graph``
    (initializers and Constant attributes of the graph and its subgraphs),
    ``sparse`` (sparse tensors' parts) or ``function`` (model-local functions)."""

    def from_graph(graph: onnx.GraphProto, where: str) -> Iterator[tuple[onnx.TensorProto, str]]:
        for tensor in graph.initializer:
            yield tensor, where
        for sparse in graph.sparse_initializer:
            yield sparse.values, "sparse"
            yield sparse.indices, "sparse"
        yield from from_nodes(graph.node, where)

    def from_nodes(nodes, where: str) -> Iterator[tuple[onnx.TensorProto, str]]:
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t, where
                if attr.HasField("sparse_tensor"):
                    yield attr.sparse_tensor.values, "sparse"
                    yield attr.sparse_tensor.indices, "sparse"
                for tensor in attr.tensors:
                    yield tensor, "list"
                for sparse in attr.sparse_tensors:
                    yield sparse.values, "sparse"
                    yield sparse.indices, "sparse"
                if attr.HasField("g"):
                    yield from from_graph(attr.g, where)
                for sub in attr.graphs:
                    yield from from_graph(sub, where)

    yield from from_graph(proto.graph, "graph")
    for func in proto.functions:
        yield from from_nodes(func.node, "function")


_UNTRACKED = {
    "sparse": "a sparse tensor",
    "function": "a model-local function",
    "list": "a tensor-list attribute",
}


def _validate_external_data(proto: onnx.ModelProto, base: Path) -> dict[int, tuple]:
    """Check every external reference; return id(tensor) -> (tensor, path, offset, length, identity).

    Keeping the tensor in the value keeps its protobuf wrapper alive, and a live
    wrapper is what the protobuf runtime hands out again for the same message,
    so gs's LazyValues.tensor is that same object and ``id()`` identifies it."""
    found: dict[int, tuple] = {}
    for tensor, where in iter_tensor_protos(proto):
        if tensor.data_location != EXTERNAL:
            continue
        checked = check_external_location(tensor, base)
        if where in _UNTRACKED:
            raise ModelLoadError(
                f"tensor {tensor.name or '<unnamed>'!r}: external data inside {_UNTRACKED[where]} is not supported",
                hint="load the model with onnx.load and save it as a single file, then run onnxforge on that",
            )
        found[id(tensor)] = (tensor, *checked)
    return found


_DIGITS = re.compile(r"[0-9]+")


def external_entries(tensor: onnx.TensorProto) -> dict[str, str]:
    """The tensor's external_data as a dict; a key given twice is ambiguous and refused."""
    entries: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key in entries:
            raise UnsafeModelError(
                f"tensor {tensor.name or '<unnamed>'!r}: external data gives {entry.key!r} twice"
            )
        entries[entry.key] = entry.value
    return entries


def check_external_location(tensor: onnx.TensorProto, base: Path) -> tuple[Path, int, int, tuple[int, int]]:
    """Validate one external reference; return (real path, offset, length, (st_dev, st_ino))."""
    name = tensor.name or "<unnamed>"
    info = external_entries(tensor)
    location = info.get("location", "")

    def refuse(why: str) -> UnsafeModelError:
        return UnsafeModelError(f"tensor {name!r}: external data {location!r} {why}")

    if not location:
        raise refuse("has no location")
    if "\x00" in location or os.path.isabs(location) or location.startswith(("/", "\\")) or re.match(
        r"^[A-Za-z]:", location
    ):
        raise refuse("is not a relative path")
    base_real = os.path.realpath(base)
    target = os.path.realpath(os.path.join(base, location))
    if os.path.commonpath([base_real, target]) != base_real or target == base_real:
        raise refuse("resolves outside the model's folder")
    try:
        st = os.lstat(target)  # target is fully resolved: no link left to follow
    except OSError:
        raise refuse("does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise refuse("is not a regular file")
    if st.st_nlink > 1:
        raise refuse("is a hard link (it could alias a file outside the model's folder)")
    offset, length = _offset_and_length(info, st.st_size, refuse)
    if offset + length > st.st_size:
        raise refuse(f"offset {offset} + length {length} lies beyond the file's {st.st_size} bytes")
    expected = expected_nbytes(tensor)
    if expected is not None and length < expected:
        raise refuse(f"holds {length} bytes but the tensor's dims need {expected}")
    return Path(target), offset, length, (st.st_dev, st.st_ino)


def _offset_and_length(info: dict[str, str], size: int, refuse) -> tuple[int, int]:
    for key in ("offset", "length"):
        if key in info and not _DIGITS.fullmatch(info[key]):
            raise refuse(f"has a {key} that is not a non-negative integer: {info[key]!r}")
    offset = int(info.get("offset", "0"))
    length = int(info["length"]) if "length" in info else max(size - offset, 0)
    return offset, length


def expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's dims and type need, or None when the type has no fixed size."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    count = 1
    for d in tensor.dims:
        count *= max(d, 0)
    if tensor.data_type in _SUBBYTE_TYPES:
        return (count + 1) // 2
    return count * itemsize


_SUBBYTE_TYPES = {
    getattr(onnx.TensorProto, n)
    for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
    if hasattr(onnx.TensorProto, n)
}


def _attach_external_values(model: Model, locations: dict[int, tuple]) -> None:
    """Swap gs's LazyValues of external tensors for ExternalValues reading validated paths."""
    if not locations:
        return
    attached: set[int] = set()
    for const in constants(model.graph):
        tensor = getattr(const._values, "tensor", None)
        entry = locations.get(id(tensor))
        if entry is not None and entry[0] is tensor:
            const._values = ExternalValues(*entry)
            attached.add(id(tensor))
    if len(attached) < len(locations):
        missing = [t.name or "<unnamed>" for key, (t, *_) in locations.items() if key not in attached]
        raise ModelLoadError(
            f"{len(missing)} external tensors (first: {missing[0]!r}) are not where onnxforge tracks weights",
            hint="load the model with onnx.load and save it as a single file, then run onnxforge on that",
        )
