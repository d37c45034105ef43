"""Registered passes run on a ModelProto: how quant's graph rewrites go through the rule
machinery (match / check with a reason / rewrite, listed by ``onnxforge passes``)."""
from __future__ import annotations

import onnx

from onnxforge.context import PassContext
from onnxforge.model import Model
from onnxforge.opsets import one_default_domain


def apply_passes(proto: onnx.ModelProto, names: tuple[str, ...], max_iterations: int = 8,
                 options: dict | None = None) -> tuple[onnx.ModelProto, int]:
    """``proto`` with the registered passes ``names`` run to a fixpoint (their rules fire on
    one node at a time: Conv -> Mul -> Add takes two rounds), and how often a rule fired;
    ``proto`` itself when none did. Not verified here: the quantizer compares the result
    with the float model. ``options``: pass name -> its settings."""
    from onnxforge.passes.registry import resolve

    model = Model.from_proto(proto)
    ctx = PassContext(model=model, options=dict(options or {}))
    passes = [resolve(name) for name in names]
    fired = 0
    for _ in range(max_iterations):
        round_fired = sum(sum(p.run(model.graph, ctx).stats.values()) for p in passes)
        fired += round_fired
        if not round_fired:
            break
    return (one_default_domain(model.to_proto()), fired) if fired else (proto, 0)
