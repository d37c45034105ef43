"""Which candidates of an INT8 plan to return to float first: most sensitive first.

The prior is each node's own int8 contribution (contribution.py); the first
``MAX_MEASURED`` weighted nodes in that order are then measured end to end (each
returned to float alone, the metric's gain on the feeds), since local noise
misjudges error that grows downstream. Each measurement is one evaluation of the
search budget (budget.SearchBudget), so the ranking is bounded by a count, never
by seconds.
"""
from __future__ import annotations

from . import budget as budget_mod
from .contribution import ranked_by_contribution
from .plan import _Plan

MAX_MEASURED = 8  # weighted nodes measured end to end; the rest keep their prior order
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def ranked_by_sensitivity(baseline, quantized, plan: _Plan, feeds, metric_fn, search: budget_mod.SearchBudget,
            workers=None, metric: str | None = None) -> list[str]:
    """Candidates, most sensitive first.

    The cheap prior is each node's own int8 contribution (contribution.py: that node
    alone reading int8 activations, N + 1 runs of one model; the ranking `onnxforge
    debug` prints). Then
    the first MAX_MEASURED weighted nodes (in prior order) are returned to float
    one at a time and the gain
    in the metric on ``feeds`` measured: the end-to-end effect, which the local
    noise misjudges when early layers' error grows downstream. Each measurement
    is one of ``search``'s evaluations; the fallback's groups stay reserved."""
    nodes = {n.name: n for n in baseline.graph.node if n.name in plan.candidates}
    local = ranked_by_contribution(quantized, nodes, feeds)
    prior = local + [n for n in nodes if n not in set(local)]
    reference = budget_mod.run_outputs(baseline, feeds)
    base_score = metric_fn(reference, budget_mod.run_outputs(quantized, feeds))
    gains: dict[str, float] = {}
    reserve = min(budget_mod.FALLBACK_GROUPS, len(prior))
    chosen = []
    for name in [n for n in prior if nodes[n].op_type in WEIGHTED][:MAX_MEASURED]:
        if search.left <= reserve or not search.take():
            break
        chosen.append(name)
    if workers is not None:  # independent per candidate: scored on the workers
        from .shards import score_models

        scores = score_models([plan.build([n]) for n in chosen], feeds, reference, metric, workers)
        gains = {n: s - base_score for n, s in zip(chosen, scores)}
    for name in chosen if workers is None else ():
        gains[name] = metric_fn(reference, budget_mod.run_outputs(plan.build([name]), feeds)) - base_score
    measured = sorted(gains, key=lambda k: -gains[k])
    return measured + [n for n in prior if n not in gains]
