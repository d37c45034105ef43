"""PNG plot of a bench result: latency distributions (one violin + box per
model, log axis when they span more than 10x) and, with several models, each
model's ratio to the first with its 95% interval.

Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch),
so it works headless and never touches other code's figures.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from onnxforge.bench.harness import BenchResult


def plot_result(result: BenchResult, path: str | Path, title: str | None = None) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = result.models
    with_ratios = len(models) > 1
    fig = Figure(figsize=(max(6.0, 1.6 * len(models) + 3), 4.5 if not with_ratios else 7.5), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if with_ratios else 1, 1, squeeze=False,
                        gridspec_kw={"height_ratios": [2, 1]} if with_ratios else None)[:, 0]
    _distributions(axes[0], result)
    axes[0].set_title(title or _default_title(result), fontsize=10)
    if with_ratios:
        _ratios(axes[1], result)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def _default_title(result: BenchResult) -> str:
    env = result.environment
    cpu = f"{env['cpu']['model']}, {env['cpu']['usable_cores']} cores" if env else ""
    return f"latency per run, {result.config['rounds']} interleaved rounds" + (f" ({cpu})" if cpu else "")


def _distributions(ax, result: BenchResult) -> None:
    samples = [np.asarray(m.latencies_ms) for m in result.models]
    positions = np.arange(1, len(samples) + 1)
    ax.violinplot(samples, positions=positions, showextrema=False, widths=0.8)
    ax.boxplot(samples, positions=positions, widths=0.15, showfliers=False, medianprops={"color": "black"})
    ax.set_xticks(positions, [m.label for m in result.models], rotation=15, fontsize=8)
    ax.set_ylabel("latency (ms)")
    lo = min(float(s.min()) for s in samples)
    hi = max(float(s.max()) for s in samples)
    if lo > 0 and hi / lo > 10:
        ax.set_yscale("log")
    for pos, model in zip(positions, result.models):
        ax.annotate(f"p50 {model.stats['p50']:.3g}", (pos, model.stats["p50"]), xytext=(18, 0),
                    textcoords="offset points", fontsize=7, va="center")
    ax.grid(axis="y", alpha=0.3)


def _ratios(ax, result: BenchResult) -> None:
    labels, ratios, lows, highs = [], [], [], []
    for m in result.models[1:]:
        labels.append(m.label)
        ratios.append(m.ratio.ratio)
        lows.append(m.ratio.ratio - m.ratio.low)
        highs.append(min(m.ratio.high, 10 * m.ratio.ratio) - m.ratio.ratio)
    y = np.arange(len(labels))
    colors = ["tab:green" if m.ratio.verdict == "faster" else "tab:red" if m.ratio.verdict == "slower"
              else "tab:gray" for m in result.models[1:]]
    for yi, ratio, low, high, color in zip(y, ratios, lows, highs, colors):
        ax.errorbar([ratio], [yi], xerr=[[low], [high]], fmt="o", color=color, capsize=4)
    ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.invert_yaxis()  # same top-to-bottom order as the models above
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel(f"latency ratio to {result.models[0].label} (95% CI; < 1 is faster)")
    ax.grid(axis="x", alpha=0.3)
