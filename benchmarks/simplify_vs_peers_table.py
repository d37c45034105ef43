"""The Markdown table of benchmarks/simplify_vs_peers.py: a verdict per model (equal within
RTOL, dynamic dims kept, nodes against the smaller peer) and the table with its notes."""
from __future__ import annotations

import os
import platform

import onnx

RTOL = 1e-4


def verdict(row: dict) -> str:
    if any(note.startswith("original does not run") for note in row["notes"]):
        return "skipped (onnxruntime does not run the original)"
    forge = row["nodes"].get("onnxforge")
    if forge is None:
        return "onnxforge failed"
    if row["rel"].get("onnxforge", 0) > RTOL:
        return "onnxforge NOT EQUAL"
    if not row["dynamic_kept"].get("onnxforge", True):
        return "onnxforge pinned a dim"
    if row["best_peer"] is None:
        return "ok (no peer result)"
    return "ok" if forge <= row["best_peer"] else f"larger (+{forge - row['best_peer']})"


def _rel(row, label) -> str:
    if label not in row["nodes"]:
        return "failed"
    if label not in row["rel"]:
        return "—"
    value = row["rel"][label]
    return "inf" if value == float("inf") else f"{value:.1e}"


def markdown(rows: list[dict], command: str) -> str:
    import onnxruntime

    ok = sum(verdict(r).startswith("ok") for r in rows)
    skipped = sum(verdict(r).startswith("skipped") for r in rows)
    lines = ["# Graph size: onnxforge -O3 vs onnxsim and onnxslim", "", f"Command: `{command}`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs; onnx {onnx.__version__}, onnxruntime "
             f"{onnxruntime.__version__} (project venv). Peers' versions: see the JSON. Nodes include subgraphs.",
             "rel = max |variant - original| / max |original| over outputs and feeds (onnxruntime CPU, optimizations",
             "off); feeds = how many input sizes were run (two per dynamic dim where the model has dynamic dims;",
             "backend folders use their own test inputs). dyn = every symbolic dim of the original is still symbolic.",
             "", f"onnxforge <= min(peers) and equal on {ok} of {len(rows) - skipped} models ({skipped} skipped: onnxruntime "
             "does not run the original).", "",
             "| model | nodes orig | onnxforge | onnxsim | onnxslim | rel forge/sim/slim | feeds | dyn forge | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n = r["nodes"]
        lines.append(f"| {r['model']} | {n.get('original')} | {n.get('onnxforge', '—')} | {n.get('onnxsim', '—')} | "
                     f"{n.get('onnxslim', '—')} | {_rel(r, 'onnxforge')}/{_rel(r, 'onnxsim')}/{_rel(r, 'onnxslim')} | "
                     f"{r['feeds']} | {'yes' if r['dynamic_kept'].get('onnxforge', True) else 'NO'} | {verdict(r)} |")
    larger = [r for r in rows if "op_diff" in r]
    if larger:
        lines += ["", "Where onnxforge is larger: op count onnxforge minus the smaller peer's, per op type.", ""]
        for r in larger:
            diff = ", ".join(f"{op} {d:+d}" for op, d in r["op_diff"].items())
            lines.append(f"- {r['model']} (vs {r['larger_than']}): {diff}")
    notes = [f"- {r['model']}: {note}" for r in rows for note in r["notes"]]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"
