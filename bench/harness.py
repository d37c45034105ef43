"""Benchmark harness: latency, throughput, memory and (optionally) accuracy of
one or more models, measured interleaved so machine noise hits all alike.

Every model's session lives in this one process, because interleaving needs
all of them ready at once: round after round, in a freshly shuffled order,
each model runs ``iterations`` times. A model's latency in a round is the
median of those runs; ratios to the first model come from the per-round
medians (see ``stats.ratio_ci``).

Memory: before creating each session the process's peak-RSS mark is reset
(Linux ``/proc/self/clear_refs``), so ``peak_rss_mb`` is the high-water mark
above the RSS before creation, over creation, the first run and warmup. That
is the session's own cost (weights, arena, optimized graph) without a
subprocess per model, which would break the interleaving. Memory a
process already freed is reused before RSS grows, so the figure is exact in a
fresh process (the CLI) and a lower bound in a long-lived one. Without
clear_refs (non-Linux) the figure is left out rather than guessed.
"""
from __future__ import annotations

import datetime as _dt
import gc
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from onnxforge.bench.memory import reset_peak_rss, status_kb
from onnxforge.bench.stats import RatioCI, ratio_ci, summarize
from onnxforge.bench.variants import Variant, make_variants, parse_model_spec  # noqa: F401  (parse_model_spec re-exported)
from onnxforge.errors import DataError, OptionError
from onnxforge.inputs import check_data, load_feeds
from onnxforge.verify_feeds import runnable_feeds
from onnxforge.io import load_input
from onnxforge.runtime.env import environment
from onnxforge.runtime.session import make_runner, outputs_as_numpy, session

ROUND_TARGET_S = 0.15  # aim for this much time per model per round when choosing iterations
MIN_ITERATIONS, MAX_ITERATIONS = 3, 50
ACCURACY_FEEDS = 4  # feeds compared against --reference


@dataclass
class BenchConfig:
    rounds: int = 15
    warmup: int = 3
    iterations: int | None = None  # runs per model per round; None = from warmup latency
    threads: int | None = None  # intra-op threads over every profile; None = the profile's
    seed: int = 0
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    data: str | None = None
    reference: str | None = None
    recreate_every: int | None = None  # fresh sessions every N rounds (None = never)

    def __post_init__(self):
        if self.rounds < 1 or self.warmup < 0 or (self.iterations is not None and self.iterations < 1):
            raise OptionError("bench: need --rounds >= 1, --warmup >= 0 and --iterations >= 1")
        if self.recreate_every is not None and self.recreate_every < 1:
            raise OptionError("bench: --recreate-every must be >= 1")
        if self.threads is not None and self.threads < 0:
            raise OptionError("bench: --threads must be >= 0 (0 = onnxruntime's default)")


@dataclass
class ModelResult:
    label: str
    path: str
    profile_source: str
    providers: list[str]
    create_ms: float
    first_run_ms: float
    iterations: int
    latencies_ms: list[float]
    round_medians_ms: list[float]
    stats: dict[str, float]
    throughput_per_s: float
    peak_rss_mb: float | None
    session_rss_mb: float | None
    ratio: RatioCI | None = None
    accuracy: list[dict] | None = None
    warm_ms: float = 0.0  # median warmup latency

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ratio"] = None if self.ratio is None else {**asdict(self.ratio), "verdict": self.ratio.verdict}
        return data


@dataclass
class BenchResult:
    models: list[ModelResult]
    config: dict
    environment: dict
    started: str

    @property
    def ratios(self) -> list[RatioCI | None]:
        return [m.ratio for m in self.models]

    def to_dict(self) -> dict:
        return {"schema": "onnxforge.bench", "version": 1, "started": self.started, "config": self.config,
                "environment": self.environment, "models": [m.to_dict() for m in self.models]}


# ---------------------------------------------------------------------- memory


def _warm_runtime() -> None:
    """Pay onnxruntime's one-time process setup (environment, kernel registry)
    before measuring, so it is not charged to the first model's memory and time."""
    from onnxforge.runtime.env import probe_model

    session(probe_model(), None).run(None, {"x": np.zeros(1, np.float32)})


