"""Guards shared by every command (through ``onnxforge.cli.main``): the same bad
input gives the same one-line error and exit 2 everywhere; no output replaces a
file the run reads (the model, its external data, data files, the recipe) under
any spelling; data files must be regular files; bad data and options are exit 2."""
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.cli import main


def _model(dynamic: bool = False) -> onnx.ModelProto:
    """y = Relu(MatMul(x, W) + b): small, quantizable, fp16-able, prunable-free."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    dims = ["n", "k"] if dynamic else ["n", 8]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
         helper.make_node("Relu", ["a"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture()
def work(tmp_path):
    """tmp/m/model.onnx with its weights in tmp/m/model.onnx.data, a calib folder, a recipe."""
    folder = tmp_path / "m"
    folder.mkdir()
    model = _model()
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(2):
        np.savez(calib / f"{i}.npz", x=np.random.default_rng(i).standard_normal((1, 8)).astype(np.float32))
    (tmp_path / "recipe.toml").write_text('version = 1\nprovider = "cpu"\n\n[[steps]]\nstep = "optimize"\nlevel = 1\n')
    return tmp_path


def _run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines and lines[0].startswith("error: ") and len(lines) <= 2, err
    assert "Traceback" not in err and "internal error" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _digests(*paths):
    return [Path(p).read_bytes() for p in paths]


# ------------------------------------------------------------------ one condition, one exit code

BAD_MODELS = {
    "truncated": lambda p: p.write_bytes(onnx.load(p).SerializeToString()[:40]) or p,
    "missing": lambda p: p.with_name("nope.onnx"),
    "folder": lambda p: p.parent,
}


def _commands(model, tmp):
    out = tmp / "out.onnx"
    return {
        "optimize": ["optimize", model, "-o", out],
        "quantize": ["quantize", model, "-o", out, "--calib", "random", "--no-latency"],
        "convert-fp16": ["convert-fp16", model, "-o", out],
        "prune": ["prune", model, "-o", out, "--ratio", "0.5"],
        "bench": ["bench", model, "--rounds", "1", "--warmup", "0", "--iterations", "1"],
        "compare": ["compare", model, model],
        "tune": ["tune", model, "--budget", "1s", "-o", tmp / "p.json"],
        "run": ["run", tmp / "recipe.toml", model, "-o", out],
    }


@pytest.mark.parametrize("bad", sorted(BAD_MODELS))
@pytest.mark.parametrize("command", sorted(_commands("m", Path("t"))))
def test_bad_model_is_exit_2_for_every_command(work, capsys, bad, command):
    path = work / "plain.onnx"
    onnx.save(_model(), path)
    path = BAD_MODELS[bad](path)
    if command == "run" and bad == "folder":
        # `run` takes a folder as a fleet of its models: a broken one among them is
        # reported by name, the others run, and the fleet exits 2.
        (path / "broken.onnx").write_bytes(b"\x08\x07\x12")
        code, _, err = _run(_commands(path, work)[command], capsys)
        assert code == 2, err
        assert "broken" in err and "plain: ok" in err and "Traceback" not in err, err
        return
    code, _, err = _run(_commands(path, work)[command], capsys)
    _assert_one_line_error(code, err)


def test_bench_and_tune_validate_external_data(work, capsys, tmp_path_factory):
    """A hard link to a file outside the model's folder is refused as optimize refuses it."""
    outside = tmp_path_factory.mktemp("outside")
    data = work / "m" / "model.onnx.data"
    os.replace(data, outside / "secret.bin")
    os.link(outside / "secret.bin", data)
    model = work / "m" / "model.onnx"
    for args in (["bench", model, "--rounds", "1"], ["tune", model, "--budget", "1s", "-o", work / "p.json"],
                 ["optimize", model, "-o", work / "o.onnx"]):
        code, _, err = _run(args, capsys)
        _assert_one_line_error(code, err, "hard link")


# ------------------------------------------------------------------ no output replaces an input


def _spellings(work):
    """Other names of the model and of its data file: ../, a symlink, a hard link."""
    model, data = work / "m" / "model.onnx", work / "m" / "model.onnx.data"
    (work / "m" / "sub").mkdir()
    os.symlink(model, work / "link.onnx")
    os.symlink(data, work / "link.data")
    plain = work / "plain.onnx"
    onnx.save(_model(), plain)
    os.link(plain, work / "hard.onnx")
    return {
        "model": (model, model),
        "model-dotdot": (model, work / "m" / "sub" / ".." / "model.onnx"),
        "model-symlink": (model, work / "link.onnx"),
        "data": (model, data),
        "data-symlink": (model, work / "link.data"),
        "hardlink": (plain, work / "hard.onnx"),
    }


