"""Weights shared, not copied, between the model, its snapshots, onnxruntime sessions,
onnx's checker and shape inference.

A -O3 run makes dozens of sessions, checks and shape inferences, plus snapshots for
rollback; exporting the whole model for each one copied every weight two or three
times over (the exported proto, its serialized bytes, onnxruntime's parse of them),
so a 650 MB model peaked near 10x its weights. Here:

* ``lifted_proto``: the model exported with each *liftable* weight (a main-graph
  initializer of at least ``LIFT_BYTES`` in a type numpy holds exactly, not an
  overridable input) as a typed graph input of the same name, dims and type, unless
  the model rounds activations at run time (``ROUNDS_ACTIVATIONS``): onnxruntime's float
  kernels add in another order for a weight fed at run time than for a constant one,
  and a rounding downstream turns that last-bit noise into a whole quantization step
  (MiniLM with dynamic INT8: 0.0088 apart), so such a model is embedded whole. Only its
  header is exported. The checker and shape inference judge the same graph (a large
  weight's values never decide a shape), and nothing of the weight is copied.
* ``model_session``: an onnxruntime session of that proto, fed the model's own
  arrays as those inputs on every run: onnxruntime's CPU provider reads a contiguous
  numpy input in place. An op that insists on a constant weight (session or run
  fails) gets the embedded model as before, so a verdict never depends on this.
  With graph optimizations on, onnxruntime folds and fuses around initializers, so
  such a session reads the model from a temporary file with external data instead.
* ``share_weights``: the model's large inline weights become read-only numpy arrays
  (loaded once from the parsed file, which can then be freed), and ``stage_shared``
  lets a snapshot reattach the very same value objects instead of copies: read-only,
  so no pass can change either model through them (a pass assigns new values).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from .model import _PLAIN_TYPES, ExternalValues, Model, constants, iter_graphs

LIFT_BYTES = 4096  # smaller tensors stay inline: shape inference reads their values
_COMPLEX = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}
_MARK = "\x00onnxforge-shared:"


# ------------------------------------------------------------------ what is lifted


def value_type(const: gs.Constant) -> int | None:
    """The ONNX element type a constant exports as, when numpy holds it exactly, else None."""
    values = const._values
    if isinstance(values, SparseValues):
        return None
    if isinstance(values, LazyValues):
        elem = int(values.tensor.data_type)
    else:
        array = np.asarray(values)
        if array.dtype.kind not in "biuf":
            return None
        elem = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        export = const.export_dtype
        exported = export if isinstance(export, int) else onnx.helper.np_dtype_to_tensor_dtype(np.dtype(export))
        if exported != elem:  # bfloat16 & co. held as float32: the export converts
            return None
    return elem if elem in _PLAIN_TYPES and elem not in _COMPLEX else None


# Ops that round a tensor computed at run time (MatMulNBits only at accuracy_level 4).
ROUNDS_ACTIVATIONS = frozenset({"QuantizeLinear", "DynamicQuantizeLinear", "DynamicQuantizeMatMul",
                                "DynamicQuantizeLSTM", "MatMulNBits"})


def rounds_activations(node: gs.Node) -> bool:
    return node.op in ROUNDS_ACTIVATIONS and (node.op != "MatMulNBits" or node.attrs.get("accuracy_level", 0) == 4)


def nbytes(const: gs.Constant) -> int:
    values = const._values
    if isinstance(values, ExternalValues):
        return int(values.length)
    if isinstance(values, LazyValues):
        return int(values.nbytes)
    return int(getattr(values, "nbytes", 0))


def liftable(graph: gs.Graph, keep: set[str] = frozenset()) -> list[gs.Constant]:
    """Main-graph initializers exported as typed inputs instead (see the module docstring).
    A constant a subgraph also reads is exported there too, so it stays."""
    if any(rounds_activations(n) for g in iter_graphs(graph) for n in g.nodes):
        return []
    in_subgraphs = {id(t) for g in list(iter_graphs(graph))[1:] for t in g.tensors().values()
                    if isinstance(t, gs.Constant)}
    return [t for t in graph.tensors().values()
            if isinstance(t, gs.Constant) and id(t) not in in_subgraphs and t.name not in keep
            and nbytes(t) >= LIFT_BYTES and value_type(t) is not None]


def _header(const: gs.Constant, elem: int) -> onnx.TensorProto:
    return onnx.TensorProto(name=const.name, data_type=elem, dims=[int(d) for d in const.shape])


@contextlib.contextmanager
def staged_headers(lifted: list[gs.Constant], elem: int | None = None) -> Iterator[None]:
    """While exporting, each constant of ``lifted`` exports as its header alone (no bytes);
    ``elem``: their element type, when the caller knows it (else read from each)."""
    from .io_export import _stage, _swapped

    with _swapped() as swaps:
        for const in lifted:
            _stage(swaps, const, _header(const, elem or value_type(const)), None)
        yield


def lift_to_inputs(graph: onnx.GraphProto, names: set[str]) -> None:
    """Initializers named in ``names`` become graph inputs of their dims and type."""
    if not names:
        return
    listed = {i.name for i in graph.input}
    kept = []
    for init in graph.initializer:
        if init.name not in names:
            kept.append(init)
        elif init.name not in listed:  # IR < 4 lists every initializer as an input already
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)


def lifted_proto(model: Model) -> tuple[onnx.ModelProto, list[gs.Constant]]:
    """The model as a proto with its liftable weights as typed graph inputs (nothing of
    them copied), and those constants. External tensors not lifted are read inline, so
    the proto runs without a data file."""
    from .io_export import _stage_inline, _swapped

    lifted = liftable(model.graph, set(model.overridable_inputs))
    staged = {id(c) for c in lifted}
    with staged_headers(lifted), _swapped() as swaps:
        for const in constants(model.graph):
            if id(const) not in staged and not isinstance(const._values, SparseValues):
                _stage_inline(swaps, const)
        proto = model.to_proto()
    lift_to_inputs(proto.graph, {c.name for c in lifted})
    return proto, lifted


def weight_array(const: gs.Constant) -> np.ndarray:
    """The values to feed for a lifted constant: the model's own array when it holds
    one (no copy), else loaded for this use only (the model keeps its lazy values)."""
    values = const._values
    array = values.load() if isinstance(values, LazyValues) else np.asarray(values)
    return np.asarray(array, order="C")  # contiguous, and a scalar stays 0-d (ascontiguousarray makes it [1])


# ------------------------------------------------------------------ sessions


class SharedWeightSession:
    """An onnxruntime session whose lifted weights are fed from the model's arrays:
    ``get_inputs`` lists the model's own inputs, ``run`` adds the weights. When the
    lifted form does not run (an op wants a constant weight) the embedded model's
    session (``fallback()``) takes over for good."""

    def __init__(self, session, weights: dict[str, np.ndarray], fallback):
        self._session, self._weights, self._fallback = session, weights, fallback

    def get_inputs(self):
        return [i for i in self._session.get_inputs() if i.name not in self._weights]

    def run(self, output_names, input_feed, run_options=None):
        if not self._weights:
            return self._session.run(output_names, input_feed, run_options)
        try:
            return self._session.run(output_names, {**input_feed, **self._weights}, run_options)
        except Exception:
            if run_options is not None and getattr(run_options, "terminate", False):
                raise  # stopped by the caller's clock, not refused
            self._session, self._weights = self._fallback(), {}
            return self._session.run(output_names, input_feed, run_options)

    def __getattr__(self, name):
        return getattr(self._session, name)


@contextlib.contextmanager
def model_session(model: Model, options, providers: list[str]) -> Iterator:
    """A session of an in-memory model sharing its weights (see ``SharedWeightSession``)."""
    import onnxruntime as ort

    if options.graph_optimization_level != ort.GraphOptimizationLevel.ORT_DISABLE_ALL:
        # onnxruntime folds, fuses and prepacks around initializers: weights fed as inputs
        # would be another graph to it. A file with external data holds no second copy.
        with _embedded_session(model, options, providers, external=True) as session:
            yield session
        return
    with contextlib.ExitStack() as stack:
        def embedded():
            return stack.enter_context(_embedded_session(model, options, providers))

        proto, lifted = lifted_proto(model)
        if not lifted:
            yield ort.InferenceSession(proto.SerializeToString(), options, providers=providers)
            return
        try:
            session = ort.InferenceSession(proto.SerializeToString(), options, providers=providers)
        except Exception:
            yield embedded()
            return
        del proto
        yield SharedWeightSession(session, {c.name: weight_array(c) for c in lifted}, embedded)


@contextlib.contextmanager
def _embedded_session(model: Model, options, providers: list[str], external: bool = False) -> Iterator:
    """The whole model handed to onnxruntime (its weights copied): through a temporary
    folder, weights in external data, when ``external`` or when they live in external data."""
    import tempfile
    from pathlib import Path

    import onnxruntime as ort

    from .io import save
    from .model import external_values

    if external or any(True for _ in external_values(model.graph)):
        with tempfile.TemporaryDirectory(prefix="onnxforge-verify-") as tmp:
            path = Path(tmp) / "model.onnx"
            save(model, path, external_data=True)
            yield ort.InferenceSession(str(path), options, providers=providers)
        return
    yield ort.InferenceSession(model.to_proto().SerializeToString(), options, providers=providers)


# ------------------------------------------------------------------ snapshots


def share_weights(model: Model) -> None:
    """Large inline weights become read-only arrays loaded once; large arrays become
    read-only; small inline tensors get their own protos. Afterwards nothing refers to
    the parsed file's protobuf (which holds every weight once more) and it is freed."""
    for g in iter_graphs(model.graph):  # gs keeps the parsed model's opset_import field
        if g.import_domains is not None:
            g.import_domains = [_own(d, onnx.OperatorSetIdProto) for d in g.import_domains]
    for const in constants(model.graph):
        values = const._values
        if isinstance(values, SparseValues):
            const._values = SparseValues(_own(values.tensor, onnx.SparseTensorProto))
        elif isinstance(values, ExternalValues):
            const._values = ExternalValues(_own(values.tensor, onnx.TensorProto), values.path, values.offset,
                                           values.length, values.identity)
        elif isinstance(values, LazyValues):
            big = values.nbytes >= LIFT_BYTES and value_type(const) is not None
            if big and values.tensor.data_location != onnx.TensorProto.EXTERNAL:
                const._values = _read_only(_array_of(values.tensor))
            else:
                const._values = LazyValues(_own(values.tensor, onnx.TensorProto))
        elif isinstance(values, np.ndarray) and values.nbytes >= LIFT_BYTES:
            values.flags.writeable = False


