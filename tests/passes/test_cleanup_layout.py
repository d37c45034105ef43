"""sink-transposes: NHWC round trips around elementwise ops cancel (with collapse-chains)."""
import numpy as np
import onnx.parser

from cleanup_support import assert_parity, histogram, model_from_text, refusal_reasons, run_pass

OPSET = '<ir_version: 8, opset_import: ["" : 17]>'


def sunk(text: str, opset: int = 17):
    model = model_from_text(OPSET.replace("17", str(opset)) + text)
    run_pass("constant-to-initializer", model)
    before = model.to_proto()
    # The pipeline runs passes to a fixpoint; a Transpose moves one op per run.
    stats, reasons = {}, []
    for _ in range(4):
        result, ctx = run_pass("sink-transposes", model)
        for key, value in result.stats.items():
            stats[key] = stats.get(key, 0) + value
        reasons += refusal_reasons(ctx)
    run_pass("collapse-chains", model)
    return model, before, stats, reasons


def images(*batches, names=("x",)):
    rng = np.random.default_rng(0)
    return [{n: rng.standard_normal((b, 3, 4, 5)).astype(np.float32) for n in names} for b in batches]


NHWC_RELU = """
g (float[N,3,4,5] x) => (float[N,3,4,5] y) {
  a = Transpose <perm = [0, 2, 3, 1]> (x)
  r = Relu(a)
  lo = Constant <value = float {0.0}> ()
  hi = Constant <value = float {6.0}> ()
  c = Clip(r, lo, hi)
  y = Transpose <perm = [0, 3, 1, 2]> (c)
}"""


def test_transpose_round_trip_around_elementwise_ops_cancels():
    model, before, result, _ = sunk(NHWC_RELU)
    assert result == {"transpose-past-elementwise": 2}
    assert histogram(model) == {"Relu": 1, "Clip": 1}
    for feed in images(1, 3):
        assert_parity(before, model, feed)


def test_same_transpose_on_both_operands_moves_past_the_binary_op():
    model, before, result, _ = sunk("""
    g (float[N,3,4,5] x, float[N,3,4,5] z) => (float[N,3,4,5] y) {
      a = Transpose <perm = [0, 2, 3, 1]> (x)
      b = Transpose <perm = [0, 2, 3, 1]> (z)
      s = Add(a, b)
      y = Transpose <perm = [0, 3, 1, 2]> (s)
    }""")
    assert result == {"transpose-pair-past-binary": 1}
    assert histogram(model) == {"Add": 1}
    for feed in images(1, 2, names=("x", "z")):
        assert_parity(before, model, feed)


def test_transposed_tensor_read_elsewhere_is_kept():
    model, before, result, ctx = sunk(NHWC_RELU.replace("(float[N,3,4,5] y)", "(float[N,3,4,5] y, float[N,4,5,3] w)")
                                      .replace("  r = Relu(a)", "  r = Relu(a)\n  w = Neg(a)"))
    assert "the transposed tensor has other readers" in ctx
    assert histogram(model)["Transpose"] >= 2
    for feed in images(1, 3):
        assert_parity(before, model, feed)


def test_operands_of_different_rank_are_not_moved():
    model, before, result, ctx = sunk("""
    g (float[N,3,4,5] x, float[3,4,5] z) => (float[N,3,4,5] y) {
      a = Transpose <perm = [0, 2, 3, 1]> (x)
      b = Transpose <perm = [1, 2, 0]> (z)
      s = Add(a, b)
      y = Transpose <perm = [0, 3, 1, 2]> (s)
    }""")
    assert "transpose-pair-past-binary" not in result
    for feed in images(1, 2, names=("x",)):
        feed["z"] = np.ones((3, 4, 5), np.float32)
        assert_parity(before, model, feed)


# NHWC work between two layout changes, as Keras-style exports write it: the op's axes are NHWC ones.
AROUND = """
g (float[N,3,4,5] x) => (float[N,OUT] y) {
  a = Transpose <perm = [0, 2, 3, 1]> (x)
  BODY
  y = Transpose <perm = [0, 3, 1, 2]> (o)
}"""


