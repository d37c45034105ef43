"""Each example recipe runs through `onnxforge run`; a rerun is byte-identical and
hits the cache; results are the same across processes and without the cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from pipeline_support import EXAMPLES, ROOT, output_files, sha256, stage_example

from onnxforge.cli import main
from onnxforge.demo_models import small_cnn, small_encoder
from onnxforge.pipeline import REPORT_SCHEMA, REPORT_SCHEMA_VERSION, Pipeline

EXAMPLE_MODELS = {
    "cnn_cpu_int8.toml": small_cnn,
    "transformer_cpu_dynamic_int8.toml": small_encoder,
    "custom_pass.toml": small_cnn,
}


def run_cli(recipe: Path, model: Path, out: Path, report: Path, cache: Path, *extra: str) -> tuple[int, dict]:
    code = main(["run", str(recipe), str(model), "-o", str(out), "--report", str(report),
                 "--cache-dir", str(cache), "--quiet", *extra])
    return code, json.loads(report.read_text())


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.toml")) == sorted(EXAMPLE_MODELS)


@pytest.mark.parametrize("name", sorted(EXAMPLE_MODELS))
def test_example_runs_twice_identically_and_hits_the_cache(name, tmp_path):
    recipe, model = stage_example(name, tmp_path, EXAMPLE_MODELS[name]())
    cache = tmp_path / "cache"
    code1, first = run_cli(recipe, model, tmp_path / "a.onnx", tmp_path / "a.json", cache)
    code2, second = run_cli(recipe, model, tmp_path / "b.onnx", tmp_path / "b.json", cache)
    assert (code1, code2) == (0, 0)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    for report, out in ((first, "a.onnx"), (second, "b.onnx")):
        assert report["schema"] == REPORT_SCHEMA and report["schema_version"] == REPORT_SCHEMA_VERSION
        assert report["status"] == "ok" and report["exit_code"] == 0
        assert report["output"]["sha256"] == sha256(tmp_path / out)
        assert report["input"]["sha256"] == sha256(model)
        assert [s["step"] for s in report["steps"]] == [s["step"] for s in first["steps"]]
        onnx.checker.check_model(onnx.load(tmp_path / out), full_check=True)
    cacheable = [s["index"] for s in first["steps"] if s["step"] in ("quantize", "prune", "tune", "fp16")]
    assert [s["cached"] for s in first["steps"] if s["index"] in cacheable] == [False] * len(cacheable)
    assert [s["cached"] for s in second["steps"] if s["index"] in cacheable] == [True] * len(cacheable)
    assert second["cache"]["hits"] == len(cacheable)


def test_int8_example_report_has_accuracy_latency_and_environment(tmp_path):
    recipe, model = stage_example("cnn_cpu_int8.toml", tmp_path, small_cnn())
    code, report = run_cli(recipe, model, tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "cache")
    assert code == 0
    kinds = [s["step"] for s in report["steps"]]
    assert kinds == ["optimize", "quantize", "check", "bench"]
    optimize, quantize, check, bench = report["steps"]
    assert optimize["verification"]["ok"] and optimize["changes"]["nodes"]["after"] < optimize["changes"]["nodes"]["before"]
    assert quantize["changes"]["ops"].get("QuantizeLinear", 0) > 0
    assert quantize["quantization"]["int8_nodes"]
    assert {a["step"] for a in report["accuracy"]} == {2, 3}
    assert all(o["cosine"] >= 0.99 for o in check["accuracy"]["outputs"])
    assert report["latency"][0]["step"] == 4 and report["latency"][0]["output_ms"]["p50"] > 0
    assert report["verification"][0]["step"] == 1
    assert report["environment"]["versions"]["onnxruntime"]
    assert report["packages"]["onnx"] == onnx.__version__
    assert all(isinstance(s["seconds"], float) for s in report["steps"])
    assert [s["line"] for s in report["steps"]] == sorted(s["line"] for s in report["steps"])


def test_cached_and_uncached_runs_give_the_same_bytes(tmp_path):
    recipe, model = stage_example("cnn_cpu_int8.toml", tmp_path, small_cnn())
    cache = tmp_path / "cache"
    run_cli(recipe, model, tmp_path / "a.onnx", tmp_path / "a.json", cache)
    code, report = run_cli(recipe, model, tmp_path / "b.onnx", tmp_path / "b.json", cache, "--no-cache")
    assert code == 0 and report["cache"]["hits"] == 0
    assert [s["cached"] for s in report["steps"] if s["step"] == "quantize"] == [False]
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_two_fresh_processes_give_identical_bytes(tmp_path):
    recipe, model = stage_example("cnn_cpu_int8.toml", tmp_path, small_cnn())
    outputs = []
    for i, seed in enumerate(("1", "2")):  # different hash seeds: set order must not leak into the output
        out = tmp_path / f"p{i}.onnx"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run(
            [sys.executable, "-m", "onnxforge.cli", "run", str(recipe), str(model), "-o", str(out), "--no-cache", "--quiet"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        outputs.append(list(output_files(out).values()))
    assert outputs[0] == outputs[1]


def test_external_data_layout_is_deterministic(tmp_path):
    recipe, model = stage_example("custom_pass.toml", tmp_path, small_cnn())
    text = recipe.read_text().replace('provider = "cpu"', 'provider = "cpu"\nexternal_data = true')
    recipe.write_text(text)
    results = []
    for name in ("a", "b"):
        out = tmp_path / name / "model.onnx"
        out.parent.mkdir()
        Pipeline.from_file(recipe).run(model, out)
        results.append(output_files(out))
    assert results[0] == results[1] and "model.onnx.data" in results[0]


def test_pipeline_api_runs_on_a_model_proto_without_output(tmp_path):
    recipe, _ = stage_example("custom_pass.toml", tmp_path, small_cnn())
    result = Pipeline.from_file(recipe).run(small_cnn())
    assert result.output is None and result.report["input"]["path"] is None
    ops = [n.op for n in result.model.graph.nodes]
    assert "Gemm" in ops and "MatMul" in ops  # the user pass fused the bias MatMul only
    assert result.report["steps"][0]["report"]["passes"][-1]["stats"] == {"matmul_bias_to_gemm": 1}


# ------------------------------------------------------------------ real models


@pytest.mark.slow
def test_cnn_example_on_the_real_classifier(tmp_path):
    from conftest import SHARED, shared_model

    model = shared_model("ppocr_mobile_v2_cls")
    if not (SHARED / "data" / "ppocr_mobile_v2_cls" / "calib").exists():
        pytest.skip("the shared calibration data is absent")
    if Path(SHARED).resolve() != (ROOT.parent / "shared").resolve():
        pytest.skip("the example's data paths assume ../shared beside the project")
    cache = tmp_path / "cache"
    code, report = run_cli(EXAMPLES / "cnn_cpu_int8.toml", model, tmp_path / "a.onnx", tmp_path / "a.json", cache)
    assert code == 0, report["error"]
    assert report["steps"][1]["accuracy"]["ok"]
    code, again = run_cli(EXAMPLES / "cnn_cpu_int8.toml", model, tmp_path / "b.onnx", tmp_path / "b.json", cache)
    assert code == 0 and again["steps"][1]["cached"] is True
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


@pytest.mark.slow
@pytest.mark.corpus
def test_transformer_example_on_minilm(tmp_path):
    from conftest import SHARED, corpus_model

    model = corpus_model("minilm_l6_real")
    if Path(SHARED).resolve() != (ROOT.parent / "shared").resolve() or not (SHARED / "data" / "minilm_l6_real").exists():
        pytest.skip("the example's data paths assume ../shared/data/minilm_l6_real beside the project")
    code, report = run_cli(EXAMPLES / "transformer_cpu_dynamic_int8.toml", model, tmp_path / "a.onnx",
                           tmp_path / "a.json", tmp_path / "cache")
    assert code in (0, 3), report["error"]  # 3: the budget mechanism could not reach the cosine target
    if code == 0:
        assert min(o["cosine"] for o in report["steps"][2]["accuracy"]["outputs"]) >= 0.98
