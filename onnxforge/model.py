"""The in-memory model: an onnx-graphsurgeon graph plus what the graph does not hold.

onnx-graphsurgeon keeps nodes, tensors, subgraphs and functions. Everything else
the user had (IR version, opset imports of every domain, producer fields, model
doc string, metadata_props, functions as written) lives in ``meta``, a ModelProto
without a graph, and is put back on export unchanged.

Weights stored as external data stay on disk: their values are ``ExternalValues``
that read bytes from the (already validated) data file only when a pass asks.

One module (over 400 lines) on purpose: ``Model`` and the private helpers of its round trip
through ModelProto (``to_proto`` / ``from_proto``: value types, type attributes, string
tensors, opsets) change together; the graph walkers at the end are a few lines each.
"""
from __future__ import annotations

import base64
import dataclasses
import os
import stat
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from .opsets import merged_opset_imports

# Types whose raw bytes numpy reads directly (little-endian, one element per item).
_PLAIN_TYPES = {
    getattr(onnx.TensorProto, n)
    for n in (
        "FLOAT", "DOUBLE", "FLOAT16", "INT8", "INT16", "INT32", "INT64",
        "UINT8", "UINT16", "UINT32", "UINT64", "BOOL", "COMPLEX64", "COMPLEX128",
    )
}
# Fields of a TensorProto that hold or locate its data (everything else is header).
DATA_FIELDS = frozenset(
    ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data",
     "uint64_data", "external_data", "data_location")
)


def copy_fields(source, target, skip: frozenset[str] | set[str]) -> None:
    """Copy every set field of protobuf message ``source`` except ``skip`` into ``target``."""
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        repeated = getattr(field, "is_repeated", None)  # protobuf >= 5; older ones have label
        if repeated is None:
            repeated = field.label == field.LABEL_REPEATED
        if repeated:
            getattr(target, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(target, field.name).SetInParent()  # keeps an empty but set message set
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def tensor_header(tensor: onnx.TensorProto, name: str | None = None) -> onnx.TensorProto:
    """A copy of ``tensor`` without its data (name, dims, type, doc string, ...)."""
    header = onnx.TensorProto()
    copy_fields(tensor, header, DATA_FIELDS)
    if name is not None:
        header.name = name
    return header


class ExternalValues(LazyValues):
    """Lazy values of a tensor stored in an external data file.

    ``path`` is the validated absolute path of the data file; the tensor proto
    keeps its original relative location so exporting never loads the bytes.
    ``identity`` is the (st_dev, st_ino) seen when the path was validated: every
    open checks the file is still that regular file, so swapping it for a link
    after loading is caught.
    """

    def __init__(self, tensor: onnx.TensorProto, path: Path, offset: int, length: int,
                 identity: tuple[int, int] | None = None):
        super().__init__(tensor)
        self.path = Path(path)
        self.offset = offset
        self.length = length
        self.identity = identity

    def _open(self):
        f = open(self.path, "rb")
        st = os.fstat(f.fileno())
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_size < self.offset + self.length
            or (self.identity is not None and (st.st_dev, st.st_ino) != self.identity)
        ):
            f.close()
            raise OSError(f"{self.path} changed since the model was loaded")
        f.seek(self.offset)
        return f

    def read_bytes(self, chunk: int = 64 << 20) -> Iterator[bytes]:
        with self._open() as f:
            left = self.length
            while left > 0:
                block = f.read(min(chunk, left))
                if not block:
                    raise OSError(f"unexpected end of {self.path}")
                left -= len(block)
                yield block

    def load(self) -> np.ndarray:
        data_type = self.tensor.data_type
        count = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        if data_type in _PLAIN_TYPES:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).newbyteorder("<")
            with self._open() as f:
                arr = np.fromfile(f, dtype=dtype, count=count)
            if arr.size != count:
                raise OSError(f"unexpected end of {self.path}")
            return arr.astype(dtype.newbyteorder("="), copy=False).reshape(self.shape)
        # bfloat16, float8, 4-bit types: let onnx decode the raw bytes.
        inline = tensor_header(self.tensor)
        inline.raw_data = b"".join(self.read_bytes())
        return np.array(onnx.numpy_helper.to_array(inline))

    def __str__(self) -> str:
        return f"ExternalValues(shape={self.shape}, dtype={self.dtype}, file={self.path.name})"


