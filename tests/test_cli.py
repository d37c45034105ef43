"""The CLI: real runs of optimize/inspect/compare/passes, and one clear line with
exit code 2 (no traceback) for every kind of bad input."""
import json
import subprocess
import sys

import onnx
import pytest

from onnxforge.cli import main
from onnxforge.demo_models import small_cnn, small_encoder


@pytest.fixture()
def cnn(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), path)
    return path


def _run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and len(lines) <= 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_optimize_writes_model_and_report(cnn, tmp_path, capsys):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    code, stdout, _ = _run(["optimize", str(cnn), "-o", str(out), "-O3", "--report", str(rep)], capsys)
    assert code == 0
    report = json.loads(rep.read_text())
    assert report["schema_version"] == 1 and report["verification"]["ok"]
    assert report["after"]["nodes"] < report["before"]["nodes"]
    assert "verification: numeric passed" in stdout
    onnx.checker.check_model(str(out), full_check=True)


def test_optimize_json_and_passes_selection(cnn, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code, stdout, _ = _run(["optimize", str(cnn), "-o", str(out), "--passes", "eliminate-identity", "--json"], capsys)
    assert code == 0
    report = json.loads(stdout)
    assert [p["pass"] for p in report["passes"]] == ["eliminate-identity"]
    assert "Identity" not in report["after"]["ops"] and "Dropout" not in report["after"]["ops"]


def test_disable_removes_a_pass(cnn, tmp_path, capsys):
    code, stdout, _ = _run(["optimize", str(cnn), "-o", str(tmp_path / "o.onnx"), "-O1",
                            "--disable", "eliminate-identity", "--json"], capsys)
    assert code == 0
    assert "eliminate-identity" not in [p["pass"] for p in json.loads(stdout)["passes"]]


def test_inspect_and_compare(cnn, tmp_path, capsys):
    code, stdout, _ = _run(["inspect", str(cnn), "--json"], capsys)
    info = json.loads(stdout)
    assert code == 0 and info["inputs"][0]["name"] == "pixel_values" and info["parameters"] > 0
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(cnn), "-o", str(out)]) == 0
    capsys.readouterr()
    code, stdout, _ = _run(["compare", str(cnn), str(out), "--json", "--rtol", "1e-4"], capsys)
    result = json.loads(stdout)
    assert code == 0 and result["ok"] and result["outputs"][0]["cosine"] > 0.999999


def test_compare_flags_different_models(tmp_path, capsys):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(small_cnn(seed=0), a)
    onnx.save(small_cnn(seed=1), b)
    code, _, _ = _run(["compare", str(a), str(b), "--rtol", "1e-4"], capsys)
    assert code == 3


BAD_FILES = {
    "empty.onnx": (b"", "empty"),
    "text.onnx": (b"this is not a model at all\n" * 10, "ONNX"),
    "random.onnx": (bytes(range(256)) * 40, "ONNX"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_model_files(name, tmp_path, capsys):
    data, needle = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(data)
    code, _, err = _run(["optimize", str(path), "-o", str(tmp_path / "o.onnx")], capsys)
    _assert_one_line_error(code, err, str(path))
    assert needle.lower() in err.lower()
    assert not (tmp_path / "o.onnx").exists()


def test_truncated_model(cnn, tmp_path, capsys):
    data = cnn.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    code, _, err = _run(["inspect", str(cut)], capsys)
    _assert_one_line_error(code, err, "cut.onnx")


def test_wrong_ir_version(tmp_path, capsys):
    model = small_cnn()
    model.ir_version = 99
    path = tmp_path / "ir.onnx"
    path.write_bytes(model.SerializeToString())
    code, _, err = _run(["inspect", str(path)], capsys)
    _assert_one_line_error(code, err, "ir_version")


def test_missing_file_and_folders(cnn, tmp_path, capsys):
    code, _, err = _run(["optimize", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o.onnx")], capsys)
    _assert_one_line_error(code, err, "nope.onnx")
    code, _, err = _run(["optimize", str(cnn), "-o", str(tmp_path / "missing" / "o.onnx")], capsys)
    _assert_one_line_error(code, err, "missing")


def test_refuses_to_overwrite_input(cnn, capsys):
    before = cnn.read_bytes()
    code, _, err = _run(["optimize", str(cnn), "-o", str(cnn)], capsys)
    _assert_one_line_error(code, err, "overwrite")
    assert cnn.read_bytes() == before


@pytest.mark.parametrize("args,needle", [
    (["--passes", "no-such-pass"], "no-such-pass"),
    (["--disable", "no-such-pass"], "no-such-pass"),
    (["--input-shape", "pixel_values:1xfoo"], "input-shape"),
    (["--input-shape", "nope:1x3x32x32"], "nope"),
    (["--provider", "quantum"], "quantum"),
    (["--data", "/no/such/folder"], "/no/such/folder"),
])
def test_bad_options(cnn, tmp_path, capsys, args, needle):
    code, _, err = _run(["optimize", str(cnn), "-o", str(tmp_path / "o.onnx"), "-O3", *args], capsys)
    _assert_one_line_error(code, err, needle)


def test_data_that_does_not_fit_the_model(cnn, tmp_path, capsys):
    import numpy as np

    np.savez(tmp_path / "0.npz", pixel_values=np.zeros((1, 3, 7, 7), np.float32), extra=np.zeros(1))
    code, _, err = _run(["optimize", str(cnn), "-o", str(tmp_path / "o.onnx"), "--data", str(tmp_path)], capsys)
    assert code in (0, 2)  # a 7x7 image runs through this CNN; mismatching names must be refused:
    np.savez(tmp_path / "0.npz", wrong=np.zeros((1, 3, 32, 32), np.float32))
    code, _, err = _run(["optimize", str(cnn), "-o", str(tmp_path / "o2.onnx"), "--data", str(tmp_path)], capsys)
    _assert_one_line_error(code, err, "pixel_values")


def test_console_script_exit_codes(tmp_path):
    """The installed entry point: exit 2 and no traceback, end to end."""
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    proc = subprocess.run([sys.executable, "-m", "onnxforge.cli", "inspect", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.startswith("error:")
    proc = subprocess.run([sys.executable, "-m", "onnxforge.cli", "--debug", "inspect", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_encoder_numeric_verification_with_fusions(tmp_path, capsys):
    src, out = tmp_path / "enc.onnx", tmp_path / "enc.opt.onnx"
    onnx.save(small_encoder(), src)
    code, stdout, _ = _run(["optimize", str(src), "-o", str(out), "-O3", "--json", "--explain"], capsys)
    report = json.loads(stdout)
    assert code == 0 and report["verification"]["ok"]
    assert report["after"]["nodes"] < report["before"]["nodes"]


def test_optimize_with_tune_writes_profile(cnn, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code, _, err = _run(["optimize", str(cnn), "-o", str(out), "--tune", "--tune-budget", "3s", "--json"], capsys)
    assert code == 0, err
    profile = tmp_path / "o.profile.json"
    data = json.loads(profile.read_text())
    assert data["tuning"]["trials"] is not None
    from onnxforge.runtime import session

    sess = session(str(out), profile=str(profile))
    assert sess.get_inputs()[0].name == "pixel_values"
