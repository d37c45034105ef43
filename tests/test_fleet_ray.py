"""The Ray path for real: a local Ray head with 2 worker CPUs runs a fleet and a
distributed calibration, then stops. Skipped only where ray cannot be imported
(it is the optional extra onnxforge[ray]; the test extra installs it)."""
from __future__ import annotations

import pytest
from shard_support import conv_model, feed_folder, same_histograms

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'onnxforge[ray]')")

from onnxforge.inputs import data_files, iter_feed_files  # noqa: E402
from onnxforge.passes.quant import calibrate as cal  # noqa: E402
from onnxforge.passes.quant.shards import collect_histograms_sharded  # noqa: E402
from onnxforge.workers import RayWorkers, Workers  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")
    try:
        yield RayWorkers()  # joins the running local cluster
    finally:
        ray.shutdown()


def test_ray_calibration_on_two_workers_equals_one_process(local_ray, tmp_path):
    model = conv_model()
    folder = feed_folder(tmp_path / "calib", 4)
    single, _ = cal.collect_histograms(model, iter_feed_files(folder))
    assert local_ray.count == 2
    sharded, count = collect_histograms_sharded(model, data_files(folder), local_ray)
    assert count == 4 and same_histograms(single, sharded)


def test_ray_fleet_ships_outputs_back_and_reports_the_corrupt_model(local_ray, tmp_path):
    import onnx

    from onnxforge.fleet import run_fleet
    from onnxforge.pipeline import Pipeline

    (tmp_path / "models").mkdir()
    onnx.save(conv_model(0), tmp_path / "models" / "a.onnx")
    (tmp_path / "models" / "corrupt.onnx").write_bytes(b"\x08\x07 not a protobuf" * 10)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('version = 1\n[[steps]]\nstep = "optimize"\nlevel = 2\n'
                      '[[steps]]\nstep = "bench"\nrounds = 2\nwarmup = 1\niterations = 2\n')
    result = run_fleet(recipe, [tmp_path / "models"], tmp_path / "out", local_ray, cache_dir=tmp_path / "cache")
    rows = {r["name"]: r for r in result.report["models"]}
    assert result.exit_code == 2 and result.report["workers"]["kind"] == "ray"
    assert rows["corrupt"]["status"] == "failed" and "not a valid ONNX protobuf" in rows["corrupt"]["error"]
    Pipeline.from_file(recipe).run(tmp_path / "models" / "a.onnx", tmp_path / "alone.onnx", use_cache=False)
    assert (tmp_path / "out" / "a.onnx").read_bytes() == (tmp_path / "alone.onnx").read_bytes()
    # latency comes from the driver, never from a Ray worker
    assert rows["a"]["latency_ratio"] is not None and "driver" in rows["a"]["latency_measured_on"]


def test_ray_sensitivity_scoring_gives_the_one_process_model(local_ray, tmp_path):
    """The accuracy budget's per-candidate sensitivity measurements as Ray tasks (max_drop 0
    forces the ranking), calibration sharded too: the same fallback steps and bytes as one
    process; quantize's latency is measured in the driver, and its report says so."""
    import platform

    from onnxforge.passes.quant.quantize import quantize

    model = conv_model()
    calib = feed_folder(tmp_path / "calib", 4)
    kw = dict(method="percentile", max_drop=0.0, measure_latency=False, log=lambda _m: None, max_evaluations=24)
    alone, rep_alone = quantize(model, str(calib), **kw)
    workers = Recording(local_ray)
    spread, rep_spread = quantize(model, str(calib), workers=workers, **{**kw, "measure_latency": True})
    assert workers.calls == ["_shard_histograms", "_score"]  # both went to the Ray tasks, latency did not
    assert rep_spread.latency is not None and platform.node() in rep_spread.where["latency"]
    assert rep_spread.where["sensitivity"].startswith("scored on Ray cluster")
    assert rep_spread.where["calibration"].startswith("split across Ray cluster")
    assert rep_alone.where["sensitivity"] == rep_alone.where["calibration"] == f"this process on {platform.node()}"
    assert any("split across Ray cluster" in n for n in rep_spread.notes)
    steps = lambda rep: [(s["float"], s["score"]) for s in rep.fallback_steps]  # noqa: E731
    assert steps(rep_alone) == steps(rep_spread) and len(rep_alone.fallback_steps) > 0
    assert alone.to_proto().SerializeToString() == spread.to_proto().SerializeToString()


class Recording(Workers):
    """Another Workers, with the names of the functions sent to it recorded."""

    def __init__(self, inner: Workers):
        self.inner, self.calls, self.kind = inner, [], inner.kind

    @property
    def count(self) -> int:
        return self.inner.count

    @property
    def where(self) -> str:
        return self.inner.where

    def run(self, fn, items, common=None):
        self.calls.append(fn.__name__)
        return self.inner.run(fn, items, common)
