"""The main graph of a ModelProto as the quantizer's measurements read it: who makes and
who reads each tensor (``graph_maps``), and the model cut to what some of its tensors
depend on (``upstream_of``: onnxruntime runs every node of a session whatever is fetched,
so measuring a few tensors runs only the nodes above them: learned rounding's per-group
sessions, bias correction's per-conv runs, GPTQ/AWQ's sequential moments), and layers cut
into groups that can be measured in one run (``independent_groups``: a step that corrects
a layer measures it after every upstream correction; two layers neither of which feeds the
other can share a run)."""
from __future__ import annotations

from typing import Sequence

import onnx


def graph_maps(model: onnx.ModelProto):
    """(producer by tensor, readers by tensor, initializers by name, graph output names) of the main graph."""
    producers = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    inits = {t.name: t for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    return producers, readers, inits, outputs


def independent_groups(model: onnx.ModelProto, items: Sequence[tuple[str, str]]) -> list[list[int]]:
    """``items`` (the tensor an item's layer writes, the tensor measured for it), in graph order, cut
    into consecutive groups of indices in which no item's measured tensor depends on the layer of
    another item of the same group."""
    writes: dict[str, int] = {}
    for i, (written, _measured) in enumerate(items):
        writes[written] = writes.get(written, 0) | 1 << i
    above: dict[str, int] = {}  # tensor -> bit mask of the items whose layer is upstream of it
    for node in model.graph.node:
        mask = 0
        for name in list(node.input) + outer_names(node):
            mask |= above.get(name, 0)
        for name in node.output:
            mask |= writes.get(name, 0)
        for name in node.output:
            above[name] = mask
    groups: list[list[int]] = []
    members = 0
    for i, (_written, measured) in enumerate(items):
        if not groups or above.get(measured, 0) & members:
            groups.append([])
            members = 0
        groups[-1].append(i)
        members |= 1 << i
    return groups


def upstream_of(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """``model`` cut to the nodes ``names`` depend on (onnxruntime runs every node of a session
    whatever is fetched), with ``names`` as its outputs and only the initializers those nodes read."""
    producers = {o: n for n in model.graph.node for o in n.output}
    needed, stack = set(), list(names)
    while stack:
        node = producers.get(stack.pop())
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        stack.extend(list(node.input) + outer_names(node))
    kept = [n for n in model.graph.node if id(n) in needed]
    read = {name for n in kept for name in list(n.input) + outer_names(n)}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:], out.graph.output[:]
    out.graph.node.extend(kept)
    out.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    inits = [t for t in out.graph.initializer if t.name in read]
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    return out


def with_outputs(model: onnx.ModelProto, names: Sequence[str], copy: bool = True) -> onnx.ModelProto:
    """``model`` (a copy unless ``copy=False``) with ``names`` also as graph outputs (each once, after
    its own): what a session that measures inner tensors runs. A measurement view, never written."""
    out = model
    if copy:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    out.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in have)
    return out


def outer_names(node: onnx.NodeProto) -> list[str]:
    """Names a node's subgraphs read (a superset of the outer-scope ones)."""
    names = []
    for attr in node.attribute:
        for graph in list(attr.g.node and [attr.g] or []) + list(attr.graphs):
            for inner in graph.node:
                names.extend(inner.input)
                names.extend(outer_names(inner))
    return names
