"""One opset_import entry for the default domain ("" and "ai.onnx" are the same).

skl2onnx 1.20 lists it twice (('', 17) twice, or '' and 'ai.onnx'); onnxruntime's
quantizers then fail with "Failed to find proper ai.onnx domain". Every ModelProto
the quant code builds from another's model-level fields, or hands to onnxruntime's
quantizers, goes through ``one_default_domain``.
"""
from __future__ import annotations

import onnx

from onnxforge.passes.matching import DEFAULT_DOMAINS  # noqa: F401  (quant imports it from here)


def one_default_domain(model: onnx.ModelProto, copy: bool = False) -> onnx.ModelProto:
    """``model`` with a single default-domain entry, "" at the highest version listed:
    changed in place, or with ``copy`` a changed copy (``model`` itself when it is fine)."""
    entries = list(model.opset_import)
    default = [o.version for o in entries if o.domain in DEFAULT_DOMAINS]
    if len(default) < 2 and not any(o.domain == "ai.onnx" for o in entries):
        return model
    if copy:
        model, source = onnx.ModelProto(), model
        model.CopyFrom(source)
    kept = [onnx.helper.make_opsetid(o.domain, o.version) for o in entries if o.domain not in DEFAULT_DOMAINS]
    del model.opset_import[:]
    model.opset_import.extend([onnx.helper.make_opsetid("", max(default))] + kept)
    return model
