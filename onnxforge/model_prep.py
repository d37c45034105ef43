"""What the pass manager does to a model around a run: an independent snapshot (external
weights re-attached, not copied), exporters' negative dims made unknown, and the input
shapes the user pinned (``--input-shape``).
"""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from .errors import OptionError
from .model import ExternalValues, Model, constants, iter_graphs


def snapshot(model: Model) -> Model:
    """An independent copy: serialized and re-imported, so no pass can mutate the
    original's arrays in place. External weights stay on disk and are re-attached."""
    external = {}
    for const in constants(model.graph):
        values = const._values
        if isinstance(values, ExternalValues):
            external[_external_key(values.tensor)] = values
    copy = Model.from_proto(model.to_proto(), model.source)
    copy.notes = list(model.notes)
    for const in constants(copy.graph):
        tensor = getattr(const._values, "tensor", None)
        if tensor is not None and tensor.data_location == onnx.TensorProto.EXTERNAL:
            src = external.get(_external_key(tensor))
            if src is not None:
                const._values = ExternalValues(tensor, src.path, src.offset, src.length)
    return copy


def _external_key(tensor: onnx.TensorProto) -> tuple[str, str]:
    info = {e.key: e.value for e in tensor.external_data}
    return info.get("location", ""), info.get("offset", "0")


def forget_negative_dims(model: Model) -> None:
    """Exporters (paddle2onnx) write -1 for unknown dims of outputs and value_info;
    ONNX has no negative dims, and strict shape inference rejects them once inputs
    are pinned. They mean "unknown", so say that."""
    for g in iter_graphs(model.graph):
        for tensor in g.tensors().values():
            if isinstance(tensor, gs.Variable) and tensor.shape is not None and tensor not in g.inputs:
                if any(isinstance(d, int) and d < 0 for d in tensor.shape):
                    tensor.shape = [None if isinstance(d, int) and d < 0 else d for d in tensor.shape]


def apply_input_shapes(model: Model, shapes: dict[str, tuple]) -> None:
    """Pin graph input shapes (``--input-shape``) so folding can resolve Shape chains."""
    if not shapes:
        return
    inputs = {t.name: t for t in model.graph.inputs}
    unknown = [n for n in shapes if n not in inputs]
    if unknown:
        raise OptionError(
            f"--input-shape names {', '.join(unknown)}, which the model does not have",
            hint=f"the inputs are {', '.join(inputs)}",
        )
    for name, dims in shapes.items():
        tensor = inputs[name]
        if tensor.shape is not None and len(tensor.shape) != len(dims):
            raise OptionError(f"--input-shape {name}: rank {len(dims)} but the model's input has rank {len(tensor.shape)}")
        for have, want in zip(tensor.shape or [], dims):
            if isinstance(have, int) and have >= 0 and have != want:
                raise OptionError(f"--input-shape {name}: dim {have} is fixed in the model, cannot pin it to {want}")
        tensor.shape = list(dims)
