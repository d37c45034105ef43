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

The parts: model_checks.py (what load refuses), external_data.py (the reference
checks), write_guard.py (outputs never replace inputs), io_export.py (how tensors
are written without holding them twice); io re-exports their public names.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError, EncodeError
from onnx_graphsurgeon.ir.tensor import SparseValues

from .errors import ModelLoadError, ModelSaveError, first_line
from .external_data import (  # noqa: F401  (re-exported: io is where callers look)
    EXTERNAL, _attach_external_values, _validate_external_data, check_external_location, expected_nbytes,
    external_entries, iter_tensor_protos,
)
from .io_export import (  # noqa: F401  (ALIGNMENT re-exported)
    _GRAPH_INITIALIZER, _MODEL_GRAPH, ALIGNMENT, _externalized, _field_key, _InitializerEntry, _stage, _stage_inline,
    _swapped, _varint, _weight_bytes,
)
from .model import Model, constants, external_values, iter_graphs
from .model_checks import (  # noqa: F401  (re-exported)
    _check_header, _non_utf8_string, _run_checker, _varint_size, checker_view, raw_data_length, runtime_only_op,
)
from .write_guard import (  # noqa: F401  (re-exported: every command writes through these)
    _refuse_overwriting_inputs, _sync, _sync_folder, check_output_path, check_output_paths, guarding_inputs, protect,
    write_file, write_text,
)

PROTOBUF_LIMIT = 2**31 - 1
# Keep headroom below protobuf's hard limit: graph structure is serialized too.
EXTERNAL_DATA_THRESHOLD = 1_900_000_000


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


def _import(proto: onnx.ModelProto, path: Path) -> Model:
    try:
        return Model.from_proto(proto, source=path)
    except Exception as exc:  # gs raises bare exceptions (and UnicodeDecodeError) on malformed graphs
        raise ModelLoadError(f"{path}: cannot import the graph: {first_line(exc)}") from None


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


def load_input(path: str | os.PathLike, what: str = "the input model", **options) -> Model:
    """``load`` for a command's input: the model file and its external data become protected."""
    model = load(path, **options)
    protect(sorted(model.source_files), f"{what} or its external data")
    return model


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


# ------------------------------------------------------------ single-file streaming


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