# ----------------------------------------------------------------------- feeds


def make_feeds(model_path: str | os.PathLike, input_shapes: Mapping | None = None, data: str | None = None,
               seed: int = 0) -> list[dict]:
    """Feed dicts for a model: from ``data`` (npz folder/file, npy folder) or seeded."""
    model = load_input(model_path, "a benchmarked model")
    names = [i.name for i in model.graph.inputs]
    if data:
        check_data(model, data, "--data")
        return load_feeds(data, input_names=names)
    return runnable_feeds(model, dict(input_shapes or {}), 1, seed)


# ---------------------------------------------------------------------- running


@dataclass
class LiveSession:
    variant: Variant
    runner: Callable[[int], object]
    providers: list[str]
    create_ms: float
    first_run_ms: float
    peak_rss_mb: float | None
    session_rss_mb: float | None
    iterations: int = 0
    latencies: list[float] = field(default_factory=list)
    round_medians: list[float] = field(default_factory=list)
    session: object = None
    accuracy: list[dict] | None = None


def start_session(variant: Variant, feeds: list[dict], config: BenchConfig) -> LiveSession:
    gc.collect()
    rss_before = status_kb("VmRSS")
    can_track = reset_peak_rss() and rss_before is not None
    overrides = {"intra_op_num_threads": config.threads} if config.threads is not None else None
    t0 = time.perf_counter()
    sess = session(variant.path, variant.profile, overrides=overrides)
    create_ms = (time.perf_counter() - t0) * 1e3
    rss_created = status_kb("VmRSS")
    runner = make_runner(sess, feeds, variant.profile)
    t0 = time.perf_counter()
    runner(0)
    first_ms = (time.perf_counter() - t0) * 1e3
    warm = []
    for i in range(config.warmup):
        t0 = time.perf_counter()
        runner(i + 1)
        warm.append((time.perf_counter() - t0) * 1e3)
    peak = status_kb("VmHWM") if can_track else None
    live = LiveSession(variant, runner, sess.get_providers(), create_ms, first_ms,
                 None if peak is None else (peak - rss_before) / 1024,
                 None if not can_track or rss_created is None else (rss_created - rss_before) / 1024,
                 session=sess)
    live.warm_ms = float(np.median(warm)) if warm else first_ms
    live.iterations = config.iterations or _auto_iterations(live.warm_ms)
    return live


def _auto_iterations(latency_ms: float) -> int:
    wanted = ROUND_TARGET_S * 1e3 / max(latency_ms, 1e-3)
    return int(min(MAX_ITERATIONS, max(MIN_ITERATIONS, math.ceil(wanted))))


def _equalize_iterations(lives: Sequence[LiveSession], config: BenchConfig) -> None:
    """Every model runs the same feeds the same number of times per round: with
    feeds of different shapes, unequal counts would give models different work."""
    if config.iterations is None:
        count = _auto_iterations(float(np.median([live.warm_ms for live in lives])))
        for live in lives:
            live.iterations = count


def _run_round(live: LiveSession, offset: int) -> None:
    times = []
    for k in range(live.iterations):
        t0 = time.perf_counter_ns()
        live.runner(offset + k)
        times.append((time.perf_counter_ns() - t0) / 1e6)
    live.latencies.extend(times)
    live.round_medians.append(float(np.median(times)))


def round_order(count: int, seed: int, round_no: int) -> list[int]:
    """Model order in round ``round_no``: a seeded shuffle in even rounds, its
    reverse in the following odd round. Every pair of rounds puts each model in
    mirrored positions, so a position effect (running right after another
    model, measured at 10-20% on a loaded machine) cancels in the ratios
    instead of favouring whichever model a shuffle happened to put second."""
    order = list(range(count))
    random.Random(f"{seed}:{round_no - round_no % 2}").shuffle(order)
    return order[::-1] if round_no % 2 else order


