"""`onnxforge debug ORIGINAL CHANGED`: layer-by-layer comparison, through the CLI."""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxforge.cli import main


def _model(w2: np.ndarray, *, fused: bool = False, input_name: str = "x") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    b = rng.standard_normal((4,)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b, "b")]
    nodes = [helper.make_node("MatMul", [input_name, "w1"], ["h1"], name="mm1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1")]
    if fused:  # MatMul+Add as one Gemm: "h2" is gone, "y" made by a new node
        nodes.append(helper.make_node("Gemm", ["r1", "w2", "b"], ["y"], name="gemm_fused"))
    else:
        nodes += [helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="mm2"),
                  helper.make_node("Add", ["h2", "b"], ["y"], name="add_bias")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _pair(tmp_path, **changed_kw):
    w2 = np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32)
    orig = tmp_path / "orig.onnx"
    onnx.save(_model(w2), orig)
    w2b = w2.copy()
    w2b[3, 1] += 0.5
    changed = tmp_path / "changed.onnx"
    onnx.save(_model(w2b, **changed_kw), changed)
    return str(orig), str(changed)


def test_text_names_the_first_jump(tmp_path, capsys):
    orig, changed = _pair(tmp_path)
    assert main(["debug", orig, changed, "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "first jump: tensor h2 (#2), made by node mm2 (MatMul)" in out
    assert "r1 (rel 0.00e+00" in out and "w2 (initializer)" in out
    assert "final outputs:" in out and "y:" in out


def test_json_lists_tensors_in_graph_order(tmp_path, capsys):
    orig, changed = _pair(tmp_path)
    assert main(["debug", orig, changed, "--json", "--chunk", "1"]) == 0  # one tensor per run: chunking
    result = json.loads(capsys.readouterr().out)
    names = [t["name"] for t in result["tensors"]]
    assert names == ["h1", "r1", "h2", "y"]
    h1, r1, h2, y = result["tensors"]
    for t in (h1, r1):
        assert t["max_abs"] == 0.0 and t["max_rel"] == 0.0 and t["cosine"] == 1.0 and t["sqnr_db"] == "inf"
        assert not t["jump"]
    assert h2["jump"] and h2["max_abs"] > 0 and h2["cosine"] < 1 and h2["sqnr_db"] < 100
    assert h2["nan"] == 0 and h2["inf"] == 0
    assert result["first_jump"]["tensor"] == "h2" and result["first_jump"]["node"] == "mm2"
    assert result["first_jump"]["op"] == "MatMul"
    assert result["outputs"][0]["name"] == "y" and result["outputs"][0]["max_abs"] > 0
    assert result["runs"] == 4  # 4 chunks of 1 tensor, 1 feed
    assert result["only_in_original"] == [] and result["only_in_changed"] == []


def test_high_threshold_no_jump(tmp_path, capsys):
    orig, changed = _pair(tmp_path)
    assert main(["debug", orig, changed, "--threshold", "10"]) == 0
    assert "first jump: none" in capsys.readouterr().out


def test_fused_tensor_is_only_in_one(tmp_path, capsys):
    orig, changed = _pair(tmp_path, fused=True)
    assert main(["debug", orig, changed, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in result["tensors"]] == ["h1", "r1", "y"]
    assert result["only_in_original"] == ["h2"]
    assert result["first_jump"]["tensor"] == "y" and result["first_jump"]["node"] == "add_bias"
    assert main(["debug", orig, changed]) == 0
    assert "1 tensor(s) only in the original (fused/folded away): h2" in capsys.readouterr().out


def test_different_inputs_exit_2_one_line(tmp_path, capsys):
    orig, _ = _pair(tmp_path)
    other = tmp_path / "other.onnx"
    onnx.save(_model(np.ones((16, 4), np.float32), input_name="z"), other)
    assert main(["debug", orig, str(other)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "different inputs" in errors[0]
    assert "Traceback" not in captured.err


def test_bad_file_exit_2(tmp_path, capsys):
    orig, _ = _pair(tmp_path)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    assert main(["debug", orig, str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err


def test_external_data_model(tmp_path, capsys):
    orig, changed = _pair(tmp_path)
    ext = tmp_path / "ext" / "changed.onnx"
    ext.parent.mkdir()
    onnx.save(onnx.load(changed), ext, save_as_external_data=True, all_tensors_to_one_file=True,
              location="changed.onnx.data", size_threshold=0)
    assert main(["debug", orig, str(ext), "--json", "--chunk", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["first_jump"]["tensor"] == "h2" and result["runs"] == 2


def _renamed_relu(tmp_path, *, with_map: bool) -> tuple[str, str]:
    """The changed model computes r1 under a new name (as a fusion would), with or
    without the name map that optimize writes."""
    w2 = np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32)
    orig = tmp_path / "orig.onnx"
    onnx.save(_model(w2), orig)
    changed = _model(w2)
    for node in changed.graph.node:
        node.input[:] = ["r1_new" if i == "r1" else i for i in node.input]
        node.output[:] = ["r1_new" if o == "r1" else o for o in node.output]
    if with_map:
        changed.metadata_props.add(key="onnxforge.name_map", value=json.dumps({"r1_new": "r1"}))
    path = tmp_path / "changed.onnx"
    onnx.save(changed, path)
    return str(orig), str(path)


def test_name_map_matches_renamed_tensors(tmp_path, capsys):
    orig, changed = _renamed_relu(tmp_path, with_map=True)
    assert main(["debug", orig, changed, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    names = [(t["name"], t.get("changed_name")) for t in result["tensors"]]
    assert names == [("h1", None), ("r1", "r1_new"), ("h2", None), ("y", None)]
    assert result["matched_by_name_map"] == 1
    assert result["only_in_original"] == [] and result["only_in_changed"] == []
    assert main(["debug", orig, changed]) == 0
    assert "r1 (as r1_new)" in capsys.readouterr().out


def test_without_name_map_renamed_tensors_are_unmatched(tmp_path, capsys):
    orig, changed = _renamed_relu(tmp_path, with_map=False)
    assert main(["debug", orig, changed, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["only_in_original"] == ["r1"] and result["only_in_changed"] == ["r1_new"]


def test_pass_manager_writes_the_map_debug_reads(tmp_path, capsys):
    """End to end: a rule gives a tensor a new name, the written model's name map lets
    debug compare it with the original tensor."""
    from test_rewrite_rollback import ReluAsMaxPass  # Relu(x) as Max(x, 0) under a new name

    from onnxforge import Model, PassContext, PassManager
    from onnxforge.io import save

    w2 = np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32)
    src = tmp_path / "orig.onnx"
    onnx.save(_model(w2), src)
    out, _report = PassManager([ReluAsMaxPass()]).run(Model.from_proto(_model(w2)), PassContext())
    save(out, tmp_path / "opt.onnx")
    assert main(["debug", str(src), str(tmp_path / "opt.onnx"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [(t["name"], t.get("changed_name")) for t in result["tensors"]][1] == ("r1", "r1_max")
    assert result["matched_by_name_map"] == 1 and not result["only_in_original"]


def test_plot_writes_a_png(tmp_path, capsys):
    orig, changed = _pair(tmp_path)
    png = tmp_path / "err.png"
    assert main(["debug", orig, changed, "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))


def test_one_session_at_a_time_and_a_slice_of_tensors(tmp_path, capsys, monkeypatch):
    """Bounded memory: the two models never run side by side and each session exposes
    at most --chunk intermediates (plus the outputs)."""
    import gc

    import onnxruntime as ort

    live, peak, exposed = [0], [0], []
    real = ort.InferenceSession

    class Counting(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            exposed.append(len(self.get_outputs()))

        def __del__(self):
            live[0] -= 1

    monkeypatch.setattr(ort, "InferenceSession", Counting)
    orig, changed = _pair(tmp_path)
    assert main(["debug", orig, changed, "--json", "--chunk", "2"]) == 0
    gc.collect()
    assert peak[0] == 1 and exposed and max(exposed) <= 2 + 1
    assert json.loads(capsys.readouterr().out)["compared"] == 4


def test_float16_tensors_are_compared_with_float32(tmp_path, capsys):
    """An FP16 model's tensors are float16 where the original's are float32: compared, not a type mismatch."""
    w2 = np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32)
    orig = tmp_path / "orig.onnx"
    onnx.save(_model(w2), orig)
    half = _model(w2)
    half.graph.node.insert(0, helper.make_node("Cast", ["x"], ["x16"], name="to16", to=TensorProto.FLOAT16))
    half.graph.node[1].input[0] = "x16"
    for init in half.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    half.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    (tmp_path / "half.onnx").write_bytes(half.SerializeToString())
    assert main(["debug", str(orig), str(tmp_path / "half.onnx"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    h1 = result["tensors"][0]
    assert h1["name"] == "h1" and "mismatch" not in h1 and 0 < h1["max_rel"] < 1e-2 and h1["cosine"] > 0.9999
    assert "mismatch" not in result["outputs"][0]
