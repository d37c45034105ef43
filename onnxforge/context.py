"""Settings and per-run collectors shared by the passes of one pipeline run.

A fresh ``PassContext`` is made for every run; passes keep no state of their own
between runs, so the same pass object can serve many pipelines at once.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .model import Model


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a rule matched a candidate but did not rewrite it (printed by --explain)."""

    rule: str
    reason: str
    nodes: tuple[str, ...] = ()

    def __str__(self) -> str:
        where = ", ".join(self.nodes) if self.nodes else "-"
        return f"{self.rule}: {self.reason} [{where}]"


@dataclasses.dataclass
class PassContext:
    """What a pass may read (settings) and append to (refusals, warnings)."""

    model: Model | None = None
    provider: str = "cpu"
    input_shapes: dict[str, tuple] = dataclasses.field(default_factory=dict)
    # Inputs the user pinned (--pin-input): name -> values, or None for the input's default.
    pinned_inputs: dict[str, tuple | None] = dataclasses.field(default_factory=dict)
    # Shapes for the verification inputs only (--verify-shape): never written into the model.
    verify_shapes: dict[str, tuple] = dataclasses.field(default_factory=dict)
    options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # Constant folding refuses to materialise tensors larger than this (bytes).
    fold_size_limit: int = 16 << 20
    seed: int = 0
    refusals: list[Refusal] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    # Rewrites (rule + matched nodes) the pass manager rolled back: rules skip them.
    denied_rewrites: frozenset[tuple[str, tuple[str, ...]]] = frozenset()
    # When set, rewrites past this many in the current pass run are skipped (the pass
    # manager bisects a failing pass over its rewrites with it); counts down as they fire.
    rewrite_budget: int | None = None
    # Every rewrite that fired, in order: (pass, rule, matched nodes).
    rewrites: list[tuple[str, str, tuple[str, ...]]] = dataclasses.field(default_factory=list)
    # New tensor name -> the original tensor it stands for (a fused node's output,
    # written as the model's ``onnxforge.name_map`` metadata so ``debug`` can match it).
    name_map: dict[str, str] = dataclasses.field(default_factory=dict)

    def option(self, pass_name: str, key: str, default: Any = None) -> Any:
        return self.options.get(pass_name, {}).get(key, default)

    def refuse(self, refusal: Refusal) -> None:
        if refusal not in self.refusals:
            self.refusals.append(refusal)

    def fresh(self, model: Model | None) -> "PassContext":
        """The same settings with empty collectors, for a rerun from the original."""
        return dataclasses.replace(self, model=model, refusals=[], warnings=list(self.warnings), rewrites=[],
                                   name_map={}, rewrite_budget=None)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
