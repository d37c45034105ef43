"""The float baseline's library calls as registered passes (prepare.py runs them in this order):
``graphsurgeon-fold-constants``, ``raise-opset``, ``onnxruntime-basic``.

Each wraps one call that takes the whole model and gives one back, as the wrapped onnxruntime
quantizers do (ort_qdq.py): its rule says what the call is given, and what not with the reason
(``--explain`` shows it); a refused node is kept out of the call where the call can leave one
out, and otherwise the call is not made.

* ``graphsurgeon-fold-constants`` (rule ``graphsurgeon-folded-node``): onnx-graphsurgeon's
  ``fold_constants``: Constant nodes become initializers, a node whose inputs are all
  computable from constants (and a Shape of a statically shaped tensor) is evaluated once by
  onnxruntime and stored. Identity: a deterministic op on constants gives the same tensor on
  every run. Refused, and kept out of the fold (with what reads it): a random op (folding
  would store one draw for every run), a rewrite the pass manager rolled back. Q/DQ and
  DynamicQuantizeLinear are not candidates (graphsurgeon never folds them).
* ``raise-opset`` (rule ``onnx-version-conversion``): onnx's version converter brings the
  default domain to the option ``minimum`` (13 unless given: DequantizeLinear's ``axis``).
  Exact: each adapter writes the same computation in the newer op version (Squeeze's axes
  attribute becomes an input, ...). An IR 3 model is lifted to IR 4 first (IR 3 reads an
  initializer only when it is also a graph input; the converter would not see weights held
  as initializers only), and the result is at least IR 7. Refused, whole: a model with local
  functions (the converter drops them, and the nodes calling them no longer load), a rewrite
  rolled back.
* ``onnxruntime-basic`` (rule ``onnxruntime-basic-rewrites``): the graph onnxruntime writes
  after its *basic* session-time rewrites (constant folding, Conv + BatchNormalization / Add /
  Mul, Pad + Conv, Identity and Dropout removal), which emit standard ONNX ops only and stay
  portable across providers. Float reassociation only (folded Conv weights). Weights still in
  external files under the option ``base_dir`` are streamed to onnxruntime, never loaded here.
  Refused, whole (onnxruntime takes the model or nothing): a node of an op onnxruntime has
  no schema for and no local function defines (it would refuse the model), a rewrite rolled
  back.

``apply_call`` (registered.py) runs one of them on a ModelProto itself: the rule judges an
imported graph (weights not copied), the call acts on the proto, so the bytes are the call's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from types import MappingProxyType
from typing import Mapping

import onnx
import onnx_graphsurgeon as gs

from onnxforge.context import PassContext, Refusal
from onnxforge.model import iter_graph_protos, iter_graphs
from onnxforge.opsets import default_opset
from onnxforge.passes.base import Match, Pass, PassResult, Rule, rewrite_key
from onnxforge.passes.cleanup.common import NONDETERMINISTIC_OPS, has_subgraph
from onnxforge.passes.matching import DEFAULT_DOMAINS

from .ort_qdq import adopt, verdicts

log = logging.getLogger("onnxforge.quant")

MIN_QDQ_OPSET = 13
NO_FOLD_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})  # graphsurgeon's


class WholeModelCall(Pass):
    """A pass wrapping one call on the whole model (module docstring): its one rule judges the
    graph (``verdicts``: accepted keys, refused names); ``call`` makes the new model from the
    exported proto and the refused names; the model becomes it."""

    per_node = False  # the rule judges each node (else: once, anchored on the main graph's first node)

    def needed(self, graph: gs.Graph, ctx: PassContext) -> bool:
        """Whether the call has anything to do (judging is skipped when not)."""
        return True

    def call(self, proto: onnx.ModelProto, ctx: PassContext, excluded: list[str]) -> onnx.ModelProto:  # pragma: no cover
        raise NotImplementedError

    def fired(self, accepted: list[tuple[str, ...]], out: onnx.ModelProto) -> list[tuple[str, ...]]:
        """The accepted keys the call acted on (all of them by default)."""
        return accepted

    def apply(self, proto: onnx.ModelProto, graph: gs.Graph, ctx: PassContext) -> onnx.ModelProto | None:
        """The call's model for ``proto`` (whose graph ``graph`` is), None when nothing is accepted;
        refusals and rewrites recorded in ``ctx``."""
        if not graph.nodes or not self.needed(graph, ctx):
            return None
        rule = self.rules[0]()
        accepted, excluded = verdicts(rule, graph, ctx, iter_graphs(graph) if self.per_node else [graph])
        if not accepted:
            return None
        out = self.call(proto, ctx, excluded)
        ctx.rewrites.extend((self.name, rule.name, key) for key in self.fired(accepted, out))
        return out

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if ctx.model is None or ctx.model.graph is not graph:
            raise ValueError(f"{self.name} runs on a whole model (its graph is handed to one call)")
        before = len(ctx.rewrites)
        out = self.apply(ctx.model.to_proto(), graph, ctx)
        if out is None:
            return PassResult(False)
        adopt(ctx.model, out)
        return PassResult.from_counts({self.rules[0].name: len(ctx.rewrites) - before})


@dataclasses.dataclass(frozen=True)
class ForeignNodes:
    """A whole-model rule's match: the nodes outside the ONNX default domain, in every graph
    (contrib ops, model-local function calls, custom ops)."""

    nodes: tuple[gs.Node, ...]

    @classmethod
    def of(cls, graph: gs.Graph) -> "ForeignNodes":
        return cls(tuple(n for g in iter_graphs(graph) for n in g.nodes if n.domain not in DEFAULT_DOMAINS))


class WholeModelRule(Rule):
    """A rule of a call that takes the model whole: it matches once, on the main graph's first node."""

    def match(self, graph, node):
        return Match([node], ForeignNodes.of(graph)) if node is graph.nodes[0] else None