def run_rounds(lives: Sequence[LiveSession], rounds: int, seed: int, on_round: Callable[[], None] | None = None,
               first_round: int = 0) -> None:
    """Interleave: every round runs each model's block once, in ``round_order``.

    Each block starts with one untimed run, so a model's first call after
    another model ran (cold caches, parked threads) is not in its samples.
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one model's timing would bias that model only
    try:
        for r in range(first_round, first_round + rounds):
            for index in round_order(len(lives), seed, r):
                lives[index].runner(r * lives[index].iterations)
                _run_round(lives[index], r * lives[index].iterations)
            if on_round:
                on_round()
    finally:
        if gc_was_enabled:
            gc.enable()


def _result(live: LiveSession) -> ModelResult:
    stats = summarize(live.latencies)
    return ModelResult(
        label=live.variant.label, path=str(live.variant.path), profile_source=live.variant.profile_source,
        providers=live.providers, create_ms=live.create_ms, first_run_ms=live.first_run_ms,
        iterations=live.iterations, latencies_ms=live.latencies, round_medians_ms=live.round_medians,
        stats=stats, throughput_per_s=1e3 / stats["mean"], peak_rss_mb=live.peak_rss_mb,
        session_rss_mb=live.session_rss_mb, accuracy=live.accuracy,
    )


# --------------------------------------------------------------------- accuracy


def compare_outputs(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], names: Sequence[str]) -> list[dict]:
    """Max abs error and cosine similarity per output (by position)."""
    rows = []
    for name, ref, got in zip(names, reference, candidate):
        ref = np.asarray(ref)
        got = np.asarray(got)
        if ref.shape != got.shape:
            rows.append({"output": name, "max_abs": math.inf, "cosine": float("nan"),
                         "note": f"shape {got.shape} vs reference {ref.shape}"})
            continue
        a = ref.astype(np.float64).ravel()
        b = got.astype(np.float64).ravel()
        finite = np.isfinite(a) & np.isfinite(b)
        max_abs = float(np.max(np.abs(a[finite] - b[finite]))) if finite.any() else 0.0
        norm = float(np.linalg.norm(a[finite]) * np.linalg.norm(b[finite]))
        cosine = float(np.dot(a[finite], b[finite]) / norm) if norm > 0 else (1.0 if max_abs == 0 else 0.0)
        rows.append({"output": name, "max_abs": max_abs, "cosine": cosine})
    return rows


def _accuracy(reference_path: str, lives: Sequence[LiveSession], feeds: list[dict]) -> None:
    ref_sess = session(reference_path, None)
    names = [o.name for o in ref_sess.get_outputs()]
    ref_inputs = {i.name for i in ref_sess.get_inputs()}
    chosen = feeds[:ACCURACY_FEEDS]
    ref_outputs = [ref_sess.run(None, {k: v for k, v in f.items() if k in ref_inputs}) for f in chosen]
    for live in lives:
        per_feed = []
        for i, ref_out in enumerate(ref_outputs):
            got = outputs_as_numpy(live.runner(i))
            per_feed.append(compare_outputs(ref_out, got, names))
        live_rows = []
        for j, name in enumerate(names):
            rows = [feed_rows[j] for feed_rows in per_feed if j < len(feed_rows)]
            if rows:
                live_rows.append({"output": name, "max_abs": max(r["max_abs"] for r in rows),
                                  "cosine": min(r["cosine"] for r in rows),
                                  **({"note": rows[0]["note"]} if "note" in rows[0] else {})})
        live.accuracy = live_rows


# --------------------------------------------------------------------- public API


def run_bench(variants: Sequence[Variant], config: BenchConfig, feeds: list[dict] | None = None,
              progress=None, record_environment: bool = True) -> BenchResult:
    """Benchmark ``variants`` interleaved; ``progress(advance)`` is called per round.

    ``feeds``: feed dicts shared by every model (``None``: seeded from the first
    model, or loaded from ``config.data``).
    """
    if not variants:
        raise OptionError("bench: no models given")
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if config.reference:
        load_input(config.reference, "the --reference model")  # validated before anything runs
    if feeds is None:
        feeds = make_feeds(variants[0].path, config.input_shapes, config.data, config.seed)
    if not feeds:
        raise DataError("bench: no input feeds")
    _warm_runtime()
    lives = [start_session(v, feeds, config) for v in variants]
    _equalize_iterations(lives, config)
    _run_blocks(lives, feeds, config, progress)
    if config.reference:
        _accuracy(config.reference, lives, feeds)
    results = [_result(live) for live in lives]
    base = results[0].round_medians_ms
    for res in results[1:]:
        res.ratio = ratio_ci(base, res.round_medians_ms)
    return BenchResult(results, _config_dict(config, feeds), environment() if record_environment else {}, started)


def _run_blocks(lives: list[LiveSession], feeds: list[dict], config: BenchConfig, progress) -> None:
    """All rounds, in blocks of ``recreate_every`` with fresh sessions between
    blocks: a session-level effect (where its threads and buffers landed) then
    varies across blocks and shows in the interval instead of biasing the ratio."""
    block = config.recreate_every or config.rounds
    for start in range(0, config.rounds, block):
        if start:
            for i, live in enumerate(lives):
                lives[i] = _recreated(live, feeds, config)
        run_rounds(lives, min(block, config.rounds - start), config.seed, progress, first_round=start)


def _recreated(live: LiveSession, feeds: list[dict], config: BenchConfig) -> LiveSession:
    live.session = live.runner = None
    fresh = start_session(live.variant, feeds, config)
    # keep the first session's creation/first-run/memory figures and the samples so far
    fresh.create_ms, fresh.first_run_ms = live.create_ms, live.first_run_ms
    fresh.peak_rss_mb, fresh.session_rss_mb, fresh.warm_ms = live.peak_rss_mb, live.session_rss_mb, live.warm_ms
    fresh.iterations, fresh.latencies, fresh.round_medians = live.iterations, live.latencies, live.round_medians
    return fresh


def _config_dict(config: BenchConfig, feeds: list[dict]) -> dict:
    data = asdict(config)
    data["input_shapes"] = {k: list(v) for k, v in config.input_shapes.items()}
    data["feeds"] = len(feeds)
    data["feed_shapes"] = {k: list(np.shape(v)) for k, v in feeds[0].items()}
    return data


def compare_latency(models: Sequence[str | os.PathLike], feeds: dict | list[dict] | None = None, *,
                    threads: int | None = 2, rounds: int = 15, warmup: int = 3, iterations: int | None = None,
                    profiles: Sequence | None = None, provider: str = "cpu", seed: int = 0,
                    input_shapes: Mapping | None = None) -> BenchResult:
    """Latency of ``models[1:]`` relative to ``models[0]``, measured interleaved.

    Example::

        from onnxforge.bench.harness import compare_latency
        res = compare_latency(["raw.onnx", "opt.onnx"], feeds, threads=2, rounds=15)
        r = res.models[1].ratio          # RatioCI(ratio, low, high, rounds)
        print(r, r.verdict)              # "0.912 [0.880, 0.945] faster"
        res.models[0].stats["p50"]       # ms; also p90, p99, mean, std, min, max

    models: model paths; the first is the baseline (its ``ratio`` is None).
    feeds: one feed dict or a list of them (cycled), shared by all models;
        None = seeded inputs from the first model (``input_shapes`` pins
        dynamic dims, e.g. {"input_ids": (1, 128)}).
    threads: intra-op threads for every model (None = each profile's own).
    rounds: interleaved rounds; the 95% CI is a t-interval over them.
    iterations: runs per model per round (None = about 0.15 s worth).
    profiles: per-model profile (path, dict, Profile, "auto" or None); default
        None = onnxruntime's defaults for ``provider`` on every model.
    """
    if isinstance(feeds, Mapping):
        feeds = [dict(feeds)]
    variants = make_variants(models, profiles if profiles is not None else [None] * len(models), provider)
    config = BenchConfig(rounds=rounds, warmup=warmup, iterations=iterations, threads=threads, seed=seed,
                         input_shapes={k: tuple(v) for k, v in (input_shapes or {}).items()})
    return run_bench(variants, config, feeds)
