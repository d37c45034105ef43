"""``onnxforge debug ORIGINAL CHANGED``: where did accuracy go? Layer-by-layer comparison.

Both models run on the same inputs; every intermediate tensor that has the same name in
both main graphs (a node output in each) is compared, in the original's topological
order: max abs error, max rel error (relative to the original tensor's max |x|), cosine,
SQNR (dB) and the NaN/Inf count in the changed model. Outputs of Constant nodes are
weights, not activations, and are left out like initializers. The first tensor whose error
jumps above the threshold is named with the original node that makes it.

Jump rule (``--threshold X``, default 1e-3): a tensor jumps when its max rel error > X,
or its cosine < 1 - X, or the changed model has more NaN/Inf there than the original,
or its shape or type differs.

Memory: intermediates are exposed as extra graph outputs at most ``CHUNK`` (256) at a
time; each chunk is a separate pair of runs, one feed at a time, and only running sums
are kept, so at most CHUNK tensors of one feed per model are held at once.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .errors import DataError
from .inputs import load_feeds
from .verify import session_for
from .verify_feeds import runnable_feeds

CHUNK = 256
DEFAULT_THRESHOLD = 1e-3


@dataclass
class _Stats:
    """Running figures of one tensor over several feeds."""

    name: str
    max_abs: float = 0.0
    ref_max: float = 0.0
    dot: float = 0.0
    ref_sq: float = 0.0
    out_sq: float = 0.0
    err_sq: float = 0.0
    nan: int = 0
    inf: int = 0
    ref_nonfinite: int = 0
    mismatch: str | None = None
    shape: list = field(default_factory=list)

    def add(self, ref, out) -> None:
        if ref is None or out is None or isinstance(ref, (list, tuple, dict)) or isinstance(out, (list, tuple, dict)):
            self.mismatch = self.mismatch or "not a tensor"
            return
        ref, out = np.asarray(ref), np.asarray(out)
        if ref.shape != out.shape:
            self.mismatch = f"shape {list(ref.shape)} vs {list(out.shape)}"
            return
        if ref.dtype != out.dtype:
            self.mismatch = f"type {ref.dtype} vs {out.dtype}"
            return
        self.shape = list(ref.shape)
        if ref.dtype.kind not in "biufc" or ref.size == 0:
            return
        r = ref.astype(np.float64) if ref.dtype.kind != "c" else np.abs(ref).astype(np.float64)
        o = out.astype(np.float64) if out.dtype.kind != "c" else np.abs(out).astype(np.float64)
        self.nan += int(np.isnan(o).sum())
        self.inf += int(np.isinf(o).sum())
        ok_r, ok_o = np.isfinite(r), np.isfinite(o)
        self.ref_nonfinite += int((~ok_r).sum())
        both = ok_r & ok_o
        r, o = np.where(both, r, 0.0), np.where(both, o, 0.0)
        d = r - o
        self.max_abs = max(self.max_abs, float(np.abs(d).max()))
        self.ref_max = max(self.ref_max, float(np.abs(r).max()))
        self.dot += float(np.dot(r.ravel(), o.ravel()))
        self.ref_sq += float(np.dot(r.ravel(), r.ravel()))
        self.out_sq += float(np.dot(o.ravel(), o.ravel()))
        self.err_sq += float(np.dot(d.ravel(), d.ravel()))

    def as_dict(self, threshold: float) -> dict:
        if self.mismatch:
            return {"name": self.name, "mismatch": self.mismatch, "jump": True}
        max_rel = self.max_abs / self.ref_max if self.ref_max > 0 else (0.0 if self.max_abs == 0 else math.inf)
        if self.ref_sq == 0 and self.out_sq == 0:
            cosine = 1.0
        elif self.ref_sq == 0 or self.out_sq == 0:
            cosine = 0.0
        else:
            cosine = self.dot / math.sqrt(self.ref_sq * self.out_sq)
        if self.err_sq == 0:
            sqnr = math.inf
        elif self.ref_sq == 0:
            sqnr = -math.inf
        else:
            sqnr = 10 * math.log10(self.ref_sq / self.err_sq)
        jump = (max_rel > threshold or cosine < 1 - threshold or self.nan + self.inf > self.ref_nonfinite)
        return {"name": self.name, "shape": self.shape, "max_abs": self.max_abs, "max_rel": max_rel,
                "cosine": cosine, "sqnr_db": sqnr, "nan": self.nan, "inf": self.inf, "jump": bool(jump)}


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


@contextlib.contextmanager
def _exposing(model, extra: list[gs.Variable], what: str):
    """A CPU session (graph optimizations off, so names survive) of ``model`` with
    ``extra`` added as graph outputs; yields run(feed) -> {name: value}."""
    graph = model.graph
    kept = list(graph.outputs)
    names = {t.name for t in kept}
    graph.outputs = kept + [t for t in extra if t.name not in names]
    try:
        with session_for(model) as sess:
            graph.outputs = kept
            wanted = [o.name for o in sess.get_outputs()]
            inputs = [i.name for i in sess.get_inputs()]

            def run(feed: dict) -> dict:
                try:
                    return dict(zip(wanted, sess.run(wanted, {n: feed[n] for n in inputs if n in feed})))
                except Exception as exc:
                    raise _failed(what, exc) from exc

            yield run
    except DataError:
        raise
    except Exception as exc:
        raise _failed(what, exc) from exc
    finally:
        graph.outputs = kept


def _failed(what: str, exc: Exception) -> DataError:
    text = str(exc).strip().splitlines()
    return DataError(f"{what}: does not run on these inputs: {text[0] if text else type(exc).__name__}",
                     hint="give --data DIR with inputs both models accept")


def debug_models(original, changed, feeds: list[dict], *, threshold: float = DEFAULT_THRESHOLD,
                 chunk: int = CHUNK, original_path: str = "", changed_path: str = "") -> dict:
    """Compare the same-named intermediates of two loaded models (onnxforge Models) on ``feeds``."""
    for m in (original, changed):
        m.graph.toposort()
    tensors_a = _node_outputs(original.graph, set(original.value_types))
    tensors_b = _node_outputs(changed.graph, set(changed.value_types))
    by_name_b = {t.name: t for t in tensors_b}
    names_a = {t.name for t in tensors_a}
    common = [t for t in tensors_a if t.name in by_name_b]
    only_a = [t.name for t in tensors_a if t.name not in by_name_b]
    only_b = [t.name for t in tensors_b if t.name not in names_a]
    outs_a = [t.name for t in original.graph.outputs]
    outs_b = [t.name for t in changed.graph.outputs]
    if len(outs_a) != len(outs_b):
        raise DataError(f"the models have different numbers of outputs: {len(outs_a)} vs {len(outs_b)}",
                        hint="debug compares models of the same interface")

    stats = {t.name: _Stats(t.name) for t in common}
    final = [_Stats(a if a == b else f"{a} / {b}") for a, b in zip(outs_a, outs_b)]
    runs = 0
    for start in range(0, max(len(common), 1), chunk):
        part = common[start:start + chunk]
        part_b = [by_name_b[t.name] for t in part]
        with _exposing(original, part, original_path or "the original model") as run_a, \
                _exposing(changed, part_b, changed_path or "the changed model") as run_b:
            for feed in feeds:
                got_a, got_b = run_a(feed), run_b(feed)
                runs += 1
                for t in part:
                    stats[t.name].add(got_a.get(t.name), got_b.get(t.name))
                if start == 0:  # the final outputs, by position
                    for s, a, b in zip(final, outs_a, outs_b):
                        s.add(got_a.get(a), got_b.get(b))
                del got_a, got_b

    producer = {}
    for node in original.graph.nodes:
        for t in node.outputs:
            producer.setdefault(t.name, node)
    rows = [stats[t.name].as_dict(threshold) for t in common]
    by_row = {r["name"]: r for r in rows}
    first = next((r for r in rows if r["jump"]), None)
    first_jump = None
    if first is not None:
        node = producer[first["name"]]
        inputs = []
        for t in node.inputs:
            if not t.name:
                continue
            entry = {"name": t.name}
            if isinstance(t, gs.Constant):
                entry["kind"] = "initializer"
            elif t.name in producer and producer[t.name].op == "Constant":
                entry["kind"] = "constant"
            elif t.name in by_row:
                r = by_row[t.name]
                entry.update(kind="compared", max_rel=r.get("max_rel"), cosine=r.get("cosine"))
            elif t.name in {i.name for i in original.graph.inputs}:
                entry["kind"] = "graph input"
            else:
                entry["kind"] = "only in original"
            inputs.append(entry)
        first_jump = {"tensor": first["name"], "index": rows.index(first), "node": node.name, "op": node.op,
                      "inputs": inputs}
    return {
        "original": str(original_path), "changed": str(changed_path), "feeds": len(feeds), "threshold": threshold,
        "jump_rule": f"max_rel > {threshold:g} or cosine < {1 - threshold:g} or new NaN/Inf or shape/type mismatch",
        "compared": len(rows), "chunk": chunk, "runs": runs,
        "tensors": rows, "first_jump": first_jump,
        "outputs": [s.as_dict(threshold) for s in final],
        "only_in_original": only_a, "only_in_changed": only_b,
    }


def debug_files(original_path, changed_path, *, data=None, samples: int = 1,
                threshold: float = DEFAULT_THRESHOLD, chunk: int = CHUNK) -> dict:
    from .io import load_input

    original = load_input(original_path, "the original model")
    changed = load_input(changed_path, "the changed model")
    names_a = [t.name for t in original.graph.inputs]
    names_b = [t.name for t in changed.graph.inputs]
    if set(names_a) != set(names_b):
        raise DataError(f"the models have different inputs: {sorted(names_a)} vs {sorted(names_b)}",
                        hint="debug compares models of the same interface")
    if data:
        feeds = load_feeds(data, names_a, limit=samples)
    else:
        feeds = runnable_feeds(original, {}, samples)
    if not feeds:
        raise DataError(f"{data}: no feeds")
    result = debug_models(original, changed, feeds, threshold=threshold, chunk=chunk,
                          original_path=str(original_path), changed_path=str(changed_path))
    result["source"] = str(data) if data else "made-up"
    return result


# ------------------------------------------------------------------ render


def _num(x, fmt: str) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, fmt)


def json_safe(result: dict) -> dict:
    """inf/nan as strings: stdout stays strict JSON."""
    def fix(v):
        if isinstance(v, float) and not math.isfinite(v):
            return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v
    return fix(result)


def render_debug(result: dict, *, limit_only: int = 8) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:  # piped or redirected: whole tensor names, one row per tensor
        longest = max((len(r["name"]) for r in result["tensors"]), default=10)
        console = Console(highlight=False, soft_wrap=True, width=max(100, longest + 90))
    source = result.get("source", "")
    where = "made-up feed(s)" if source in ("", "made-up") else f"feed(s) from {source}"
    title = (f"{result['original']} vs {result['changed']}: {result['compared']} tensors compared "
             f"on {result['feeds']} {where}")
    t = Table(title=escape(title), show_edge=False)
    for col in ("#", "tensor", "max abs", "max rel", "cosine", "SQNR dB", "NaN/Inf", ""):
        t.add_column(col, justify="left" if col in ("tensor", "") else "right",
                     overflow="fold" if col == "tensor" else "ellipsis", no_wrap=col != "tensor")
    first = result["first_jump"]
    for i, r in enumerate(result["tensors"]):
        mark = "<- first jump" if first and i == first["index"] else ("jump" if r["jump"] else "")
        if "mismatch" in r:
            t.add_row(str(i), escape(r["name"]), escape(r["mismatch"]), "", "", "", "", mark)
            continue
        t.add_row(str(i), escape(r["name"]), _num(r["max_abs"], ".3e"), _num(r["max_rel"], ".3e"),
                  _num(r["cosine"], ".6f"), _num(r["sqnr_db"], ".1f"), f"{r['nan']}/{r['inf']}", mark)
    console.print(t)
    print(f"jump rule: {result['jump_rule']}")
    if first:
        ins = []
        for e in first["inputs"]:
            if e["kind"] == "compared":
                ins.append(f"{e['name']} (rel {_num(e['max_rel'], '.2e')}, cos {_num(e['cosine'], '.6f')})")
            else:
                ins.append(f"{e['name']} ({e['kind']})")
        print(f"first jump: tensor {first['tensor']} (#{first['index']}), made by node {first['node'] or '(unnamed)'} "
              f"({first['op']})")
        print(f"  its inputs: {', '.join(ins) or '-'}")
    else:
        print("first jump: none (every compared tensor is within the threshold)")
    print("final outputs:")
    for r in result["outputs"]:
        if "mismatch" in r:
            print(f"  {r['name']}: {r['mismatch']}")
        else:
            print(f"  {r['name']}: max abs {_num(r['max_abs'], '.3e')}, max rel {_num(r['max_rel'], '.3e')}, "
                  f"cosine {_num(r['cosine'], '.6f')}, SQNR {_num(r['sqnr_db'], '.1f')} dB, "
                  f"NaN/Inf {r['nan']}/{r['inf']}")
    for key, label in (("only_in_original", "only in the original (fused/folded away)"),
                       ("only_in_changed", "only in the changed model")):
        names = result[key]
        if names:
            more = f", ... ({len(names) - limit_only} more)" if len(names) > limit_only else ""
            print(f"{len(names)} tensor(s) {label}: {', '.join(names[:limit_only])}{more}")
