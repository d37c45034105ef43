"""``onnxforge inspect``: what a model is made of."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import onnx_graphsurgeon as gs

from .io import load
from .model import Model, external_values, iter_graphs
from .report import _fmt_bytes, model_stats


def _tensor_info(t: gs.Tensor) -> dict:
    dtype = getattr(t.dtype, "__name__", None) or str(t.dtype)
    return {"name": t.name, "dtype": str(dtype), "shape": [d if d is not None else "?" for d in (t.shape or [])]}


def estimate_flops(model: Model, input_shapes=None) -> int | None:
    """FLOPs from the pruning package's counter, where this build has it."""
    try:
        flops = importlib.import_module("onnxforge.passes.prune.flops")
    except ImportError:
        return None
    try:
        return int(flops.estimate_flops(model, input_shapes=input_shapes))
    except Exception:
        return None


def inspect_model(path: str | os.PathLike, input_shapes=None) -> dict:
    path = Path(path)
    model = load(path)
    data_files = sorted({str(v.path.name) for v in external_values(model.graph)})
    size = path.stat().st_size + sum((path.parent / f).stat().st_size for f in data_files)
    stats = model_stats(model, file_bytes=size)
    meta = model.meta
    return {
        "path": str(path),
        "ir_version": meta.ir_version,
        "opsets": stats["opsets"],
        "producer": f"{meta.producer_name} {meta.producer_version}".strip(),
        "inputs": [_tensor_info(t) for t in model.graph.inputs],
        "outputs": [_tensor_info(t) for t in model.graph.outputs],
        "nodes": stats["nodes"],
        "subgraphs": sum(1 for _ in iter_graphs(model.graph)) - 1,
        "functions": len(meta.functions),
        "ops": stats["ops"],
        "parameters": stats["parameters"],
        "weight_bytes": stats["weight_bytes"],
        "file_bytes": size,
        "external_data": data_files,
        "flops": estimate_flops(model, input_shapes),
        "metadata": {p.key: p.value for p in meta.metadata_props},
        "notes": model.notes,
    }


def render_inspection(info: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    c = Console(highlight=False, soft_wrap=True)
    c.print(f"[bold]{info['path']}[/]  IR {info['ir_version']}, opsets "
            + ", ".join(f"{d} {v}" for d, v in info["opsets"].items())
            + (f", producer {info['producer']}" if info["producer"] else ""))
    io = Table(show_edge=False)
    for col in ("", "name", "dtype", "shape"):
        io.add_column(col)
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            io.add_row(kind[:-1], escape(t["name"]), t["dtype"], "x".join(str(d) for d in t["shape"]) or "scalar")
    c.print(io)
    flops = info["flops"]
    c.print(
        f"nodes {info['nodes']} (subgraphs {info['subgraphs']}, functions {info['functions']}), "
        f"parameters {info['parameters']:,}, weights {_fmt_bytes(info['weight_bytes'])}, "
        f"file {_fmt_bytes(info['file_bytes'])}"
        + (f", external data: {', '.join(info['external_data'])}" if info["external_data"] else "")
        + (f", FLOPs {flops / 1e9:.3f} G" if flops else "")
    )
    ops = Table(title="op histogram", show_edge=False)
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, n in info["ops"].items():
        ops.add_row(escape(op), str(n))
    c.print(ops)
    for note in info["notes"]:
        c.print(escape(f"note: {note}"))
