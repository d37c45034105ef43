"""Weights shared, not copied (onnxforge/shared_weights.py): sessions, the checker and
shape inference of an -O3 run get the model without its weights; snapshots share
read-only arrays; the peak memory of optimize + save stays near the weights."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

import onnxforge
from onnxforge.io import load, save
from onnxforge.model_prep import snapshot
from onnxforge.shared_weights import LIFT_BYTES, SharedWeightSession, lifted_proto, model_session, share_weights
from onnxforge.verify import run_outputs

HIDDEN = 1024


def _mlp(layers: int, hidden: int = HIDDEN) -> onnx.ModelProto:
    """x -> (MatMul W_i -> Add b_i -> Identity -> Relu) x layers, weights hidden^2 float32 each,
    plus a Transpose pair that cancels (something for -O3 to remove)."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        inits += [onnx.numpy_helper.from_array(rng.standard_normal((hidden, hidden), dtype=np.float32) * 0.03, f"w{i}"),
                  onnx.numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), f"b{i}")]
        nodes += [oh.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]), oh.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  oh.make_node("Identity", [f"a{i}"], [f"i{i}"]), oh.make_node("Relu", [f"i{i}"], [f"r{i}"])]
        prev = f"r{i}"
    nodes += [oh.make_node("Transpose", [prev], ["t0"], perm=[1, 0]), oh.make_node("Transpose", ["t0"], ["y"], perm=[1, 0])]
    graph = oh.make_graph(nodes, "mlp", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", hidden])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", hidden])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def mlp_file(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(_mlp(3), str(path))
    return path


def test_lifted_proto_holds_no_weight_and_runs_equal(mlp_file):
    model = load(mlp_file)
    proto, lifted = lifted_proto(model)
    assert {c.name for c in lifted} == {"w0", "w1", "w2", "b0", "b1", "b2"}  # 4 KiB each or more
    assert proto.ByteSize() < 20_000  # three 4 MB matrices and their biases: headers only
    assert {i.name for i in proto.graph.input} == {"x", "w0", "w1", "w2", "b0", "b1", "b2"}
    onnx.checker.check_model(proto, full_check=True)
    feeds = [{"x": np.random.default_rng(1).standard_normal((2, HIDDEN), dtype=np.float32)}]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as verification runs
    with model_session(model, options, ["CPUExecutionProvider"]) as session:
        assert isinstance(session, SharedWeightSession)
        assert [i.name for i in session.get_inputs()] == ["x"]
    embedded = ort.InferenceSession(str(mlp_file), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(run_outputs(model, feeds)[0][0], embedded.run(None, feeds[0])[0], rtol=1e-5, atol=1e-5)


def test_small_tensors_stay_initializers():
    model = onnxforge.Model.from_proto(_mlp(1, hidden=16))  # 1 KiB matrix: below LIFT_BYTES
    assert 16 * 16 * 4 < LIFT_BYTES
    proto, lifted = lifted_proto(model)
    assert lifted == [] and {t.name for t in proto.graph.initializer} == {"w0", "b0"}


def test_optimize_hands_no_weights_to_onnxruntime_checker_or_inference(mlp_file, monkeypatch):
    """Every model an -O3 run gives onnxruntime, the checker or shape inference is
    weightless (on the code before, each was the whole 12 MB model)."""
    sizes: list[tuple[str, int]] = []
    real_session, real_check, real_infer = ort.InferenceSession, onnx.checker.check_model, onnx.shape_inference.infer_shapes

    def session(source, *args, **kwargs):
        sizes.append(("session", len(source) if isinstance(source, bytes) else Path(source).stat().st_size))
        return real_session(source, *args, **kwargs)

    def check(model, *args, **kwargs):
        sizes.append(("checker", model.ByteSize() if isinstance(model, onnx.ModelProto) else 0))
        return real_check(model, *args, **kwargs)

    def infer(model, *args, **kwargs):
        sizes.append(("inference", model.ByteSize()))
        return real_infer(model, *args, **kwargs)

    model = load(mlp_file)
    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(onnx.checker, "check_model", check)
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", infer)
    result, report = onnxforge.optimize(model, level=3)
    assert report.verification["mode"] == "numeric" and report.verification["ok"]
    kinds = {k for k, _ in sizes}
    assert kinds == {"session", "checker", "inference"}, kinds
    assert max(n for _, n in sizes) < 50_000, sorted(sizes, key=lambda s: -s[1])[:3]
    assert not {n.op for n in result.graph.nodes} & {"Identity", "Transpose"}  # the run did its work


def test_snapshot_shares_read_only_arrays(mlp_file):
    model = load(mlp_file)
    share_weights(model)
    copy = snapshot(model)
    original = {t.name: t for t in model.graph.tensors().values() if isinstance(t, gs.Constant)}
    copied = {t.name: t for t in copy.graph.tensors().values() if isinstance(t, gs.Constant)}
    assert copied["w0"]._values is original["w0"]._values  # shared, not copied
    assert not copied["w0"].values.flags.writeable
    with pytest.raises(ValueError):
        copied["w0"].values[0, 0] = 1.0  # a pass cannot change the original through it
    copied["w0"].values = np.zeros_like(copied["w0"].values)  # replacing values leaves the original alone
    assert np.any(original["w0"].values != 0)


def test_shared_weights_save_the_same_bytes(mlp_file, tmp_path):
    lazy, shared = load(mlp_file), load(mlp_file)
    share_weights(shared)
    assert isinstance(next(t for t in shared.graph.tensors().values() if t.name == "w0")._values, np.ndarray)
    save(lazy, tmp_path / "a.onnx")
    save(shared, tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_a_session_that_refuses_lifted_weights_falls_back_to_the_embedded_model():
    class Refusing:
        def get_inputs(self):
            return []

        def run(self, names, feed, options=None):
            raise RuntimeError("B must be a constant initializer")

    class Embedded:
        def run(self, names, feed, options=None):
            return [feed["x"] + 1]

    made = []
    session = SharedWeightSession(Refusing(), {"w": np.zeros(3)}, lambda: made.append(1) or Embedded())
    assert session.run(None, {"x": np.ones(2)})[0].tolist() == [2.0, 2.0]
    assert session.run(None, {"x": np.zeros(2)})[0].tolist() == [1.0, 1.0]
    assert made == [1]  # made once, kept


def _hwm_resettable() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM" in Path("/proc/self/status").read_text()
    except OSError:
        return False


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _hwm_resettable(),
                    reason="needs Linux's resettable peak RSS (/proc/self/clear_refs)")
def test_optimize_and_save_peak_memory_is_bounded_by_the_weights(tmp_path):
    """optimize -O3 + verified save of a model with 50 MB of weights: the peak resident
    memory it adds stays under 3x the weights (about 2.2x here: the weights loaded once
    as arrays, and onnxruntime reading the written file back; the code before added
    about 10x in optimize alone: a copy per snapshot, session, check and inference)."""
    path = tmp_path / "big.onnx"
    onnx.save(_mlp(3, hidden=2048), str(path))
    weights = sum(t.ByteSize() for t in onnx.load(str(path)).graph.initializer)
    assert weights > 48e6
    model = load(path)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _kib("VmRSS")
    result, report = onnxforge.optimize(model, level=3)
    save(result, tmp_path / "out.onnx", check=report.check_written)
    added = _kib("VmHWM") - before
    assert report.verification["ok"]
    assert added < 3 * weights, f"peak added {added / 1e6:.0f} MB for {weights / 1e6:.0f} MB of weights"


def test_an_optimized_session_sees_weights_as_initializers(tmp_path):
    """At onnxruntime's default level a Conv + BatchNormalization folds into one Conv only
    when the weights are initializers: the in-memory model's session gives the file's
    numbers bit for bit (weights fed as inputs would not fold and round differently)."""
    rng = np.random.default_rng(3)
    c = 32
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((c, c, 3, 3), dtype=np.float32), "w")]
    inits += [onnx.numpy_helper.from_array(rng.standard_normal(c, dtype=np.float32) + k, n)
              for k, n in ((0, "scale"), (0, "bias"), (0, "mean"), (4, "var"))]
    graph = oh.make_graph([oh.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                           oh.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"])],
                          "convbn", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, c, 16, 16])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, c, 16, 16])], inits)
    path = tmp_path / "convbn.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8), str(path))
    feeds = [{"x": rng.standard_normal((1, c, 16, 16), dtype=np.float32)}]
    model = load(path)
    share_weights(model)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
    assert run_outputs(model, feeds, optimize=True)[0][0].tobytes() == expected.tobytes()


