"""Which types an op takes, for the ops a model holds: onnx's schemas for the standard
domains, onnxruntime's for the ones onnx does not know (com.microsoft contrib ops
such as DynamicQuantizeLSTM, which take float but not float16)."""
from __future__ import annotations

import functools
from typing import Iterable

import onnx


@functools.lru_cache(maxsize=1)
def _runtime_schemas() -> dict[tuple[str, str], list]:
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema
    except ImportError:
        return {}
    table: dict[tuple[str, str], list] = {}
    for schema in get_all_operator_schema():
        table.setdefault((schema.domain, schema.name), []).append(schema)
    return table


def op_schema(op_type: str, domain: str, version: int) -> tuple[object, str] | None:
    """(schema, "ONNX" | "onnxruntime") in force at ``version`` of ``domain``, or None."""
    domain = "" if domain == "ai.onnx" else domain
    try:
        return onnx.defs.get_schema(op_type, version, domain), "ONNX"
    except onnx.defs.SchemaError:
        pass
    known = [s for s in _runtime_schemas().get((domain, op_type), []) if s.since_version <= version]
    return (max(known, key=lambda s: s.since_version), "onnxruntime") if known else None


def float_only_formal(schema, node: onnx.NodeProto, skip_inputs: Iterable[int] = ()) -> str | None:
    """The name of a formal input/output ``node`` uses (optional ones it leaves out do
    not count) whose types include float but not float16, or None."""
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    skip = set(skip_inputs)
    used = [(f, i not in skip) for i, f in _in_use(list(schema.inputs), node.input)]
    used += [(f, True) for _, f in _in_use(list(schema.outputs), node.output)]
    for formal, check in used:
        type_str = getattr(formal, "type_str", None) or formal.typeStr  # onnx / onnxruntime spelling
        types = allowed.get(type_str, {type_str})
        if check and "tensor(float)" in types and "tensor(float16)" not in types:
            return formal.name
    return None


def _in_use(formals: list, names) -> list[tuple[int, object]]:
    """(position, formal) of the names given; past the formals, the last (variadic) one."""
    return [(i, formals[min(i, len(formals) - 1)]) for i, name in enumerate(names) if name and formals]
