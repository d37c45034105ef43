"""Optimization reports: model statistics before and after, per-pass changes and
time, verification results, warnings. Printed as a table, saved as JSON."""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from .model import Model, iter_graphs, parameter_count, weight_bytes

SCHEMA_VERSION = 1


def op_histogram(model: Model) -> dict[str, int]:
    counts: collections.Counter = collections.Counter()
    for g in iter_graphs(model.graph):
        for node in g.nodes:
            key = node.op if node.domain in ("", "ai.onnx", None) else f"{node.domain}.{node.op}"
            counts[key] += 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def model_stats(model: Model, file_bytes: int | None = None) -> dict[str, Any]:
    hist = op_histogram(model)
    stats = {
        "nodes": sum(hist.values()),
        "ops": hist,
        "parameters": parameter_count(model.graph),
        "weight_bytes": weight_bytes(model.graph),
        "opsets": {imp.domain or "ai.onnx": imp.version for imp in model.meta.opset_import},
        "ir_version": model.meta.ir_version,
    }
    if file_bytes is not None:
        stats["file_bytes"] = file_bytes
    return stats


@dataclasses.dataclass
class PassRecord:
    name: str
    iteration: int
    changed: bool
    stats: dict[str, int]
    seconds: float


@dataclasses.dataclass
class OptimizeReport:
    before: dict[str, Any]
    after: dict[str, Any] = dataclasses.field(default_factory=dict)
    records: list[PassRecord] = dataclasses.field(default_factory=list)
    iterations: int = 0
    verification: dict[str, Any] | None = None
    rolled_back: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    refusals: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    input: str | None = None
    output: str | None = None
    # What the run was verified against (verify.Verifier); judges the written file too.
    verifier: Any = dataclasses.field(default=None, repr=False, compare=False)

    def check_written(self, path: Path) -> None:
        """Verify the file as written (reloaded from disk) with the run's verifier and
        tolerance; the report's verdict becomes the file's. Raises when it fails, so
        ``io.save(check=...)`` never moves a failing file into place."""
        from .errors import VerificationError

        if self.verifier is None or self.verification is None:
            return
        tol = self.verification.get("tolerance") or {}
        result = self.verifier.check_file(Path(path), (tol.get("rtol", 0.0), tol.get("atol", 0.0)))
        result.tolerance = (tol.get("rtol", 0.0), tol.get("atol", 0.0))
        self.verification = {**result.as_dict(), "file": "written file, reloaded from disk",
                             "at_default_level": self.verification.get("at_default_level", False)}
        if not result.ok:
            raise VerificationError(
                f"the written model fails {result.mode} verification, so it was not written: {result.detail}",
                hint="report this model; --verify none writes it unverified",
            )

    def per_pass(self) -> list[dict[str, Any]]:
        table: dict[str, dict[str, Any]] = {}
        for r in self.records:
            row = table.setdefault(r.name, {"pass": r.name, "runs": 0, "changed": 0, "seconds": 0.0, "stats": {}})
            row["runs"] += 1
            row["changed"] += int(r.changed)
            row["seconds"] += r.seconds
            for k, v in r.stats.items():
                row["stats"][k] = row["stats"].get(k, 0) + v
        return list(table.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "optimize",
            "input": self.input,
            "output": self.output,
            "before": self.before,
            "after": self.after,
            "passes": self.per_pass(),
            "iterations": self.iterations,
            "verification": self.verification,
            "rolled_back": self.rolled_back,
            "warnings": self.warnings,
            "refusals": self.refusals,
            "seconds": round(self.seconds, 4),
        }


def write_json(data: dict, path: str | os.PathLike) -> None:
    """Atomically write a JSON document through the guarded writer (never over a file the run reads)."""
    from .io import write_text

    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def group_refusals(refusals: list[dict]) -> dict[tuple[str, str], list[tuple[str, ...]]]:
    """(rule, reason) -> the node-name tuples it was given for, in first-seen order."""
    groups: dict[tuple[str, str], list[tuple[str, ...]]] = {}
    for r in refusals:
        groups.setdefault((r["rule"], r["reason"]), []).append(tuple(r["nodes"]))
    return groups


