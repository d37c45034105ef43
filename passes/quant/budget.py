"""Accuracy budget: how far the quantized model may drift from the float one, and
which nodes to give back to float when it drifts too far.

Metrics (score in [0, 1] where 1 is the float model; the budget holds when
``score >= 1 - max_drop``):
  * cosine: mean over validation feeds of the cosine similarity of all float
    outputs concatenated;
  * sqnr: the noise-to-signal power ratio N/S of the outputs mapped to
    score = 1 - N/S (so max_drop 0.01 means SQNR >= 20 dB);
  * top1: fraction of feeds (and rows) whose argmax over the last axis of the
    first output agrees with the float model;
  * a user callable ``metric(reference_outputs, candidate_outputs) -> score``
    (lists of per-feed output lists).

Sensitivity: quantize ranks nodes by their own contribution (contribution.py:
the output error with that node alone reading int8 activations, the ranking
``onnxforge debug`` prints). ``node_sensitivity`` is the local measure it
replaced (the N/S a node adds at its output: its output's N/S minus the worst
at its inputs), kept for the comparison in benchmarks/quant_keep_float.py.
The fallback returns the most sensitive nodes to float one group at a time until the budget holds, nothing is left, or the search has
spent its evaluations, keeping the best model evaluated so far.

Determinism: what the search may do is counted in evaluations (a model built
and scored), never in seconds, so a run's result does not depend on how busy
the machine is (SearchBudget). A time limit is optional and only stops the
search early; a run it stopped is reported as such and is not reproducible.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx

from onnxforge.errors import OptionError
from onnxforge.output_diff import cosine as similarity

from .ortsession import return_freed_memory, session as ort_session

METRICS = ("cosine", "sqnr", "top1")

Outputs = list[list[np.ndarray]]  # per feed, per output


def run_outputs(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]], names: list[str] | None = None, *, optimize: bool = True) -> Outputs:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    session = ort_session(model, options)
    wanted = {i.name for i in session.get_inputs()}
    outputs = [session.run(names, {k: v for k, v in feed.items() if k in wanted}) for feed in feeds]
    del session
    return_freed_memory()
    return outputs


def _float_parts(outputs: list) -> np.ndarray:
    """The float tensors among ``outputs``, flattened and concatenated; a sequence output
    (a list), a map (a dict) or an optional counts by the tensors it holds."""
    parts = [np.asarray(t, dtype=np.float64).ravel() for t in _tensors(outputs)
             if np.issubdtype(np.asarray(t).dtype, np.floating)]
    return np.concatenate(parts) if parts else np.zeros(0)


def _tensors(value) -> list:
    if value is None:
        return []
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _tensors(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return [value]


def cosine(reference: Outputs, candidate: Outputs) -> float:
    """Mean over samples of the cosine of the sample's float outputs, concatenated."""
    values = [similarity(_float_parts(ref), _float_parts(cand)) for ref, cand in zip(reference, candidate)]
    return float(np.mean(values)) if values else 1.0