def test_transpose_round_trip_around_pad_cancels():
    body = """pads = Constant <value = int64[8] {0, 1, 2, 0, 0, 3, 4, 0}> ()
  zero = Constant <value = float {0.5}> ()
  o = Pad(a, pads, zero)"""
    model, before, result, _ = sunk(AROUND.replace("BODY", body).replace("N,OUT", "N,3,8,11"))
    assert result == {"transpose-past-axis-op": 1}
    assert histogram(model) == {"Pad": 1}
    assert model.graph.nodes[0].inputs[1].values.tolist() == [0, 0, 1, 2, 0, 0, 3, 4]  # NCHW pads
    for feed in images(1, 3):
        assert_parity(before, model, feed)


def test_transpose_round_trip_around_reduce_cancels():
    body = """o = ReduceMax <keepdims = 1, axes = [1, 2]> (a)"""
    model, before, result, _ = sunk(AROUND.replace("BODY", body).replace("N,OUT", "N,3,1,1"))
    assert result == {"transpose-past-axis-op": 1}
    assert histogram(model) == {"ReduceMax": 1}
    assert list(model.graph.nodes[0].attrs["axes"]) == [2, 3]
    for feed in images(1, 3):
        assert_parity(before, model, feed)


def test_concat_of_equally_transposed_inputs_keeps_one_transpose():
    model, before, result, _ = sunk("""
    g (float[N,3,4,5] x, float[N,3,4,5] z) => (float[N,4,5,6] y) {
      a = Transpose <perm = [0, 2, 3, 1]> (x)
      b = Transpose <perm = [0, 2, 3, 1]> (z)
      y = Concat <axis = -1> (a, b)
    }""")
    assert result == {"transpose-past-axis-op": 1}
    assert histogram(model) == {"Concat": 1, "Transpose": 1}
    for feed in images(1, 2, names=("x", "z")):
        assert_parity(before, model, feed)


def test_reduce_dropping_axes_keeps_its_transpose():
    model, before, result, reasons = sunk("""
    g (float[N,3,4,5] x) => (float[N,5,4] y) {
      a = Transpose <perm = [0, 2, 3, 1]> (x)
      r = ReduceMax <keepdims = 0, axes = [3]> (a)
      y = Transpose <perm = [0, 2, 1]> (r)
    }""")
    assert "transpose-past-axis-op" not in result
    assert "keepdims=0 drops the reduced axes (the permutation would change)" in reasons
    for feed in images(1, 3):
        assert_parity(before, model, feed)


def test_float_mean_keeps_its_transpose():
    body = """o = ReduceMean <keepdims = 1, axes = [1, 2]> (a)"""
    model, before, result, reasons = sunk(AROUND.replace("BODY", body).replace("N,OUT", "N,3,1,1"))
    assert "transpose-past-axis-op" not in result
    assert "a floating-point sum in the other layout adds in another order (not bit-exact)" in reasons


def test_pads_from_data_keep_the_transpose():
    model, before, result, reasons = sunk("""
    g (float[N,3,4,5] x, int64[8] pads) => (float[N,A,B,C] y) {
      a = Transpose <perm = [0, 2, 3, 1]> (x)
      o = Pad(a, pads)
      y = Transpose <perm = [0, 3, 1, 2]> (o)
    }""")
    assert "transpose-past-axis-op" not in result
    assert "the pads are not a constant of 2 x rank values" in reasons
    for feed in images(1, 3):
        feed["pads"] = np.array([0, 1, 0, 0, 0, 0, 2, 0], np.int64)
        assert_parity(before, model, feed)