def _writes(model, target, work):
    """Every file each command writes, with ``target`` in that place."""
    out = work / "out.onnx"
    calib = ["--calib", work / "calib"]
    return {
        "optimize -o": ["optimize", model, "-o", target],
        "optimize --report": ["optimize", model, "-o", out, "--report", target],
        "quantize -o": ["quantize", model, "-o", target, *calib, "--no-latency"],
        "quantize --report": ["quantize", model, "-o", out, *calib, "--no-latency", "--report", target],
        "quantize --trt-cache": ["quantize", model, "-o", out, *calib, "--no-latency", "--trt-cache", target],
        "convert-fp16 -o": ["convert-fp16", model, "-o", target],
        "convert-fp16 --report": ["convert-fp16", model, "-o", out, "--report", target],
        "prune -o": ["prune", model, "-o", target, "--sparsity", "0.5"],
        "prune --report": ["prune", model, "-o", out, "--sparsity", "0.5", "--report", target],
        "tune -o": ["tune", model, "--budget", "1s", "-o", target],
        "bench --json": ["bench", model, "--rounds", "1", "--json", target],
        "bench --csv": ["bench", model, "--rounds", "1", "--csv", target],
        "bench --markdown": ["bench", model, "--rounds", "1", "--markdown", target],
        "bench --plot": ["bench", model, "--rounds", "1", "--plot", target],
        "run -o": ["run", work / "recipe.toml", model, "-o", target],
        "run --report": ["run", work / "recipe.toml", model, "-o", out, "--report", target],
    }


WRITES = sorted(_writes("m", "t", Path("w")))
SPELLINGS = ["model", "model-dotdot", "model-symlink", "data", "data-symlink", "hardlink"]


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("write", WRITES)
def test_no_output_replaces_the_input_model_or_its_data(work, capsys, write, spelling):
    model, target = _spellings(work)[spelling]
    watched = [model, work / "m" / "model.onnx.data"]
    before = _digests(*watched)
    code, _, err = _run(_writes(model, target, work)[write], capsys)
    _assert_one_line_error(code, err, "refusing to overwrite")
    assert _digests(*watched) == before
    assert not [p for p in work.rglob(".*.tmp")], "a temporary file was left behind"


@pytest.mark.parametrize("args", [
    ["quantize", "{model}", "-o", "{calib0}", "--calib", "{calib}", "--no-latency"],
    ["quantize", "{model}", "-o", "{out}", "--calib", "{calib}", "--val", "{val}", "--report", "{val0}",
     "--no-latency"],
    ["convert-fp16", "{model}", "-o", "{calib0}", "--calib", "{calib}"],
    ["prune", "{model}", "-o", "{out}", "--ratio", "0.5", "--calib", "{calib}", "--report", "{calib0}"],
    ["optimize", "{model}", "-o", "{out}", "--data", "{calib}", "--report", "{calib0}"],
    ["bench", "{model}", "--rounds", "1", "--data", "{calib}", "--json", "{calib0}"],
    ["tune", "{model}", "--budget", "1s", "--data", "{calib}", "-o", "{calib0}"],
    ["run", "{recipe}", "{model}", "-o", "{out}", "--report", "{recipe}"],
    ["run", "{recipe}", "{model}", "-o", "{recipe}"],
], ids=lambda a: " ".join(a[:1] + [x for x in a if x.startswith("-")]))
def test_no_output_replaces_a_data_file_or_the_recipe(work, capsys, args):
    val = work / "val"
    val.mkdir()
    np.savez(val / "0.npz", x=np.ones((1, 8), np.float32))
    names = {"model": work / "m" / "model.onnx", "out": work / "out.onnx", "calib": work / "calib",
             "calib0": work / "calib" / ".." / "calib" / "0.npz", "val": val, "val0": val / "0.npz",
             "recipe": work / "recipe.toml"}
    watched = [work / "calib" / "0.npz", val / "0.npz", work / "recipe.toml"]
    before = _digests(*watched)
    code, _, err = _run([a.format(**names) for a in args], capsys)
    _assert_one_line_error(code, err, "refusing to overwrite")
    assert _digests(*watched) == before


def test_two_outputs_may_not_be_one_file(work, capsys):
    out = work / "out.onnx"
    code, _, err = _run(["optimize", work / "m" / "model.onnx", "-o", out, "--report", out], capsys)
    _assert_one_line_error(code, err, "two outputs")


