"""`onnxforge quantize --calib random` and `onnxforge convert-fp16 --calib random` on the kinds
of model onnx's backend tests hold (tests/backend_sweep.py found each): exit 0 and OUT runs,
with optimizations off and at onnxruntime's default level, with the original's output types
and shapes."""
import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper

from onnxforge.cli import main


def _run(path, feed, level):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 4
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feed)


def _command(tmp_path, model, argv, feed):
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    assert main([argv[0], str(src), "-o", str(out), *argv[1:]]) == 0
    want = _run(src, feed, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        got = _run(out, feed, level)
        assert [(g.shape, g.dtype) for g in got] == [(w.shape, w.dtype) for w in want]
    return want, got


def _ir3_conv() -> onnx.ModelProto:
    """PyTorch's old exporter: IR 3, opset 6, every weight also listed as a graph input."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", T.FLOAT, [4, 3, 3, 3], rng.standard_normal((4, 3, 3, 3)).astype(np.float32).ravel())
    b = helper.make_tensor("b", T.FLOAT, [4], rng.standard_normal(4).astype(np.float32))
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3])], "g",
        [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8]),
         helper.make_tensor_value_info("w", T.FLOAT, [4, 3, 3, 3]), helper.make_tensor_value_info("b", T.FLOAT, [4])],
        [helper.make_tensor_value_info("y", T.FLOAT, [1, 4, 6, 6])], [w, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 6)])
    m.ir_version = 3
    return m


@pytest.mark.parametrize("argv", [["quantize", "--calib", "random", "--no-latency"], ["convert-fp16", "--calib", "random"]])
def test_ir3_model_with_weights_listed_as_inputs(tmp_path, argv):
    """The opset was raised with the weights no longer listed as inputs while IR 3 says an
    initializer counts only as an input: onnx's converter failed ("Input 1 is undefined")."""
    feed = {"x": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    want, got = _command(tmp_path, _ir3_conv(), argv, feed)
    cos = float(np.dot(want[0].ravel(), got[0].ravel()) / np.linalg.norm(want[0]) / np.linalg.norm(got[0]))
    assert cos > 0.99


def test_fp16_keeps_sequence_ops_float32(tmp_path, capsys):
    """SequenceInsert of a float16 tensor into a float32 sequence does not load; the
    unnamed nodes could not be named in the retry either."""
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x, float[1,3] y) => (float[M,3] out) {
      e = SequenceEmpty ()
      s1 = SequenceInsert (e, x)
      s2 = SequenceInsert (s1, y)
      c = ConcatFromSequence <axis = 0> (s2)
      out = Relu (c)
    }""")
    feed = {"x": np.ones((2, 3), np.float32), "y": -np.ones((1, 3), np.float32)}
    want, got = _command(tmp_path, model, ["convert-fp16", "--calib", "random"], feed)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-3)
    assert "sequence/optional ops stay float32" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["quantize", "--calib", "random", "--no-latency"], ["convert-fp16", "--calib", "random"]])
def test_a_sequence_output_counts_by_its_tensors_in_the_accuracy_metric(tmp_path, argv):
    """The metric flattened outputs as arrays: a sequence output (a list of tensors of
    different shapes) crashed it."""
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[5,4] x, float[4,4] w) => (seq(float[?,4]) out) {
      w_t = Transpose (w)
      y = MatMul (x, w_t)
      split = Constant <value = int64[2] {2, 3}> ()
      out = SplitToSequence <axis = 0> (y, split)
    }""")
    rng = np.random.default_rng(2)
    feed = {"x": rng.standard_normal((5, 4)).astype(np.float32), "w": rng.standard_normal((4, 4)).astype(np.float32)}
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    assert main([argv[0], str(src), "-o", str(out), *argv[1:]]) == 0
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        got = _run(out, feed, level)[0]
        assert [t.shape for t in got] == [(2, 4), (3, 4)]


