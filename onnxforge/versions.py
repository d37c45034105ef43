"""What the installed onnxruntime can read, and capping a model to it.

The limits are probed once per process by building tiny models, because
onnxruntime publishes no API for them and its release notes lag the code.
"""
from __future__ import annotations

import functools

import onnx
from onnx import helper

from .model import Model


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
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def runtime_limits() -> tuple[int, int]:
    """(max ir_version, max default-domain opset) the installed onnxruntime loads."""
    ir = max((v for v in range(onnx.IR_VERSION, 6, -1) if _loads(v, 13)), default=7)
    top = onnx.defs.onnx_opset_version()
    opset = max((v for v in range(top, 12, -1) if _loads(min(ir, 8), v) or _loads(ir, v)), default=13)
    return ir, opset


def cap_model_versions(model: Model) -> None:
    """Lower ir_version/opset to what onnxruntime reads; record what was lowered in model.notes."""
    max_ir, max_opset = runtime_limits()
    if model.meta.ir_version > max_ir:
        model.notes.append(f"ir_version lowered from {model.meta.ir_version} to {max_ir} (onnxruntime's limit)")
        model.meta.ir_version = max_ir
    opset = model.opset("")
    if opset is not None and opset > max_opset:
        from .errors import ModelLoadError

        converted = _convert_opset(model, max_opset)
        if converted is None:
            raise ModelLoadError(
                f"opset {opset} is newer than onnxruntime reads ({max_opset}) and cannot be converted down",
                hint="upgrade onnxruntime or re-export with an older opset",
            )
        model.graph, model.meta = converted.graph, converted.meta
        model.notes.append(f"opset lowered from {opset} to {max_opset} (onnxruntime's limit)")


def _convert_opset(model: Model, target: int) -> Model | None:
    from onnx import version_converter

    try:
        proto = version_converter.convert_version(model.to_proto(), target)
    except Exception:
        return None
    return Model.from_proto(proto, model.source)
