"""``onnxforge debug ORIGINAL CHANGED``: where did accuracy go? Layer-by-layer comparison.

Both models run on the same inputs; every intermediate tensor that has the same name in
both main graphs (a node output in each) is compared, in the original's topological
order: max abs error, max rel error (relative to the original tensor's max |x|), cosine,
SQNR (dB) and the NaN/Inf count in the changed model. Outputs of Constant nodes are
weights, not activations, and are left out like initializers. The first tensor whose error
jumps above the threshold is named with the original node that makes it.

Jump rule (``--threshold X``, default 1e-3): a tensor jumps when its max rel error > X,
or its cosine < 1 - X, or the changed model has more NaN/Inf there than the original,
or its shape or type differs (float16 against float32 is compared, in float64: that
is the precision change an FP16 model makes).

Matching: same names first; a tensor of the changed model that the passes recorded
as standing for an original tensor (the ``onnxforge.name_map`` metadata written by
``optimize``: a fused node's output for the last output of the nodes it replaced)
is compared with that tensor when the original name is gone from the changed model.

Memory: each model is written once to a temporary folder with its weights as external
data and dropped from Python; each session is a small graph file beside those weights
(optimizations and prepacking off, so weights are not copied). Intermediates are
exposed as extra graph outputs at most ``CHUNK`` (256) at a time, and the two models
run one after the other: the original's session runs every feed and keeps only that
slice's values, is closed, then the changed model's session runs and folds each value
into running sums. So one model's weights plus CHUNK tensors x feeds are held at once,
never all intermediates.

Quantized (QDQ) changed models: each quantized node's own contribution to the output
error (that node alone reading int8 activations, all others float; see
passes/quant/contribution.py, also quantize's sensitivity ranking), largest first:
the nodes to keep float.

``--plot``: max rel error by depth (longest path from the inputs), one line per graph
output through the compared tensors that feed it.
"""
from __future__ import annotations

import contextlib
import gc
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx_graphsurgeon as gs

from .debug_render import plot_errors
from .errors import DataError
from .inputs import checked_feeds
from .output_diff import RunningDiff
from .verify_feeds import runnable_feeds

CHUNK = 256
DEFAULT_THRESHOLD = 1e-3


def _node_outputs(graph: gs.Graph, skip_types: set[str]) -> list[gs.Variable]:
    """Node outputs of the main graph in topological order: tensors only, no graph
    inputs, initializers or Constant-node outputs, each once."""
    inputs = {t.name for t in graph.inputs}
    seen: set[str] = set()
    out = []
    for node in graph.nodes:
        if node.op == "Constant":  # weights, not activations (often folded into initializers)
            continue
        for t in node.outputs:
            if (not t.name or t.name in seen or t.name in inputs or isinstance(t, gs.Constant)
                    or getattr(t, "type", "tensor_type") != "tensor_type" or t.name in skip_types):
                continue
            seen.add(t.name)
            out.append(t)
    return out


@dataclass
class _Plan:
    """What to compare, from the two graphs' structure alone (no weights): pairs of
    (original name, changed name) in the original's order, the original's producers
    and each tensor's depth and output paths (for the first jump and the plot)."""

    pairs: list[tuple[str, str]]
    only_a: list[str]
    only_b: list[str]
    outs_a: list[str]
    outs_b: list[str]
    producer: dict[str, tuple[str, str, list[str]]]  # tensor -> (node name, op, input names)
    input_kind: dict[str, str]  # non-activation names -> "initializer" / "constant" / "graph input"
    depth: dict[str, int]
    reaches: dict[str, int]  # tensor -> bitmask of the graph outputs it feeds
    mapped: int = 0


