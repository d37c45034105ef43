"""Registered passes run on a ModelProto: how quant's graph rewrites go through the rule
machinery (match / check with a reason / rewrite, listed by ``onnxforge passes``).

Every change to the graph quant returns is such a pass, onnxruntime's quantizers included
(ort_qdq.py, ort_dynamic.py wrap one call each behind a rule that says per node what the call
is given), and so are the float baseline's library calls (graphsurgeon's constant folding, onnx's
version converter, onnxruntime's basic offline rewrites: baseline_rules.py, run by ``apply_call``).
What quant still edits on ModelProtos directly:
  * copies made only to measure, never written: extra graph outputs for a session (calibrate,
    budget, equalize), weights as graph inputs (bias_correct, hessians), the model cut above some
    tensors (proto_graph.upstream_of), the per-node int8 switches of contribution.py;
  * inside the wrapped onnxruntime calls, the float weights the call left unread
    (formats._without_unused_initializers) and the types it is given (formats._with_inferred_types:
    value_info, no node changed);
  * on the output, what changes no computation: names for unnamed nodes (prepare.name_unnamed_nodes:
    the exclusions are keyed by name) and the CPU class in the metadata (finish.marked_for)."""
from __future__ import annotations

import onnx

from onnxforge.context import PassContext
from onnxforge.model import Model
from onnxforge.opsets import one_default_domain


def apply_passes(proto: onnx.ModelProto, names: tuple[str, ...], max_iterations: int = 8,
                 options: dict | None = None, toposort: bool = True) -> tuple[onnx.ModelProto, int]:
    """``proto`` with the registered passes ``names`` run to a fixpoint (their rules fire on
    one node at a time: Conv -> Mul -> Add takes two rounds), and how often a rule fired;
    ``proto`` itself when none did. Not verified here: the quantizer compares the result
    with the float model. ``options``: pass name -> its settings. ``toposort=False``: the
    passes leave the nodes in an order that is topological already, kept as it is (onnxruntime's
    quantizer's: sorting it by depth would change the order the weights are saved in)."""
    model = Model.from_proto(proto)
    fired = apply_to_model(model, names, max_iterations, options)
    return (one_default_domain(model.to_proto(toposort=toposort)), fired) if fired else (proto, 0)


def apply_to_model(model: Model, names: tuple[str, ...], max_iterations: int = 8, options: dict | None = None) -> int:
    """``apply_passes`` on ``model`` itself (changed in place): how often a rule fired."""
    from onnxforge.passes.registry import resolve

    ctx = PassContext(model=model, options=dict(options or {}))
    passes = [resolve(name) for name in names]
    fired = 0
    for _ in range(max_iterations):
        round_fired = sum(sum(p.run(model.graph, ctx).stats.values()) for p in passes)
        fired += round_fired
        if not round_fired:
            break
    return fired


def apply_call(proto: onnx.ModelProto, name: str, options: dict | None = None) -> tuple[onnx.ModelProto, PassContext]:
    """The registered whole-model call ``name`` (baseline_rules.WholeModelCall) on ``proto`` itself, and its
    context (refusals, rewrites): its rule judges an imported graph (weights referenced, not copied),
    the call acts on ``proto``, so the result is the call's, with no export in between; ``proto`` itself
    when the rule accepts nothing. ``options``: that pass's settings."""
    from onnxforge.passes.registry import resolve

    model = Model.from_proto(proto)
    ctx = PassContext(model=model, options={name: dict(options or {})})
    out = resolve(name).apply(proto, model.graph, ctx)
    return (proto if out is None else out), ctx