def test_integer_sum_over_axes_from_an_input_moves():
    model, before, result, _ = sunk("""
    g (int32[N,3,4,5] x) => (int32[N,3,1,5] y) {
      a = Transpose <perm = [0, 2, 3, 1]> (x)
      axes = Constant <value = int64[1] {1}> ()
      o = ReduceSum <keepdims = 1> (a, axes)
      y = Transpose <perm = [0, 3, 1, 2]> (o)
    }""")
    assert result == {"transpose-past-axis-op": 1}
    assert histogram(model) == {"ReduceSum": 1}
    assert model.graph.nodes[0].inputs[1].values.tolist() == [2]
    for n in (1, 3):
        assert_parity(before, model, {"x": np.arange(n * 60, dtype=np.int32).reshape(n, 3, 4, 5)})


def test_pad_with_pads_attribute_moves():
    model = model_from_text('<ir_version: 5, opset_import: ["" : 10]>' + """
    g (float[N,3,4,5] x) => (float[N,3,6,5] y) {
      a = Transpose <perm = [0, 2, 3, 1]> (x)
      o = Pad <pads = [0, 1, 0, 0, 0, 1, 0, 0], mode = "edge"> (a)
      y = Transpose <perm = [0, 3, 1, 2]> (o)
    }""")
    before = model.to_proto()
    result, _ = run_pass("sink-transposes", model)
    run_pass("collapse-chains", model)
    assert result.stats == {"transpose-past-axis-op": 1}
    assert histogram(model) == {"Pad": 1}
    assert list(model.graph.nodes[0].attrs["pads"]) == [0, 0, 1, 0, 0, 0, 1, 0]
    for feed in images(1, 3):
        assert_parity(before, model, feed)


# Resize between two layout changes (NHWC upsampling): nearest moves, scales/roi/axes relabelled.
RESIZE = """
g (float[N,3,4,5] x) => (float[N,3,8,10] y) {
  a = Transpose <perm = [0, 2, 3, 1]> (x)
  BODY
  y = Transpose <perm = [0, 3, 1, 2]> (o)
}"""


def _resize(body: str, opset: int = 17):
    return sunk(RESIZE.replace("BODY", body), opset)


def _resize_node(model):
    return next(n for n in model.graph.nodes if n.op == "Resize")


def test_transpose_round_trip_around_nearest_resize_cancels():
    body = """scales = Constant <value = float[4] {1.0, 2.0, 2.0, 1.0}> ()
  o = Resize <mode = "nearest", coordinate_transformation_mode = "asymmetric"> (a, , scales)"""
    model, before, result, _ = _resize(body)
    assert result == {"transpose-past-axis-op": 1}
    assert histogram(model) == {"Resize": 1}
    assert _resize_node(model).inputs[2].values.tolist() == [1.0, 1.0, 2.0, 2.0]  # NCHW scales
    for feed in images(1, 3):
        assert_parity(before, model, feed)


def test_resize_roi_and_axes_are_relabelled():
    # tf_crop_and_resize reads roi per axis (begins, then ends); Resize-18's axes list the resized axes.
    body = """roi = Constant <value = float[4] {0.0, 0.25, 1.0, 0.75}> ()
  scales = Constant <value = float[2] {2.0, 2.0}> ()
  o = Resize <mode = "nearest", coordinate_transformation_mode = "tf_crop_and_resize", axes = [1, 2]> (a, roi, scales)"""
    model, before, result, _ = _resize(body, opset=18)
    assert result == {"transpose-past-axis-op": 1}
    assert histogram(model) == {"Resize": 1}
    node = _resize_node(model)
    assert list(node.attrs["axes"]) == [2, 3]
    assert node.inputs[1].values.tolist() == [0.0, 0.25, 1.0, 0.75] and node.inputs[2].values.tolist() == [2.0, 2.0]
    for feed in images(1, 3):
        assert_parity(before, model, feed)


