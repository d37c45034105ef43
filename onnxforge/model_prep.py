"""What the pass manager does to a model around a run: an independent snapshot (external
weights re-attached, not copied), exporters' negative dims made unknown, the input
shapes the user pinned (``--input-shape``) and the inputs the user pinned to a value
(``--pin-input``: from then on a constant, which folds like any other).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import OptionError
from .model import Model, iter_graphs


def snapshot(model: Model) -> Model:
    """An independent copy: exported and re-imported. Large weights are not copied but
    shared (``shared_weights.stage_shared``): external ones stay on disk, arrays are
    read-only, so no pass can mutate either model's values in place."""
    from .shared_weights import reattach, stage_shared

    with stage_shared(model) as shared:
        proto = model.to_proto()
    copy = Model.from_proto(proto, model.source)
    del proto
    reattach(copy, shared)
    copy.notes = list(model.notes)
    return copy


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


def apply_pinned_inputs(model: Model, pins: dict[str, tuple | None]) -> None:
    """Make each pinned input a constant and drop it from the graph inputs: its default
    initializer (``NAME``) or the given values (``NAME=V[,V...]``, in the input's declared
    type and static shape). Only then may passes specialise the model on that value."""
    if not pins:
        return
    inputs = {t.name: t for t in model.graph.inputs}
    tensors = model.graph.tensors()
    for name, values in pins.items():
        default = tensors.get(name) if name in model.overridable_inputs else None
        if name not in inputs and default is None:
            raise OptionError(f"--pin-input names {name}, which is not a graph input of the model",
                              hint=f"the inputs are {', '.join(list(inputs) + list(model.overridable_inputs))}")
        if default is not None:
            model.overridable_inputs.remove(name)
            if values is not None:
                default.values = _pinned_array(name, values, default.dtype, default.shape)
            continue
        if values is None:
            raise OptionError(f"--pin-input {name}: the input has no default initializer; give its value, "
                              f"e.g. --pin-input {name}=1")
        var = inputs[name]
        const = gs.Constant(name, _pinned_array(name, values, var.dtype, var.shape))
        for node in list(var.outputs):  # readers in every graph (subgraphs read outer values)
            for i, t in enumerate(node.inputs):
                if t is var:
                    node.inputs[i] = const
        model.graph.inputs = [t for t in model.graph.inputs if t is not var]
        if name in model.input_order:
            model.input_order.remove(name)
    if not model.overridable_inputs:  # the load-time warning about defaults no longer applies
        model.notes = [n for n in model.notes if "have default initializers" not in n]


def _pinned_array(name: str, values: tuple, dtype, shape) -> np.ndarray:
    dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype) if isinstance(dtype, int) else np.dtype(dtype)
    if dtype is None or dtype.kind not in "biuf":
        raise OptionError(f"--pin-input {name}: only numeric or bool inputs can be pinned")
    dims = list(shape) if shape is not None else [len(values)] if len(values) > 1 else []
    if any(not isinstance(d, int) or d < 0 for d in dims):
        raise OptionError(f"--pin-input {name}: the input's shape {shape} is not static; pin it with "
                          "--input-shape or give a model whose input has a fixed shape")
    if int(np.prod(dims, dtype=np.int64)) != len(values):
        raise OptionError(f"--pin-input {name}: {len(values)} value(s) for an input of shape {list(dims)}")
    array = np.asarray(values, dtype=np.float64)
    if dtype.kind in "biu" and not np.array_equal(array, np.round(array)):
        raise OptionError(f"--pin-input {name}: the input is {dtype}; the values must be whole numbers")
    return array.astype(dtype).reshape(dims)
