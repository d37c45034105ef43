"""Safe model loading and atomic saving.

Loading never lets onnx or onnxruntime follow an external-data reference before
it has been checked: relative, inside the model's folder once symbolic links are
resolved, not a hard link, a regular file, and ``offset + length`` within it.
Weights in external files stay on disk (``ExternalValues``) so a 2 GB model is
never held twice; saving copies their bytes in chunks into a fresh data file.

Saving writes into a temporary folder beside the target and renames into place,
refuses to overwrite the input model or its data files, and never appends to an
existing data file. With external data two files are replaced: the data first,
then the model, each by one rename; a crash between the two renames (not a
failure while writing, which leaves the old target untouched) would pair the old
model file with the new data file.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError, EncodeError
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from .errors import ModelLoadError, ModelSaveError, UnsafeModelError, first_line
from .model import ExternalValues, Model, constants, copy_fields, external_values, iter_graphs, tensor_header

PROTOBUF_LIMIT = 2**31 - 1
# Keep headroom below protobuf's hard limit: graph structure is serialized too.
EXTERNAL_DATA_THRESHOLD = 1_900_000_000
ALIGNMENT = 4096
EXTERNAL = onnx.TensorProto.EXTERNAL


# ----------------------------------------------------------------------------- load


def load(path: str | os.PathLike, *, check: bool = True, cap_versions: bool = True) -> Model:
    """Load an ONNX model, validating external data before anything reads it.

    ``check`` runs onnx's checker; ``cap_versions`` lowers ir_version and opset to
    what the installed onnxruntime reads (recorded in ``model.notes``)."""
    path = Path(path)
    proto = _read_proto(path)
    _check_header(proto, path)
    base = Path(os.path.abspath(path)).parent
    locations = _validate_external_data(proto, base)
    notes: list[str] = _run_checker(proto, path) if check else []
    if cap_versions:
        from . import versions

        capped, capped_notes = versions.cap_proto_versions(proto)
        notes += capped_notes
        if capped is not proto:  # a converted copy: its tensors are new objects
            proto, locations = capped, _validate_external_data(capped, base)
    model = _import(proto, path)
    _attach_external_values(model, locations)
    model.notes.extend(notes)
    return model


def _read_proto(path: Path) -> onnx.ModelProto:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such file") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelLoadError(f"{path}: is a folder, not a model file")
    if not stat.S_ISREG(st.st_mode):
        raise ModelLoadError(f"{path}: is not a regular file")
    if st.st_size == 0:
        raise ModelLoadError(f"{path}: the file is empty")
    if st.st_size > PROTOBUF_LIMIT:
        raise ModelLoadError(
            f"{path}: a single-file model of {st.st_size / 1e9:.2f} GB exceeds protobuf's 2 GB limit",
            hint="re-export it with external data (weights in a separate file beside the model)",
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read: {exc.strerror}") from None
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except UnicodeDecodeError:
        raise ModelLoadError(f"{path}: not a valid ONNX protobuf (a string field is not UTF-8)") from None
    except (DecodeError, RuntimeError, ValueError, RecursionError) as exc:
        raise ModelLoadError(
            f"{path}: not a valid ONNX protobuf (corrupted, truncated or another format): {first_line(exc)}"
        ) from None
    bad = _non_utf8_string(proto)
    if bad is not None:
        raise ModelLoadError(f"{path}: not a valid ONNX protobuf (the {bad} field is not UTF-8 text)")
    return proto


def _non_utf8_string(message) -> str | None:
    """The name of a string field holding bytes that are not UTF-8, or None.

    The protobuf runtime parses such fields without complaint and hands back
    ``bytes`` instead of ``str``, which breaks much later (when saving). Tensor
    data is never touched: only a TensorProto's names are looked at."""
    if isinstance(message, onnx.TensorProto):
        fields = [(f, getattr(message, f.name)) for f in _TENSOR_TEXT_FIELDS]
    else:
        fields = message.ListFields()
    for field, value in fields:
        if field.type == field.TYPE_STRING:
            items = value if isinstance(value, (list, tuple)) or _is_repeated(field) else [value]
            if any(isinstance(item, bytes) for item in items):
                return f"{message.DESCRIPTOR.name}.{field.name}"
        elif field.type == field.TYPE_MESSAGE:
            for item in value if _is_repeated(field) else [value]:
                bad = _non_utf8_string(item)
                if bad is not None:
                    return bad
    return None