def _array_of(tensor: onnx.TensorProto) -> np.ndarray:
    """A tensor's values, from raw bytes without a second copy (read-only, backed by them)."""
    if not tensor.HasField("raw_data"):
        return onnx.numpy_helper.to_array(tensor)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    array = np.frombuffer(tensor.raw_data, dtype=dtype).reshape([int(d) for d in tensor.dims])
    return array.astype(dtype.newbyteorder("="), copy=False)


def _own(message, cls):
    copy = cls()
    copy.CopyFrom(message)
    return copy


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _shareable(const: gs.Constant) -> bool:
    values = const._values
    if isinstance(values, ExternalValues):  # its proto alone would point at no checked file
        return True
    if isinstance(values, SparseValues) or nbytes(const) < LIFT_BYTES:
        return False
    if isinstance(values, LazyValues):  # never changed in place: a load makes a new array
        return values.tensor.data_type != onnx.TensorProto.UNDEFINED
    return value_type(const) is not None  # an array exported as another type is copied


@contextlib.contextmanager
def stage_shared(model: Model) -> Iterator[list]:
    """While exporting, each large constant exports as a marked header; ``reattach``
    gives the copy imported from that export the same value objects (arrays made
    read-only first)."""
    from .io_export import _stage, _swapped

    shared: list = []
    with _swapped() as swaps:
        for const in constants(model.graph):
            if not _shareable(const):
                continue
            values = const._values
            if isinstance(values, np.ndarray):
                values.flags.writeable = False
            header = onnx.TensorProto(name=const.name, dims=[int(d) for d in const.shape],
                                      doc_string=f"{_MARK}{len(shared)}")
            header.data_type = values.tensor.data_type if isinstance(values, LazyValues) else value_type(const)
            shared.append((values, const.data_location))
            _stage(swaps, const, header, None)
        yield shared


def reattach(copy: Model, shared: list) -> None:
    for const in constants(copy.graph):
        tensor = getattr(const._values, "tensor", None)
        doc = getattr(tensor, "doc_string", "") if isinstance(tensor, onnx.TensorProto) else ""
        if doc.startswith(_MARK):
            const._values, const.data_location = shared[int(doc[len(_MARK):])]
