"""What ``quantize`` reports: ``QuantReport`` (nodes int8/float with reasons, accuracy,
latency, kernels, notes), written as JSON by the CLI."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass
class QuantReport:
    provider: str
    format: dict
    method: str
    calibration: str
    calibration_feeds: int
    validation: str
    metric: str
    max_drop: float
    score: float | None = None
    score_before_fallback: float | None = None
    budget_met: bool | None = None
    budget_timed_out: bool = False  # the time limit stopped the search early
    evaluations: int = 0  # models built and scored by the search
    max_evaluations: int = 0
    search: str = ""  # how the search ended (evaluations used; stopped by the time limit)
    reproducible: bool = True  # False: a time limit or a latency measurement decided the result
    int8_nodes: list[str] = dataclasses.field(default_factory=list)
    float_nodes: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> why
    kernels: dict[str, int] = dataclasses.field(default_factory=dict)
    latency: dict | None = None
    fallback_steps: list[dict] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    equalized: int = 0
    bias_corrected: int = 0  # layers whose bias absorbed the mean rounding error
    rounding: dict | None = None  # learned rounding: per layer errors, skipped layers (rounding.py)
    kept_float: bool = False
    quantized_for: str = ""  # CPU class the formats were chosen for (runtime/cpuclass.py)
    seconds: float = 0.0
    # where each figure was computed: calibration, sensitivity (the accuracy budget's per-candidate
    # scores), accuracy (the budget's scores), latency (always this process: the machine quantize runs on)
    where: dict[str, str] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.as_dict(), indent=1, default=_jsonable))

    def summary(self) -> str:
        lines = [
            f"provider {self.provider}, {'dynamic MatMul' if self.format.get('dynamic_matmul') else 'static QDQ'}, "
            f"method {self.method}, calibration: {self.calibration} ({self.calibration_feeds} feeds)",
            f"int8 nodes: {len(self.int8_nodes)}, float nodes: {len(self.float_nodes)}",
        ]
        if self.quantized_for:
            lines[0] += f", for CPU class {self.quantized_for}"
        if self.score is not None:
            lines.append(
                f"{self.metric} vs float: {self.score:.5f} (budget >= {1 - self.max_drop:.5f}: "
                f"{'met' if self.budget_met else 'MISSED'}) on {self.validation}"
            )
        if self.latency:
            lat = self.latency
            lines.append(
                f"latency {lat['variant_ms']:.3f} ms vs float {lat['base_ms']:.3f} ms: "
                f"{lat['ratio']:.3f}x [{lat['ci_low']:.3f}, {lat['ci_high']:.3f}]"
            )
        outliers = sorted(n for n, why in self.float_nodes.items() if why.startswith("input outliers"))
        if outliers:
            lines.append(f"kept float for input outliers ({len(outliers)}; reasons in the JSON report): {', '.join(outliers)}")
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _jsonable(value: Any):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)
