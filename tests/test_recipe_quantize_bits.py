"""Recipe quantize steps with bits = "auto" (fp32 / INT8 dynamic / INT4 judged and timed, one kept) and the
INT4 keys (accuracy_level), on a tiny decoder with a KV cache built in the tests."""
import json

import numpy as np
import onnx

import decoder_graphs as dg
from onnxforge.cli import main


def _setup(tmp_path, step: str):
    proto = dg.decoder(layers=1, vocab=64, head_size=8)
    onnx.save(proto, tmp_path / "model.onnx")
    (tmp_path / "data").mkdir()
    for i in range(4):
        np.savez(tmp_path / "data" / f"{i:02d}.npz", **dg.feeds(proto, batch=1, seq=8, left_pad=(0,), seed=i))
    recipe = tmp_path / "recipe.toml"
    # no input_shapes: they would pin the model (the final check's made-up inputs try an empty cache first)
    recipe.write_text(f'version = 1\n\n[[steps]]\nstep = "quantize"\ncalibration = "data"\n{step}\n')
    return recipe


def _run(tmp_path, recipe, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main(["run", str(recipe), str(tmp_path / "model.onnx"), "-o", str(out), "--report", str(report),
                 "--no-cache", "--quiet"])
    return code, capsys.readouterr().err, out, report


def test_bits_auto_recipe_keeps_one_candidate_and_records_why(tmp_path, capsys):
    recipe = _setup(tmp_path, 'bits = "auto"\nweight_method = "rtn"\nblock_size = 32\nauto_rounds = 2\n'
                              'max_drop = 0.5\nmax_ppl_increase = 10.0')
    code, err, out, report = _run(tmp_path, recipe, capsys)
    assert code == 0, err
    step = json.loads(report.read_text())["steps"][0]
    auto = step["bits_auto"]
    assert [c["name"] for c in auto["candidates"]] == ["int4", "int4-acc4", "int8-dynamic", "fp32"]
    ops = {n.op_type for n in onnx.load(out).graph.node}
    expect = {"int4": "MatMulNBits", "int4-acc4": "MatMulNBits", "int8-dynamic": "MatMulInteger", "fp32": "MatMul"}
    assert expect[auto["chosen"]] in ops and auto["reason"]
    assert "max_input_error" in auto["int8"]


def test_int4_recipe_takes_the_accuracy_level(tmp_path, capsys):
    recipe = _setup(tmp_path, 'bits = 4\nweight_method = "rtn"\nblock_size = 32\naccuracy_level = 4\n'
                              'max_ppl_increase = 10.0\nmax_drop = 0.5')
    code, err, out, _ = _run(tmp_path, recipe, capsys)
    assert code == 0, err
    nbits = [n for n in onnx.load(out).graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(onnx.helper.get_attribute_value(a) == 4 for n in nbits for a in n.attribute
                         if a.name == "accuracy_level")


def test_bits_other_than_8_4_auto_is_refused_with_the_key(tmp_path, capsys):
    recipe = _setup(tmp_path, 'bits = "eight"')
    code, err, _, _ = _run(tmp_path, recipe, capsys)
    assert code == 2 and "steps[1].bits" in err and "is not one of 8, 4, 'auto'" in err


def test_bits_auto_on_a_model_pinned_by_input_shapes_is_refused_in_one_line(tmp_path, capsys):
    # input_shapes pin the model before the first step; bits = "auto" times greedy generation, which
    # needs the dynamic dims (it failed inside the generation bench with an IndexError)
    recipe = _setup(tmp_path, 'bits = "auto"\nweight_method = "rtn"\nblock_size = 32')
    recipe.write_text(recipe.read_text().replace("version = 1\n", "version = 1\ninput_shapes = { input_ids = [1, 8] }\n"))
    code, err, out, _ = _run(tmp_path, recipe, capsys)
    assert code == 2 and not out.exists()
    assert 'steps[1].bits: bits = "auto" cannot run on a model pinned by input_shapes' in err.splitlines()[0]


def test_step_data_that_does_not_fit_the_pinned_model_is_refused_naming_the_file(tmp_path, capsys):
    # the calibration feeds hold an empty cache; input_shapes pin a cache of one position: one line, exit 2
    # (it was onnxruntime's 'Got invalid dimensions' as an internal error)
    recipe = _setup(tmp_path, 'bits = 4\nweight_method = "rtn"\nblock_size = 32')
    pins = '"past_key_values.0.key" = [1, 2, 1, 8], "past_key_values.0.value" = [1, 2, 1, 8]'
    recipe.write_text(recipe.read_text().replace("version = 1\n", f"version = 1\ninput_shapes = {{ {pins} }}\n"))
    code, err, out, _ = _run(tmp_path, recipe, capsys)
    first = err.splitlines()[0]
    assert code == 2 and not out.exists(), err
    assert first.startswith("error: steps[1].calibration ") and "00.npz" in first and "past_key_values.0.key" in first
