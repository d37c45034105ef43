"""What the installed onnxruntime can read, and capping a model to it.

onnxruntime publishes no API for the newest IR version and default-domain opset
it loads, and its release notes lag the code, so the limits are probed by
building tiny Identity models. Both limits are monotone (a runtime that loads
opset N loads every older one), so a binary search needs about four sessions
per limit; the answer is memoized for the process because the installed
runtime cannot change under a running interpreter.
"""
from __future__ import annotations

import functools

import onnx
from onnx import helper

from .errors import ModelLoadError
from .opsets import default_opset

# The search ranges: IR 3 introduced opset imports; opset 7 is the oldest ORT reads.
LOWEST_IR, LOWEST_OPSET = 3, 7
PROBE_OPSET = 13  # an opset every supported onnxruntime reads, used while probing the IR


def _loads(ir_version: int, opset: int) -> bool:
    import onnxruntime as ort

    node = helper.make_node("Identity", ["x"], ["y"])
    vi = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph([node], "probe", [vi[0]], [vi[1]])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return True
    except Exception:  # onnxruntime raises its own Fail/InvalidGraph/... classes
        return False


def _highest(low: int, high: int, accepted) -> int:
    """Largest v in [low, high] with accepted(v), assuming accepted is monotone
    decreasing and accepted(low) holds."""
    while low < high:
        mid = (low + high + 1) // 2
        if accepted(mid):
            low = mid
        else:
            high = mid - 1
    return low


@functools.lru_cache(maxsize=1)
def runtime_limits() -> tuple[int, int]:
    """(max ir_version, max default-domain opset) the installed onnxruntime loads."""
    max_ir = _highest(LOWEST_IR, onnx.IR_VERSION, lambda v: _loads(v, PROBE_OPSET))
    max_opset = _highest(LOWEST_OPSET, onnx.defs.onnx_opset_version(), lambda v: _loads(max_ir, v))
    return max_ir, max_opset


def cap_proto_versions(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Lower ir_version and the default opset to what onnxruntime reads.

    Returns the (possibly converted) proto and one note per change. The opset is
    lowered with onnx's version converter; everything the converter does not
    carry over (functions, doc strings, metadata, other domains) is copied back
    from the original. External-data references are kept as references.
    """
    max_ir, max_opset = runtime_limits()
    notes: list[str] = []
    opset = default_opset(proto, missing=None)
    if opset is not None and opset > max_opset:
        proto = _convert_opset(proto, opset, max_opset)
        notes.append(f"opset lowered from {opset} to {max_opset} (the installed onnxruntime's limit)")
    if proto.ir_version > max_ir:
        notes.append(f"ir_version lowered from {proto.ir_version} to {max_ir} (the installed onnxruntime's limit)")
        proto.ir_version = max_ir
    return proto, notes


def _convert_opset(proto: onnx.ModelProto, opset: int, target: int) -> onnx.ModelProto:
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(proto, target)
    except Exception as exc:  # ConvertError, InferenceError, RuntimeError from the C++ side
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(
            f"opset {opset} is newer than the installed onnxruntime reads ({target}) "
            f"and onnx cannot convert it down: {first}",
            hint="upgrade onnxruntime, or re-export the model with an older opset",
        ) from exc
    _restore_model_fields(proto, converted, target)
    return converted


def _restore_model_fields(original: onnx.ModelProto, converted: onnx.ModelProto, target: int) -> None:
    """Put back the model-level fields the version converter may drop or rewrite."""
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(converted, field, getattr(original, field))
    for field in ("metadata_props", "functions", "training_info"):
        converted.ClearField(field)
        getattr(converted, field).extend(getattr(original, field))
    converted.graph.doc_string = original.graph.doc_string
    converted.ClearField("opset_import")
    for imp in original.opset_import:
        version = target if imp.domain in ("", "ai.onnx") else imp.version
        converted.opset_import.append(helper.make_opsetid(imp.domain, version))
