"""Bench harness on tiny onnx models: interleaving, ratios, accuracy, outputs, CLI."""
import csv
import json

import numpy as np
import onnx
import onnx.parser
import pytest

from onnxforge.bench.harness import (BenchConfig, compare_latency, compare_outputs, make_variants, parse_model_spec,
                                     run_bench)
from onnxforge.bench.outputs import markdown_table, render_table, write_csv, write_json, write_markdown
from onnxforge.bench.plot import plot_result
from onnxforge.cli import main
from onnxforge.errors import DataError, OptionError

RELU = """
<ir_version: 8, opset_import: ["" : 17]>
tiny (float[N, 16] x) => (float[N, 8] y) {
    w = Constant <value = float[16, 8] {%s}> ()
    m = MatMul(x, w)
    y = Relu(m)
}
""" % ", ".join(str(((i * 5) % 11 - 5) / 4) for i in range(128))
NO_RELU = RELU.replace("y = Relu(m)", "y = Identity(m)")


@pytest.fixture
def models(tmp_path):
    paths = {}
    for name, text in (("relu", RELU), ("same", RELU), ("norelu", NO_RELU)):
        paths[name] = tmp_path / f"{name}.onnx"
        onnx.save(onnx.parser.parse_model(text), paths[name])
    return paths


FAST = dict(rounds=3, warmup=1, iterations=2)


def test_compare_latency_gives_ratios_to_the_first(models):
    res = compare_latency([models["relu"], models["same"], models["norelu"]], threads=1, **FAST)
    assert res.models[0].ratio is None
    for m in res.models:
        assert len(m.round_medians_ms) == 3 and len(m.latencies_ms) == 6
        assert m.stats["p50"] > 0 and m.throughput_per_s > 0 and m.create_ms > 0 and m.first_run_ms > 0
        assert m.providers == ["CPUExecutionProvider"]
    for m in res.models[1:]:
        assert m.ratio.rounds == 3 and m.ratio.low <= m.ratio.ratio <= m.ratio.high
    assert res.config["feed_shapes"] == {"x": [1, 16]}
    assert res.environment["providers"][0]["works"]
    assert [m.label for m in res.models] == ["relu", "same", "norelu"]


def test_feeds_can_be_given_and_are_cycled(models):
    feeds = [{"x": np.full((2, 16), v, np.float32)} for v in (1.0, -1.0, 0.5)]
    res = compare_latency([models["relu"]], feeds, threads=1, **FAST)
    assert res.config["feeds"] == 3 and res.config["feed_shapes"] == {"x": [2, 16]}


def test_peak_memory_is_measured_on_linux(models):
    res = compare_latency([models["relu"]], threads=1, **FAST)
    if open("/proc/self/clear_refs", "a").writable():
        assert res.models[0].peak_rss_mb is not None and res.models[0].peak_rss_mb >= 0


def test_reference_accuracy(models):
    variants = make_variants([models["relu"], models["norelu"]], [None, None])
    res = run_bench(variants, BenchConfig(reference=str(models["relu"]), input_shapes={"x": (4, 16)}, **FAST),
                    record_environment=False)
    same, different = (m.accuracy[0] for m in res.models)
    assert same["max_abs"] == 0 and same["cosine"] == pytest.approx(1.0)
    assert different["max_abs"] > 0 and different["cosine"] < 1.0


def test_compare_outputs_metrics():
    rows = compare_outputs([np.array([1.0, 0.0]), np.zeros(3)], [np.array([0.0, 1.0]), np.zeros(2)], ["a", "b"])
    assert rows[0]["max_abs"] == 1.0 and rows[0]["cosine"] == pytest.approx(0.0)
    assert "shape" in rows[1]["note"]


