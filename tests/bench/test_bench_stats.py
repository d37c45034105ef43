"""Ratio/CI math on synthetic numbers, and latency summaries."""
import math

import numpy as np
import pytest

from onnxforge.bench.stats import RatioCI, ratio_ci, summarize, t_cdf, t_quantile


@pytest.mark.parametrize("df,expected", [(1, 12.7062047), (2, 4.3026527), (5, 2.5705818), (14, 2.1447867),
                                         (30, 2.0422725), (1000, 1.9623391)])
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-6)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-6)
    assert t_cdf(expected, df) == pytest.approx(0.975, abs=1e-7)


def test_constant_ratio_has_a_zero_width_interval():
    base = [10.0, 12.0, 9.0, 11.0]
    r = ratio_ci(base, [b * 0.5 for b in base])
    assert r.ratio == pytest.approx(0.5) and r.low == pytest.approx(0.5) and r.high == pytest.approx(0.5)
    assert r.verdict == "faster" and r.rounds == 4


def test_ratio_is_the_geometric_mean_with_a_log_t_interval():
    base = np.array([10.0, 10.0, 10.0, 10.0, 10.0])
    ratios = np.array([0.9, 1.1, 1.0, 0.95, 1.05])
    r = ratio_ci(base, base * ratios)
    logs = np.log(ratios)
    half = t_quantile(0.975, 4) * logs.std(ddof=1) / math.sqrt(5)
    assert r.ratio == pytest.approx(math.exp(logs.mean()))
    assert r.low == pytest.approx(math.exp(logs.mean() - half))
    assert r.high == pytest.approx(math.exp(logs.mean() + half))
    assert r.verdict == "same"
    assert "[" in str(r)


def test_pairing_by_round_cancels_drift():
    drift = np.linspace(10, 30, 15)  # the machine slows down 3x over the run
    r = ratio_ci(drift, drift * 1.1 * np.where(np.arange(15) % 2, 1.01, 0.99))
    assert r.verdict == "slower" and 1.09 < r.ratio < 1.11


def test_single_round_has_an_unbounded_interval():
    r = ratio_ci([10.0], [5.0])
    assert r.ratio == pytest.approx(0.5) and r.low == 0.0 and math.isinf(r.high) and r.verdict == "same"


@pytest.mark.parametrize("base,variant", [([1.0, 2.0], [1.0]), ([], []), ([1.0, 0.0], [1.0, 1.0])])
def test_ratio_refuses_bad_input(base, variant):
    with pytest.raises(ValueError):
        ratio_ci(base, variant)


def test_verdicts():
    assert RatioCI(1.2, 1.1, 1.3, 5).verdict == "slower"
    assert RatioCI(0.8, 0.7, 0.9, 5).verdict == "faster"
    assert RatioCI(1.0, 0.9, 1.1, 5).verdict == "same"


def test_summarize():
    s = summarize(list(range(1, 101)))
    assert s["p50"] == pytest.approx(50.5) and s["p90"] == pytest.approx(90.1) and s["p99"] == pytest.approx(99.01)
    assert s["mean"] == pytest.approx(50.5) and s["min"] == 1 and s["max"] == 100 and s["n"] == 100
    assert summarize([3.0])["std"] == 0.0
    with pytest.raises(ValueError):
        summarize([])


def test_round_order_mirrors_positions_in_pairs():
    from onnxforge.bench.harness import round_order

    for n in (2, 3, 5):
        for pair in range(6):
            even, odd = round_order(n, 7, 2 * pair), round_order(n, 7, 2 * pair + 1)
            assert sorted(even) == list(range(n)) and odd == even[::-1]
    firsts = [round_order(2, 0, r)[0] for r in range(16)]
    assert firsts.count(0) == firsts.count(1) == 8
    assert round_order(4, 1, 0) == round_order(4, 1, 0)  # seeded: reproducible
