"""Tune a model's deployment profile for one provider within a time budget.

Search: coordinate descent over the provider's dimensions (``search_space()``
in its profile module, most promising first). For each dimension every
alternative value races against the incumbent, interleaved in rounds
(``bench.harness``): after each round a candidate whose 95% interval lies
above 1 (slower beyond noise) is dropped, and at rounds 3, 6, 12 and 24 the worse
half by point estimate goes too (successive halving). A candidate replaces the
incumbent only if its interval lies entirely below 1. A final interleaved
run of the tuned profile against the defaults, on freshly created sessions
(the search's winner may owe part of its lead to its particular session),
keeps the tuning only if it is still faster beyond noise; otherwise the
defaults are written. So the
result is never slower than the defaults beyond measurement noise.

Budget: every session creation and every round is started only if the time
it is expected to take (measured on the baseline) fits before the deadline,
with a share of the budget reserved for the final confirmation.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from onnxforge.bench.harness import BenchConfig, LiveSession, make_feeds, run_rounds, start_session
from onnxforge.bench.stats import RatioCI, ratio_ci
from onnxforge.bench.variants import Variant
from onnxforge.errors import OnnxForgeError, OptionError
from onnxforge.io import check_output_paths, load_input, write_file
from onnxforge.runtime.profile import Profile, ProviderEntry, default_profile, profile_path_for, save_profile
from onnxforge.runtime.providers import profile_module
from onnxforge.runtime.shapes import ShapeRange, opt_shapes
from onnxforge.runtime.space import Dimension
from onnxforge.runtime.tune_report import render_tune, tune_text  # noqa: F401  (re-exported)

CONFIRM_SHARE = 0.25  # of the budget kept for the final tuned-vs-default run
SAFETY = 0.92  # plan to finish by this fraction of the budget
MIN_ROUNDS, MAX_ROUNDS = 3, 30
HALVING_AT = (3, 6, 12, 24)
CONFIRM_MIN_ROUNDS, CONFIRM_MAX_ROUNDS = 5, 20
ROUND_TARGET_S = 0.04  # per model per round, when choosing iterations


@dataclass
class Trial:
    dimension: str
    candidate: str
    changes: dict
    outcome: str  # accepted, not-faster, slower, halved, failed, no-time
    ratio: dict | None = None  # vs the incumbent of that moment
    rounds: int = 0
    note: str = ""


@dataclass
class TuneResult:
    profile: Profile
    trials: list[Trial]
    confirmation: dict | None  # tuned vs default ratio, when run
    kept_default: bool
    elapsed_s: float
    budget_s: float
    baseline_ms: float
    path: Path | None = None

    def report(self) -> dict:
        from onnxforge.runtime.env import cpu_info, versions

        cpu = cpu_info()
        return {
            "machine": {"cpu": cpu["model"], "usable_cores": cpu["usable_cores"], "isa": cpu["isa"],
                        "onnxruntime": versions()["onnxruntime_package"]},
            "budget_s": self.budget_s, "elapsed_s": round(self.elapsed_s, 3), "baseline_ms": self.baseline_ms,
            "kept_default": self.kept_default, "confirmation": self.confirmation,
            "trials": [asdict(t) for t in self.trials],
        }


@dataclass
class _Clock:
    start: float
    budget_s: float
    now: Callable[[], float] = time.monotonic

    def elapsed(self) -> float:
        return self.now() - self.start

    def left(self) -> float:
        return self.budget_s * SAFETY - self.elapsed()


@dataclass
class _State:
    model: Path
    provider: str
    feeds: list[dict]
    clock: _Clock
    iterations: int = 3
    create_s: float = 0.0  # measured on the baseline
    round_s: float = 0.0  # one model, one round
    seed: int = 0
    trials: list[Trial] = field(default_factory=list)


def parse_budget(text: str | float | int) -> float:
    """``"60s"``, ``"2m"``, ``"90"``, ``1.5`` -> seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        raw = str(text).strip().lower()
        scale = {"ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
        unit = next((u for u in ("ms", "min", "s", "m", "h") if raw.endswith(u)), "")
        try:
            seconds = float(raw[: len(raw) - len(unit)] if unit else raw) * scale.get(unit, 1.0)
        except ValueError:
            raise OptionError(f"--budget {text!r}: expected seconds like 60, 60s, 2m") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise OptionError(f"--budget {text!r}: must be a positive duration")
    return seconds


def model_inputs(path: str | Path) -> dict[str, tuple | None]:
    """Graph input name -> shape (ints for fixed dims, str/None for dynamic ones).
    The model is read by onnxforge's loader (external data validated first)."""
    graph = load_input(path).graph
    return {t.name: None if t.shape is None else tuple(d if isinstance(d, int) else (d or None) for d in t.shape)
            for t in graph.inputs}


def _static(inputs: Mapping[str, tuple | None], ranges: Mapping[str, ShapeRange]) -> bool:
    for name, shape in inputs.items():
        if name in ranges:
            if not ranges[name].fixed:
                return False
        elif shape is None or any(not isinstance(d, int) or d <= 0 for d in shape):
            # seeded feeds pin dynamic dims to one value, but a deployed model sees others
            return False
    return True


def _apply(profile: Profile, dim: Dimension, value: dict) -> Profile:
    entries = [ProviderEntry(e.name, dict(e.options)) for e in profile.providers]
    session_options = dict(profile.session_options)
    if dim.section == "session":
        session_options.update(value)
    else:
        entries[0].options.update(value)
    return Profile(entries, session_options, profile.model).validated()


def _differs(profile: Profile, dim: Dimension, value: dict) -> bool:
    current = profile.session_options if dim.section == "session" else profile.providers[0].options
    return any(current.get(k) != v for k, v in value.items())


def _start(state: _State, profile: Profile, label: str) -> LiveSession:
    config = BenchConfig(rounds=1, warmup=2, iterations=state.iterations, threads=None, seed=state.seed)
    return start_session(Variant(label, state.model, profile, "tuning"), state.feeds, config)


def _ratio(base: LiveSession, live: LiveSession) -> RatioCI:
    n = len(live.round_medians)
    return ratio_ci(base.round_medians[:n], live.round_medians)


def _ratio_dict(r: RatioCI) -> dict:
    return {"ratio": r.ratio, "low": r.low, "high": r.high, "rounds": r.rounds, "verdict": r.verdict}


# -------------------------------------------------------------------------- racing


def _race(state: _State, dim: Dimension, incumbent: LiveSession, profile: Profile, dim_deadline: float
          ) -> tuple[LiveSession, Profile] | None:
    """Race the dimension's alternatives against the incumbent; the winner, if any."""
    contenders: list[tuple[LiveSession, Profile, Trial]] = []
    for value in dim.values:
        if not _differs(profile, dim, value):
            continue
        trial = Trial(dim.name, dim.label(dim.values.index(value)), value, "no-time")
        state.trials.append(trial)
        if state.clock.elapsed() + state.create_s * 1.5 + state.round_s * MIN_ROUNDS * 2 > dim_deadline:
            trial.note = "no time left in this dimension's share to create its session"
            continue
        try:
            candidate = _apply(profile, dim, value)
            live = _start(state, candidate, trial.candidate)
        except OnnxForgeError as exc:
            trial.outcome, trial.note = "failed", exc.message
            continue
        contenders.append((live, candidate, trial))
    if not contenders:
        return None
    incumbent.round_medians = []
    for live, _, _ in contenders:
        live.round_medians = []
    alive = list(contenders)
    for _, _, trial in alive:
        trial.note = "no time for a round"
    for round_no in range(1, MAX_ROUNDS + 1):
        cost = _round_cost(state, [incumbent] + [c[0] for c in alive])
        if state.clock.elapsed() + cost > dim_deadline:
            if round_no == 1:
                for _, _, trial in alive:
                    trial.note = f"a round would take {cost:.2f}s, more than this dimension's share"
            break
        run_rounds([incumbent] + [c[0] for c in alive], 1, state.seed, first_round=round_no)
        alive = _prune(alive, incumbent, round_no)
        if not alive:
            break
        if len(alive) == 1 and round_no >= MIN_ROUNDS + 2 and _ratio(incumbent, alive[0][0]).high < 1:
            break  # a lone survivor already wins beyond noise
    return _pick(alive, incumbent)


def _round_cost(state: _State, lives: list[LiveSession]) -> float:
    return sum(live.iterations * _typical_ms(live) / 1e3 for live in lives) + 0.01 * len(lives)


def _typical_ms(live: LiveSession) -> float:
    medians = live.round_medians or [live.warm_ms]
    return sorted(medians)[len(medians) // 2]


def _prune(alive, incumbent: LiveSession, round_no: int):
    kept = []
    for live, prof, trial in alive:
        r = _ratio(incumbent, live)
        trial.ratio, trial.rounds = _ratio_dict(r), r.rounds
        if round_no >= MIN_ROUNDS and r.low > 1.0:
            trial.outcome, trial.note = "slower", f"slower beyond noise after {round_no} rounds"
        else:
            kept.append((live, prof, trial))
    if round_no in HALVING_AT and len(kept) > 1:
        kept.sort(key=lambda c: _ratio(incumbent, c[0]).ratio)
        for _, _, trial in kept[(len(kept) + 1) // 2:]:
            trial.outcome, trial.note = "halved", f"in the slower half after {round_no} rounds"
        kept = kept[: (len(kept) + 1) // 2]
    for _, _, trial in kept:
        trial.outcome, trial.note = "not-faster", "interval includes 1"
    return kept


def _pick(alive, incumbent: LiveSession):
    alive = [c for c in alive if len(c[0].round_medians) >= MIN_ROUNDS]
    if not alive:
        return None
    scored = sorted(alive, key=lambda c: _ratio(incumbent, c[0]).ratio)
    live, prof, trial = scored[0]
    r = _ratio(incumbent, live)
    if r.rounds >= MIN_ROUNDS and r.high < 1.0:
        trial.outcome, trial.note = "accepted", f"faster beyond noise: {r}"
        return live, prof
    return None


# --------------------------------------------------------------------------- tune


def _baseline(model: Path, provider: str, cache_dir, ranges: Mapping[str, ShapeRange]) -> Profile:
    prof = default_profile(provider, cache_dir=cache_dir)
    if provider == "tensorrt" and ranges:
        trt = profile_module("tensorrt")
        prof.providers[0].options.update(trt.profile_shape_options(ranges, model_inputs(model)))
    prof.model = {"file": model.name}
    return prof.validated()


def tune(model: str | Path, provider: str = "cpu", budget_s: float = 60.0, *, output: str | Path | None = None,
         shape_ranges: Mapping[str, ShapeRange] | None = None, data: str | None = None, seed: int = 0,
         allow_lossy: bool = False, cache_dir: str | Path | None = None,
         on_progress: Callable[[str], None] | None = None) -> TuneResult:
    """Search ``provider``'s space for ``model`` within ``budget_s`` seconds.

    Writes the profile to ``output`` (default: ``model.profile.json`` beside
    the model; pass ``output=False`` to write nothing) with the report of
    every trial under its ``tuning`` key. ``shape_ranges`` come from
    ``--input-shape`` (opt shapes feed the runs; TensorRT also gets them as
    optimization profiles). ``allow_lossy`` lets FP16/TF32 into the search.
    """
    model = Path(model)
    target = None if output is False else Path(output or profile_path_for(model))
    clock = _Clock(time.monotonic(), float(budget_s))
    ranges = dict(shape_ranges or {})
    if provider == "tensorrt" and cache_dir is None:
        cache_dir = model.with_name(f"{model.stem}.trt_cache")
    feeds = make_feeds(model, opt_shapes(ranges), data, seed)  # loads the model: its files are protected now
    check_output_paths(target)
    state = _State(model, provider, feeds, clock, seed=seed)
    notify = on_progress or (lambda _msg: None)

    default = _baseline(model, provider, cache_dir, ranges)
    t0 = time.monotonic()
    baseline = _start(state, default, "default")
    state.create_s = time.monotonic() - t0
    typical = _typical_ms(baseline)
    state.iterations = max(2, min(30, math.ceil(ROUND_TARGET_S * 1e3 / max(typical, 1e-3))))
    baseline.iterations = state.iterations
    state.round_s = state.iterations * typical / 1e3

    module = profile_module(provider)
    dims = [d for d in module.search_space(static_shapes=_static(model_inputs(model), ranges),
                                            allow_lossy=allow_lossy) if allow_lossy or not d.lossy]
    incumbent, profile = baseline, default
    for i, dim in enumerate(dims):
        dims_left = len(dims) - i
        # the confirmation reserve is only needed once something could change
        needs_reserve = profile is not default or dims_left > 1
        search_end = clock.budget_s * SAFETY - (_confirm_reserve(state) if needs_reserve else 0.0)
        dim_deadline = _dim_deadline(state, dim, search_end, dims_left)
        notify(f"{dim.name}: {len(dim.values) - 1} alternative(s), {max(0.0, dim_deadline - clock.elapsed()):.1f}s")
        winner = _race(state, dim, incumbent, profile, dim_deadline)
        if winner is not None:
            incumbent, profile = winner

    confirmation, kept_default = None, True
    if profile is not default:
        incumbent = baseline = None  # free them: the confirmation runs on fresh sessions
        pair = _fresh_pair(state, default, profile)
        if pair is None:
            confirmation = {"note": "no time left to confirm on fresh sessions: defaults kept"}
        else:
            baseline, incumbent = pair
            confirmation, kept_default = _confirm(state, baseline, incumbent)
    final = default if kept_default else profile
    final = Profile(final.providers, final.session_options, {"file": model.name})
    result = TuneResult(final, state.trials, confirmation, kept_default, clock.elapsed(), clock.budget_s,
                        typical)
    final.tuning = result.report()
    if target is not None:
        result.path = write_file(target, lambda tmp: save_profile(final, tmp))
    return result


def _fresh_pair(state: _State, default: Profile, tuned: Profile) -> tuple[LiveSession, LiveSession] | None:
    """New sessions for the confirmation. The search kept the candidate whose
    session measured best, so re-measuring that same session would carry its
    luck (where its threads and buffers landed) into the verdict."""
    needed = 2 * state.create_s * 1.5 + CONFIRM_MIN_ROUNDS * 2 * state.round_s
    if state.clock.left() < needed:
        return None
    return _start(state, default, "default"), _start(state, tuned, "tuned")


def _confirm_reserve(state: _State) -> float:
    """Seconds kept for the confirmation: its share of the budget, or what two
    fresh sessions and CONFIRM_MIN_ROUNDS rounds take if that is more."""
    needed = 2 * state.create_s * 1.5 + CONFIRM_MIN_ROUNDS * 2 * state.round_s
    return max(CONFIRM_SHARE * state.clock.budget_s * SAFETY, needed)


def _dim_deadline(state: _State, dim: Dimension, search_end: float, dims_left: int) -> float:
    """An equal share of the remaining search time, or at least what this
    dimension needs for its sessions and MIN_ROUNDS rounds: dimensions come
    most promising first, so a slow model spends its budget on those."""
    now = state.clock.elapsed()
    share = max(0.0, search_end - now) / dims_left
    alternatives = len(dim.values) - 1
    needed = alternatives * state.create_s * 1.5 + (alternatives + 1) * state.round_s * MIN_ROUNDS * 2
    return min(search_end, now + max(share, needed))


def _confirm(state: _State, baseline: LiveSession, tuned: LiveSession) -> tuple[dict | None, bool]:
    """Tuned vs default, interleaved; keep tuned only if faster beyond noise."""
    baseline.round_medians, tuned.round_medians = [], []
    for round_no in range(CONFIRM_MAX_ROUNDS):
        cost = _round_cost(state, [baseline, tuned])
        if state.clock.left() < cost:
            break
        run_rounds([baseline, tuned], 1, state.seed + 1000, first_round=round_no)
    if len(tuned.round_medians) < CONFIRM_MIN_ROUNDS:
        return {"note": f"only {len(tuned.round_medians)} confirmation rounds fit the budget: defaults kept"}, True
    r = _ratio(baseline, tuned)
    return _ratio_dict(r), not r.high < 1.0


def tune_and_save(model: str | Path, provider: str = "cpu", budget_s: float | str = 60.0,
                  output: str | Path | None = None, **options) -> TuneResult:
    """``tune`` with a budget given as seconds or text ("60s"), writing the profile
    beside the model (or to ``output``); what ``optimize --tune`` calls."""
    return tune(model, provider, parse_budget(budget_s), output=output, **options)