def noise_ratio(a: np.ndarray, b: np.ndarray) -> float:
    signal = float(np.sum(np.square(a, dtype=np.float64)))
    noise = float(np.sum(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    return noise / signal if signal > 0 else (0.0 if noise == 0 else 1.0)


def sqnr_score(reference: Outputs, candidate: Outputs) -> float:
    ratios = [noise_ratio(_float_parts(r), _float_parts(c)) for r, c in zip(reference, candidate)]
    return 1.0 - float(np.mean(ratios)) if ratios else 1.0


def top1(reference: Outputs, candidate: Outputs) -> float:
    agree = total = 0
    for ref, cand in zip(reference, candidate):
        a, b = np.asarray(ref[0]), np.asarray(cand[0])
        ia, ib = a.reshape(-1, a.shape[-1]).argmax(-1), b.reshape(-1, b.shape[-1]).argmax(-1)
        agree += int(np.sum(ia == ib))
        total += ia.size
    return agree / total if total else 1.0


def metric_function(metric: str | Callable) -> Callable[[Outputs, Outputs], float]:
    if callable(metric):
        return metric
    table = {"cosine": cosine, "sqnr": sqnr_score, "top1": top1}
    if metric not in table:
        raise OptionError(f"unknown metric {metric!r}", hint=f"choose one of {', '.join(METRICS)} or pass a callable")
    return table[metric]


def sqnr_db(score: float) -> float:
    """SQNR in dB from an sqnr score (1 - N/S)."""
    ratio = max(1.0 - score, 1e-12)
    return -10.0 * math.log10(ratio)


# ------------------------------------------------------------------ sensitivity


def node_sensitivity(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    nodes: Mapping[str, onnx.NodeProto],
    feeds: Sequence[Mapping[str, np.ndarray]],
) -> dict[str, float]:
    """Node name -> noise-to-signal ratio it adds (outputs compared by tensor name)."""
    quant_values = _value_names(quant_model)
    # Only nodes the quantized model still runs as themselves (a Relu folded into
    # its Conv's Q range is gone; its output name may now mean something else).
    present = {(n.name, n.op_type, tuple(n.output)) for n in quant_model.graph.node}
    nodes = {k: n for k, n in nodes.items() if (n.name, n.op_type, tuple(n.output)) in present}
    wanted = set()
    for node in nodes.values():
        wanted.update(t for t in list(node.input) + list(node.output) if t in quant_values)
    float_values = _value_names(float_model)
    wanted = sorted(wanted & float_values)
    if not wanted:
        return {}
    ref = _collect(float_model, feeds, wanted)
    got = _collect(quant_model, feeds, wanted)
    ratio = {
        name: float(np.mean([noise_ratio(r, g) for r, g in zip(ref[name], got[name])]))
        for name in wanted
        if name in ref and name in got  # float tensors only
    }
    sensitivity = {}
    for name, node in nodes.items():
        outs = [ratio[t] for t in node.output if t in ratio]
        if not outs:
            continue
        ins = [ratio[t] for t in node.input if t in ratio]
        sensitivity[name] = max(outs) - (max(ins) if ins else 0.0)
    return sensitivity


def _value_names(model: onnx.ModelProto) -> set[str]:
    names = {i.name for i in model.graph.input}
    for node in model.graph.node:
        names.update(node.output)
    return names


def _collect(model: onnx.ModelProto, feeds, names: list[str]) -> dict[str, list[np.ndarray]]:
    from .proto_graph import with_outputs

    exposed = with_outputs(model, names)
    results: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for outputs in run_outputs(exposed, feeds, names, optimize=False):
        for name, value in zip(names, outputs):
            if np.issubdtype(value.dtype, np.floating):
                results[name].append(value)
    return {k: v for k, v in results.items() if v}


# ------------------------------------------------------------------ fallback search


# The fallback search returns nodes to float in at most this many groups.
FALLBACK_GROUPS = 16


@dataclasses.dataclass
class SearchBudget:
    """Evaluations the search may spend (they decide the result) and an optional
    time limit (``deadline`` on ``clock``) that only stops it early.

    ``take()`` before each evaluation: False when the count is spent (the
    planned end of the search) or the time limit has passed (an early stop,
    recorded in ``stopped_by_time``)."""

    max_evaluations: int
    deadline: float | None = None
    clock: Callable[[], float] = time.monotonic
    used: int = 0
    stopped_by_time: bool = False

    @classmethod
    def start(cls, max_evaluations: int, seconds: float | None = None, clock: Callable[[], float] | None = None) -> "SearchBudget":
        clock = clock or time.monotonic
        return cls(max_evaluations, None if seconds is None else clock() + seconds, clock)

    @property
    def left(self) -> int:
        return max(0, self.max_evaluations - self.used)

    def time_up(self) -> bool:
        """True (and recorded) once the time limit has passed."""
        if self.deadline is not None and self.clock() > self.deadline:
            self.stopped_by_time = True
        return self.stopped_by_time

    def take(self, *, force: bool = False) -> bool:
        """Count one evaluation if the search may run it; ``force``: always (the first score)."""
        if not force and (self.left == 0 or self.time_up()):
            return False
        self.used += 1
        return True

    def describe(self) -> str:
        if self.stopped_by_time:
            return (f"search stopped by the time limit after {self.used} of {self.max_evaluations} evaluations: "
                    "the result is not reproducible (without the time limit the search would go on)")
        return f"search used {self.used} of {self.max_evaluations} evaluations"


def default_max_evaluations(range_options: int, measured: int, recorrected: int) -> int:
    """Evaluations the whole search needs at most, so the default never cuts it:
    per range option a score before and after bias correction, the elementwise
    variant, ``recorrected`` layers returned to float with bias correction re-run,
    ``measured`` end-to-end sensitivity measurements, and the fallback's groups."""
    return 2 * max(1, range_options) + 1 + recorrected + measured + FALLBACK_GROUPS


@dataclasses.dataclass
class BudgetStep:
    excluded: list[str]
    score: float
    seconds: float


@dataclasses.dataclass
class BudgetResult:
    model: onnx.ModelProto
    score: float
    met: bool
    excluded: list[str]
    steps: list[BudgetStep]
    timed_out: bool = False  # stopped early by the time limit (not reproducible)


def fallback_search(
    build: Callable[[list[str]], onnx.ModelProto],
    evaluate: Callable[[onnx.ModelProto], float],
    ranked: list[str],
    threshold: float,
    *,
    initial: tuple[onnx.ModelProto, float],
    group_size: int = 0,
    search: SearchBudget | None = None,
) -> BudgetResult:
    """Return the most sensitive nodes of ``ranked`` to float a group at a time.

    ``build(excluded)`` quantizes with ``excluded`` kept float; ``evaluate`` scores
    a model. Stops when the score reaches ``threshold``, ``ranked`` is exhausted or
    ``search`` has no evaluation left (or its time limit passed); the best model
    so far is returned."""
    best_model, best_score = initial
    best_excluded: list[str] = []
    steps: list[BudgetStep] = []
    if best_score >= threshold:
        return BudgetResult(best_model, best_score, True, [], steps)
    search = search or SearchBudget(math.inf)
    size = group_size or max(1, math.ceil(len(ranked) / FALLBACK_GROUPS))
    excluded: list[str] = []
    for start in range(0, len(ranked), size):
        if not search.take():
            break
        began = time.monotonic()
        excluded = excluded + ranked[start : start + size]
        model = build(excluded)
        score = evaluate(model)
        steps.append(BudgetStep(list(excluded), score, time.monotonic() - began))
        if score > best_score:
            best_model, best_score, best_excluded = model, score, list(excluded)
        if score >= threshold:
            break
    return BudgetResult(best_model, best_score, best_score >= threshold, best_excluded, steps, search.stopped_by_time)