def test_a_model_that_rounds_activations_is_embedded_whole():
    """A weight fed at run time changes float sums in their last bits; a rounding downstream
    (dynamic INT8: DynamicQuantizeLinear) makes that a whole step (MiniLM: 0.0088), so
    nothing is lifted from such a model; a float model's weights are."""
    rng = np.random.default_rng(0)
    wf = rng.standard_normal((64, 64)).astype(np.float32)  # 16 KiB: over LIFT_BYTES
    nodes = [oh.make_node("MatMul", ["x", "wf"], ["h"]),
             oh.make_node("DynamicQuantizeLinear", ["h"], ["q", "s", "z"]),
             oh.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 64])],
                          [onnx.numpy_helper.from_array(wf, "wf")])
    rounded = onnxforge.Model.from_proto(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)]))
    assert lifted_proto(rounded)[1] == []
    del graph.node[1:]
    graph.output[0].name = "h"
    plain = onnxforge.Model.from_proto(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)]))
    assert [c.name for c in lifted_proto(plain)[1]] == ["wf"]


def test_weight_array_keeps_a_scalar_0_d():
    # fp16's copy of a scalar constant reads it through weight_array: np.ascontiguousarray made it [1]
    import numpy as np
    import onnx_graphsurgeon as gs

    from onnxforge.shared_weights import weight_array

    assert weight_array(gs.Constant("c", np.array(2.5, np.float32))).shape == ()
    matrix = np.arange(6, dtype=np.float32).reshape(2, 3).T  # not C-contiguous
    got = weight_array(gs.Constant("w", matrix))
    assert got.flags.c_contiguous and np.array_equal(got, matrix)
