"""One opset_import entry per domain, the default domain spelled "" ("" and "ai.onnx" are one).

skl2onnx 1.20 lists the default domain twice (('', 17) twice, or '' and 'ai.onnx');
onnxruntime's quantizers then fail with "Failed to find proper ai.onnx domain". The loader
merges the entries of every model it reads (with a note), and every ModelProto the quant
code builds from another's model-level fields, or hands to onnxruntime's quantizers, goes
through ``one_default_domain``. The highest version listed for a domain is kept.
"""
from __future__ import annotations

from typing import Iterable

import onnx

DEFAULT_DOMAINS = (None, "", "ai.onnx")  # the default domain as graphs spell it (graphsurgeon: None)


def merged_opset_imports(entries: Iterable[onnx.OperatorSetIdProto]) -> tuple[list[onnx.OperatorSetIdProto], list[str]]:
    """(one entry per domain in first-seen order, at its highest version, the default domain
    as ""; the domains that were listed more than once)."""
    merged: dict[str, int] = {}
    doubled = []
    for entry in entries:
        key = "" if entry.domain in DEFAULT_DOMAINS else entry.domain
        if key in merged:
            doubled.append(key or "ai.onnx")
        merged[key] = max(merged.get(key, entry.version), entry.version)
    return [onnx.helper.make_opsetid(d, v) for d, v in merged.items()], sorted(set(doubled))


def one_default_domain(model: onnx.ModelProto, copy: bool = False) -> onnx.ModelProto:
    """``model`` with one opset_import entry per domain (see the module docstring): changed in
    place, or with ``copy`` a changed copy (``model`` itself when it is fine)."""
    merged, doubled = merged_opset_imports(model.opset_import)
    if not doubled and not any(o.domain == "ai.onnx" for o in model.opset_import):
        return model
    if copy:
        model, source = onnx.ModelProto(), model
        model.CopyFrom(source)
    del model.opset_import[:]
    model.opset_import.extend(merged)
    return model


def default_opset(model: onnx.ModelProto, missing: int | None = 1) -> int | None:
    """The default domain's version in ``model.opset_import`` (``missing`` when none is listed)."""
    return next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), missing)
