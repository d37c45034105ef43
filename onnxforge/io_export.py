"""How tensors are written on save without holding the weights twice: one initializer
at a time into a single file (``InitializerEntry``), or staged as external-data
references into ``<name>.data`` at ALIGNMENT-byte offsets while the graph is exported."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from .errors import ModelSaveError
from .external_data import EXTERNAL
from .model import ExternalValues, Model, constants, tensor_header
from .model_checks import _varint_size
from .shared_weights import value_type

ALIGNMENT = 4096
_MODEL_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_GRAPH_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_TENSOR_RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
_LENGTH_DELIMITED = 2


class _InitializerEntry:
    """The serialized size of one initializer, and how to write it without
    holding more than that tensor in memory."""

    def __init__(self, const: gs.Constant):
        self.const = const
        values = const._values
        self.array = _raw_array(const)
        if isinstance(values, ExternalValues) or self.array is not None:
            header = tensor_header(values.tensor, const.name) if self.array is None else onnx.TensorProto(
                name=const.name, data_type=value_type(const), dims=[int(d) for d in const.shape])
            self.header = header.SerializeToString()
            n = values.length if self.array is None else self.array.nbytes
            self.size = len(self.header) + 1 + _varint_size(n) + n
        else:
            self.header = None
            self.size = self._tensor().ByteSize()
        self.framed_size = 1 + _varint_size(self.size) + self.size

    def _tensor(self) -> onnx.TensorProto:
        values = self.const._values
        if isinstance(values, LazyValues):
            if values.tensor.data_location == EXTERNAL:
                raise ModelSaveError(f"tensor {self.const.name!r}: its external data was never validated")
            values.tensor.name = self.const.name  # what gs's exporter does too
            return values.tensor
        from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

        tensor = OnnxExporter.export_tensor_proto(self.const)
        if tensor.data_location == EXTERNAL:  # materialized by a pass: the bytes are inline now
            tensor.ClearField("data_location")
        return tensor

    def write(self, out) -> None:
        if self.header is None:
            out.write(self._tensor().SerializeToString())
            return
        out.write(self.header)
        if self.array is not None:  # the array's own bytes, not a copy of them
            out.write(_field_key(_TENSOR_RAW_DATA) + _varint(self.array.nbytes))
            out.write(memoryview(self.array).cast("B"))
            return
        values = self.const._values
        out.write(_field_key(_TENSOR_RAW_DATA) + _varint(values.length))
        for block in values.read_bytes():
            out.write(block)


def _raw_array(const: gs.Constant):
    """A constant's array as little-endian contiguous raw bytes (what raw_data holds),
    when it is one of a plain type exported as itself, else None."""

    values = const._values
    if isinstance(values, LazyValues) or not isinstance(values, np.ndarray) or value_type(const) is None:
        return None
    little = values.dtype.newbyteorder("<")
    return np.ascontiguousarray(values.astype(little, copy=False)).reshape(-1)


def _field_key(number: int) -> bytes:
    return _varint(number << 3 | _LENGTH_DELIMITED)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# ------------------------------------------------------------ staging tensors for export


class _Staged(LazyValues):
    """Values swapped in while exporting: gs's exporter uses ``tensor`` as is."""

    def __init__(self, tensor: onnx.TensorProto, shape, dtype):  # no super(): gs rejects some dtypes
        self.tensor, self.shape, self.dtype, self.nbytes = tensor, shape, dtype, 0


@contextlib.contextmanager
def _swapped() -> Iterator[list]:
    """Collects (constant, values, data_location) swaps and undoes them on exit."""
    swaps: list = []
    try:
        yield swaps
    finally:
        for const, values, location in reversed(swaps):
            const._values, const.data_location = values, location


def _stage(swaps: list, const: gs.Constant, tensor: onnx.TensorProto | None, location) -> None:
    swaps.append((const, const._values, const.data_location))
    if tensor is not None:
        const._values = _Staged(tensor, const.shape, const.dtype)
    const.data_location = location