def test_resize_roi_without_axes_is_permuted():
    body = """roi = Constant <value = float[8] {0.0, 0.25, 0.0, 0.0, 1.0, 0.75, 1.0, 1.0}> ()
  scales = Constant <value = float[4] {1.0, 2.0, 2.0, 1.0}> ()
  o = Resize <mode = "nearest", coordinate_transformation_mode = "tf_crop_and_resize"> (a, roi, scales)"""
    model, before, result, _ = _resize(body)
    assert result == {"transpose-past-axis-op": 1}
    node = _resize_node(model)
    assert node.inputs[1].values.tolist() == [0.0, 0.0, 0.25, 0.0, 1.0, 1.0, 0.75, 1.0]
    for feed in images(1, 3):
        assert_parity(before, model, feed)


def test_linear_resize_keeps_its_transpose():
    body = """scales = Constant <value = float[4] {1.0, 2.0, 2.0, 1.0}> ()
  o = Resize <mode = "linear"> (a, , scales)"""
    model, before, result, reasons = _resize(body)
    assert "transpose-past-axis-op" not in result
    assert "mode 'linear' interpolates axis after axis (not bit-exact in the other layout)" in reasons
    assert histogram(model)["Transpose"] == 2
    for feed in images(1, 3):
        assert_parity(before, model, feed)


def test_resize_scales_from_data_keep_the_transpose():
    model, before, result, reasons = sunk("""
    g (float[N,3,4,5] x, float[4] scales) => (float[N,A,B,C] y) {
      a = Transpose <perm = [0, 2, 3, 1]> (x)
      o = Resize <mode = "nearest"> (a, , scales)
      y = Transpose <perm = [0, 3, 1, 2]> (o)
    }""")
    assert "transpose-past-axis-op" not in result
    assert "its scales input is not a constant" in reasons
    for feed in images(1, 3):
        feed["scales"] = np.array([1, 2, 2, 1], np.float32)
        assert_parity(before, model, feed)


def test_resize_roi_from_data_keeps_the_transpose():
    model, before, result, reasons = sunk("""
    g (float[N,3,4,5] x, float[8] roi) => (float[N,A,B,C] y) {
      a = Transpose <perm = [0, 2, 3, 1]> (x)
      scales = Constant <value = float[4] {1.0, 2.0, 2.0, 1.0}> ()
      o = Resize <mode = "nearest", coordinate_transformation_mode = "tf_crop_and_resize"> (a, roi, scales)
      y = Transpose <perm = [0, 3, 1, 2]> (o)
    }""")
    assert "transpose-past-axis-op" not in result
    assert "its roi input is not a constant" in reasons
    for feed in images(1, 3):
        feed["roi"] = np.array([0, 0.25, 0, 0, 1, 0.75, 1, 1], np.float32)
        assert_parity(before, model, feed)


def test_resize_sizes_from_data_keep_the_transpose():
    model, before, result, reasons = sunk("""
    g (float[N,3,4,5] x, int64[4] sizes) => (float[N,A,B,C] y) {
      a = Transpose <perm = [0, 2, 3, 1]> (x)
      o = Resize <mode = "nearest"> (a, , , sizes)
      y = Transpose <perm = [0, 3, 1, 2]> (o)
    }""")
    assert "transpose-past-axis-op" not in result
    assert "its sizes input is not a constant" in reasons
    for n, feed in zip((1, 3), images(1, 3)):
        feed["sizes"] = np.array([n, 8, 10, 3], np.int64)
        assert_parity(before, model, feed)


def test_resize_scales_of_another_length_keep_the_transpose():
    # Invalid for onnx's checker (3 scales for 2 axes): built without it, the rule must not guess.
    from onnxforge.model import Model

    model = Model.from_proto(onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 18]>' + RESIZE.replace(
        "BODY", """scales = Constant <value = float[3] {2.0, 2.0, 1.0}> ()
  o = Resize <mode = "nearest", axes = [1, 2]> (a, , scales)""")))
    run_pass("constant-to-initializer", model)
    result, ctx = run_pass("sink-transposes", model)
    assert "transpose-past-axis-op" not in result.stats
    assert "its scales input does not hold 2 values" in refusal_reasons(ctx)
