"""Tuning: budget parsing, racing/acceptance logic on synthetic latencies, and a
real (tiny) tuning run that must stay within its budget and write a valid profile."""
import itertools

import onnx
import onnx.parser
import pytest

from onnxforge.bench.harness import LiveSession
from onnxforge.errors import OptionError
from onnxforge.runtime import load_profile, profile_path_for
from onnxforge.runtime import tune as tune_mod
from onnxforge.runtime.tune import Trial, parse_budget, tune, tune_text


@pytest.mark.parametrize("text,seconds", [("60s", 60), ("2m", 120), ("90", 90), ("1.5", 1.5), (3, 3),
                                          ("500ms", 0.5), ("1min", 60)])
def test_parse_budget(text, seconds):
    assert parse_budget(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["soon", "-5s", "0", "nan"])
def test_bad_budget(text):
    with pytest.raises(OptionError):
        parse_budget(text)


def _live(medians, iterations=2):
    live = LiveSession(None, None, [], 0.0, 1.0, None, None)
    live.round_medians = list(medians)
    live.iterations = iterations
    live.warm_ms = 1.0
    return live


def _noisy(level, n, spread=0.01):
    wiggle = itertools.cycle([1 - spread, 1 + spread, 1.0, 1 + spread / 2, 1 - spread / 2])
    return [level * next(wiggle) for _ in range(n)]


def test_prune_drops_slower_beyond_noise_and_halves():
    incumbent = _live(_noisy(10, 3))
    slow = (_live(_noisy(13, 3)), None, Trial("d", "slow", {}, ""))
    fast = (_live(_noisy(8, 3)), None, Trial("d", "fast", {}, ""))
    same = (_live([10.6, 9.7, 10.3]), None, Trial("d", "same", {}, ""))
    kept = tune_mod._prune([slow, fast, same], incumbent, 3)
    assert slow[2].outcome == "slower"
    assert [k[2].candidate for k in kept] == ["fast"]  # halving at round 3 kept the better half of two
    assert same[2].outcome == "halved"
    winner = tune_mod._pick(kept, incumbent)
    assert winner is not None and fast[2].outcome == "accepted"


def test_pick_refuses_a_win_inside_noise():
    incumbent = _live([10, 12, 9, 11, 10])
    maybe = (_live([9.5, 12.5, 8.0, 11.5, 9.0]), None, Trial("d", "maybe", {}, ""))
    assert tune_mod._pick(tune_mod._prune([maybe], incumbent, 5), incumbent) is None
    assert maybe[2].outcome == "not-faster"


@pytest.mark.parametrize("tuned_level,kept_default", [(12.0, True), (10.0, True), (8.0, False)])
def test_confirmation_keeps_defaults_unless_faster_beyond_noise(monkeypatch, tuned_level, kept_default):
    baseline, tuned = _live([]), _live([])
    levels = {id(baseline): 10.0, id(tuned): tuned_level}
    wiggle = itertools.cycle([0.99, 1.01, 1.0, 1.005, 0.995])

    def fake_rounds(lives, rounds, seed, on_round=None, first_round=0):
        for live in lives:
            live.round_medians.append(levels[id(live)] * next(wiggle))

    monkeypatch.setattr(tune_mod, "run_rounds", fake_rounds)
    state = tune_mod._State(None, "cpu", [], tune_mod._Clock(tune_mod.time.monotonic(), 1000.0))
    confirmation, kept = tune_mod._confirm(state, baseline, tuned)
    assert kept is kept_default
    assert confirmation["rounds"] == tune_mod.CONFIRM_MAX_ROUNDS


def test_confirmation_without_time_keeps_defaults(monkeypatch):
    state = tune_mod._State(None, "cpu", [], tune_mod._Clock(tune_mod.time.monotonic() - 10, 1.0))
    confirmation, kept = tune_mod._confirm(state, _live([]), _live([]))
    assert kept and "defaults kept" in confirmation["note"]


TINY = """
<ir_version: 8, opset_import: ["" : 17]>
tiny (float[8, 64] x) => (float[8, 64] y) {
    w = Constant <value = float[64, 64] {%s}> ()
    m = MatMul(x, w)
    y = Relu(m)
}
""" % ", ".join(str((i % 7) - 3) for i in range(64 * 64))


def test_tune_tiny_model_within_budget(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(onnx.parser.parse_model(TINY), path)
    budget = 3.0
    result = tune(path, "cpu", budget)
    assert result.elapsed_s <= budget
    assert result.path == profile_path_for(path)
    prof = load_profile(result.path)
    assert prof.primary == "cpu" and prof.tuning["budget_s"] == budget
    assert prof.tuning["trials"], "it tried nothing"
    outcomes = {t["outcome"] for t in prof.tuning["trials"]}
    assert outcomes <= {"accepted", "not-faster", "slower", "halved", "failed", "no-time"}
    if result.kept_default:
        assert prof.session_options == {"graph_optimization_level": "all"}
    else:
        assert result.confirmation["high"] < 1.0
    assert "onnxforge tune" in tune_text(result)


def test_tune_refuses_unknown_provider(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(onnx.parser.parse_model(TINY), path)
    with pytest.raises(Exception, match="unknown provider"):
        tune(path, "tpu", 1.0, output=False)
