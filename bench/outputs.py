"""Bench result outputs: terminal table (rich), JSON, CSV and Markdown.

JSON holds everything (every latency sample and the environment); CSV and
Markdown hold one row per model with the summary columns below.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from onnxforge.bench.harness import BenchResult, ModelResult

COLUMNS = ("model", "providers", "create_ms", "first_run_ms", "p50_ms", "p90_ms", "p99_ms", "mean_ms",
           "throughput_per_s", "peak_rss_mb", "ratio", "ratio_low", "ratio_high", "verdict", "accuracy")


def _accuracy_text(model: ModelResult) -> str:
    if not model.accuracy:
        return ""
    return "; ".join(f"{a['output']}: max_abs={a['max_abs']:.3g} cos={a['cosine']:.6f}" for a in model.accuracy)


def summary_rows(result: BenchResult) -> list[dict]:
    rows = []
    for m in result.models:
        r = m.ratio
        rows.append({
            "model": m.label,
            "providers": "+".join(p.removesuffix("ExecutionProvider") for p in m.providers),
            "create_ms": m.create_ms, "first_run_ms": m.first_run_ms,
            "p50_ms": m.stats["p50"], "p90_ms": m.stats["p90"], "p99_ms": m.stats["p99"], "mean_ms": m.stats["mean"],
            "throughput_per_s": m.throughput_per_s, "peak_rss_mb": m.peak_rss_mb,
            "ratio": 1.0 if r is None else r.ratio, "ratio_low": None if r is None else r.low,
            "ratio_high": None if r is None else r.high, "verdict": "baseline" if r is None else r.verdict,
            "accuracy": _accuracy_text(m),
        })
    return rows


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}f}"
    return str(value)


def _ratio_text(row: dict) -> str:
    if row["verdict"] == "baseline":
        return "1 (baseline)"
    return f"{row['ratio']:.3f} [{_fmt(row['ratio_low'])}, {_fmt(row['ratio_high'])}] {row['verdict']}"


def write_json(result: BenchResult, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(result.to_dict(), indent=1, default=_json_default, allow_nan=True) + "\n")
    return path


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def write_csv(result: BenchResult, path: str | Path) -> Path:
    path = Path(path)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in summary_rows(result):
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    path.write_text(buffer.getvalue())
    return path


def markdown_table(result: BenchResult) -> str:
    header = "| model | provider | create ms | first run ms | p50 ms | p90 ms | p99 ms | mean ms | runs/s | peak MB | ratio to first [95% CI] |"
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in summary_rows(result):
        lines.append("| " + " | ".join([
            row["model"], row["providers"], _fmt(row["create_ms"], 1), _fmt(row["first_run_ms"], 2),
            _fmt(row["p50_ms"]), _fmt(row["p90_ms"]), _fmt(row["p99_ms"]), _fmt(row["mean_ms"]),
            _fmt(row["throughput_per_s"], 1), _fmt(row["peak_rss_mb"], 1), _ratio_text(row),
        ]) + " |")
    accuracy = [(r["model"], r["accuracy"]) for r in summary_rows(result) if r["accuracy"]]
    if accuracy:
        lines += ["", "| model | accuracy vs reference |", "|---|---|"]
        lines += [f"| {name} | {text} |" for name, text in accuracy]
    env = result.environment
    if env:
        cpu = env["cpu"]
        lines += ["", f"Machine: {cpu['model']}, {cpu['usable_cores']} usable cores, {' '.join(cpu['isa'])}; "
                      f"{env['versions']['onnxruntime_package']}, onnx {env['versions']['onnx']}. "
                      f"{result.config['rounds']} interleaved rounds, threads={result.config['threads']}."]
    return "\n".join(lines) + "\n"


def write_markdown(result: BenchResult, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(markdown_table(result))
    return path


def render_table(result: BenchResult, console=None) -> None:
    """Rich table on a terminal; the plain Markdown table otherwise (logs, pipes)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if not console.is_terminal:
        console.print(markdown_table(result).rstrip("\n"), markup=False, highlight=False, soft_wrap=True)
        return
    table = Table(title=f"onnxforge bench ({result.config['rounds']} interleaved rounds)")
    for name in ("model", "provider", "create ms", "1st run ms", "p50 ms", "p90 ms", "p99 ms", "mean ms",
                 "runs/s", "peak MB", "ratio [95% CI]"):
        table.add_column(name, justify="left" if name in ("model", "provider", "ratio [95% CI]") else "right")
    for row in summary_rows(result):
        table.add_row(row["model"], row["providers"], _fmt(row["create_ms"], 1), _fmt(row["first_run_ms"], 2),
                      _fmt(row["p50_ms"]), _fmt(row["p90_ms"]), _fmt(row["p99_ms"]), _fmt(row["mean_ms"]),
                      _fmt(row["throughput_per_s"], 1), _fmt(row["peak_rss_mb"], 1), _ratio_text(row))
    console.print(table)
    for row in summary_rows(result):
        if row["accuracy"]:
            console.print(f"{row['model']} vs reference: {row['accuracy']}")