@contextlib.contextmanager
def _externalized(model: Model, out, data_name: str, threshold: int) -> Iterator[None]:
    """Write every constant of ``threshold`` bytes or more to ``out`` and stage
    a data-less TensorProto pointing there in its place."""
    written: dict[int, tuple[int, int]] = {}  # id(values) -> (offset, length): shared values once
    with _swapped() as swaps:
        for const in constants(model.graph):
            values = const._values
            if isinstance(values, SparseValues):
                continue
            if _const_nbytes(const) < threshold:
                _stage_inline(swaps, const)
                continue
            parts = _export_parts(const)
            if parts is None:  # a type onnx cannot write as raw bytes: leave it inline
                continue
            header, payload = parts
            if id(values) not in written:
                offset = _pad(out)
                length = 0
                for block in payload:
                    out.write(block)
                    length += len(block)
                written[id(values)] = (offset, length)
            del payload
            _set_external(header, data_name, *written[id(values)])
            _stage(swaps, const, header, EXTERNAL)
        yield


def _stage_inline(swaps: list, const: gs.Constant) -> None:
    values = const._values
    if isinstance(values, ExternalValues):
        tensor = tensor_header(values.tensor, const.name)
        tensor.raw_data = b"".join(values.read_bytes())
        _stage(swaps, const, tensor, None)
    elif isinstance(values, LazyValues):
        if values.tensor.data_location == EXTERNAL:
            raise ModelSaveError(f"tensor {const.name!r}: its external data was never validated; its source is unknown")
    elif const.data_location == EXTERNAL:
        _stage(swaps, const, None, None)  # materialized by a pass: its bytes are in memory now


def _export_parts(const: gs.Constant) -> tuple[onnx.TensorProto, Iterable[bytes]] | None:
    """(data-less TensorProto, raw little-endian bytes) of a constant, holding at
    most one tensor's bytes in memory; None for types onnx cannot write raw."""
    values = const._values
    if isinstance(values, ExternalValues):
        return tensor_header(values.tensor, const.name), values.read_bytes()
    if isinstance(values, LazyValues):
        tensor = values.tensor
        if tensor.data_location == EXTERNAL:
            raise ModelSaveError(f"tensor {const.name!r}: its external data was never validated; its source is unknown")
        if tensor.HasField("raw_data"):
            return tensor_header(tensor, const.name), (tensor.raw_data,)
        converted = _typed_to_raw(tensor)  # float_data, int32_data, ...
    else:
        converted = _numpy_tensor(const)
    if converted is None:
        return None
    raw = converted.raw_data
    return tensor_header(converted, const.name), (raw,)


def _typed_to_raw(tensor: onnx.TensorProto) -> onnx.TensorProto | None:
    try:
        converted = onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor))
    except (ValueError, TypeError, KeyError):
        return None
    converted.data_type = tensor.data_type
    return converted if converted.HasField("raw_data") else None


def _numpy_tensor(const: gs.Constant) -> onnx.TensorProto | None:
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    try:
        tensor = OnnxExporter.export_tensor_proto(const)
    except (ValueError, TypeError, KeyError):
        return None
    return tensor if tensor.HasField("raw_data") else None


def _pad(out) -> int:
    pos = out.tell()
    pad = (-pos) % ALIGNMENT
    if pad:
        out.write(b"\0" * pad)
    return pos + pad


def _set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _weight_bytes(model: Model) -> int:
    # meta holds the model-local functions and their Constant attributes.
    return sum(_const_nbytes(c) for c in constants(model.graph)) + model.meta.ByteSize()


def _const_nbytes(const: gs.Constant) -> int:
    values = const._values
    if isinstance(values, ExternalValues):
        return values.length
    if isinstance(values, LazyValues):
        return int(values.tensor.ByteSize())
    return int(getattr(values, "nbytes", 0))