# ------------------------------------------------------------------ graphsurgeon's constant folding
class GraphsurgeonFoldedNode(Rule):
    """A node graphsurgeon's fold evaluates and stores (check: or why not)."""

    name = "graphsurgeon-folded-node"

    def __init__(self):
        self._computable: dict[int, set[str]] = {}  # per graph of this judging: tensors computable from constants

    def match(self, graph, node):
        if node.op == "Constant" or _static_shape(node) or _inputs_in(node, self.computable(graph)):
            return Match([node])
        return None

    def check(self, graph, match, ctx):
        node = match.nodes[0]
        if node.op in NONDETERMINISTIC_OPS and node.domain in DEFAULT_DOMAINS:
            return self.refusal(f"random op {node.op}: folding would store one draw for every run", match)
        return None

    def computable(self, graph: gs.Graph) -> set[str]:
        """Names of the tensors of ``graph`` computable from its constants without a random op
        (graph order is topological), as graphsurgeon's fold finds them."""
        names = self._computable.get(id(graph))
        if names is None:
            names = {name for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
            for node in graph.nodes:
                random = node.op in NONDETERMINISTIC_OPS and node.domain in DEFAULT_DOMAINS
                if node.op == "Constant" or _static_shape(node) or (not random and _inputs_in(node, names)):
                    names.update(t.name for t in node.outputs)
            self._computable[id(graph)] = names
        return names


def _inputs_in(node: gs.Node, names: set[str]) -> bool:
    """``node`` reads only tensors in ``names`` (omitted optional inputs aside), at least one, and
    is one graphsurgeon folds (no subgraph, no Q/DQ, no attribute reference)."""
    inputs = [t for t in node.inputs if not t.is_empty()]
    return (bool(inputs) and node.op not in NO_FOLD_OPS and not has_subgraph(node)
            and not any(isinstance(a, gs.Node.AttributeRef) for a in node.attrs.values())
            and all(t.name in names for t in inputs))


def _static_shape(node: gs.Node) -> bool:
    """A Shape of a tensor whose shape is known and static (graphsurgeon's shape folding)."""
    if node.op != "Shape" or node.domain not in DEFAULT_DOMAINS or not node.inputs:
        return False
    shape = node.inputs[0].shape
    return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape)


class GraphsurgeonFold(WholeModelCall):
    name = "graphsurgeon-fold-constants"
    description = "Constant nodes to initializers and constant subexpressions folded by onnx-graphsurgeon"
    tolerance = (1e-5, 1e-6)  # stored values are onnxruntime's; a consumer may take a pre-packed kernel path
    rules = (GraphsurgeonFoldedNode,)
    per_node = True

    def call(self, proto, ctx, excluded):
        graph = gs.import_onnx(proto)
        kept = set(excluded)
        try:
            with _graphsurgeon_quiet():  # its failed partial folds print onnxruntime errors
                graph.fold_constants(error_ok=True, should_exclude_node=lambda n: _key(n) in kept)
        except Exception as exc:  # noqa: BLE001 - folding is an improvement, not a precondition
            log.warning("constant folding failed (%s)", exc)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return with_graph(proto, graph)

    def fired(self, accepted, out):
        # a folded node is gone: a named one by its name, an unnamed one (``op:output``) by its output
        left = {x for g in iter_graph_protos(out.graph) for n in g.node for x in (n.name, f"{n.op_type}:{n.output[0] if n.output else ''}")}
        return [key for key in accepted if key[0] not in left]


def _key(node: gs.Node) -> str:
    """The name ``verdicts`` hands a refused node by (an unnamed one: op and first output)."""
    return rewrite_key("", Match([node]))[1][0]


