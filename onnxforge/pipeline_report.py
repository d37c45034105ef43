"""The pipeline's JSON report: its skeleton (schema and version), the environment and
package versions it records, per-step changes, and JSON-safe parameters and errors."""
from __future__ import annotations

import os
from typing import Any, Mapping

from .errors import OnnxForgeError, first_line
from .pass_files import user_code
from .recipe import Recipe

REPORT_SCHEMA = "onnxforge.pipeline-report"
REPORT_SCHEMA_VERSION = 1
STAT_KEYS = ("nodes", "parameters", "weight_bytes")


def _empty_report(recipe: Recipe) -> dict[str, Any]:
    import hashlib

    text = recipe.text
    return {
        "schema": REPORT_SCHEMA,
        "schema_version": REPORT_SCHEMA_VERSION,
        "status": "running",
        "exit_code": None,
        "error": None,
        "recipe": {
            "path": recipe.source if recipe.text is not None else None,
            "sha256": hashlib.sha256(text.encode()).hexdigest() if text is not None else None,
            "name": recipe.settings["name"],
            "version": recipe.settings["version"],
            "provider": recipe.provider,
            "input_shapes": {k: list(v) for k, v in recipe.settings["input_shapes"].items()},
            "seed": recipe.settings["seed"],
            "user_code": user_code(recipe),
        },
        "input": None,
        "output": None,
        "steps": [],
        "verification": [],
        "accuracy": [],
        "latency": [],
        "warnings": [],
        "cache": {"enabled": True, "folder": None, "hits": 0, "misses": 0},
        "environment": _environment(),
        "packages": package_versions(),
        "seconds": None,
    }


def _environment() -> dict[str, Any]:
    try:
        from .runtime.env import environment
    except ImportError:  # a build without the runtime package
        import platform

        return {"host": platform.node(), "os": f"{platform.system()} {platform.release()}"}
    return environment()


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions = {}
    for dist in ("onnxforge", "onnx", "onnxruntime", "onnxruntime-gpu", "onnx-graphsurgeon", "numpy", "protobuf"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _changes(before: dict, after: dict) -> dict[str, Any]:
    changes: dict[str, Any] = {k: {"before": before[k], "after": after[k]} for k in STAT_KEYS}
    ops = sorted(set(before["ops"]) | set(after["ops"]))
    changes["ops"] = {
        op: after["ops"].get(op, 0) - before["ops"].get(op, 0)
        for op in ops if before["ops"].get(op, 0) != after["ops"].get(op, 0)
    }
    return changes


def _jsonable_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}


def _json_safe(value: Any) -> Any:
    """Plain JSON types only (numpy scalars and other objects become numbers or strings)."""
    import json

    import numpy as np

    def default(obj):
        if isinstance(obj, (np.floating, np.integer, np.bool_)):
            return obj.item()
        return str(obj)

    return json.loads(json.dumps(value, default=default))


def _error_dict(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, OnnxForgeError):
        return {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}
    return {"type": type(exc).__name__, "message": first_line(exc), "hint": None}
