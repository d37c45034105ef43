"""The in-memory model: an onnx-graphsurgeon graph plus what the graph does not hold.

onnx-graphsurgeon keeps nodes, tensors, subgraphs and functions. Everything else
the user had (IR version, opset imports of every domain, producer fields, model
doc string, metadata_props, functions as written) lives in ``meta``, a ModelProto
without a graph, and is put back on export unchanged.

Weights stored as external data stay on disk: their values are ``ExternalValues``
that read bytes from the (already validated) data file only when a pass asks.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues


class ExternalValues(LazyValues):
    """Lazy values of a tensor stored in an external data file.

    ``path`` is the validated absolute path of the data file; the tensor proto
    keeps its original relative location so exporting never loads the bytes.
    """

    def __init__(self, tensor: onnx.TensorProto, path: Path, offset: int, length: int):
        super().__init__(tensor)
        self.path = path
        self.offset = offset
        self.length = length

    def read_bytes(self, chunk: int = 64 << 20) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            left = self.length
            while left > 0:
                block = f.read(min(chunk, left))
                if not block:
                    raise OSError(f"unexpected end of {self.path}")
                left -= len(block)
                yield block

    def load(self) -> np.ndarray:
        from onnx_graphsurgeon.importers.onnx_importer import get_numpy_type

        dtype = np.dtype(get_numpy_type(self.dtype))
        count = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        arr = np.fromfile(self.path, dtype=dtype, count=count, offset=self.offset)
        return arr.reshape(self.shape)

    def __str__(self) -> str:
        return f"ExternalValues(shape={self.shape}, dtype={self.dtype}, file={self.path.name})"


@dataclasses.dataclass
class Model:
    """A loaded model: ``graph`` (onnx-graphsurgeon) plus ``meta`` (the ModelProto minus its graph)."""

    graph: gs.Graph
    meta: onnx.ModelProto
    source: Path | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

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
        return Model(self.graph.copy(), meta, self.source, list(self.notes))

    def to_proto(self) -> onnx.ModelProto:
        """Export to a ModelProto; external tensors stay references, nothing is loaded."""
        graph = self.graph
        graph.toposort(recurse_subgraphs=True)
        exported = gs.export_onnx(graph, do_type_check=False)
        proto = onnx.ModelProto()
        proto.CopyFrom(self.meta)
        proto.graph.CopyFrom(exported.graph)
        # gs may add opset domains for ops it saw; keep the user's plus any new ones.
        have = {imp.domain for imp in proto.opset_import}
        for imp in exported.opset_import:
            if imp.domain not in have and imp.domain not in ("", "ai.onnx"):
                proto.opset_import.append(imp)
        return proto

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, source: Path | None = None) -> "Model":
        graph = gs.import_onnx(proto)
        meta = onnx.ModelProto()
        meta.CopyFrom(proto)
        meta.ClearField("graph")
        return cls(graph, meta, source)


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


def samefile(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()
