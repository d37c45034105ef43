"""Search-space dimensions for tuning.

A dimension is one knob (or a few knobs that only make sense together, such as
parallel execution plus its inter-op thread count). Each value is a partial
options dict applied over the incumbent profile; the first value is the
default, the one tuning keeps unless another is faster beyond noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Dimension:
    name: str
    section: str  # "session" or "provider"
    values: tuple[dict[str, Any], ...]
    lossy: bool = False  # changes numerics (TF32, FP16): searched only when allowed

    def label(self, index: int) -> str:
        value = self.values[index]
        if not value:
            return "default"
        return ",".join(f"{k}={_short(v)}" for k, v in value.items())


def _short(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def thread_counts(cores: int) -> list[int]:
    """Candidate intra-op thread counts: all cores, half, a quarter, one."""
    counts = [cores, cores // 2, cores // 4, 1]
    return list(dict.fromkeys(c for c in counts if c >= 1))
