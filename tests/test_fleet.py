"""Fleets: one recipe over many models on local worker processes (Ray: test_fleet_ray.py)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from shard_support import conv_model

from onnxforge.errors import OptionError
from onnxforge.fleet import discover, model_names, run_fleet
from onnxforge.pipeline import Pipeline
from onnxforge.workers import LocalWorkers

RECIPE = """
version = 1
name = "fleet-test"
[[steps]]
step = "optimize"
level = 2
[[steps]]
step = "quantize"
calibration = "random"
max_evaluations = 2
[[steps]]
step = "check"
samples = 2
min_cosine = 0.9
"""

KILLER = '''
import os, signal
from onnxforge.passes.base import Pass, PassResult

class Die(Pass):
    """Kills its process on a graph named "die": a worker that crashes."""
    name = "die"

    def run(self, graph, ctx):
        if graph.name == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        return PassResult(False)
'''

HANGER = '''
import os, time
from pathlib import Path
from onnxforge.passes.base import Pass, PassResult

class Hang(Pass):
    """Never ends on a graph named "hang" (after writing its pid): a worker that hangs."""
    name = "hang"

    def run(self, graph, ctx):
        if graph.name == "hang":
            Path(os.environ["HANG_PID_FILE"]).write_text(str(os.getpid()))
            time.sleep(3600)
        return PassResult(False)
'''


@pytest.fixture
def fleet_dir(tmp_path):
    import onnx

    (tmp_path / "models").mkdir()
    onnx.save(conv_model(0), tmp_path / "models" / "a.onnx")
    onnx.save(conv_model(1), tmp_path / "models" / "b.onnx")
    (tmp_path / "models" / "corrupt.onnx").write_bytes(b"\x08\x07 not a protobuf" * 10)
    (tmp_path / "recipe.toml").write_text(RECIPE)
    return tmp_path


def test_local_fleet_isolates_a_corrupt_model_and_matches_single_runs(fleet_dir):
    out, cache = fleet_dir / "out", fleet_dir / "cache"
    rows_seen = []
    with LocalWorkers(2, threads=True) as workers:
        result = run_fleet(fleet_dir / "recipe.toml", [fleet_dir / "models"], out, workers, cache_dir=cache,
                           progress=rows_seen.append)
    assert result.exit_code == 2
    rows = {r["name"]: r for r in result.report["models"]}
    assert sorted(r["name"] for r in rows_seen) == ["a", "b", "corrupt"]
    assert rows["corrupt"]["status"] == "failed" and "not a valid ONNX protobuf" in rows["corrupt"]["error"]
    assert "\n" not in rows["corrupt"]["error"] and not (out / "corrupt.onnx").exists()
    for name in ("a", "b"):
        assert rows[name]["status"] == "ok" and rows[name]["accuracy"] > 0.9
        alone = Pipeline.from_file(fleet_dir / "recipe.toml").run(fleet_dir / "models" / f"{name}.onnx",
                                                                  fleet_dir / f"{name}.alone.onnx", use_cache=False)
        assert (out / f"{name}.onnx").read_bytes() == (fleet_dir / f"{name}.alone.onnx").read_bytes()
        assert alone.report["output"]["sha256"] == rows[name]["output_sha256"]
    report = json.loads((out / "fleet.json").read_text())
    assert report["summary"] == {"models": 3, "ok": 2, "failed": 1, "from_run_cache": 0}
    table = list(csv.DictReader((out / "fleet.csv").open()))
    assert [r["name"] for r in table] == ["a", "b", "corrupt"] and table[2]["status"] == "failed"
    assert "| corrupt | failed |" in (out / "fleet.md").read_text()
    # a rerun restores every finished model from the cache, byte for byte
    before = {n: (out / f"{n}.onnx").read_bytes() for n in ("a", "b")}
    with LocalWorkers(2, threads=True) as workers:
        again = run_fleet(fleet_dir / "recipe.toml", [fleet_dir / "models"], out, workers, cache_dir=cache)
    assert again.exit_code == 2 and again.report["summary"]["from_run_cache"] == 2
    assert all((out / f"{n}.onnx").read_bytes() == before[n] for n in before)


def test_a_worker_process_that_dies_is_reported_and_the_fleet_goes_on(fleet_dir):
    import onnx

    (fleet_dir / "die.py").write_text(KILLER)
    (fleet_dir / "kill.toml").write_text('version = 1\n[[steps]]\nstep = "optimize"\nlevel = 1\n'
                                         'extra_passes = ["die.py:Die"]\nverify = "none"\n')
    doomed = conv_model(2)
    doomed.graph.name = "die"
    onnx.save(doomed, fleet_dir / "doomed.onnx")
    with LocalWorkers(2, threads=True) as workers:
        result = run_fleet(fleet_dir / "kill.toml", [fleet_dir / "doomed.onnx", fleet_dir / "models" / "a.onnx"],
                           fleet_dir / "out", workers, use_cache=False)
    rows = {r["name"]: r for r in result.report["models"]}
    assert result.exit_code == 2
    assert rows["doomed"]["error"] == "the worker process died (SIGKILL)"
    assert rows["a"]["status"] == "ok"


def test_a_hanging_worker_is_killed_at_the_per_model_timeout(fleet_dir, monkeypatch):
    import os
    import time

    import onnx

    (fleet_dir / "hang.py").write_text(HANGER)
    (fleet_dir / "hang.toml").write_text('version = 1\nmodel_timeout = 3600\n[[steps]]\nstep = "optimize"\nlevel = 1\n'
                                         'extra_passes = ["hang.py:Hang"]\nverify = "none"\n')
    stuck = conv_model(2)
    stuck.graph.name = "hang"
    onnx.save(stuck, fleet_dir / "stuck.onnx")
    monkeypatch.setenv("HANG_PID_FILE", str(fleet_dir / "pid"))
    started = time.monotonic()
    result = run_fleet(fleet_dir / "hang.toml", [fleet_dir / "stuck.onnx"], fleet_dir / "out", LocalWorkers(1, threads=True),
                       use_cache=False, model_timeout=8)  # the argument wins over the recipe's 3600
    row = result.report["models"][0]
    assert time.monotonic() - started < 120
    assert result.exit_code == 2 and row["status"] == "failed" and not (fleet_dir / "out" / "stuck.onnx").exists()
    assert row["error"].startswith("timed out after 8 s") and result.report["model_timeout_s"] == 8
    if (fleet_dir / "pid").exists():  # the pass was reached within 8 s (not a slow import): that process is gone
        with pytest.raises(ProcessLookupError):
            os.kill(int((fleet_dir / "pid").read_text()), 0)


def test_model_timeout_only_for_fleets(fleet_dir, capsys):
    from onnxforge.cli import main

    assert main(["run", str(fleet_dir / "recipe.toml"), str(fleet_dir / "models" / "a.onnx"), "-o",
                 str(fleet_dir / "a.out.onnx"), "--model-timeout", "5"]) == 2
    assert "--model-timeout: only for fleets" in capsys.readouterr().err
    assert not (fleet_dir / "a.out.onnx").exists()


def test_fleet_refuses_tune_and_a_bench_before_other_steps(fleet_dir):
    (fleet_dir / "tune.toml").write_text('version = 1\n[[steps]]\nstep = "tune"\nbudget_seconds = 5\n')
    (fleet_dir / "bench.toml").write_text('version = 1\n[[steps]]\nstep = "bench"\n[[steps]]\nstep = "optimize"\n')
    for recipe, words in (("tune.toml", "does not run tune steps"), ("bench.toml", "must come last")):
        with pytest.raises(OptionError, match=words):
            run_fleet(fleet_dir / recipe, [fleet_dir / "models"], fleet_dir / "out", LocalWorkers(1, threads=True))


def test_discover_and_unique_names(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    for d in ("x", "y"):
        (tmp_path / d / "m.onnx").write_bytes(b"")
    models = discover([tmp_path / "x", tmp_path / "y" / "m.onnx"])
    assert model_names(models) == ["m", "m~2"]
    with pytest.raises(Exception, match="no such model"):
        discover([tmp_path / "nope.onnx"])


def test_cli_fleet_exit_2_and_ray_never_imported(fleet_dir):
    """The default install never imports ray, fleet included (a fresh interpreter)."""
    (fleet_dir / "light.toml").write_text('version = 1\n[[steps]]\nstep = "optimize"\nlevel = 1\n')
    code = (
        "import sys; from onnxforge.cli import main\n"
        f"rc = main(['run', {str(fleet_dir / 'light.toml')!r}, {str(fleet_dir / 'models')!r}, '-o', "
        f"{str(fleet_dir / 'cli_out')!r}, '--jobs', '2', '--quiet', '--cache-dir', {str(fleet_dir / 'c')!r}])\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
        "print('rc', rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "rc 2" in proc.stdout
    assert (fleet_dir / "cli_out" / "a.onnx").exists() and (fleet_dir / "cli_out" / "fleet.md").exists()


def test_model_placeholder_gives_each_model_its_own_data(fleet_dir):
    from shard_support import feed_folder

    from onnxforge.fleet import recipe_for

    feed_folder(fleet_dir / "data" / "a" / "calib", 2)
    (fleet_dir / "per_model.toml").write_text('version = 1\n[[steps]]\nstep = "quantize"\n'
                                              'calibration = "data/{model}/calib"\n')
    recipe = recipe_for(fleet_dir / "per_model.toml", fleet_dir / "models" / "a.onnx")
    assert recipe.steps[0].params["calibration"] == str(fleet_dir / "data" / "a" / "calib")
    with pytest.raises(Exception, match="no such file or folder"):
        recipe_for(fleet_dir / "per_model.toml", fleet_dir / "models" / "b.onnx")
