"""How a tune result is shown: a table on a terminal, plain text (one line per trial, then
the verdict) otherwise.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onnxforge.runtime.tune import TuneResult


def render_tune(result: TuneResult, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if not console.is_terminal:
        console.print(tune_text(result), markup=False, highlight=False, soft_wrap=True)
        return
    table = Table(title=f"onnxforge tune ({result.elapsed_s:.1f}s of {result.budget_s:.0f}s)")
    for name in ("dimension", "candidate", "outcome", "ratio vs incumbent [95% CI]", "rounds", "note"):
        table.add_column(name)
    for t in result.trials:
        ratio = "-" if not t.ratio else f"{t.ratio['ratio']:.3f} [{t.ratio['low']:.3f}, {t.ratio['high']:.3f}]"
        table.add_row(t.dimension, t.candidate, t.outcome, ratio, str(t.rounds), t.note)
    console.print(table)
    console.print(_verdict_text(result), markup=False)


def _verdict_text(result: TuneResult) -> str:
    conf = result.confirmation
    if conf and "ratio" in conf:
        text = (f"tuned vs default: {conf['ratio']:.3f} [{conf['low']:.3f}, {conf['high']:.3f}] over "
                f"{conf['rounds']} rounds -> {'defaults kept' if result.kept_default else 'tuned profile kept'}")
    elif conf:
        text = conf["note"]
    else:
        text = "no candidate was faster beyond noise: defaults kept"
    return text + (f"\nprofile written to {result.path}" if result.path else "")


def tune_text(result: TuneResult) -> str:
    """Plain-text report: one line per trial, then the verdict."""
    lines = [f"onnxforge tune: {result.elapsed_s:.1f}s of {result.budget_s:.0f}s budget, "
             f"baseline {result.baseline_ms:.3f} ms"]
    for t in result.trials:
        ratio = "-" if not t.ratio else f"{t.ratio['ratio']:.3f} [{t.ratio['low']:.3f}, {t.ratio['high']:.3f}]"
        lines.append(f"  {t.dimension:<16} {t.candidate:<48} {t.outcome:<10} {ratio:<24} rounds={t.rounds} {t.note}")
    lines.append(_verdict_text(result))
    return "\n".join(lines)
