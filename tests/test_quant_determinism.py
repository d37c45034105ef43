"""Deterministic INT8 search: evaluations are counted, seconds only stop early.

A busy machine makes each evaluation slow; here a fake clock jumps 1000 s per
evaluation (and the evaluation sleeps), which without a time limit must not
change a byte of the result, and with one must be reported as an early stop.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.passes.quant import budget as budget_mod
from onnxforge.passes.quant import latency as latency_mod
from onnxforge.passes.quant.quantize import quantize


def _parser() -> argparse.ArgumentParser:
    from onnxforge.passes.quant.commands import add_quantize_parser

    parser = argparse.ArgumentParser()
    add_quantize_parser(parser.add_subparsers())
    return parser


def _chain(depth: int = 4, channels: int = 8) -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    nodes, inits, x, cin = [], [], "x", 4
    for i in range(depth):
        w = rng.standard_normal((channels, cin, 3, 3)).astype(np.float32) * 0.3
        w[0] *= 40  # an outlier channel: per-tensor ranges suffer, the search has work
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        x, cin = f"r{i}", channels
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, channels, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _feeds(n: int = 4) -> list[dict]:
    rng = np.random.default_rng(3)
    return [{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(n)]


class _Busy:
    """A machine kept busy: each evaluation sleeps and the clock jumps ``jump`` seconds."""

    def __init__(self, monkeypatch, jump: float = 1000.0, sleep: float = 0.01):
        self.now, self.calls = 0.0, 0
        real_run = budget_mod.run_outputs

        def slow_run(*args, **kwargs):
            self.calls += 1
            time.sleep(sleep)
            self.now += jump
            return real_run(*args, **kwargs)

        monkeypatch.setattr(budget_mod, "run_outputs", slow_run)
        monkeypatch.setattr(time, "monotonic", lambda: self.now)


def _quantize(model, **kw):
    kw.setdefault("measure_latency", False)
    kw.setdefault("log", lambda _m: None)
    out, report = quantize(model, _feeds(), **kw)
    return out.to_proto().SerializeToString(), report


def test_busy_machine_gives_identical_bytes(monkeypatch):
    # max_drop 1e-7: only float meets it, so every stage of the search runs
    quiet, quiet_report = _quantize(_chain(), max_drop=1e-7)
    assert quiet_report.fallback_steps and quiet_report.evaluations > 4
    busy = _Busy(monkeypatch)
    loaded, loaded_report = _quantize(_chain(), max_drop=1e-7)
    assert busy.calls > 4 and busy.now > 4000  # the search saw hours pass
    assert loaded == quiet
    assert loaded_report.evaluations == quiet_report.evaluations <= quiet_report.max_evaluations
    assert loaded_report.reproducible and not loaded_report.budget_timed_out
    assert f"search used {quiet_report.evaluations} of {quiet_report.max_evaluations} evaluations" in quiet_report.notes


def test_cli_busy_machine_writes_identical_files(tmp_path, monkeypatch):
    model, calib = tmp_path / "m.onnx", tmp_path / "calib"
    onnx.save(_chain(), model)
    calib.mkdir()
    for i, feed in enumerate(_feeds()):
        np.savez(calib / f"{i:04d}.npz", **feed)

    def run(out):
        args = _parser().parse_args(["quantize", str(model), "-o", str(tmp_path / out), "--calib", str(calib),
                                     "--no-latency", "--max-drop", "1e-7"])
        return args.func(args)

    first = run("a.onnx")
    _Busy(monkeypatch)
    assert run("b.onnx") == first
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_max_evaluations_bounds_the_search_whatever_the_clock(monkeypatch):
    quiet, report = _quantize(_chain(), max_drop=1e-7, max_evaluations=3)
    assert report.evaluations == 3 and report.max_evaluations == 3 and report.reproducible
    _Busy(monkeypatch)
    loaded, _ = _quantize(_chain(), max_drop=1e-7, max_evaluations=3)
    assert loaded == quiet
    with pytest.raises(Exception, match="max-evaluations"):
        _quantize(_chain(), max_evaluations=0)


def test_time_limit_stops_early_and_says_so(monkeypatch, tmp_path, capsys):
    _, full = _quantize(_chain(), max_drop=1e-7)
    _Busy(monkeypatch)
    _, report = _quantize(_chain(), max_drop=1e-7, budget_seconds=1500)
    assert report.budget_timed_out and not report.reproducible and not report.budget_met
    assert report.evaluations < full.evaluations
    stopped = f"search stopped by the time limit after {report.evaluations} of {report.max_evaluations} evaluations"
    assert report.search.startswith(stopped) and any(w.startswith(stopped) for w in report.warnings)

    model, calib = tmp_path / "m.onnx", tmp_path / "calib"
    onnx.save(_chain(), model)
    calib.mkdir()
    for i, feed in enumerate(_feeds()):
        np.savez(calib / f"{i:04d}.npz", **feed)
    args = _parser().parse_args(["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calib", str(calib),
                                 "--no-latency", "--max-drop", "1e-7", "--budget-seconds", "1500"])
    assert args.func(args) == 3
    err = capsys.readouterr().err
    assert "accuracy budget missed" in err and "search stopped by the time limit after" in err
    assert "--budget-seconds" in err


def test_search_budget_counts_and_time_limit_only_stops():
    now = [0.0]
    search = budget_mod.SearchBudget.start(3, seconds=10, clock=lambda: now[0])
    assert search.take() and search.take() and search.left == 1
    now[0] = 11
    assert not search.take() and search.stopped_by_time and search.used == 2
    assert search.take(force=True) and search.used == 3  # the first score is always made
    unlimited = budget_mod.SearchBudget.start(2)
    assert unlimited.take() and unlimited.take() and not unlimited.take() and not unlimited.stopped_by_time
    assert unlimited.describe() == "search used 2 of 2 evaluations"


def test_fallback_search_stops_after_its_evaluations():
    scores = {0: 0.5, 1: 0.7, 2: 0.8, 3: 0.9, 4: 0.99}
    search = budget_mod.SearchBudget(2)
    result = budget_mod.fallback_search(lambda ex: len(ex), lambda m: scores[m], list("abcd"), 0.97,
                                        initial=(0, 0.5), group_size=1, search=search)
    assert len(result.steps) == 2 and result.model == 2 and not result.met and not result.timed_out


def test_latency_decides_the_bytes_only_when_asked(monkeypatch):
    """A slower-measured INT8 model is still returned (report warns); keep_float_if_slower is opt-in and flagged."""
    slower = latency_mod.LatencyComparison(1.0, 3.0, 3.0, 2.5, 3.5, 10, 2)
    monkeypatch.setattr(latency_mod, "compare", lambda *a, **k: slower)
    plain, _ = _quantize(_chain(), max_drop=0.5)
    measured, report = _quantize(_chain(), max_drop=0.5, measure_latency=True)
    assert measured == plain and report.reproducible and not report.kept_float
    assert any("3.00x the float latency" in w for w in report.warnings)
    _, asked = _quantize(_chain(), max_drop=0.5, measure_latency=True, keep_float_if_slower=True)
    assert asked.kept_float and not asked.reproducible
