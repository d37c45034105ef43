"""``onnxforge compare A B``: numerical diff of two models on the same inputs."""
from __future__ import annotations

from .errors import DataError
from .inputs import checked_feeds
from .io import load
from .output_diff import compare_arrays, merge_diffs
from .verify import run_outputs
from .verify_feeds import runnable_feeds


def compare_models(a, b, *, data=None, input_shapes=None, samples: int = 4, rtol: float | None = None) -> dict:
    model_a, model_b = load(a), load(b)
    names_a = [t.name for t in model_a.graph.inputs]
    names_b = {t.name for t in model_b.graph.inputs}
    if set(names_a) != names_b:
        raise DataError(f"the models have different inputs: {sorted(names_a)} vs {sorted(names_b)}",
                        hint="compare models of the same interface")
    if data:
        feeds = checked_feeds(model_a, data, "--data", limit=samples)
    else:
        feeds = runnable_feeds(model_a, input_shapes, samples)
    try:
        out_a = run_outputs(model_a, feeds)
    except Exception as exc:
        raise DataError(f"{a}: does not run on these inputs: {str(exc).splitlines()[0]}",
                        hint="give --data DIR or --input-shape NAME:DIMS") from exc
    try:
        out_b = run_outputs(model_b, feeds)
    except Exception as exc:
        raise DataError(f"{b}: does not run on these inputs: {str(exc).splitlines()[0]}") from exc
    names = [t.name for t in model_a.graph.outputs]
    tol = rtol if rtol is not None else float("inf")
    diffs = merge_diffs(
        [compare_arrays(n, x, y, tol, 0.0) for n, x, y in zip(names, xa, xb)] for xa, xb in zip(out_a, out_b)
    )
    return {
        "a": str(a), "b": str(b), "feeds": len(feeds), "source": data or "seeded",
        "outputs": [d.as_dict() for d in diffs], "ok": all(d.ok for d in diffs),
    }


def render_comparison(result: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(f"{result['a']} vs {result['b']} on {result['feeds']} {result['source']} feed(s)"), show_edge=False)
    for col in ("output", "max abs", "max rel", "cosine"):
        t.add_column(col, justify="right" if col != "output" else "left")
    for o in result["outputs"]:
        t.add_row(escape(o["name"]), f"{o['max_abs']:.3e}", f"{o['max_rel']:.3e}", f"{o['cosine']:.8f}")
    Console(highlight=False, soft_wrap=True).print(t)