def test_outputs_exist_and_parse(models, tmp_path):
    res = compare_latency([models["relu"], models["norelu"]], threads=1, **FAST)
    data = json.loads(write_json(res, tmp_path / "r.json").read_text())
    assert data["schema"] == "onnxforge.bench" and len(data["models"][1]["latencies_ms"]) == 6
    assert data["models"][1]["ratio"]["verdict"] in ("faster", "slower", "same")
    assert data["environment"]["cpu"]["usable_cores"] >= 1
    rows = list(csv.DictReader(write_csv(res, tmp_path / "r.csv").open()))
    assert [r["model"] for r in rows] == ["relu", "norelu"] and float(rows[1]["ratio"]) > 0
    md = write_markdown(res, tmp_path / "r.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 4 and all(line.count("|") == table[0].count("|") for line in table)
    png = plot_result(res, tmp_path / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "relu" in markdown_table(res)


def test_plain_table_when_not_a_terminal(models, capsys):
    res = compare_latency([models["relu"]], threads=1, **FAST)
    render_table(res)
    out = capsys.readouterr().out
    assert out.startswith("| model |") and "\x1b[" not in out


def test_model_spec_with_profile():
    assert parse_model_spec("m.onnx@tuned.profile.json") == ("m.onnx", "tuned.profile.json")
    assert parse_model_spec("weird@name.onnx") == ("weird@name.onnx", None)


def test_bad_inputs_are_refused(models, tmp_path):
    with pytest.raises(DataError, match="no such model"):
        make_variants([tmp_path / "missing.onnx"])
    with pytest.raises(OptionError):
        BenchConfig(rounds=0)
    with pytest.raises(OptionError, match="one profile per model"):
        make_variants([models["relu"]], [None, None])


def test_cli_bench_writes_every_output(models, tmp_path):
    profile = tmp_path / "p.profile.json"
    profile.write_text(json.dumps({"schema": "onnxforge.profile", "version": 1,
                                   "providers": [{"name": "cpu"}], "session_options": {"intra_op_num_threads": 1}}))
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        np.savez(data / f"{i}.npz", x=np.full((3, 16), i, np.float32))
    out = {ext: tmp_path / f"bench.{ext}" for ext in ("json", "csv", "md", "png")}
    code = main(["bench", str(models["relu"]), f"{models['relu']}@{profile}", "--rounds", "2", "--warmup", "1",
                 "--iterations", "2", "--data", str(data), "--reference", str(models["relu"]),
                 "--json", str(out["json"]), "--csv", str(out["csv"]), "--markdown", str(out["md"]),
                 "--plot", str(out["png"])])
    assert code == 0 and all(p.stat().st_size > 0 for p in out.values())
    result = json.loads(out["json"].read_text())
    assert result["models"][1]["label"] == "relu@p.profile" and result["config"]["feeds"] == 2
    assert result["models"][1]["accuracy"][0]["max_abs"] == 0


def test_cli_bench_bad_profile_is_one_line_error(models, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "onnxforge.profile", "version": 1, "providers": [{"name": "cpu"}],
                               "session_options": {"threads": 2}}))
    assert main(["bench", str(models["relu"]), "--profile", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown option 'threads'" in err and err.count("error:") == 1


def test_cli_env_json(capsys):
    assert main(["env", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"cpu", "providers", "versions", "gpus"} <= set(data)


def test_cli_tune_writes_profile(models, tmp_path, capsys):
    out = tmp_path / "tuned.json"
    assert main(["tune", str(models["relu"]), "--budget", "2s", "-o", str(out), "--input-shape", "x:4x16"]) == 0
    data = json.loads(out.read_text())
    assert data["schema"] == "onnxforge.profile" and data["tuning"]["elapsed_s"] <= 2
    assert "onnxforge tune" in capsys.readouterr().out


def test_feeds_missing_an_input_are_refused(models):
    with pytest.raises(DataError, match="lack model input"):
        compare_latency([models["relu"]], {"y": np.zeros((1, 16), np.float32)}, threads=1, **FAST)


def test_every_model_runs_the_same_feeds_per_round(models):
    res = compare_latency([models["relu"], models["norelu"]], threads=1, rounds=2, warmup=1)
    assert res.models[0].iterations == res.models[1].iterations
    assert len(res.models[0].latencies_ms) == len(res.models[1].latencies_ms)


def test_recreated_sessions_keep_all_samples(models):
    variants = make_variants([models["relu"], models["norelu"]], [None, None])
    res = run_bench(variants, BenchConfig(rounds=5, warmup=1, iterations=2, recreate_every=2), record_environment=False)
    for m in res.models:
        assert len(m.round_medians_ms) == 5 and len(m.latencies_ms) == 10
    assert res.models[1].ratio.rounds == 5
    with pytest.raises(OptionError):
        BenchConfig(recreate_every=0)