def test_guarded_writes_still_write(work, capsys):
    """The guard refuses only inputs: reports and plots land, atomically, with no temporary left."""
    model, out = work / "m" / "model.onnx", work / "out.onnx"
    code, _, err = _run(["bench", model, "--rounds", "1", "--warmup", "0", "--iterations", "1",
                         "--json", work / "b.json", "--csv", work / "b.csv"], capsys)
    assert code == 0, err
    assert json.loads((work / "b.json").read_text())["models"]
    code, _, err = _run(["prune", model, "-o", out, "--sparsity", "0.5", "--report", work / "p.json"], capsys)
    assert code == 0, err
    assert json.loads((work / "p.json").read_text())
    assert not [p for p in work.rglob(".*.tmp")]


# ------------------------------------------------------------------ reads: regular files, user code


@pytest.mark.parametrize("command", ["quantize", "convert-fp16", "prune", "optimize", "bench"])
def test_a_fifo_in_a_data_folder_is_refused_not_waited_on(work, capsys, command):
    os.mkfifo(work / "calib" / "zz.npz")
    model, out = work / "m" / "model.onnx", work / "out.onnx"
    args = {
        "quantize": ["quantize", model, "-o", out, "--calib", work / "calib", "--no-latency"],
        "convert-fp16": ["convert-fp16", model, "-o", out, "--calib", work / "calib"],
        "prune": ["prune", model, "-o", out, "--ratio", "0.5", "--calib", work / "calib"],
        "optimize": ["optimize", model, "-o", out, "--data", work / "calib"],
        "bench": ["bench", model, "--rounds", "1", "--data", work / "calib"],
    }[command]
    code, _, err = _run(args, capsys)
    _assert_one_line_error(code, err, "zz.npz", "not a regular file")


def _recipe_with_pass(work, pass_ref: str) -> Path:
    recipe = work / "r" / "recipe.toml"
    recipe.parent.mkdir(exist_ok=True)
    recipe.write_text(f'version = 1\nprovider = "cpu"\n\n[[steps]]\nstep = "optimize"\npasses = ["{pass_ref}"]\n')
    return recipe


PASS_CODE = ("from onnxforge import Pass, PassResult\n\nclass Noop(Pass):\n    name = 'user-noop'\n"
             "    def run(self, graph, ctx):\n        return PassResult(changed=False)\n")


@pytest.mark.parametrize("where", ["dotdot", "symlink"])
def test_recipe_pass_files_only_from_the_recipes_folder(work, capsys, where):
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.py").write_text(PASS_CODE + "raise SystemExit('ran code from elsewhere')\n")
    if where == "dotdot":
        recipe = _recipe_with_pass(work, "../elsewhere/x.py:Noop")
    else:
        recipe = _recipe_with_pass(work, "x.py:Noop")
        os.symlink(elsewhere / "x.py", recipe.parent / "x.py")
    code, _, err = _run(["run", recipe, work / "m" / "model.onnx", "-o", work / "out.onnx"], capsys)
    _assert_one_line_error(code, err, "outside the recipe's folder")
    assert not (work / "out.onnx").exists()


def test_recipe_report_names_the_user_code_it_ran(work, capsys):
    recipe = _recipe_with_pass(work, "mine.py:Noop")
    (recipe.parent / "mine.py").write_text(PASS_CODE)
    report = work / "report.json"
    code, out, err = _run(["run", recipe, work / "m" / "model.onnx", "-o", work / "out.onnx", "--report", report],
                          capsys)
    assert code == 0, err
    (entry,) = json.loads(report.read_text())["recipe"]["user_code"]
    assert entry["pass"] == "mine.py:Noop" and entry["file"] == str((recipe.parent / "mine.py").resolve())
    assert len(entry["sha256"]) == 64 and "user code: mine.py:Noop" in out


# ------------------------------------------------------------------ bad data and options


def _bad_calib(folder: Path, kind: str) -> Path:
    folder.mkdir()
    if kind == "shape":
        np.savez(folder / "0.npz", x=np.ones((1, 5, 7), np.float32))
    elif kind == "dtype":
        np.savez(folder / "0.npz", x=np.ones((1, 8), np.int64))
    elif kind == "corrupt":
        (folder / "0.npz").write_bytes(b"PK\x03\x04 not a zip")
    elif kind == "missing-input":
        np.savez(folder / "0.npz", other=np.ones((1, 8), np.float32))
    return folder


@pytest.mark.parametrize("kind", ["shape", "dtype", "corrupt", "missing-input"])
@pytest.mark.parametrize("command", ["quantize", "convert-fp16", "prune", "bench", "optimize", "compare", "debug",
                                     "reduce", "run"])