def _is_repeated(field) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 5; older ones have label
    return field.label == field.LABEL_REPEATED if repeated is None else repeated


_TENSOR_TEXT_FIELDS = [
    onnx.TensorProto.DESCRIPTOR.fields_by_name[n]
    for n in ("name", "doc_string", "external_data", "metadata_props")
    if n in onnx.TensorProto.DESCRIPTOR.fields_by_name
]


def _check_header(proto: onnx.ModelProto, path: Path) -> None:
    if not proto.HasField("graph") or not proto.HasField("ir_version"):
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


def _run_checker(proto: onnx.ModelProto, path: Path) -> list[str]:
    """Run onnx's checker; returns notes. Ops the checker has no schema for but
    onnxruntime implements (its contrib ops, its default-domain LayerNormalization
    below opset 17: what -O3 emits) are left for onnxruntime to judge."""
    try:
        onnx.checker.check_model(checker_view(proto))
    except onnx.checker.ValidationError as exc:
        message = first_line(exc)
        unknown = runtime_only_op(message)
        if unknown:
            return [f"the onnx checker does not know {unknown} at this opset; onnxruntime implements it"]
        if _onnxruntime_loads(path):
            # The promise is about models onnxruntime runs: the checker's objection
            # (a type without a shape, ...) is reported, and onnxruntime judges.
            return [f"the ONNX checker rejects the model ({message}); onnxruntime loads it, so it judges the result"]
        raise ModelLoadError(
            f"{path}: the ONNX checker rejects the model: {message}",
            hint="fix the exporter output, or load it with onnxforge.load(path, check=False)",
        ) from None
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path}: the ONNX checker cannot read the model: {first_line(exc)}") from None
    return []


def _onnxruntime_loads(path: Path) -> bool:
    """Whether onnxruntime's CPU provider loads the model file (its external data
    was validated before this is asked)."""
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return True


def runtime_only_op(checker_message: str) -> str | None:
    """The op a checker error says has no schema, when onnxruntime implements it
    (its contrib ops, its default-domain LayerNormalization below opset 17)."""
    prefix = "No Op registered for "
    if not checker_message.startswith(prefix):
        return None
    op = checker_message[len(prefix):].split(" ", 1)[0]
    return op if op in _runtime_op_names() else None


def _runtime_op_names() -> set[str]:
    """Op types onnxruntime registers in any domain (its contrib ops included)."""
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema
    except ImportError:
        return set()
    return {schema.name for schema in get_all_operator_schema()}


CHECKER_INLINE_LIMIT = 4096  # tensors up to this size keep their data in the checker's copy