def test_fp16_keeps_a_function_op_float32_when_onnxruntime_rejects_its_body(tmp_path, capsys):
    """MeanVarianceNormalization has no float16 kernel on the CPU provider: onnxruntime runs
    its function body, whose float constants meet the float16 input in an unnamed Add."""
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 13]>
    g (float[1,2,3,3] x) => (float[1,2,3,3] y) { y = MeanVarianceNormalization (x) }""")
    feed = {"x": np.random.default_rng(3).standard_normal((1, 2, 3, 3)).astype(np.float32)}
    want, got = _command(tmp_path, model, ["convert-fp16", "--calib", "random"], feed)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert "MeanVarianceNormalization is a function op" in capsys.readouterr().out


def test_fp16_names_the_node_onnxruntime_rejects_for_mixed_types():
    """onnx's expanded AffineGrid: an Add converted to float16 read an If output whose type
    nothing recorded, so no cast was placed and onnxruntime rejected the graph naming the
    Add; the retry keeps it float32 (before, the message was not understood: exit 1)."""
    from onnxforge.passes.quant.fp16 import _rejected_node

    error = RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Type Error: Type parameter (T) of Optype (Add) bound to "
                         "different types (tensor(float) and tensor(float16) in node (Add_19).")
    assert _rejected_node(error) == ("Add_19", "Add reads a float32 tensor of no known type")


def test_qdq_placement_keeps_float_the_nodes_of_a_tensor_calibration_did_not_range():
    """onnxruntime's quantizer stops ("Quantization parameters are not specified for param")
    at a tensor with no range; the nodes reading and writing it stay float instead."""
    from onnxforge.passes.quant.formats import spec_for
    from onnxforge.passes.quant.ort_qdq import place_qdq

    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[2,4] x) => (float[2,4] y) {
      w = Constant <value = float[4,4] {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}> ()
      h = MatMul (x, w)
      y = MatMul (h, w)
    }""")
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
    from onnxforge.passes.quant.prepare import constant_nodes_to_initializers

    model = constant_nodes_to_initializers(model)
    ranges = {"x": (-1.0, 1.0), "y": (-1.0, 1.0)}  # h never ranged
    out = place_qdq(model, ranges, spec_for("cpu", model, "static"), [], ("MatMul",))
    matmuls = [n for n in out.graph.node if n.op_type == "MatMul"]
    assert [n.name for n in matmuls] == ["n1", "n2"]  # both touch h: both stay float
    assert not any(i.endswith("DequantizeLinear_Output") for n in matmuls for i in n.input)
    onnx.checker.check_model(out)


def test_qdq_pairs_before_a_subgraph_read_are_dropped_so_onnxruntime_does_not_abort(tmp_path):
    """onnxruntime 1.31 aborts the process (a vector index assertion) building any optimized
    session of Q -> DQ -> Transpose -> Reshape -> a tensor an If branch reads (onnx's expanded
    AffineGrid, quantized): the pair is dropped. The session is built in a child process."""
    import subprocess
    import sys

    from onnxforge.passes.quant.ort_qdq import unpair_before_subgraph_reads

    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x, bool c) => (float[3,2] y) {
      m = Relu (x)
      s = Constant <value = float {0.01}> ()
      z = Constant <value = uint8 {128}> ()
      q = QuantizeLinear (m, s, z)
      d = DequantizeLinear (q, s, z)
      t = Transpose (d)
      shape = Constant <value = int64[2] {3, 2}> ()
      r = Reshape (t, shape)
      y = If (c) <then_branch = g1 () => (float[3,2] a) { a = Relu (r) },
                  else_branch = g2 () => (float[3,2] b) { b = Neg (r) }>
    }""")
    assert unpair_before_subgraph_reads(model) == 2
    assert [n.op_type for n in model.graph.node].count("DequantizeLinear") == 0
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    loads = subprocess.run([sys.executable, "-c", "import onnxruntime as ort, sys\n"
                            "ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])", str(path)],
                           capture_output=True, timeout=120)
    assert loads.returncode == 0, loads.stderr[-300:]
    feed = {"x": np.array([[1, -2, 3], [-4, 5, -6]], np.float32), "c": np.array(True)}
    np.testing.assert_array_equal(_run(path, feed, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)[0],
                                  np.maximum(np.maximum(feed["x"], 0).T.reshape(3, 2), 0))
