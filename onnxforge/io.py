"""Safe model loading and atomic saving.

Loading never lets onnx or onnxruntime follow an external-data reference before
it has been checked: relative, inside the model's folder once symbolic links are
resolved, not a hard link, a regular file, and ``offset + length`` within it.
Weights in external files stay on disk (``ExternalValues``) so a 2 GB model is
never held twice; saving copies their bytes in chunks into a fresh data file.

Saving writes into a temporary file or folder beside the target and renames it
into place, refuses to overwrite the input model or its data files, and never
appends to an existing data file.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator

import onnx
from google.protobuf.message import DecodeError, EncodeError

from .errors import ModelLoadError, ModelSaveError, UnsafeModelError
from .model import ExternalValues, Model, constants, samefile

PROTOBUF_LIMIT = 2**31 - 1
# Keep headroom below protobuf's hard limit: graph structure is serialized too.
EXTERNAL_DATA_THRESHOLD = 1_900_000_000
ALIGNMENT = 4096


# ----------------------------------------------------------------------------- load


def load(path: str | os.PathLike, *, check: bool = True, cap_versions: bool = True) -> Model:
    """Load an ONNX model, validating external data before anything reads it."""
    path = Path(path)
    proto = _read_proto(path)
    _check_header(proto, path)
    base = path.resolve().parent
    locations = _validate_external_data(proto, base)
    if check and not locations:
        _run_checker(proto, path)
    try:
        model = Model.from_proto(proto, source=path)
    except Exception as exc:  # gs raises plain exceptions on malformed graphs
        raise ModelLoadError(f"{path}: cannot import the graph: {exc}") from exc
    _attach_external_values(model, locations)
    if cap_versions:
        from .versions import cap_model_versions

        cap_model_versions(model)
    return model


def _read_proto(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a folder, not a model file")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{path}: the file is empty")
    if size > PROTOBUF_LIMIT:
        raise ModelLoadError(
            f"{path}: a single-file model of {size / 1e9:.2f} GB exceeds protobuf's 2 GB limit",
            hint="re-export it with external data (weights in a separate file beside the model)",
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read: {exc.strerror}") from exc
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(
            f"{path}: not a valid ONNX protobuf (corrupted or truncated): {_first_line(exc)}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{path}: not a valid ONNX protobuf (bad string encoding)") from exc
    return proto


def _check_header(proto: onnx.ModelProto, path: Path) -> None:
    if not proto.HasField("graph") or proto.ir_version == 0:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph or no ir_version)")
    if proto.ir_version > onnx.IR_VERSION:
        raise ModelLoadError(
            f"{path}: ir_version {proto.ir_version} is newer than onnx {onnx.__version__} reads "
            f"(at most {onnx.IR_VERSION})",
            hint="upgrade onnx and onnxruntime, or re-export with an older IR version",
        )
    if proto.ir_version < 3:
        raise ModelLoadError(
            f"{path}: ir_version {proto.ir_version} predates opset imports (IR 3)",
            hint="re-export the model with a current exporter",
        )
    if not proto.opset_import:
        raise ModelLoadError(f"{path}: the model declares no opset_import")


def _run_checker(proto: onnx.ModelProto, path: Path) -> None:
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ModelLoadError(
            f"{path}: the ONNX checker rejects the model: {_first_line(exc)}",
            hint="fix the exporter output, or pass check=False (CLI: --no-check) to load it anyway",
        ) from exc


# --------------------------------------------------------------- external data checks


def iter_tensor_protos(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto that can carry data: initializers, Constant attributes, sparse
    values, in the graph, its subgraphs and the model's functions."""

    def from_graph(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            yield from from_nodes([node])

    def from_nodes(nodes) -> Iterator[onnx.TensorProto]:
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                if attr.HasField("sparse_tensor"):
                    yield attr.sparse_tensor.values
                    yield attr.sparse_tensor.indices
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from from_graph(attr.g)
                for sub in attr.graphs:
                    yield from from_graph(sub)

    yield from from_graph(proto.graph)
    for func in proto.functions:
        yield from from_nodes(func.node)


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _validate_external_data(proto: onnx.ModelProto, base: Path) -> dict[int, tuple]:
    """Check every external reference; return id(tensor) -> (tensor, path, offset, length).

    The tensor itself is kept in the value: protobuf wrappers are cached only while
    alive, so holding them keeps ``id()`` stable until gs has imported them."""
    found: dict[int, tuple] = {}
    for tensor in iter_tensor_protos(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        found[id(tensor)] = (tensor, *check_external_location(tensor, base))
    return found


def check_external_location(tensor: onnx.TensorProto, base: Path) -> tuple[Path, int, int]:
    name = tensor.name or "<unnamed>"
    info = external_info(tensor)
    location = info.get("location", "")

    def refuse(why: str) -> UnsafeModelError:
        return UnsafeModelError(f"tensor {name!r}: external data {location!r} {why}")

    if not location:
        raise refuse("has no location")
    if "\x00" in location or os.path.isabs(location) or location.startswith(("/", "\\")) or (
        len(location) > 1 and location[1] == ":"
    ):
        raise refuse("is not a relative path")
    base_real = base.resolve()
    target = (base / location).resolve()
    if base_real != target and base_real not in target.parents:
        raise refuse("resolves outside the model's folder")
    try:
        st = os.stat(target)
    except OSError:
        raise refuse("does not exist")
    if not stat.S_ISREG(st.st_mode):
        raise refuse("is not a regular file")
    if st.st_nlink > 1:
        raise refuse("is a hard link (it could alias a file outside the model's folder)")
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else st.st_size - offset
    except ValueError:
        raise refuse("has a non-integer offset or length")
    if offset < 0 or length < 0 or offset + length > st.st_size:
        raise refuse(f"offset {offset} + length {length} lies beyond the file's {st.st_size} bytes")
    expected = _expected_nbytes(tensor)
    if expected is not None and length < expected:
        raise refuse(f"holds {length} bytes but the tensor needs {expected}")
    return target, offset, length


def _expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    if tensor.data_type in (onnx.TensorProto.STRING,) or itemsize == 0:
        return None
    count = 1
    for d in tensor.dims:
        count *= d
    if tensor.data_type in _SUBBYTE_TYPES:
        return (count + 1) // 2
    return count * itemsize


_SUBBYTE_TYPES = {
    getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)
}


def _attach_external_values(model: Model, locations: dict[int, tuple]) -> None:
    """Swap gs's LazyValues of external tensors for ExternalValues reading validated paths."""
    if not locations:
        return
    attached = 0
    for const in constants(model.graph):
        tensor = getattr(const._values, "tensor", None)
        if tensor is not None and id(tensor) in locations:
            _, path, offset, length = locations[id(tensor)]
            const._values = ExternalValues(tensor, path, offset, length)
            attached += 1
    if attached < len(locations):
        raise UnsafeModelError(
            f"{len(locations) - attached} external tensors sit where onnxforge cannot track them "
            "(function bodies or sparse tensors)",
            hint="load the data into the model with onnx.load and save it as a single file first",
        )


# ----------------------------------------------------------------------------- save


def save(
    model: Model | onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    size_threshold: int = 1024,
) -> Path:
    """Write ``model`` atomically to ``path``.

    ``external_data``: True writes weights to ``<name>.data`` beside the model,
    False forbids it, None decides (external when the input had external data or
    the model would exceed protobuf's 2 GB limit).
    """
    path = Path(path)
    if isinstance(model, onnx.ModelProto):
        model = Model.from_proto(model)
    _refuse_overwriting_inputs(model, path)
    if path.is_dir():
        raise ModelSaveError(f"{path}: is a folder; give a file name such as {path / 'model.onnx'}")
    if not path.parent.exists():
        raise ModelSaveError(f"{path.parent}: the output folder does not exist")

    proto = model.to_proto()
    has_external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in iter_tensor_protos(proto))
    if external_data is None:
        external_data = has_external or _payload_bytes(proto) > EXTERNAL_DATA_THRESHOLD
    if not external_data and has_external:
        raise ModelSaveError(
            f"{path}: the model's weights live in external data and exceed what one file can hold",
            hint="save with external data (CLI: --external-data)",
        )
    if external_data:
        _save_external(model, proto, path, size_threshold)
    else:
        try:
            data = proto.SerializeToString()
        except (EncodeError, ValueError) as exc:
            raise ModelSaveError(
                f"{path}: the model exceeds protobuf's 2 GB limit", hint="save with external data"
            ) from exc
        _atomic_write_bytes(path, data)
    return path


