"""quantize --bits auto: the choice rule (near ties keep the smaller model, a clear speed-up by more than the
margin wins, over-budget candidates never do) and the command end to end on a tiny decoder with a KV cache
(timed by generation) and on one without (timed per forward pass)."""
import json

import numpy as np
import onnx
import pytest

import decoder_graphs as dg
from onnxforge.cli import main
from onnxforge.passes.quant.auto_bits import Candidate, _choose


def _cands(met=(True, True, True, True)):
    names = ["int4", "int4-acc4", "int8-dynamic", "fp32"]
    return [Candidate(n, n, 1, budget_met=m) for n, m in zip(names, met)]


def _rounds(*medians, noise=0.01, rounds=8):
    rng = np.random.default_rng(0)
    return [list(m * (1 + noise * rng.standard_normal(rounds))) for m in medians]


def test_near_tie_keeps_the_smallest_candidate_and_is_not_decided_by_timing():
    times = dict(zip(["int4", "int4-acc4", "int8-dynamic", "fp32"], _rounds(10.0, 9.6, 9.5, 12.0)))
    chosen, reason, by_timing = _choose(_cands(), times, 0.10)
    assert chosen == "int4" and not by_timing and "smallest" in reason


def test_a_clearly_faster_candidate_replaces_the_smaller_one():
    times = dict(zip(["int4", "int4-acc4", "int8-dynamic", "fp32"], _rounds(10.0, 5.0, 7.0, 12.0)))
    cands = _cands()
    chosen, reason, by_timing = _choose(cands, times, 0.10)
    assert chosen == "int4-acc4" and by_timing and "faster than int4" in reason
    assert cands[0].ratio["ratio"] == pytest.approx(2.0, rel=0.05)  # ratios are to the chosen one


def test_over_budget_candidates_are_never_chosen_even_when_fastest():
    times = dict(zip(["int4", "int4-acc4", "int8-dynamic", "fp32"], _rounds(3.0, 2.0, 7.0, 12.0)))
    chosen, reason, by_timing = _choose(_cands((False, False, True, True)), times, 0.10)
    assert chosen == "int8-dynamic" and not by_timing and "over budget: int4, int4-acc4" in reason


def _feed_folder(folder, proto, count=4, seq=8):
    folder.mkdir()
    for i in range(count):
        np.savez(folder / f"{i:02d}.npz", **dg.feeds(proto, batch=1, seq=seq, left_pad=(0,), seed=i))
    return str(folder)


@pytest.mark.parametrize("cache", [True, False])
def test_bits_auto_writes_one_of_the_candidates_and_says_why(tmp_path, capsys, cache):
    if cache:
        proto = dg.decoder(layers=1, vocab=64, head_size=8)
        timing = "decode step"
    else:  # the same decoder without its cache outputs' inputs: a fixed-length causal LM
        from test_quant_int4 import _lm
        proto = _lm()
        timing = "forward pass"
    src = tmp_path / "model.onnx"
    onnx.save(proto, src)
    if cache:
        data = _feed_folder(tmp_path / "data", proto)
    else:
        from test_quant_int4 import _calib
        data = _calib(tmp_path / "data")
    out, report = tmp_path / "auto.onnx", tmp_path / "auto.json"
    code = main(["quantize", str(src), "-o", str(out), "--bits", "auto", "--weight-method", "rtn", "--block-size", "32",
                 "--calib", data, "--auto-rounds", "2", "--max-drop", "0.5", "--max-ppl-increase", "10",
                 "--report", str(report)])
    assert code == 0
    got = json.loads(report.read_text())
    assert [c["name"] for c in got["candidates"]] == ["int4", "int4-acc4", "int8-dynamic", "fp32"]
    assert got["timing"] == timing and got["chosen"] in {c["name"] for c in got["candidates"]}
    assert all(c["ratio"] is not None and c["ratio"]["low"] <= c["ratio"]["ratio"] <= c["ratio"]["high"]
               for c in got["candidates"])
    ops = {n.op_type for n in onnx.load(out).graph.node}
    expect = {"int4": "MatMulNBits", "int4-acc4": "MatMulNBits", "int8-dynamic": "MatMulInteger", "fp32": "MatMul"}
    assert expect[got["chosen"]] in ops
    assert f"bits auto: kept {got['chosen']}" in capsys.readouterr().out
