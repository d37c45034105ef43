"""Outer-scope names that If/Loop/Scan bodies read: implicit inputs of the node holding them.

A body may read any tensor of the graphs around it by name, without listing it
as an input of the node. A rewrite that changes such a tensor's type (fp16) has
to give the body a tensor of the type it was written for: ``rename_outer_reads``
points the body's reads (at any depth) at another name.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import onnx


def bodies(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def outer_reads(node: onnx.NodeProto) -> list[str]:
    """Names ``node``'s bodies read from outside them, in first-read order."""
    found: dict[str, None] = {}
    for body in bodies(node):
        for name in _free_names(body):
            found.setdefault(name)
    return list(found)


def _free_names(graph: onnx.GraphProto) -> list[str]:
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    free: dict[str, None] = {}
    for node in graph.node:
        for name in list(node.input) + outer_reads(node):
            if name and name not in defined:
                free.setdefault(name)
        defined.update(node.output)
    for output in graph.output:
        if output.name not in defined:
            free.setdefault(output.name)
    return list(free)


def rename_outer_reads(node: onnx.NodeProto, mapping: Mapping[str, str]) -> None:
    """Point the reads of outer names in ``node``'s bodies at ``mapping[name]`` (in place)."""
    for body in bodies(node):
        _rename_free(body, mapping)


def _rename_free(graph: onnx.GraphProto, mapping: Mapping[str, str]) -> None:
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping and name not in defined:
                node.input[i] = mapping[name]
        inner = {k: v for k, v in mapping.items() if k not in defined}
        if inner:
            rename_outer_reads(node, inner)
        defined.update(node.output)
    for output in graph.output:
        if output.name in mapping and output.name not in defined:
            output.name = mapping[output.name]