@dataclasses.dataclass
class Model:
    """A loaded model: ``graph`` (onnx-graphsurgeon) plus ``meta`` (the ModelProto minus its graph)."""

    graph: gs.Graph
    meta: onnx.ModelProto
    source: Path | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    # Graph inputs that are also initializers (overridable defaults, IR >= 4):
    # onnx-graphsurgeon imports them as constants only; export puts them back.
    overridable_inputs: list[str] = dataclasses.field(default_factory=list)
    input_order: list[str] = dataclasses.field(default_factory=list)
    # Types onnx-graphsurgeon cannot hold (map, optional, sparse, sequences of those),
    # by value name, in every graph: export puts them back.
    value_types: dict[str, onnx.TypeProto] = dataclasses.field(default_factory=dict)

    @property
    def source_files(self) -> set[Path]:
        """The input model file and every external data file it reads from."""
        files: set[Path] = set()
        if self.source is not None:
            files.add(self.source.resolve())
        for values in external_values(self.graph):
            files.add(values.path)
        return files

    def opset(self, domain: str = "") -> int | None:
        for imp in self.meta.opset_import:
            if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
                return imp.version
        return None

    def set_opset(self, version: int, domain: str = "") -> None:
        for imp in self.meta.opset_import:
            if imp.domain == domain or (domain == "" and imp.domain == "ai.onnx"):
                imp.version = version
                break
        else:
            self.meta.opset_import.append(onnx.helper.make_opsetid(domain, version))
        if domain == "":
            self.graph.opset = version

    def ensure_domain(self, domain: str, version: int = 1) -> None:
        """Declare an opset domain (e.g. com.microsoft) that a fused op needs."""
        if self.opset(domain) is None:
            self.meta.opset_import.append(onnx.helper.make_opsetid(domain, version))

    def copy(self) -> "Model":
        meta = onnx.ModelProto()
        meta.CopyFrom(self.meta)
        return Model(self.graph.copy(), meta, self.source, list(self.notes),
                     list(self.overridable_inputs), list(self.input_order), dict(self.value_types))

    def to_proto(self, toposort: bool = True) -> onnx.ModelProto:
        """Export to a ModelProto; external tensors stay references, nothing is loaded.

        The exported graph is kept and the model fields are merged into it from
        ``meta`` (copying the graph instead would hold in-memory weights twice).
        ``toposort=False``: the nodes in their present order (the caller knows it is one)."""
        graph = self.graph
        if toposort:
            graph.toposort(recurse_subgraphs=True)
        _strings_as_tensor_protos(graph)
        proto = gs.export_onnx(graph, do_type_check=False)
        added = [imp for imp in proto.opset_import if self.opset(imp.domain) is None]
        for field, _ in proto.ListFields():
            if field.name != "graph":
                proto.ClearField(field.name)
        proto.MergeFrom(self.meta)  # meta has no graph: only the model fields are set
        self._restore_overridable_inputs(proto.graph)
        if proto.ir_version < 4:
            self._list_initializers_as_inputs(proto.graph)
        restore_value_types(proto.graph, self.value_types)
        _restore_type_attributes(proto.graph)
        # Domains the graph uses but meta does not declare (a pass added a node of a
        # new domain without calling ensure_domain) are declared at version 1.
        for imp in added:
            if imp.domain not in ("", "ai.onnx") and imp.domain not in _function_domains(self.meta):
                proto.opset_import.append(onnx.helper.make_opsetid(imp.domain, imp.version))
        return proto

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, source: Path | None = None) -> "Model":
        proto = _type_attributes_as_strings(proto)
        graph = gs.import_onnx(proto)
        # Model-local functions live in ``meta`` and are exported from there; graphsurgeon's
        # copies are dropped: its toposort recurses without end when a model has both
        # functions and subgraphs (silero_vad with a local function).
        graph.functions = []
        _tensor_kinds_for_export(graph)
        inits = {t.name for t in proto.graph.initializer}
        overridable = [i.name for i in proto.graph.input if i.name in inits]
        order = [i.name for i in proto.graph.input] if overridable else []
        model = cls(graph, model_fields(proto), source, overridable_inputs=overridable, input_order=order,
                    value_types=collect_value_types(proto.graph))
        _dedupe_opsets(model)
        if overridable:
            model.notes.append(
                f"{len(overridable)} graph input(s) have default initializers ({', '.join(overridable[:3])}"
                f"{', ...' if len(overridable) > 3 else ''}); constant folding keeps what reads them (an If on "
                "one stays; --pin-input NAME fixes one to its default), other passes treat them as constants, so "
                "feeding other values after optimization may not take effect"
            )
        return model

    def _restore_overridable_inputs(self, graph: onnx.GraphProto) -> None:
        """Re-list overridable initializers as graph inputs, in the user's order."""
        if not self.overridable_inputs:
            return
        inits = {t.name for t in graph.initializer}
        present = {i.name: i for i in graph.input}
        # Types come from the graph's constants, not the exported initializers: the
        # streaming writer exports empty placeholders for those (data_type 0).
        tensors = self.graph.tensors()
        for name in self.overridable_inputs:
            const = tensors.get(name)
            if name in inits and name not in present and isinstance(const, gs.Constant):
                elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(const.dtype)) if not isinstance(
                    const.dtype, int) else const.dtype
                present[name] = onnx.helper.make_tensor_value_info(name, elem, list(const.shape))
        rank = {name: i for i, name in enumerate(self.input_order)}
        ordered = sorted(present.values(), key=lambda v: rank.get(v.name, len(rank)))
        del graph.input[:]
        graph.input.extend(ordered)

    def _list_initializers_as_inputs(self, graph: onnx.GraphProto) -> None:
        """IR < 4 reads an initializer only when it is also a graph input: a constant a pass
        added (a folded value) is listed after the user's inputs, as exporters of that IR
        listed every weight (onnxruntime keeps such inputs as overridable initializers).
        Types come from the graph's constants (the streaming writer's placeholders have none)."""
        listed = {i.name for i in graph.input}
        tensors = self.graph.tensors()
        for init in graph.initializer:
            const = tensors.get(init.name)
            if init.name in listed or not isinstance(const, gs.Constant):
                continue
            elem = const.dtype if isinstance(const.dtype, int) else onnx.helper.np_dtype_to_tensor_dtype(
                np.dtype(const.dtype))
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, elem, list(const.shape)))
            listed.add(init.name)


