"""The fleet's report: a row per model (what its pipeline report says) and the fleet
report written as JSON, CSV and Markdown (``fleet.py`` runs the fleet and fills it)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Mapping

from .workers import Workers, host_name

FLEET_SCHEMA = "onnxforge.fleet-report"
FLEET_SCHEMA_VERSION = 1
REPORT_NAMES = ("fleet.json", "fleet.csv", "fleet.md")
CSV_COLUMNS = ("name", "status", "exit_code", "nodes_before", "nodes_after", "bytes_before", "bytes_after",
               "accuracy", "accuracy_source", "latency_ratio", "latency_low", "latency_high", "latency_measured_on",
               "seconds", "worker", "cached", "error")


def model_row(task: dict, result: dict, error: str | None) -> dict:
    rep = result.get("report") or {}
    inp, out = rep.get("input") or {}, rep.get("output") or {}
    accuracy = _accuracy(rep)
    ok = result.get("exit_code") == 0 and error is None
    steps = [s for s in rep.get("steps", ()) if s.get("cached") is not None]
    return {
        "name": task["name"], "input": task["model"], "output": task["output"] if ok else None,
        "status": "ok" if ok else "failed", "exit_code": result.get("exit_code"), "error": error,
        "nodes_before": (inp.get("stats") or {}).get("nodes"), "nodes_after": (out.get("stats") or {}).get("nodes"),
        "bytes_before": _input_bytes(task["model"]), "bytes_after": (out.get("stats") or {}).get("file_bytes"),
        "accuracy": accuracy[0], "accuracy_source": accuracy[1],
        "latency_ratio": None, "latency_low": None, "latency_high": None, "latency_measured_on": None,
        "seconds": result.get("seconds"), "worker": result.get("host"),
        "cached": _cached(result, steps),
        "output_sha256": out.get("sha256") if ok else None,
    }


def _cached(result: dict, steps: list[dict]) -> str | None:
    if result.get("run_cached"):
        return "run"
    if not result.get("report"):
        return None
    return f"steps {sum(1 for s in steps if s['cached'])}/{len(steps)}" if steps else "no cacheable steps"


def _input_bytes(path: str) -> int | None:
    from .cache import saved_model_bytes

    try:
        return saved_model_bytes(path)
    except OSError:
        return None


def _accuracy(rep: dict) -> tuple[float | None, str | None]:
    """The last accuracy figure of the run: a check's min cosine, or a budget's score."""
    for acc in reversed(rep.get("accuracy") or []):
        if acc.get("outputs"):
            return min(o["cosine"] for o in acc["outputs"]), f"check step {acc['step']}: min cosine"
        if acc.get("score") is not None:
            return acc["score"], f"step {acc['step']}: {acc['metric']}"
    return None, None


def empty_fleet_report(recipe, workers: Workers, common: dict, tasks: list[dict]) -> dict:
    import hashlib

    return {
        "schema": FLEET_SCHEMA, "schema_version": FLEET_SCHEMA_VERSION, "status": "running", "exit_code": None,
        "recipe": {"path": recipe.source, "name": recipe.settings["name"],
                   "sha256": hashlib.sha256((recipe.text or "").encode()).hexdigest()},
        "workers": {"kind": workers.kind, "where": workers.where, "count": workers.count},
        "driver": host_name(),
        "where": {"steps": "workers (each model in its own process)", "accuracy": "workers (deterministic)",
                  "latency": f"{host_name()}, the driver (target machine), after all models, one at a time"},
        "cache": {"enabled": common["use_cache"], "folder": common["cache_dir"]},
        "model_timeout_s": common["model_timeout"],
        "models": [model_row(t, {"exit_code": None}, None) | {"status": "pending"} for t in tasks],
        "summary": None, "seconds": None,
    }


def write_fleet_report(report: dict, paths: Mapping[str, Path]) -> None:
    """JSON, CSV and Markdown, each written atomically."""
    from .io import write_text

    write_text(paths["json"], json.dumps(report, indent=1, sort_keys=False, default=str) + "\n")
    write_text(paths["csv"], fleet_csv(report))
    write_text(paths["md"], fleet_markdown(report))


def fleet_csv(report: dict) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in report["models"]:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_COLUMNS})
    return buffer.getvalue()


def fleet_markdown(report: dict) -> str:
    lines = [f"# Fleet: {report['recipe']['name'] or report['recipe']['path']}", "",
             f"status: {report['status']}; workers: {report['workers']['where']}; "
             f"latency measured on: {report['where']['latency']}", "",
             "| model | status | nodes | size | accuracy | latency ratio [95%] | time (s) | worker | cache | error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["models"]:
        nodes = f"{r['nodes_before']} -> {r['nodes_after']}" if r["nodes_after"] is not None else ""
        size = f"{_mb(r['bytes_before'])} -> {_mb(r['bytes_after'])}" if r["bytes_after"] is not None else ""
        acc = f"{r['accuracy']:.5f}" if r["accuracy"] is not None else ""
        lat = (f"{r['latency_ratio']:.3f} [{r['latency_low']:.3f}, {r['latency_high']:.3f}]"
               if r["latency_ratio"] is not None else "")
        secs = f"{r['seconds']:.1f}" if r["seconds"] is not None else ""
        error = (r["error"] or "").replace("|", "\\|")
        lines.append(f"| {r['name']} | {r['status']} | {nodes} | {size} | {acc} | {lat} | {secs} | "
                     f"{r['worker'] or ''} | {r['cached'] or ''} | {error} |")
    if report.get("summary"):
        s = report["summary"]
        lines += ["", f"{s['ok']} of {s['models']} ok, {s['failed']} failed, {s['from_run_cache']} from the run cache; "
                      f"{report['seconds']:.1f} s"]
    return "\n".join(lines) + "\n"


def _mb(n: int | None) -> str:
    return "" if n is None else f"{n / 1e6:.2f} MB"
