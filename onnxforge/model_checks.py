"""What ``io.load`` refuses before importing a model: files that are not ONNX protobuf
(non-UTF-8 strings, no graph, unreadable IR versions), and onnx's checker, run on a
weight-less view (``checker_view``) so the weights are never copied for it."""
from __future__ import annotations

from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import ModelLoadError, first_line
from .external_data import EXTERNAL, expected_nbytes
from .model import copy_fields, tensor_header


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