@contextlib.contextmanager
def _graphsurgeon_quiet():
    """graphsurgeon's warnings off (onnxruntime's basic level folds what it leaves)."""
    from onnx_graphsurgeon.logger import G_LOGGER

    previous = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.ERROR + 1
    try:
        yield
    finally:
        G_LOGGER.severity = previous


# ------------------------------------------------------------------ onnx's version converter
class VersionConversion(WholeModelRule):
    """The model's default domain raised by onnx's version converter (check: or why not)."""

    name = "onnx-version-conversion"

    def check(self, graph, match, ctx):
        functions = {(f.domain, f.name) for f in ctx.model.meta.functions} if ctx.model is not None else set()
        calling = [n for n in match.info.nodes if (n.domain, n.op) in functions]
        if calling:
            names = ", ".join(sorted({f"{n.domain}:{n.op}" for n in calling}))
            return Refusal(self.name, f"model-local functions ({names}): onnx's version converter drops them, and the "
                                      "nodes calling them would not load", tuple(n.name or n.op for n in calling))
        return None


class RaiseOpset(WholeModelCall):
    name = "raise-opset"
    description = "the default domain raised to an opset (default 13) by onnx's version converter"
    tolerance = (0.0, 0.0)  # each adapter writes the same computation in the newer op version
    rules = (VersionConversion,)
    options: Mapping = MappingProxyType({"minimum": (int, "the opset to raise the default domain to (default 13)")})

    def needed(self, graph, ctx):
        return default_opset(ctx.model.meta, missing=_minimum(ctx)) < _minimum(ctx)

    def call(self, proto, ctx, excluded):
        return converted(proto, _minimum(ctx))


def _minimum(ctx: PassContext) -> int:
    return ctx.option(RaiseOpset.name, "minimum", MIN_QDQ_OPSET)


def converted(proto: onnx.ModelProto, minimum: int) -> onnx.ModelProto:
    """onnx's version converter on ``proto`` (IR 3 lifted to 4 first, the result at least IR 7)."""
    if proto.ir_version < 4:
        # IR 3 reads an initializer only when it is also a graph input; the passes before
        # this leave weights as initializers only, which the converter would not see.
        lifted = onnx.ModelProto()
        lifted.CopyFrom(proto)
        lifted.ir_version = 4
        proto = lifted
    out = onnx.version_converter.convert_version(proto, minimum)
    if out.ir_version < 7:
        out.ir_version = 7
    return out


# ------------------------------------------------------------------ onnxruntime's basic level
class OrtBasicRewrites(WholeModelRule):
    """The model handed to onnxruntime's basic rewrites (check: or why not)."""

    name = "onnxruntime-basic-rewrites"

    def check(self, graph, match, ctx):
        known = onnxruntime_ops()
        if known is None:
            return None
        functions = {(f.domain, f.name) for f in ctx.model.meta.functions} if ctx.model is not None else set()
        unknown = [n for n in match.info.nodes if (n.domain, n.op) not in known and (n.domain, n.op) not in functions]
        if unknown:
            ops = ", ".join(sorted({f"{n.domain}:{n.op}" for n in unknown}))
            return Refusal(self.name, f"no onnxruntime op or local function for {ops}: onnxruntime would refuse the model",
                           tuple(n.name or n.op for n in unknown))
        return None


def onnxruntime_ops() -> set[tuple[str, str]] | None:
    """(domain, op) of every op schema onnxruntime registers; None when this build does not say."""
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

        return {(s.domain, s.name) for s in get_all_operator_schema()}
    except (ImportError, AttributeError, RuntimeError):
        return None


class OrtBasic(WholeModelCall):
    name = "onnxruntime-basic"
    description = "onnxruntime's basic offline rewrites (constant folding, Conv+BN/Add/Mul, Pad+Conv): standard ops only"
    tolerance = (1e-4, 1e-5)  # folded Conv weights: float reassociation, as fuse-conv-bn
    rules = (OrtBasicRewrites,)
    options: Mapping = MappingProxyType({
        "base_dir": (object, "folder the model's external data files are relative to (streamed, not loaded)"),
    })

    def call(self, proto, ctx, excluded):
        from .prepare import ort_offline

        source = ctx.model.source if ctx.model is not None else None
        base_dir = ctx.option(self.name, "base_dir") or (source.resolve().parent if source is not None else None)
        return ort_offline(proto, level="basic", base_dir=base_dir)


def with_graph(proto: onnx.ModelProto, graph: gs.Graph) -> onnx.ModelProto:
    """``proto``'s model-level fields around ``graph`` exported. The exported graph
    is kept, not copied: each copy is the model's size again at the peak."""
    from .prepare import with_model_fields

    return with_model_fields(gs.export_onnx(graph, do_type_check=False), proto)


PASSES = (GraphsurgeonFold, RaiseOpset, OrtBasic)