def checker_view(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for onnx's checker in which external and large tensors are empty.

    The checker serializes what it is given (the weights would be held twice
    more), resolves external locations against the working folder when given a
    proto and refuses every symbolic link when given a path. External locations
    are validated (more strictly) above; without shape inference the checker
    compares initializer dims with nothing, so ``dims=[0]`` loses no check."""
    view = onnx.ModelProto()
    _copy_without_weights(proto, view)
    return view


def _copy_without_weights(source, target) -> None:
    for field, value in source.ListFields():
        repeated = _is_repeated(field)
        if field.type != field.TYPE_MESSAGE:
            if repeated:
                getattr(target, field.name).extend(value)
            else:
                setattr(target, field.name, value)
            continue
        for item in value if repeated else [value]:
            into = getattr(target, field.name).add() if repeated else getattr(target, field.name)
            into.SetInParent()  # an empty message that is set (a scalar's shape) stays set
            if isinstance(item, onnx.TensorProto):
                _copy_tensor_for_checker(item, into)
            elif isinstance(item, onnx.SparseTensorProto):
                into.CopyFrom(item)  # the checker compares its indices with its dims
            else:
                _copy_without_weights(item, into)


def _copy_tensor_for_checker(tensor: onnx.TensorProto, into: onnx.TensorProto) -> None:
    if tensor.data_location != EXTERNAL and tensor.ByteSize() <= CHECKER_INLINE_LIMIT:
        into.CopyFrom(tensor)
        return
    if tensor.data_location != EXTERNAL and tensor.HasField("raw_data"):
        # The one check the empty copy would lose: raw bytes against the dims.
        have, need = raw_data_length(tensor), expected_nbytes(tensor)
        if need is not None and have != need:
            raise onnx.checker.ValidationError(
                f"tensor {tensor.name!r} holds {have} bytes of raw data but its dims and type need {need}"
            )
    into.CopyFrom(tensor_header(tensor))
    del into.dims[:]
    into.dims.append(0)


def raw_data_length(tensor: onnx.TensorProto) -> int:
    """len(tensor.raw_data) without copying the bytes out: the field's share of ByteSize()."""
    rest = onnx.TensorProto()
    copy_fields(tensor, rest, {"raw_data"})
    share = tensor.ByteSize() - rest.ByteSize()  # tag (1 byte) + varint(n) + n
    for width in range(1, 11):
        n = share - 1 - width
        if n >= 0 and _varint_size(n) == width:
            return n
    raise ValueError(f"tensor {tensor.name!r}: inconsistent raw_data size")


def _varint_size(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _import(proto: onnx.ModelProto, path: Path) -> Model:
    try:
        return Model.from_proto(proto, source=path)
    except Exception as exc:  # gs raises bare exceptions (and UnicodeDecodeError) on malformed graphs
        raise ModelLoadError(f"{path}: cannot import the graph: {first_line(exc)}") from None


# --------------------------------------------------------------- external data checks


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


# ----------------------------------------------------------------------------- save


class _TooLarge(Exception):
    """The serialized model would exceed protobuf's 2 GB limit."""


def save(
    model: Model | onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    size_threshold: int = 1024,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``model`` atomically to ``path``.

    ``check(written_path)`` runs on the written file (and its data file beside it)
    before it is moved into place; when it raises, nothing lands at ``path``.

    ``external_data``: True writes every tensor of at least ``size_threshold``
    bytes to ``<name>.data`` beside the model, False writes one file, None decides
    (external when the input had external data or the weights approach
    protobuf's 2 GB limit, and when a single file turns out too large).
    """
    path = Path(path)
    model = _as_model(model)
    check_output_path(path)
    external = external_data if external_data is not None else _needs_external(model)
    try:
        _write(model, path, external, size_threshold, check)
    except _TooLarge:
        if external_data is not None:
            raise ModelSaveError(
                f"{path}: the model exceeds protobuf's 2 GB limit for a single file",
                hint="save with external data (CLI: --external-data)",
            ) from None
        _write(model, path, True, size_threshold, check)
    return path


def _as_model(model: Model | onnx.ModelProto) -> Model:
    if isinstance(model, Model):
        return model
    if any(t.data_location == EXTERNAL for t, _ in iter_tensor_protos(model)):
        raise ModelSaveError(
            "a ModelProto with external-data references cannot be saved: its data folder is unknown",
            hint="load it with onnxforge.io.load(path) instead",
        )
    return Model.from_proto(model)


def _needs_external(model: Model) -> bool:
    if any(True for _ in external_values(model.graph)):
        return True
    return _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD


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


# ------------------------------------------------------------ write guard
#
# Every file a command writes goes through ``write_file`` (models: ``save``):
# checked against what the run reads, written to a temporary file in the
# target's folder and renamed into place; the temporary file is removed on
# every exit path. What a run reads (the input model and its external data,
# data files, the recipe and its pass files) is registered with ``protect``
# inside a ``guarding_inputs()`` block (the CLI opens one per command).

_RUN_INPUTS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("onnxforge_run_inputs", default=None)


@contextlib.contextmanager
def guarding_inputs() -> Iterator[None]:
    """Within this block, ``protect``-ed files are never overwritten (nested blocks share one set)."""
    if _RUN_INPUTS.get() is not None:
        yield
        return
    token = _RUN_INPUTS.set({})
    try:
        yield
    finally:
        _RUN_INPUTS.reset(token)


def protect(paths: Iterable[str | os.PathLike] | str | os.PathLike | None, what: str) -> None:
    """Register files this run reads (for a folder: the files in it) so no output replaces them."""
    registry = _RUN_INPUTS.get()
    if registry is None or paths is None:
        return
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = Path(path)
        children = []
        if path.is_dir():
            with contextlib.suppress(OSError):
                children = list(path.iterdir())
        for one in children or [path]:
            try:
                st = os.stat(one)  # follows links: the identity of what is really read
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                registry.setdefault((st.st_dev, st.st_ino), f"{what}: {one}")


def load_input(path: str | os.PathLike, what: str = "the input model", **options) -> Model:
    """``load`` for a command's input: the model file and its external data become protected."""
    model = load(path, **options)
    protect(sorted(model.source_files), f"{what} or its external data")
    return model


def _protected_by(path: Path) -> str | None:
    registry = _RUN_INPUTS.get()
    if not registry:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return registry.get((st.st_dev, st.st_ino))


def check_output_path(path: str | os.PathLike) -> None:
    """Refuse a folder, a path whose folder does not exist, or a file this run reads
    (checked before any work, and again when writing)."""
    path = Path(path)
    if path.is_dir():
        raise ModelSaveError(f"{path}: is a folder; give a file name such as {path / 'model.onnx'}")
    if not path.parent.is_dir():
        raise ModelSaveError(f"{path.parent}: the output folder does not exist")
    what = _protected_by(path)
    if what is not None:
        raise ModelSaveError(f"{path}: refusing to overwrite a file this run reads ({what})",
                             hint="write the output to another path")


def check_output_paths(*paths: str | os.PathLike | None) -> None:
    """``check_output_path`` for each given path (None skipped); two outputs may not be one file."""
    seen: dict[str, str] = {}
    for path in paths:
        if path is None:
            continue
        check_output_path(path)
        real = os.path.realpath(path)
        if real in seen:
            raise ModelSaveError(f"{path}: given for two outputs (also as {seen[real]})",
                                 hint="give each output its own path")
        seen[real] = str(path)


def write_file(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write one output atomically: ``write(tmp)`` fills a temporary file in the
    target's folder, which then replaces ``path``; the temporary file never survives."""
    path = Path(path)
    check_output_path(path)
    tmp = _new_temp(path)
    try:
        write(tmp)
        check_output_path(path)  # the run may have read (and protected) it meanwhile
        os.replace(tmp, path)
    except OSError as exc:
        raise ModelSaveError(f"{path}: cannot write: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``write_file`` for text."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _new_temp(path: Path) -> Path:
    """An empty file beside ``path``, with the permissions a plain open() gives."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        except OSError as exc:
            raise ModelSaveError(f"{path.parent}: cannot write there: {exc.strerror}") from None
        return tmp
    raise ModelSaveError(f"{path.parent}: cannot create a temporary file there")


def _refuse_overwriting_inputs(model: Model, targets: list[Path]) -> None:
    sources = model.source_files
    for target in targets:
        if not os.path.lexists(target):
            continue
        if any(_samefile(source, target) for source in sources):
            raise ModelSaveError(
                f"{target}: refusing to overwrite the input model or its external data",
                hint="write the output to another path",
            )
        check_output_path(target)


def _samefile(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # a dangling link or a vanished source: compare the paths
        return os.path.realpath(a) == os.path.realpath(b)


def _write(model: Model, path: Path, external: bool, threshold: int, check=None) -> None:
    data_name = path.name + ".data"
    _refuse_overwriting_inputs(model, [path, path.with_name(data_name)] if external else [path])
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise ModelSaveError(f"{path.parent}: cannot write there: {exc.strerror}") from None
    try:
        tmp_model, tmp_data = tmpdir / path.name, tmpdir / data_name
        if external:
            with open(tmp_data, "wb") as out:
                with _externalized(model, out, data_name, threshold):
                    proto = model.to_proto()
                _sync(out)
            _write_proto(proto, tmp_model)
            del proto
        else:
            _write_single_file(model, tmp_model)
        if check is not None:
            check(tmp_model)
        # Data first: the model file that lands is never without its data.
        if external:
            os.replace(tmp_data, path.with_name(data_name))
        os.replace(tmp_model, path)
        _sync_folder(path.parent)
    except OSError as exc:
        raise ModelSaveError(f"{path}: cannot write: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _write_proto(proto: onnx.ModelProto, target: Path) -> None:
    if proto.ByteSize() > PROTOBUF_LIMIT:
        raise _TooLarge()
    try:
        data = proto.SerializeToString()
    except (EncodeError, ValueError) as exc:
        raise _TooLarge() from exc
    with open(target, "wb") as f:
        f.write(data)
        _sync(f)


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a folder; the renames are done either way
    finally:
        os.close(fd)


# ------------------------------------------------------------ single-file streaming


_MODEL_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_GRAPH_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_TENSOR_RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
_LENGTH_DELIMITED = 2


def _write_single_file(model: Model, target: Path) -> None:
    """Serialize ``model`` into one file holding one initializer's bytes at a time.

    Protobuf fields may come in any order and repeated fields concatenate, so the
    file is written as: the model's fields without the graph, then the graph field,
    whose body is the graph without initializers followed by each initializer.
    Exporting the whole ModelProto instead would copy every weight twice (the
    exported proto and its serialized bytes)."""
    # A constant a subgraph also holds is exported there too: it stays inline in both
    # (a placeholder would leave the subgraph's copy empty).
    in_subgraphs = {id(c) for g in list(iter_graphs(model.graph))[1:] for c in g.tensors().values()
                    if isinstance(c, gs.Constant)}
    initializers = [c for c in _initializer_constants(model.graph) if id(c) not in in_subgraphs]
    with _swapped() as swaps:
        for const in initializers:
            _stage(swaps, const, onnx.TensorProto(name=const.name), None)
        staged = {id(c) for c in initializers}
        for const in constants(model.graph):  # Constant attributes, subgraph initializers
            if id(const) not in staged and not isinstance(const._values, SparseValues):
                _stage_inline(swaps, const)
        proto = model.to_proto()
    streamed = {c.name for c in initializers}
    kept = [t for t in proto.graph.initializer if t.name not in streamed]
    del proto.graph.initializer[:]  # the placeholders; the real tensors are streamed below
    proto.graph.initializer.extend(kept)
    graph_body = proto.graph.SerializeToString()
    proto.ClearField("graph")
    head = proto.SerializeToString()
    entries = [_InitializerEntry(const) for const in initializers]
    graph_size = len(graph_body) + sum(e.framed_size for e in entries)
    if len(head) + 1 + _varint_size(graph_size) + graph_size > PROTOBUF_LIMIT:
        raise _TooLarge()
    with open(target, "wb") as out:
        out.write(head)
        out.write(_field_key(_MODEL_GRAPH) + _varint(graph_size))
        out.write(graph_body)
        for entry in entries:
            out.write(_field_key(_GRAPH_INITIALIZER) + _varint(entry.size))
            entry.write(out)
        _sync(out)


def _initializer_constants(graph: gs.Graph) -> list[gs.Constant]:
    """The constants gs exports as the graph's initializers, in its order."""
    return [
        t for t in graph.tensors().values()
        if isinstance(t, gs.Constant) and not isinstance(t._values, SparseValues)
    ]


class _InitializerEntry:
    """The serialized size of one initializer, and how to write it without
    holding more than that tensor in memory."""

    def __init__(self, const: gs.Constant):
        self.const = const
        values = const._values
        if isinstance(values, ExternalValues):
            self.header = tensor_header(values.tensor, const.name).SerializeToString()
            n = values.length
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
        values = self.const._values
        out.write(self.header)
        out.write(_field_key(_TENSOR_RAW_DATA) + _varint(values.length))
        for block in values.read_bytes():
            out.write(block)


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
