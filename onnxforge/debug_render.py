"""How an ``onnxforge debug`` result is shown: the table and summary lines on the terminal,
strict JSON (inf/nan as strings) and the ``--plot`` picture (max rel error by depth, one
line per graph output). The comparison itself is debug.py's.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .debug import _Plan

MAX_PLOT_LINES = 12  # graph outputs drawn (a decoder has dozens of cache outputs)


def plot_errors(result: dict, plan: _Plan, path) -> None:
    """Max rel error by depth (longest path from the inputs), one line per graph
    output through the compared float tensors that feed it (shape and mask
    arithmetic is exact and would only draw the floor); the first jump marked.
    Written atomically with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import write_file

    floor = 1e-12  # exact tensors sit on the floor of the log axis
    fig, ax = plt.subplots(figsize=(10, 5))
    outs = plan.outs_a
    shown = outs[:MAX_PLOT_LINES]
    for i, out in enumerate(shown):
        pts = sorted((r["depth"], max(r.get("max_rel", math.inf) if "mismatch" not in r else 1.0, floor))
                     for r in result["tensors"] if plan.reaches.get(r["name"], 0) >> i & 1
                     and ("mismatch" in r or r.get("dtype", "").startswith(("float", "bfloat"))))  # not shapes/masks
        if pts:
            ax.plot([p[0] for p in pts], [min(p[1], 1e6) for p in pts], marker=".", linewidth=1, label=out)
    first = result["first_jump"]
    if first:
        row = result["tensors"][first["index"]]
        ax.axvline(row["depth"], color="red", linestyle=":", linewidth=1)
        name = first["tensor"] if len(first["tensor"]) <= 48 else "..." + first["tensor"][-45:]
        ax.annotate(f" first jump: {name}", (row["depth"], 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                    color="red", va="top", ha="left")
    ax.axhline(result["threshold"], color="grey", linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("depth (nodes from the inputs)")
    ax.set_ylabel("max rel error (vs the original's max |x|)")
    more = f" ({len(outs) - len(shown)} more outputs not drawn)" if len(outs) > len(shown) else ""
    ax.set_title(f"{Path(result['original']).name} vs {Path(result['changed']).name}{more}", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    try:
        write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


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


def render_debug(result: dict, *, limit_only: int = 8, limit_contrib: int = 10) -> None:
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
            t.add_row(str(i), escape(r["name"] + (f" (as {r['changed_name']})" if r.get("changed_name") else "")),
                      escape(r["mismatch"]), "", "", "", "", mark)
            continue
        name = r["name"] + (f" (as {r['changed_name']})" if r.get("changed_name") else "")
        t.add_row(str(i), escape(name), _num(r["max_abs"], ".3e"), _num(r["max_rel"], ".3e"),
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
    contrib = result.get("contributions")
    if contrib:
        print(f"int8 contributions: each of {len(contrib)} quantized nodes alone reading int8 activations, "
              "every other node float (output SQNR and cosine vs all float), largest error first:")
        for i, c in enumerate(contrib[:limit_contrib]):
            print(f"  {i + 1:>3}. {c['node'] or '(unnamed)'} ({c['op']}): SQNR {_num(c['sqnr_db'], '.1f')} dB, "
                  f"cosine {_num(c['cosine'], '.6f')}")
        if len(contrib) > limit_contrib:
            print(f"  ... {len(contrib) - limit_contrib} more (--json lists all)")
        print(f"keep float first: {', '.join(c['node'] for c in contrib[:3])}")
    for key, label in (("only_in_original", "only in the original (fused/folded away)"),
                       ("only_in_changed", "only in the changed model")):
        names = result[key]
        if names:
            more = f", ... ({len(names) - limit_only} more)" if len(names) > limit_only else ""
            print(f"{len(names)} tensor(s) {label}: {', '.join(names[:limit_only])}{more}")