def test_calibration_data_that_does_not_fit_is_exit_2(work, capsys, kind, command):
    """Every command reading data refuses data that does not fit in one line naming the file (optimize,
    compare and debug passed onnxruntime's message on, with a hint to give the --data already given)."""
    bad = _bad_calib(work / "bad", kind)
    model, out = work / "m" / "model.onnx", work / "out.onnx"
    args = {
        "quantize": ["quantize", model, "-o", out, "--calib", bad, "--no-latency"],
        "convert-fp16": ["convert-fp16", model, "-o", out, "--calib", bad],
        "prune": ["prune", model, "-o", out, "--ratio", "0.5", "--calib", bad],
        "bench": ["bench", model, "--rounds", "1", "--data", bad],
        "optimize": ["optimize", model, "-o", out, "--data", bad],
        "compare": ["compare", model, model, "--data", bad],
        "debug": ["debug", model, model, "--data", bad],
        "reduce": ["reduce", model, "-o", out, "--data", bad],
        "run": ["run", work / "data.toml", model, "-o", out],
    }[command]
    (work / "data.toml").write_text(f'version = 1\n[[steps]]\nstep = "optimize"\ndata = "{bad}"\n')
    code, _, err = _run(args, capsys)
    _assert_one_line_error(code, err, "0.npz")


def test_data_keys_that_are_not_inputs_are_named_in_a_warning(work, capsys, caplog):
    """An extra key in a feed file is ignored, and said so (a misspelt input would go unnoticed)."""
    extra = work / "extra"
    extra.mkdir()
    np.savez(extra / "0.npz", x=np.ones((1, 8), np.float32), x_mask=np.ones((1, 8), np.float32))
    code, _, err = _run(["convert-fp16", work / "m" / "model.onnx", "-o", work / "out.onnx", "--calib", extra], capsys)
    assert code == 0, err
    assert "--calib" in caplog.text and "ignoring 'x_mask', not input(s) of the model (its inputs: x)" in caplog.text


@pytest.mark.parametrize("args", [
    ["prune", "{model}", "-o", "{out}", "--ratio", "0.5", "--round-to", "0"],
    ["prune", "{model}", "-o", "{out}", "--ratio", "0.5", "--calib-limit", "-1"],
    ["optimize", "{model}", "-o", "{out}", "--max-iterations", "0"],
    ["optimize", "{model}", "-o", "{out}", "--max-iterations", "-3"],
    ["bench", "{model}", "--rounds", "0"],
    ["optimize", "{dyn}", "-o", "{out}", "--input-shape", "x:1000000x1000000"],
    ["bench", "{dyn}", "--rounds", "1", "--input-shape", "x:1000000x1000000000"],
    ["tune", "{dyn}", "--budget", "1s", "--input-shape", "x:1000000x1000000"],
    ["inspect", "{dyn}", "--input-shape", "x:1000000000x1000000000"],
], ids=lambda a: " ".join(a[:1] + a[3:]))
def test_bad_options_are_exit_2(work, capsys, args):
    dyn = work / "dyn.onnx"
    onnx.save(_model(dynamic=True), dyn)
    names = {"model": work / "m" / "model.onnx", "dyn": dyn, "out": work / "out.onnx"}
    code, _, err = _run([a.format(**names) for a in args], capsys)
    _assert_one_line_error(code, err)


def test_the_error_line_comes_first(work, capsys):
    """No progress line and no onnxruntime log line before ``error:``."""
    bad = _bad_calib(work / "bad", "shape")
    for args in (["quantize", work / "m" / "model.onnx", "-o", work / "o.onnx", "--calib", bad],
                 ["run", work / "recipe.toml", work / "nope.onnx", "-o", work / "o.onnx"]):
        code, _, err = _run(args, capsys)
        assert err.startswith("error: "), err
        _assert_one_line_error(code, err)


def test_a_fifo_recipe_or_data_file_is_refused(work, capsys):
    os.mkfifo(work / "fifo.toml")
    os.mkfifo(work / "fifo.npz")
    model, out = work / "m" / "model.onnx", work / "out.onnx"
    for args, needle in ((["run", work / "fifo.toml", model, "-o", out], "not a regular file"),
                         (["quantize", model, "-o", out, "--calib", work / "fifo.npz"], "not a regular file"),
                         (["optimize", model, "-o", out, "--data", work / "fifo.npz"], "not a regular file")):
        code, _, err = _run(args, capsys)
        _assert_one_line_error(code, err, needle)