def _iter_value_infos(graph: onnx.GraphProto) -> Iterator[onnx.ValueInfoProto]:
    """Inputs, outputs and value_info of ``graph`` and of every subgraph in it."""
    yield from graph.input
    yield from graph.output
    yield from graph.value_info
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _iter_value_infos(sub)


def _graphsurgeon_holds(t: onnx.TypeProto) -> bool:
    kind = t.WhichOneof("value")
    if kind == "tensor_type":
        return True
    return kind == "sequence_type" and t.sequence_type.elem_type.WhichOneof("value") == "tensor_type"


_TYPE_ATTR = "\x00onnxforge-type-proto:"


def iter_graph_protos(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph in it (If/Loop/Scan bodies, nested), parents first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from iter_graph_protos(sub)


def _iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    return (node for g in iter_graph_protos(graph) for node in g.node)


def _type_attributes_as_strings(proto: onnx.ModelProto) -> onnx.ModelProto:
    """graphsurgeon drops TYPE_PROTO attributes (Optional's ``type``: an empty optional
    loses its type and onnxruntime refuses the model). They travel through it as
    tagged strings on a copy of ``proto``; ``_restore_type_attributes`` turns them back."""
    if not any(a.type == onnx.AttributeProto.TYPE_PROTO for n in _iter_nodes(proto.graph) for a in n.attribute):
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for node in _iter_nodes(copy.graph):
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TYPE_PROTO:
                encoded = _TYPE_ATTR + base64.b64encode(attr.tp.SerializeToString()).decode()
                attr.CopyFrom(onnx.helper.make_attribute(attr.name, encoded))
    return copy


def _restore_type_attributes(graph: onnx.GraphProto) -> None:
    tag = _TYPE_ATTR.encode()
    for node in _iter_nodes(graph):
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.STRING and attr.s.startswith(tag):
                tp = onnx.TypeProto.FromString(base64.b64decode(attr.s[len(tag):]))
                attr.CopyFrom(onnx.helper.make_attribute(attr.name, tp))


def _strings_as_tensor_protos(graph: gs.Graph) -> None:
    """graphsurgeon exports numpy string constants as raw_data, which ONNX forbids for
    strings (the export raises): they are handed over as TensorProtos instead."""
    for const in constants(graph):
        values = const._values
        if isinstance(values, np.ndarray) and values.dtype.kind in "OUS":
            const._values = LazyValues(onnx.numpy_helper.from_array(values.astype(object), const.name))


def _dedupe_opsets(model: "Model") -> None:
    """One opset_import entry per domain (onnxforge.opsets): skl2onnx writes the default
    domain twice, which onnxruntime's quantizer refuses."""
    merged, doubled = merged_opset_imports(model.meta.opset_import)
    if not doubled:
        return
    del model.meta.opset_import[:]
    model.meta.opset_import.extend(merged)
    model.notes.append(f"opset_import listed {', '.join(doubled)} more than once; kept one entry "
                       "each, at the highest version")


def _tensor_kinds_for_export(graph: gs.Graph) -> None:
    """graphsurgeon imports map and optional values with a ``type`` its exporter cannot
    write (it crashes); they export as tensors and ``restore_value_types`` puts the
    real type back."""
    for g in iter_graphs(graph):
        for tensor in g.tensors().values():
            if getattr(tensor, "type", "tensor_type") not in ("tensor_type", "sequence_type", "sparse_tensor_type"):
                tensor.type = "tensor_type"
                tensor.dtype, tensor.shape = None, None  # gs put the TypeProto there


def collect_value_types(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    types: dict[str, onnx.TypeProto] = {}
    for info in _iter_value_infos(graph):
        if info.HasField("type") and not _graphsurgeon_holds(info.type):
            types.setdefault(info.name, onnx.TypeProto()).CopyFrom(info.type)
    return types


def restore_value_types(graph: onnx.GraphProto, types: dict[str, onnx.TypeProto]) -> None:
    """Put back the types graphsurgeon lost (no type, or tensors of element type 0)."""
    if not types:
        return
    for info in _iter_value_infos(graph):
        saved = types.get(info.name)
        if saved is None:
            continue
        # Only types graphsurgeon cannot hold are saved, and no pass changes those.
        info.type.CopyFrom(saved)


def model_fields(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` without its graph, made without copying the graph first."""
    meta = onnx.ModelProto()
    copy_fields(proto, meta, {"graph"})
    return meta


def _function_domains(meta: onnx.ModelProto) -> set[str]:
    return {f.domain for f in meta.functions}


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph and, depth first, every subgraph (If/Loop/Scan bodies) inside it."""
    yield graph
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                yield from iter_graphs(value)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    if isinstance(item, gs.Graph):
                        yield from iter_graphs(item)


def constants(graph: gs.Graph) -> Iterator[gs.Constant]:
    """Every distinct Constant tensor in the graph and its subgraphs."""
    seen: set[int] = set()
    for g in iter_graphs(graph):
        candidates = list(g.tensors().values())
        for node in g.nodes:  # Constant nodes keep their value as an attribute
            candidates.extend(v for v in node.attrs.values() if isinstance(v, gs.Constant))
        for tensor in candidates:
            if isinstance(tensor, gs.Constant) and id(tensor) not in seen:
                seen.add(id(tensor))
                yield tensor


def external_values(graph: gs.Graph) -> Iterator[ExternalValues]:
    for const in constants(graph):
        if isinstance(const._values, ExternalValues):
            yield const._values


def parameter_count(graph: gs.Graph) -> int:
    return int(sum(int(np.prod(c.shape, dtype=np.int64)) if c.shape else 1 for c in constants(graph)))


def weight_bytes(graph: gs.Graph) -> int:
    total = 0
    for const in constants(graph):
        values = const._values
        if isinstance(values, LazyValues):
            total += int(values.nbytes)
        else:
            total += int(np.asarray(values).nbytes)
    return total