def _payload_bytes(proto: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in iter_tensor_protos(proto)) + 1_000_000


def _refuse_overwriting_inputs(model: Model, path: Path) -> None:
    data_path = path.with_name(path.name + ".data")
    for source in model.source_files:
        for target in (path, data_path):
            if target.exists() and samefile(source, target):
                raise ModelSaveError(
                    f"{target}: refusing to overwrite the input model or its external data",
                    hint="write the output to another path",
                )


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(Path(tmp))
        raise


def _save_external(model: Model, proto: onnx.ModelProto, path: Path, threshold: int) -> None:
    source_by_tensor = _source_lookup(model)
    data_name = path.name + ".data"
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp_data = tmpdir / data_name
        with open(tmp_data, "wb") as out:
            for tensor in iter_tensor_protos(proto):
                _write_tensor(tensor, out, data_name, threshold, source_by_tensor)
            out.flush()
            os.fsync(out.fileno())
        tmp_model = tmpdir / path.name
        with open(tmp_model, "wb") as f:
            f.write(proto.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        # Data first: a model file on disk always has its complete data beside it.
        os.replace(tmp_data, path.with_name(data_name))
        os.replace(tmp_model, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _source_lookup(model: Model) -> dict[tuple[str, str, str], ExternalValues]:
    """(location, offset, length) of the source reference -> the values reading it."""
    table = {}
    for const in constants(model.graph):
        values = const._values
        if isinstance(values, ExternalValues):
            info = external_info(values.tensor)
            table[(info.get("location", ""), str(values.offset), str(values.length))] = values
    return table


def _write_tensor(tensor, out, data_name: str, threshold: int, sources) -> None:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = external_info(tensor)
        values = _find_source(sources, info)
        if values is None:
            raise ModelSaveError(f"tensor {tensor.name!r}: its external data source is unknown")
        offset = _pad(out)
        for block in values.read_bytes():
            out.write(block)
        _set_external(tensor, data_name, offset, values.length)
        return
    if not tensor.HasField("raw_data"):
        # Typed fields (float_data, ...): normalise to raw bytes when large.
        if _typed_size(tensor) < threshold:
            return
        array = onnx.numpy_helper.to_array(tensor)
        tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    if len(tensor.raw_data) < threshold:
        return
    offset = _pad(out)
    raw = tensor.raw_data
    out.write(raw)
    length = len(raw)
    tensor.ClearField("raw_data")
    _set_external(tensor, data_name, offset, length)


def _find_source(sources, info):
    offset = str(int(info.get("offset", "0")))
    for (location, off, length), values in sources.items():
        if location == info.get("location", "") and off == offset:
            return values
    return None


def _typed_size(tensor) -> int:
    return 4 * (
        len(tensor.float_data) + len(tensor.int32_data) + 2 * len(tensor.int64_data) + 2 * len(tensor.double_data)
    )


def _pad(out) -> int:
    pos = out.tell()
    pad = (-pos) % ALIGNMENT
    if pad:
        out.write(b"\0" * pad)
    return pos + pad


def _set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