def _plan(original, changed) -> _Plan:
    from .name_map import read_name_map

    for m in (original, changed):
        m.graph.toposort()
    tensors_a = _node_outputs(original.graph, set(original.value_types))
    tensors_b = _node_outputs(changed.graph, set(changed.value_types))
    names_a = [t.name for t in tensors_a]
    set_a, set_b = set(names_a), {t.name for t in tensors_b}
    # the changed model's name map: a new tensor standing for an original one that
    # has no same-named tensor (the last such in the changed graph's order wins)
    stands: dict[str, str] = {}
    name_map = read_name_map(changed)
    for t in tensors_b:
        orig = name_map.get(t.name)
        if t.name not in set_a and orig in set_a and orig not in set_b:
            stands[orig] = t.name
    pairs = [(n, n if n in set_b else stands[n]) for n in names_a if n in set_b or n in stands]
    used_b = {b for _a, b in pairs}
    outs_a = [t.name for t in original.graph.outputs]
    outs_b = [t.name for t in changed.graph.outputs]
    if len(outs_a) != len(outs_b):
        raise DataError(f"the models have different numbers of outputs: {len(outs_a)} vs {len(outs_b)}",
                        hint="debug compares models of the same interface")
    producer, kind, depth = {}, {}, {}
    for t in original.graph.inputs:
        kind[t.name] = "graph input"
    for node in original.graph.nodes:
        ins = [t.name for t in node.inputs if t.name]
        for t in node.inputs:
            if isinstance(t, gs.Constant):
                kind[t.name] = "initializer"
        d = 1 + max((depth.get(i, 0) for i in ins), default=0)
        for t in node.outputs:
            producer.setdefault(t.name, (node.name, node.op, ins))
            depth.setdefault(t.name, d)
            if node.op == "Constant":
                kind[t.name] = "constant"
    reaches: dict[str, int] = {}
    for i, name in enumerate(outs_a):
        reaches[name] = reaches.get(name, 0) | (1 << i)
    for node in reversed(original.graph.nodes):  # reverse topological order
        mask = 0
        for t in node.outputs:
            mask |= reaches.get(t.name, 0)
        if mask:
            for t in node.inputs:
                reaches[t.name] = reaches.get(t.name, 0) | mask
    return _Plan(pairs, [n for n in names_a if n not in {a for a, _b in pairs}],
                 [t.name for t in tensors_b if t.name not in set_a and t.name not in used_b],
                 outs_a, outs_b, producer, kind, depth, reaches, sum(1 for a, b in pairs if a != b))


def _runnable(model, folder: Path) -> Path:
    """``model`` written to ``folder`` with its weights as external data, so each
    session with other extra outputs is a small graph file beside the same weights
    and no weights are held in Python."""
    from .io import save

    folder.mkdir(parents=True)
    return save(model, folder / "model.onnx", external_data=True)


