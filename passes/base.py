"""The pass API: ``Pass.run(graph, ctx) -> PassResult`` and rule-based passes.

A ``Rule`` is three steps, after onnxscript's rewriter:
  * ``match(graph, node)`` looks at structure only and mutates nothing; it
    returns a ``Match`` (the nodes and tensors involved) or None;
  * ``check(graph, match, ctx)`` decides whether the rewrite is exact here,
    mutating nothing, and returns a ``Refusal`` with a reason and node names, or
    None (go), or a plan (go: what it worked out, handed to rewrite as ``match.plan``);
  * ``rewrite(graph, match, ctx)`` changes the graph.

``RulePass`` runs a family of rules over the graph and every subgraph
(If/Loop/Scan bodies), counts rewrites per rule and hands refusals to the
context so ``--explain`` can print them.
"""
from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, ClassVar, Mapping

import onnx_graphsurgeon as gs

from onnxforge.context import PassContext, Refusal
from onnxforge.model import iter_graphs


@dataclasses.dataclass
class PassResult:
    changed: bool
    stats: dict[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_counts(cls, counts: dict[str, int]) -> "PassResult":
        counts = {k: v for k, v in counts.items() if v}
        return cls(bool(counts), counts)


class Pass:
    """Base class. Subclasses set ``name`` and implement ``run``.

    ``tolerance`` is (rtol, atol) the numeric verifier allows for this pass:
    (0, 0) for passes that must be bit-exact up to float reassociation.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    tolerance: ClassVar[tuple[float, float]] = (1e-5, 1e-6)
    # Settings a user may give this pass (recipe ``options``, ``optimize(options=...)``):
    # name -> (type, what it does). The pass reads them with ``ctx.option(self.name, key, default)``.
    options: ClassVar[Mapping[str, tuple[type, str]]] = MappingProxyType({})

    @classmethod
    def option_problem(cls, settings: Mapping[str, Any]) -> str | None:
        """Why ``settings`` are not options this pass takes (None when they are)."""
        for key, value in settings.items():
            if key not in cls.options:
                known = ", ".join(sorted(cls.options)) or "none"
                return f"pass {cls.name} has no option {key!r} (its options: {known})"
            kind = cls.options[key][0]
            accepted = (int, float) if kind is float else kind
            if isinstance(value, bool) and kind is not bool or not isinstance(value, accepted):
                return f"pass {cls.name} option {key!r} takes a {kind.__name__}, not {value!r}"
        return None

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


@dataclasses.dataclass
class Match:
    """The nodes a rule matched (``nodes[0]`` is the anchor) and what ``match`` found on the
    way (``info``: the rule's own frozen dataclass with named fields, None when the nodes say it all).
    ``plan`` is what ``check`` worked out for ``rewrite`` (its return value when that is not
    a refusal); ``check`` itself changes neither the graph nor the match."""

    nodes: list[gs.Node]
    info: Any = None
    plan: Any = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes if n.name)


class Rule:
    name: ClassVar[str] = ""
    # Op types the anchor node may have; the rule pass only offers those nodes.
    anchor_ops: ClassVar[tuple[str, ...]] = ()

    def match(self, graph: gs.Graph, node: gs.Node) -> Match | None:  # pragma: no cover
        raise NotImplementedError

    def check(self, graph: gs.Graph, match: Match, ctx: PassContext) -> Any:
        """A Refusal (with its reason), or None, or a plan for ``rewrite`` (``match.plan``)."""
        return None

    def rewrite(self, graph: gs.Graph, match: Match, ctx: PassContext) -> None:  # pragma: no cover
        raise NotImplementedError

    def refusal(self, reason: str, match: Match) -> Refusal:
        return Refusal(self.name, reason, match.names)


class RulePass(Pass):
    """Applies each rule of ``rules`` wherever it matches and its check passes.

    Each rewrite is recorded in the context (pass, rule, matched nodes) and may be
    vetoed by it (``denied_rewrites``, ``rewrite_budget``): that is how the pass manager
    rolls back one bad rewrite instead of the whole pass. Around each rewrite the
    tensors that readers outside the match read are noted; a reader that reads a
    differently named tensor afterwards reads the replacement, so ``ctx.name_map``
    records new name -> the original name it stands for."""

    rules: ClassVar[tuple[type[Rule], ...]] = ()

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        counts: dict[str, int] = {}
        for g in list(iter_graphs(graph)):
            for rule_cls in self.rules:
                counts[rule_cls.name] = counts.get(rule_cls.name, 0) + self._apply(rule_cls(), g, ctx, self.name)
            unique_node_names(g)
            # Every graph is visited here, so no call recurses into subgraphs.
            g.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False).toposort(recurse_subgraphs=False)
        return PassResult.from_counts(counts)

    @staticmethod
    def _apply(rule: Rule, graph: gs.Graph, ctx: PassContext, pass_name: str = "") -> int:
        fired = 0
        consumed: set[int] = set()
        for node in list(graph.nodes):
            if id(node) in consumed or (rule.anchor_ops and node.op not in rule.anchor_ops):
                continue
            match = rule.match(graph, node)
            if match is None or any(id(n) in consumed for n in match.nodes):
                continue
            verdict, key = verdict_of(rule, graph, match, ctx)
            if isinstance(verdict, Refusal):
                ctx.refuse(verdict)
                continue
            if verdict is not None:
                match = dataclasses.replace(match, plan=verdict)
            if ctx.rewrite_budget is not None:
                if ctx.rewrite_budget <= 0:
                    continue
                ctx.rewrite_budget -= 1
            readers = _outside_readers(graph, match)
            rule.rewrite(graph, match, ctx)
            _record_names(readers, ctx.name_map)
            ctx.rewrites.append((pass_name, rule.name, key[1]))
            consumed.update(id(n) for n in match.nodes)
            fired += 1
        return fired


def verdict_of(rule: Rule, graph: gs.Graph, match: Match, ctx: PassContext) -> tuple[Any, tuple[str, tuple[str, ...]]]:
    """(verdict, rewrite key) of ``match``: the rule's check (a Refusal, None or a plan), and a
    rewrite the pass manager rolled back (``ctx.denied_rewrites``) refused as such."""
    verdict = rule.check(graph, match, ctx)
    key = rewrite_key(rule.name, match)
    if not isinstance(verdict, Refusal) and key in ctx.denied_rewrites:
        verdict = Refusal(rule.name, "rolled back: this rewrite broke verification", key[1])
    return verdict, key


def rewrite_key(rule: str, match: Match) -> tuple[str, tuple[str, ...]]:
    """A rewrite's identity across replays of one pipeline: the rule and its matched
    nodes (an unnamed node by its op and first output)."""
    return rule, tuple(n.name or f"{n.op}:{n.outputs[0].name if n.outputs else ''}" for n in match.nodes)


def _outside_readers(graph: gs.Graph, match: Match) -> list[tuple[Any, int, str]]:
    """(reader, input index, tensor name) for the matched nodes' outputs read outside
    the match; graph outputs as (graph, position, name)."""
    inside = {id(n) for n in match.nodes}
    produced = {id(t): t.name for n in match.nodes for t in n.outputs}
    found: list[tuple[Any, int, str]] = [(None, 0, t.name) for n in match.nodes for t in n.inputs]
    for n in match.nodes:
        for t in n.outputs:
            for reader in t.outputs:
                if id(reader) not in inside:
                    found.extend((reader, i, t.name) for i, x in enumerate(reader.inputs) if x is t)
    found.extend((graph, i, produced[id(t)]) for i, t in enumerate(graph.outputs) if id(t) in produced)
    return found


def _record_names(readers: list[tuple[Any, int, str]], name_map: dict[str, str]) -> None:
    """A reader now reading a new tensor maps it to what it read before; one reading a
    matched node's input (a removed no-op) or a constant reads a tensor that stands
    for itself. Entries with reader None are those inputs' names."""
    kept = {old for reader, _i, old in readers if reader is None}
    for reader, index, old in readers:
        if reader is None:
            continue
        tensors = reader.outputs if isinstance(reader, gs.Graph) else reader.inputs
        if index >= len(tensors):
            continue
        new = tensors[index]
        if new.name and new.name != old and new.name not in kept and not isinstance(new, gs.Constant):
            name_map[new.name] = name_map.get(old, old)


def unique_node_names(graph: gs.Graph) -> None:
    """Rewrites name a new node after the node it replaces (``Conv_fused_Conv``), which
    repeats a name where the model's nodes have empty or shared names; onnxruntime refuses
    two nodes of one name in a graph. Unnamed nodes stay unnamed (``name_nodes``)."""
    name_nodes(graph.nodes, unnamed=False)


def name_nodes(nodes, *, unnamed: bool = True, duplicates: bool = True) -> None:
    """Node names made unique and present, in place, for graph-surgeon nodes or NodeProtos.

    ``duplicates``: of nodes sharing a name the first keeps it, later ones (the new ones:
    rewrites append) get the first free ``_k`` suffix. ``unnamed``: an unnamed node becomes
    ``<op>_<position>`` (``_k`` added on a clash): what stays float in int8 and fp16 is keyed
    by node name, onnxruntime names a node it rejects by its name, and pruning finds its edit
    sites in graph copies by name."""
    nodes = list(nodes)
    taken: set[str] = set()
    clashes = []
    for node in nodes:
        if not node.name:
            continue
        if node.name in taken and duplicates:
            clashes.append(node)
        else:
            taken.add(node.name)
    for node in clashes:
        base, k = node.name, 1
        while f"{base}_{k}" in taken:
            k += 1
        node.name = f"{base}_{k}"
        taken.add(node.name)
    if not unnamed:
        return
    for i, node in enumerate(nodes):
        if node.name:
            continue
        op = node.op if isinstance(node, gs.Node) else node.op_type
        name, k = f"{op}_{i}", 0
        while name in taken:
            k += 1
            name = f"{op}_{i}_{k}"
        node.name = name
        taken.add(name)