def render(report: OptimizeReport, file=None, explain: bool = False) -> None:
    """Print the report: a summary table, per-op changes, per-pass table, verification."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=file or sys.stdout, highlight=False, soft_wrap=True)
    b, a = report.before, report.after
    summary = Table(title="onnxforge optimize", show_edge=False)
    summary.add_column("")
    summary.add_column("before", justify="right")
    summary.add_column("after", justify="right")
    summary.add_column("change", justify="right")
    for key, fmt in (("nodes", str), ("parameters", lambda v: f"{v:,}"), ("weight_bytes", _fmt_bytes), ("file_bytes", _fmt_bytes)):
        if key in b or key in a:
            bv, av = b.get(key), a.get(key)
            change = f"{(av - bv) / bv * 100:+.1f}%" if bv and av is not None else "-"
            summary.add_row(key.replace("_", " "), fmt(bv) if bv is not None else "-", fmt(av) if av is not None else "-", change)
    console.print(summary)

    ops = Table(title="op histogram (changed ops)", show_edge=False)
    ops.add_column("op")
    ops.add_column("before", justify="right")
    ops.add_column("after", justify="right")
    names = sorted(set(b.get("ops", {})) | set(a.get("ops", {})))
    changed = [n for n in names if b.get("ops", {}).get(n, 0) != a.get("ops", {}).get(n, 0)]
    for n in changed:
        ops.add_row(n, str(b.get("ops", {}).get(n, 0)), str(a.get("ops", {}).get(n, 0)))
    if changed:
        console.print(ops)

    passes = Table(title=f"passes ({report.iterations} iteration(s) to fixpoint)", show_edge=False)
    passes.add_column("pass")
    passes.add_column("changes")
    passes.add_column("ms", justify="right")
    for row in report.per_pass():
        stats = ", ".join(f"{k} {v}" for k, v in row["stats"].items()) or "-"
        passes.add_row(row["pass"], stats, f"{row['seconds'] * 1000:.1f}")
    console.print(passes)

    v = report.verification
    if v:
        status = "passed" if v["ok"] else "FAILED"
        line = f"verification: {v['mode']} {status}" + (" on the written file" if v.get("file") else "")
        outs = v.get("outputs") or []
        if outs:
            worst_rel = max(o["max_rel"] for o in outs)
            worst_cos = min(o["cosine"] for o in outs)
            line += f" (max rel error {worst_rel:.2e}, min cosine {worst_cos:.6f}, {len(outs)} output(s))"
        if v.get("detail"):
            line += f": {v['detail']}"
        elif v["ok"] and v.get("at_default_level"):
            line += "; the result also at onnxruntime's default optimization level"
        console.print(escape(line))
    for rb in report.rolled_back:
        console.print(f"[yellow]warning:[/] {escape(rolled_back_line(rb))}")
    for w in report.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}")
    if explain:
        if report.refusals:
            console.print(f"not rewritten ({len(report.refusals)} candidates), by rule and reason:")
            for (rule, reason), nodes in group_refusals(report.refusals).items():
                shown = "; ".join(", ".join(n) or "-" for n in nodes[:3])
                more = f" and {len(nodes) - 3} more" if len(nodes) > 3 else ""
                console.print(escape(f"  {rule}: {reason} (x{len(nodes)}) [{shown}]{more}"))
        else:
            console.print("not fused: nothing was refused")


def rolled_back_line(rb: dict) -> str:
    """One rolled-back pass, or one rolled-back rewrite of a pass (rule and nodes)."""
    if rb.get("rule"):
        return (f"pass {rb['pass']}: rewrite {rb['rule']} on node(s) {', '.join(rb['nodes']) or '-'} "
                f"rolled back: {rb['reason']}")
    return f"pass {rb['pass']} rolled back: {rb['reason']}"