@contextlib.contextmanager
def _exposing(path: Path, extra: list[str], what: str):
    """A CPU session (graph optimizations and weight prepacking off: names survive,
    weights are not copied) of the model at ``path`` with ``extra`` added as graph
    outputs; yields run(feed) -> {name: value}."""
    import onnx
    import onnxruntime as ort

    from .passes.quant.proto_graph import with_outputs

    proto = with_outputs(onnx.load(str(path), load_external_data=False), extra, copy=False)
    exposed = path.with_name("exposed.onnx")
    onnx.save(proto, str(exposed))
    del proto
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        sess = ort.InferenceSession(str(exposed), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise _failed(what, exc) from exc
    wanted = [o.name for o in sess.get_outputs()]
    inputs = [i.name for i in sess.get_inputs()]

    def run(feed: dict) -> dict:
        try:
            return dict(zip(wanted, sess.run(wanted, {n: feed[n] for n in inputs if n in feed})))
        except Exception as exc:
            raise _failed(what, exc) from exc

    try:
        yield run
    finally:
        from .passes.quant.ortsession import return_freed_memory

        del sess
        return_freed_memory()  # the next session (the other model) starts from what is in use
        exposed.unlink(missing_ok=True)


def _failed(what: str, exc: Exception) -> DataError:
    text = str(exc).strip().splitlines()
    return DataError(f"{what}: does not run on these inputs: {text[0] if text else type(exc).__name__}",
                     hint="give --data DIR with inputs both models accept")


def debug_models(original, changed, feeds: list[dict], *, threshold: float = DEFAULT_THRESHOLD,
                 chunk: int = CHUNK, original_path: str = "", changed_path: str = "", plot=None,
                 contributions: bool = True) -> dict:
    """Compare the intermediates of two loaded models (onnxforge Models) on ``feeds``:
    same names, and through the changed model's name map."""
    plan = _plan(original, changed)
    with tempfile.TemporaryDirectory(prefix="onnxforge-debug-") as tmp:
        path_a = _runnable(original, Path(tmp) / "a")
        path_b = _runnable(changed, Path(tmp) / "b")
        result = _compare(plan, path_a, path_b, feeds, threshold=threshold, chunk=chunk,
                          original_path=original_path, changed_path=changed_path, plot=plot)
        if contributions:
            result["contributions"] = int8_contributions(path_b, feeds)
        return result


def int8_contributions(path: Path, feeds: list[dict]) -> list[dict] | None:
    """Each quantized node's own contribution (passes/quant/contribution.py), largest
    first; None when the model reads no activation through QuantizeLinear/DequantizeLinear."""
    import onnx

    from .passes.quant.contribution import node_contributions, quantized_reads

    model = onnx.load(str(path))
    if not quantized_reads(model):
        return None
    return [c.as_dict() for c in node_contributions(model, feeds)]


def _compare(plan: _Plan, path_a: Path, path_b: Path, feeds: list[dict], *, threshold: float, chunk: int,
             original_path: str, changed_path: str, plot=None) -> dict:
    """The runs, one model at a time: per slice of ``chunk`` tensors the original runs
    every feed and its slice values are kept, then the changed model runs and each
    of its values is folded into running sums and dropped. Only one session (one
    model's weights) exists at a time; at most ``chunk`` tensors x feeds are held."""
    pairs = plan.pairs
    stats = {a: RunningDiff(a) for a, _b in pairs}
    final = [RunningDiff(a if a == b else f"{a} / {b}") for a, b in zip(plan.outs_a, plan.outs_b)]
    runs = 0
    for start in range(0, max(len(pairs), 1), chunk):
        part = pairs[start:start + chunk]
        names_a = [a for a, _b in part] + (plan.outs_a if start == 0 else [])
        names_b = [b for _a, b in part] + (plan.outs_b if start == 0 else [])
        with _exposing(path_a, names_a, original_path or "the original model") as run_a:
            kept = [{n: v for n, v in run_a(feed).items() if n in set(names_a)} for feed in feeds]
        with _exposing(path_b, names_b, changed_path or "the changed model") as run_b:
            for i, feed in enumerate(feeds):
                got_a, got_b = kept[i], run_b(feed)
                kept[i] = None
                runs += 1
                for a, b in part:
                    stats[a].add(got_a.get(a), got_b.get(b))
                if start == 0:  # the final outputs, by position
                    for s, a, b in zip(final, plan.outs_a, plan.outs_b):
                        s.add(got_a.get(a), got_b.get(b))
                del got_a, got_b

    rows = []
    for a, b in pairs:
        row = stats[a].as_dict(threshold)
        row["depth"] = plan.depth.get(a, 0)
        if a != b:
            row["changed_name"] = b
        rows.append(row)
    by_row = {r["name"]: r for r in rows}
    first = next((r for r in rows if r["jump"]), None)
    first_jump = None
    if first is not None:
        node_name, op, ins = plan.producer[first["name"]]
        inputs = []
        for name in ins:
            entry = {"name": name}
            if name in by_row:
                r = by_row[name]
                entry.update(kind="compared", max_rel=r.get("max_rel"), cosine=r.get("cosine"))
            else:
                entry["kind"] = plan.input_kind.get(name, "only in original")
            inputs.append(entry)
        first_jump = {"tensor": first["name"], "index": rows.index(first), "node": node_name, "op": op,
                      "inputs": inputs}
    result = {
        "original": str(original_path), "changed": str(changed_path), "feeds": len(feeds), "threshold": threshold,
        "jump_rule": f"max_rel > {threshold:g} or cosine < {1 - threshold:g} or new NaN/Inf or shape/type mismatch",
        "compared": len(rows), "matched_by_name_map": plan.mapped, "chunk": chunk, "runs": runs,
        "tensors": rows, "first_jump": first_jump,
        "outputs": [s.as_dict(threshold) for s in final],
        "only_in_original": plan.only_a, "only_in_changed": plan.only_b,
    }
    if plot:
        plot_errors(result, plan, plot)
    return result


def debug_files(original_path, changed_path, *, data=None, samples: int = 1,
                threshold: float = DEFAULT_THRESHOLD, chunk: int = CHUNK, plot=None,
                contributions: bool = True) -> dict:
    from .io import load_input

    from .passes.quant.ortsession import return_freed_memory

    original = load_input(original_path, "the original model")
    names_a = [t.name for t in original.graph.inputs]
    if data:
        feeds = checked_feeds(original, data, "--data", limit=samples)
    else:  # before the changed model is loaded: the original's session is not held beside it
        feeds = runnable_feeds(original, {}, samples)
    if not feeds:
        raise DataError(f"{data}: no feeds")
    changed = load_input(changed_path, "the changed model")
    names_b = [t.name for t in changed.graph.inputs]
    if set(names_a) != set(names_b):
        raise DataError(f"the models have different inputs: {sorted(names_a)} vs {sorted(names_b)}",
                        hint="debug compares models of the same interface")
    plan = _plan(original, changed)
    with tempfile.TemporaryDirectory(prefix="onnxforge-debug-") as tmp:
        path_a = _runnable(original, Path(tmp) / "a")
        del original
        path_b = _runnable(changed, Path(tmp) / "b")
        del changed  # from here on only the files: no weights held in Python
        gc.collect()
        return_freed_memory()
        result = _compare(plan, path_a, path_b, feeds, threshold=threshold, chunk=chunk,
                          original_path=str(original_path), changed_path=str(changed_path), plot=plot)
        if contributions:
            result["contributions"] = int8_contributions(path_b, feeds)
    result["source"] = str(data) if data else "made-up"
    return result
