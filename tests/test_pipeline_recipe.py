"""Recipe validation: every mistake is refused before any work, with one line
naming the file, the line and the key, and exit code 2; budgets missed exit 3."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from pipeline_support import write_feeds

from onnxforge.cli import main
from onnxforge.demo_models import small_cnn
from onnxforge.errors import DataError, OptionError
from onnxforge.pipeline import Pipeline
from onnxforge.recipe import STEPS, KeyLines, missing_feature, parse_recipe

GOOD = """\
version = 1
provider = "cpu"

[[steps]]
step = "optimize"
level = 2

[[steps]]
step = "check"
min_cosine = 0.999
"""


@pytest.fixture
def model_path(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(small_cnn(), path)
    return path


def run_recipe(tmp_path: Path, model_path: Path, text: str, capsys, name: str = "recipe.toml"):
    recipe = tmp_path / name
    recipe.write_text(text)
    out = tmp_path / "out.onnx"
    code = main(["run", str(recipe), str(model_path), "-o", str(out), "--report", str(tmp_path / "report.json"),
                 "--no-cache", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err, out, recipe


def line_of(text: str, needle: str) -> int:
    """The line where ``needle`` (which may span lines) starts."""
    return text[:text.index(needle)].count("\n") + 1


@pytest.mark.parametrize("broken, needle, key, message", [
    (GOOD.replace('step = "check"', 'step = "chek"'), '"chek"', "steps[2].step", "unknown step 'chek'"),
    (GOOD.replace("level = 2", "levl = 2"), "levl", "steps[1].levl", "unknown key for step 'optimize'"),
    (GOOD.replace("level = 2", 'level = "2"'), "level", "steps[1].level", "expected an integer, got a string"),
    (GOOD.replace("level = 2", "level = 7"), "level", "steps[1].level", "above the maximum 3"),
    (GOOD.replace("min_cosine = 0.999", "min_cosine = true"), "min_cosine", "steps[2].min_cosine", "expected a number"),
    (GOOD.replace('provider = "cpu"', 'provider = "tpu"'), "provider", "provider", "'tpu' is not one of"),
    (GOOD.replace("version = 1", "version = 1\ncolour = 3"), "colour", "colour", "unknown key"),
    (GOOD.replace("level = 2", 'passes = ["fold-constants", "fold-konstants"]'), "passes", "steps[1].passes",
     "item 2: unknown pass 'fold-konstants'"),
    (GOOD.replace("level = 2", 'extra_passes = ["nowhere.py:Fuse"]'), "extra_passes", "steps[1].extra_passes",
     "no such pass file"),
    (GOOD.replace("level = 2", 'options = { "fold-constans" = { size = 1 } }'), "options",
     "steps[1].options.fold-constans", "names no known pass"),
    (GOOD.replace("level = 2", 'options = { "fold-constants" = { size = 1 } }'), "options",
     "steps[1].options.fold-constants", "has no option 'size' (its options: size_limit)"),
    (GOOD.replace("min_cosine = 0.999", "samples = 2"), "[[steps]]\nstep = \"check\"", "steps[2]",
     "needs min_cosine, max_abs or max_rel"),
])
def test_broken_recipe_is_one_line_with_key_and_line(tmp_path, model_path, capsys, broken, needle, key, message):
    code, err, out, recipe = run_recipe(tmp_path, model_path, broken, capsys)
    assert code == 2
    assert err[0].startswith(f"error: {recipe}:{line_of(broken, needle)}: {key}: "), err
    assert message in err[0]
    assert len([line for line in err if line.startswith("error:")]) == 1
    assert not out.exists()  # refused before any work
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "failed" and report["exit_code"] == 2 and report["steps"] == []


def test_missing_calibration_folder(tmp_path, model_path, capsys):
    text = GOOD + '\n[[steps]]\nstep = "quantize"\ncalibration = "calib/missing"\n'
    code, err, out, recipe = run_recipe(tmp_path, model_path, text, capsys)
    assert code == 2
    assert err[0].startswith(f"error: {recipe}:{line_of(text, 'calib/missing')}: steps[3].calibration: ")
    assert "no such file or folder" in err[0]
    assert not out.exists()


def test_empty_data_folder_is_refused(tmp_path, model_path, capsys):
    (tmp_path / "calib").mkdir()
    text = GOOD + '\n[[steps]]\nstep = "quantize"\ncalibration = "calib"\n'
    code, err, _, _ = run_recipe(tmp_path, model_path, text, capsys)
    assert code == 2 and "holds no .npz or .npy files" in err[0]


def test_missing_required_key_points_at_the_step(tmp_path, model_path, capsys):
    text = GOOD + '\n[[steps]]\nstep = "quantize"\nmethod = "entropy"\n'
    code, err, _, recipe = run_recipe(tmp_path, model_path, text, capsys)
    assert code == 2
    assert err[0].startswith(f"error: {recipe}:{line_of(text, '[[steps]]') + 8}: steps[3].calibration: missing")


def test_invalid_toml_names_the_line(tmp_path, model_path, capsys):
    code, err, _, _ = run_recipe(tmp_path, model_path, GOOD.replace("level = 2", "level = "), capsys)
    assert code == 2 and "invalid TOML" in err[0] and "line 6" in err[0]


def test_yaml_is_refused_with_a_pointer_to_toml(tmp_path, model_path, capsys):
    code, err, _, _ = run_recipe(tmp_path, model_path, "steps: []\n", capsys, name="recipe.yaml")
    assert code == 2 and "YAML recipes are not supported" in err[0]


def test_no_steps(tmp_path, model_path, capsys):
    code, err, _, _ = run_recipe(tmp_path, model_path, "version = 1\n", capsys)
    assert code == 2 and "steps: missing required key" in err[0]


def test_missing_recipe_file(tmp_path, model_path, capsys):
    code = main(["run", str(tmp_path / "nope.toml"), str(model_path), "-o", str(tmp_path / "o.onnx")])
    assert code == 2 and "no such recipe file" in capsys.readouterr().err


def test_missing_output_folder_is_refused_before_work(tmp_path, model_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(GOOD)
    code = main(["run", str(recipe), str(model_path), "-o", str(tmp_path / "no" / "o.onnx"), "--no-cache"])
    assert code == 2 and "output folder does not exist" in capsys.readouterr().err


def test_unavailable_feature_is_refused_not_skipped(tmp_path, model_path, capsys, monkeypatch):
    import onnxforge.recipe as recipe_module

    real = recipe_module.missing_feature
    monkeypatch.setattr(recipe_module, "missing_feature",
                        lambda feature: "onnxforge.passes.prune.prune does not exist yet" if "prune" in feature else real(feature))
    text = GOOD + '\n[[steps]]\nstep = "prune"\nratio = 0.1\n'
    code, err, out, recipe = run_recipe(tmp_path, model_path, text, capsys)
    assert code == 2
    line = line_of(text, 'step = "prune"')
    assert err[0] == (f"error: {recipe}:{line}: steps[3].step: step 'prune' is not "
                      "available in this build: onnxforge.passes.prune.prune does not exist yet")
    assert not out.exists()


def test_missing_feature_says_why():
    assert "does not exist yet" in missing_feature("onnxforge.no_such_module:run")
    assert "has no nothing_here()" in missing_feature("onnxforge.pipeline:nothing_here")
    assert missing_feature("onnxforge.pipeline:Pipeline") is None


# ------------------------------------------------------------------ exit code 3


def test_missed_accuracy_budget_exits_3_with_report(tmp_path, model_path, capsys):
    write_feeds(tmp_path / "calib", small_cnn())
    text = (GOOD.replace("min_cosine = 0.999", "max_abs = 0.0")
            .replace('step = "check"', 'step = "quantize"\ncalibration = "calib"\n\n[[steps]]\nstep = "check"'))
    code, err, out, recipe = run_recipe(tmp_path, model_path, text, capsys)
    assert code == 3
    assert err[0].startswith(f"error: {recipe}:{line_of(text, 'max_abs') - 2}: step 3 (check): output ")
    assert "max_abs 0.0" in err[0]
    assert not out.exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "failed" and report["exit_code"] == 3
    assert report["steps"][-1]["accuracy"]["ok"] is False
    assert report["error"]["type"] == "VerificationError"


# ------------------------------------------------------------------ key lines


def test_key_lines_cover_toml_forms():
    text = '''\
# comment
title = "x"          # trailing comment
"quoted key" = 1
a.b.c = 2
text = """
fake = 1
[[steps]]
"""
arr = [
  "x", # comment ]
  { inner = 1 },
]
lit = \'\'\'one
[not.a.table]
\'\'\'

[[steps]]
step = "optimize"

[steps.options]
fold = { size = 1 }

[[steps]]
step = "check"
'''
    lines = KeyLines(text)
    assert lines.line_of(("title",)) == 2
    assert lines.line_of(("quoted key",)) == 3
    assert lines.line_of(("a", "b", "c")) == 4 and lines.line_of(("a",)) == 4
    assert ("fake",) not in lines.lines and lines.line_of(("steps", 1)) == 23  # the [[steps]] in the string is skipped
    assert lines.line_of(("arr",)) == 9 and ("inner",) not in lines.lines
    assert ("not",) not in lines.lines
    assert lines.line_of(("steps", 0)) == 17
    assert lines.line_of(("steps", 0, "step")) == 18
    assert lines.line_of(("steps", 0, "options", "fold")) == 21
    assert lines.line_of(("steps", 0, "options", "fold", "size")) == 21  # inside an inline table: its key's line
    assert lines.line_of(("steps", 1, "step")) == 24
    assert lines.line_of(("steps", 1, "min_cosine")) == 23  # absent key: its table's header


def test_from_dict_and_from_toml_agree(tmp_path):
    import tomllib

    a = Pipeline.from_toml(GOOD)
    b = Pipeline.from_dict(tomllib.loads(GOOD))
    assert [(s.kind, dict(s.params)) for s in a.steps] == [(s.kind, dict(s.params)) for s in b.steps]
    with pytest.raises(OptionError, match=r"^<dict>: steps\[1\]\.levl: unknown key"):
        Pipeline.from_dict({"steps": [{"step": "optimize", "levl": 1}]})


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path):
    folder = tmp_path / "recipes"
    write_feeds(folder / "val", small_cnn(), count=2)
    recipe = parse_recipe('[[steps]]\nstep = "check"\ndata = "val"\nmax_rel = 1.0\n', source="r.toml", base_dir=folder)
    assert recipe.steps[0].params["data"] == str(folder / "val")
    with pytest.raises(DataError, match="r.toml:3: steps\\[1\\].data: 'val'"):
        parse_recipe('[[steps]]\nstep = "check"\ndata = "val"\nmax_rel = 1.0\n', source="r.toml", base_dir=tmp_path)


def test_user_pass_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "passes.py").write_text((Path(__file__).parents[1] / "examples" / "my_passes.py").read_text())
    monkeypatch.syspath_prepend(str(tmp_path))
    pipeline = Pipeline.from_dict({
        "input_shapes": {"pixel_values": [1, 3, 32, 32]},
        "steps": [{"step": "optimize", "extra_passes": ["mypkg.passes:FuseMatMulBiasToGemm"],
                   "options": {"fuse-matmul-bias-gemm": {}}}],
    })
    result = pipeline.run(small_cnn())
    assert "Gemm" in [n.op for n in result.model.graph.nodes]
    feeds = {"pixel_values": np.ones((1, 3, 32, 32), np.float32)}
    from conftest import run_proto

    np.testing.assert_allclose(run_proto(result.model.to_proto(), feeds)[0], run_proto(small_cnn(), feeds)[0],
                               rtol=1e-5, atol=1e-6)


def test_docs_describe_every_step_and_key():
    from onnxforge.recipe import TOP_FIELDS

    docs = (Path(__file__).parents[1] / "docs" / "recipes.md").read_text()
    for kind, spec in STEPS.items():
        section = docs.split(f"### `{kind}`", 1)
        assert len(section) == 2, f"docs/recipes.md lacks a section for step {kind!r}"
        body = section[1].split("\n### ", 1)[0]
        for key in spec.fields:
            assert f"`{key}`" in body or key == "cache", f"docs/recipes.md: step {kind!r} lacks key {key!r}"
    for key in TOP_FIELDS:
        assert f"| `{key}` |" in docs
