"""Data-parallel calibration: histograms of feed shards merge to exactly one pass's."""
from __future__ import annotations

import numpy as np
import pytest
from shard_support import ShardedInProcess, conv_model, feed_folder, same_histograms

from onnxforge.inputs import data_files, iter_feed_files
from onnxforge.passes.quant import calibrate as cal
from onnxforge.passes.quant.quantize import quantize
from onnxforge.passes.quant.shards import calibrate_sharded, collect_histograms_sharded, split
from onnxforge.workers import LocalWorkers

RNG = np.random.default_rng(7)


def _one_pass(chunks, bins=64):
    hist = cal.StreamingHistogram(bins)
    for chunk in chunks:
        hist.update(chunk)
    return hist


def _same(a, b):
    return a.edge == b.edge and a.minimum == b.minimum and a.maximum == b.maximum and np.array_equal(a.counts, b.counts)


def test_edges_are_powers_of_two_strictly_above_every_value():
    hist = _one_pass([np.array([0.75, -1.0]), np.array([4.0])])
    assert hist.edge == 8.0  # 4.0 itself needs the next power: no value sits on the right edge
    assert cal.dyadic_edge(0.5) == 1.0 and cal.dyadic_edge(0.3) == 0.5 and cal.dyadic_edge(0.0) == cal.EMPTY_EDGE


@pytest.mark.parametrize("seed", range(4))
def test_merge_of_any_split_is_bit_for_bit_one_pass(seed):
    rng = np.random.default_rng(seed)
    chunks = [rng.standard_normal(rng.integers(1, 500)).astype(np.float32) * rng.uniform(0.01, 300) for _ in range(9)]
    whole = _one_pass(chunks)
    order = rng.permutation(len(chunks))
    cuts = sorted(rng.choice(np.arange(1, len(chunks)), size=2, replace=False))
    shards = [[chunks[i] for i in part] for part in np.split(order, cuts)]
    parts = [_one_pass(s) for s in shards] + [cal.StreamingHistogram(64)]  # an empty shard too
    merged = cal.merge_histograms([{"t": p} for p in parts])["t"]
    assert _same(merged, whole)
    # associative and commutative
    a, b, c = parts[:3]
    assert _same(a.merged(b).merged(c), a.merged(b.merged(c)))
    assert _same(a.merged(b), b.merged(a))


def test_merge_refuses_other_bin_counts():
    with pytest.raises(ValueError):
        cal.StreamingHistogram(64).merged(cal.StreamingHistogram(128))


def test_split_is_contiguous_and_covers_everything():
    assert split(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split([1], 4) == [[1]]


def test_sharded_calibration_equals_one_process(tmp_path):
    model = conv_model()
    folder = feed_folder(tmp_path / "calib", 5)
    single, n = cal.collect_histograms(model, iter_feed_files(folder))
    sharded, m = collect_histograms_sharded(model, data_files(folder), ShardedInProcess(3))
    assert n == m == 5 and same_histograms(single, sharded)
    ranges, _, _ = cal.calibrate(model, iter_feed_files(folder), "percentile")
    assert calibrate_sharded(model, data_files(folder), ShardedInProcess(2), "percentile")[0] == ranges


def test_sharded_calibration_on_two_spawned_processes(tmp_path):
    model = conv_model()
    folder = feed_folder(tmp_path / "calib", 4)
    single, _ = cal.collect_histograms(model, iter_feed_files(folder))
    with LocalWorkers(2) as workers:
        sharded, count = collect_histograms_sharded(model, data_files(folder), workers)
    assert count == 4 and same_histograms(single, sharded)


def test_quantize_with_workers_gives_the_same_model(tmp_path):
    """Sharded calibration and sensitivity scored on workers (max_drop 0 forces the
    ranking): the same bytes as one process."""
    model = conv_model()
    calib = feed_folder(tmp_path / "calib", 4)
    kw = dict(method="percentile", max_drop=0.0, measure_latency=False, log=lambda _m: None, max_evaluations=24)
    alone, rep_alone = quantize(model, str(calib), **kw)
    workers = ShardedInProcess(2)
    spread, rep_spread = quantize(model, str(calib), workers=workers, **kw)
    assert workers.calls == ["_shard_histograms", "_score"]
    assert any("split across" in n for n in rep_spread.notes)
    scores = lambda rep: [(s["float"], s["score"]) for s in rep.fallback_steps]  # noqa: E731
    assert scores(rep_alone) == scores(rep_spread) and rep_alone.score == rep_spread.score
    assert alone.to_proto().SerializeToString() == spread.to_proto().SerializeToString()


def test_quantize_cli_jobs_2_writes_the_same_bytes(tmp_path):
    import onnx

    from onnxforge.cli import main

    onnx.save(conv_model(), tmp_path / "m.onnx")
    calib = feed_folder(tmp_path / "calib", 4)
    common = ["quantize", str(tmp_path / "m.onnx"), "--calib", str(calib), "--method", "minmax", "--no-latency",
              "--max-evaluations", "3"]
    assert main(common + ["-o", str(tmp_path / "one.onnx")]) == 0
    assert main(common + ["-o", str(tmp_path / "two.onnx"), "--jobs", "2", "--report", str(tmp_path / "r.json")]) == 0
    assert (tmp_path / "one.onnx").read_bytes() == (tmp_path / "two.onnx").read_bytes()
    assert "split across 2 local process(es)" in (tmp_path / "r.json").read_text()
