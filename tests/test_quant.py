"""INT8 quantization and fp16 conversion on small onnx.helper graphs."""
from __future__ import annotations

import argparse

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.errors import DataError, OptionError
from onnxforge.passes.quant import budget, calibrate as cal, detect as det, formats, kernels, tensorrt_cache
from onnxforge.passes.quant.fp16 import FP16_MAX, convert_fp16
from onnxforge.passes.quant.quantize import RANDOM_WARNING, quantize

RNG = np.random.default_rng(0)


def _conv_model(channels: int = 8, scales=None) -> onnx.ModelProto:
    """x[1,4,8,8] -> Conv(8) -> Relu -> Conv(8) -> y, weights with per-channel magnitudes."""
    w1 = RNG.standard_normal((channels, 4, 3, 3)).astype(np.float32)
    if scales is not None:
        w1 *= np.asarray(scales, np.float32).reshape(-1, 1, 1, 1)
    w2 = RNG.standard_normal((channels, channels, 1, 1)).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 8, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.zeros(channels, np.float32), "b1"),
         numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _feeds(n: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(n)]


def _quantize(model, **kw):
    kw.setdefault("measure_latency", False)
    kw.setdefault("log", lambda _m: None)
    return quantize(model, kw.pop("calib", _feeds(4)), **kw)


# ------------------------------------------------------------------ calibration


def test_streaming_histogram_rebins_exactly():
    small, large = RNG.uniform(-1, 1, 1000), RNG.uniform(-7, 7, 1000)
    hist = cal.StreamingHistogram(bins=64)
    hist.update(small)
    hist.update(large)
    assert hist.edge >= 7 and hist.counts.sum() == 2000
    expected, _ = np.histogram(np.concatenate([small, large]), bins=64, range=(-hist.edge, hist.edge))
    np.testing.assert_array_equal(hist.counts, expected)


def _hist(values, bins=2048):
    hist = cal.StreamingHistogram(bins)
    for chunk in np.array_split(values, 7):
        hist.update(chunk)
    return hist


def test_minmax_is_exact_and_symmetric_option():
    values = np.concatenate([RNG.uniform(-2, 5, 10000), [-3.0, 6.5]])
    hist = _hist(values)
    assert cal.compute_range(hist, "minmax", False) == pytest.approx((-3.0, 6.5))
    assert cal.compute_range(hist, "minmax", True) == pytest.approx((-6.5, 6.5))


def test_percentile_ignores_rare_outliers():
    values = np.concatenate([RNG.uniform(-1, 1, 200000), [50.0]])
    low, high = cal.compute_range(_hist(values), "percentile", True, percentile=99.9)
    assert 0.95 <= high <= 1.2 and low == -high


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_entropy_and_mse_clip_outliers(method):
    values = np.concatenate([RNG.standard_normal(200000), [40.0, -40.0]])
    low, high = cal.compute_range(_hist(values), method, True)
    # KL ignores two samples outright; MSE trades their clipping error against the
    # rounding error of 200000 samples, so it clips less but still clips.
    assert 2.0 < high < (20.0 if method == "entropy" else 35.0), (low, high)
    low, high = cal.compute_range(_hist(RNG.uniform(-1, 1, 100000)), method, True)
    assert high > 0.8  # no outliers: nothing worth clipping


def test_calibrate_streams_a_one_shot_iterator_and_groups_under_budget():
    model = _conv_model()
    feeds = _feeds(5)
    ranges, hists, count = cal.calibrate(model, iter(feeds), "minmax", memory_budget=1)  # one tensor per group
    assert count == 5
    assert set(ranges) == {"x", "c1", "r1", "y"}
    xs = np.concatenate([f["x"].ravel() for f in feeds])
    assert ranges["x"] == pytest.approx((xs.min(), xs.max()), rel=1e-6)
    assert ranges["r1"][0] == 0.0


def test_empty_calibration_data_is_an_error():
    with pytest.raises(DataError):
        cal.calibrate(_conv_model(), [], "minmax")


# ------------------------------------------------------------------ formats


def _dq_of(model, weight_prefix):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0].startswith(weight_prefix):
            return node, inits
    raise AssertionError(f"no DequantizeLinear for {weight_prefix}")


def test_per_channel_weight_scales_follow_channel_magnitude():
    scales = [0.01, 0.1, 1, 10, 0.01, 0.1, 1, 10]
    out, _ = _quantize(_conv_model(scales=scales), equalize="none")  # CLE would even out the channels
    proto = out.to_proto()
    node, inits = _dq_of(proto, "w1")
    scale = inits[node.input[1]]
    assert scale.shape == (8,)
    assert scale[3] / scale[0] > 100  # one scale per output channel
    assert inits[node.input[0]].dtype == np.int8
    axis = {a.name: a.i for a in node.attribute}.get("axis", 1)
    assert axis == 0


def test_no_stale_float_weights_after_quantization():
    out, report = _quantize(_conv_model())
    proto = out.to_proto()
    float_weights = [t.name for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 4]
    assert float_weights == []
    assert kernels.stale_float_weights(proto) == []
    assert not any("duplicate" in w for w in report.warnings)


def test_cpu_placement_uses_u8_activations_and_runs_integer_kernels():
    out, report = _quantize(_conv_model(), provider="cpu")
    proto = out.to_proto()
    inits = {t.name: t for t in proto.graph.initializer}
    q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")
    assert inits[q.input[2]].data_type == TensorProto.UINT8
    assert report.kernels.get("QLinearConv", 0) == 2
    assert set(report.int8_nodes) >= {"conv1", "conv2"}


def _transformer_block() -> onnx.ModelProto:
    """LayerNorm -> MatMul(q) / MatMul(k) -> q x k^T -> Softmax -> MatMul(v) -> MatMul(out)."""
    d = 64
    inits = [numpy_helper.from_array(RNG.standard_normal((d, d)).astype(np.float32) * 0.1, n) for n in ("wq", "wk", "wv", "wo")]
    inits += [numpy_helper.from_array(np.ones(d, np.float32), "g"), numpy_helper.from_array(np.zeros(d, np.float32), "b"),
              numpy_helper.from_array(RNG.standard_normal((d, 4)).astype(np.float32) * 0.1, "wtiny")]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], name="ln", axis=-1),
        helper.make_node("MatMul", ["ln", "wq"], ["q"], name="mm_q"),
        helper.make_node("MatMul", ["ln", "wk"], ["k"], name="mm_k"),
        helper.make_node("MatMul", ["ln", "wv"], ["v"], name="mm_v"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="mm_scores"),
        helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["a"], name="mm_context"),
        helper.make_node("MatMul", ["a", "wo"], ["o"], name="mm_out"),
        helper.make_node("MatMul", ["o", "wtiny"], ["y"], name="mm_tiny"),
    ]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _transformer_feeds(n=4):
    rng = np.random.default_rng(3)
    return [{"x": rng.standard_normal((1, 16, 64)).astype(np.float32)} for _ in range(n)]


def test_tensorrt_placement_symmetric_s8_and_skips_attention_internals():
    model = _transformer_block()
    out, report = _quantize(model, calib=_transformer_feeds(), provider="tensorrt", max_drop=0.5)
    proto = out.to_proto()
    inits = {t.name: t for t in proto.graph.initializer}
    qs = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert qs
    for q in qs:
        zp = numpy_helper.to_array(inits[q.input[2]])
        assert zp.dtype == np.int8 and not zp.any()
    producers = {o: n for n in proto.graph.node for o in n.output}
    consumers = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for node in proto.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):  # they run in float
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input)
        if node.op_type == "Softmax":  # its output feeds an attention product: no Q there
            assert all(c.op_type != "QuantizeLinear" for o in node.output for c in consumers.get(o, []))
    assert "activation x activation" in report.float_nodes["mm_scores"]
    assert "tiny GEMM" in report.float_nodes["mm_tiny"]
    assert "mm_q" in report.int8_nodes


def test_cpu_transformer_uses_dynamic_matmul():
    out, report = _quantize(_transformer_block(), calib=_transformer_feeds(), provider="cpu", max_drop=0.5)
    ops = {n.op_type for n in out.to_proto().graph.node}
    assert ops & {"DynamicQuantizeMatMul", "MatMulInteger"}
    assert report.format["dynamic_matmul"]


def test_reduce_range_follows_vnni():
    with_vnni = "flags\t\t: fpu sse avx2 avx512f avx512_vnni\n"
    without = "flags\t\t: fpu sse avx2 avx512f\n"
    assert formats.cpu_has_vnni(with_vnni) and not formats.cpu_has_vnni(without)
    model = _conv_model()
    assert formats.spec_for("cpu", model, vnni=False).reduce_range
    assert not formats.spec_for("cpu", model, vnni=True).reduce_range


def test_tensorrt_cache_ranges_are_symmetric(tmp_path):
    path = tensorrt_cache.write_tensorrt_cache({"a": (-3.0, 1.0), "b": (-0.5, 2.0)}, tmp_path / "calib.cache")
    scales = tensorrt_cache.read_tensorrt_cache(path)
    assert scales["a"] == pytest.approx(3.0 / 127, rel=1e-6)
    assert scales["b"] == pytest.approx(2.0 / 127, rel=1e-6)
    assert path.read_text().startswith("TRT-")


# ------------------------------------------------------------------ detection


def _single(op, inputs, inits, domain=""):
    node = helper.make_node(op, inputs, ["y"], name="n", domain=domain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def test_detects_each_quantized_form():
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    z = numpy_helper.from_array(np.array(0, np.uint8), "z")
    qdq = _single("QuantizeLinear", ["x", "s", "z"], [s, z])
    assert "QDQ" in det.detect(qdq).forms
    w = numpy_helper.from_array(np.ones((4, 4), np.uint8), "w")
    assert "integer ops" in det.detect(_single("MatMulInteger", ["x", "w"], [w])).forms
    assert "QOperator" in det.detect(_single("QLinearMatMul", ["x", "s", "z", "w", "s", "z", "s", "z"], [w, s, z])).forms
    weight_only = _weight_only_model()
    found = det.detect(weight_only)
    assert not found.refuses and len(found.weight_only) == 1
    with pytest.raises(OptionError, match="already quantized"):
        _quantize(qdq, calib=[{"x": np.ones((2, 4), np.float32)}])


def _weight_only_model(seed: int = 11) -> onnx.ModelProto:
    """int8 weights over the full 8-bit range (rows 0-1 at +-127: two u8 x s8 products
    past int16, which saturate on CPUs without VNNI), seeded apart from RNG's order."""
    wq = np.random.default_rng(seed).integers(-127, 128, (4, 6)).astype(np.int8)
    wq[:2] = np.where(np.arange(6) % 2, 127, -127)
    nodes = [
        helper.make_node("Cast", ["wq"], ["wf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["wf", "ws"], ["w"], name="dequant"),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])],
                              [numpy_helper.from_array(wq, "wq"),
                               numpy_helper.from_array(np.full((1, 6), 0.02, np.float32), "ws")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _reused_weight(proto: onnx.ModelProto) -> tuple[onnx.NodeProto, np.ndarray, np.ndarray]:
    """The DynamicQuantizeMatMul, its stored weight values and their zero point."""
    node = next(n for n in proto.graph.node if n.op_type == "DynamicQuantizeMatMul")
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    return node, inits[node.input[1]], inits[node.input[3]]


def test_int8_weights_are_reused_not_requantized():
    model = _weight_only_model()
    out, report = _quantize(model, calib=[{"x": RNG.standard_normal((2, 4)).astype(np.float32)} for _ in range(3)])
    node, stored, zero = _reused_weight(out.to_proto())
    original = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "wq"))
    # the same int8 values: stored as they are, or (no VNNI) shifted exactly by the zero point
    np.testing.assert_array_equal(stored.astype(np.int32) - zero.astype(np.int32), original)
    if formats.cpu_has_vnni():
        assert stored.dtype == np.int8 and node.input[1] == "wq" and not zero.any()
    else:  # u8 x s8 saturates here: u8 x u8 on the same values
        assert stored.dtype == np.uint8 and (zero == 128).all() and "no VNNI" in report.notes[0]
    assert any("not quantized again" in n for n in report.notes)
    assert not report.float_nodes and report.int8_nodes == ["matmul"]
    assert report.score > 0.99


def test_reused_int8_weights_saturate_only_as_signed_without_vnni():
    """Why the shift: u8 x s8 products saturate on CPUs without VNNI; the uint8 form is
    right on every CPU, the int8 form on VNNI CPUs only."""
    import onnxruntime as ort

    model = _weight_only_model()
    x = np.array([[3.0, 2.9, 0.2, -0.1], [2.8, 3.0, -0.3, 0.1]], np.float32)  # u8 255 on the +-127 rows
    reference = x @ (numpy_helper.to_array(model.graph.initializer[0]).astype(np.float32) * 0.02)
    errors = {}
    for saturating in (False, True):
        rewritten, names = det.int8_weights_to_dynamic_matmul(model, det.detect(model), saturating)
        assert names == ["matmul_int8"]
        assert _reused_weight(rewritten)[1].dtype == (np.uint8 if saturating else np.int8)
        y = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        errors[saturating] = float(np.abs(y - reference).max() / np.abs(reference).max())
    assert errors[True] < 0.02  # the dynamic u8 rounding of x only
    if formats.cpu_has_vnni():
        assert errors[False] < 0.02
    else:
        assert errors[False] > 0.2  # the saturated int16 sums


# ------------------------------------------------------------------ budget and warnings


def test_budget_fallback_returns_nodes_to_float():
    model = _conv_model()
    out, report = _quantize(model, max_drop=1e-9, budget_seconds=60)  # only float meets it
    assert report.score_before_fallback < 1 - 1e-9
    assert any("accuracy budget" in why for why in report.float_nodes.values())
    assert report.score >= report.score_before_fallback
    assert report.fallback_steps


def test_fallback_search_keeps_best_and_stops_at_budget():
    ranked = ["a", "b", "c", "d"]
    scores = {0: 0.5, 1: 0.7, 2: 0.95, 3: 0.9, 4: 0.99}
    result = budget.fallback_search(lambda ex: len(ex), lambda m: scores[m], ranked, 0.97, initial=(0, 0.5), group_size=1)
    assert result.met and result.excluded == ranked and result.score == 0.99
    result = budget.fallback_search(lambda ex: len(ex), lambda m: scores[m], ranked[:3], 0.97, initial=(0, 0.5), group_size=1)
    assert not result.met and result.model == 2 and result.excluded == ["a", "b"]


def test_metrics():
    ref = [[np.array([[1.0, 0.0, 0.0]])]]
    same = [[np.array([[2.0, 0.0, 0.0]])]]
    other = [[np.array([[0.0, 1.0, 0.0]])]]
    assert budget.cosine(ref, same) == pytest.approx(1.0) and budget.cosine(ref, other) == pytest.approx(0.0)
    assert budget.top1(ref, same) == 1.0 and budget.top1(ref, other) == 0.0
    assert budget.sqnr_score(ref, ref) == 1.0


def test_random_calibration_is_announced(capsys):
    messages = []
    out, report = quantize(_conv_model(), "random", measure_latency=False, log=messages.append)
    assert RANDOM_WARNING in report.warnings
    assert any("RANDOM" in m for m in messages)


def test_calibration_is_required():
    with pytest.raises(DataError, match="calibration"):
        quantize(_conv_model(), None, measure_latency=False)


def test_user_metric_through_api():
    calls = []

    def metric(reference, candidate):
        calls.append(len(reference))
        return 1.0

    _out, report = _quantize(_conv_model(), metric=metric)
    assert calls and report.score == 1.0 and report.metric == "user"


# ------------------------------------------------------------------ fp16


def _overflow_model() -> onnx.ModelProto:
    """x -> Mul(300) -> Mul(300) (overflows fp16 at |x| > 0.73) -> Mul(1e-5) -> Add(big init) -> y."""
    nodes = [
        helper.make_node("Mul", ["x", "k"], ["a"], name="scale1"),
        helper.make_node("Mul", ["a", "k"], ["b"], name="scale2"),
        helper.make_node("Mul", ["b", "small"], ["c"], name="shrink"),
        helper.make_node("Relu", ["c"], ["d"], name="relu"),
        helper.make_node("Add", ["d", "big"], ["e"], name="add_big"),
        helper.make_node("Sub", ["e", "big"], ["y"], name="sub_big"),
    ]
    inits = [numpy_helper.from_array(np.array(300.0, np.float32), "k"),
             numpy_helper.from_array(np.array(1e-5, np.float32), "small"),
             numpy_helper.from_array(np.full((8,), 1e6, np.float32), "big")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_fp16_keeps_overflowing_nodes_in_fp32_and_io_types():
    feeds = [{"x": (np.random.default_rng(i).standard_normal((2, 8)) * 4).astype(np.float32)} for i in range(4)]
    out, report = convert_fp16(_overflow_model(), calib=feeds, log=lambda _m: None)
    proto = out.to_proto()
    assert "scale2" in report.float32_nodes and "overflows" in report.float32_nodes["scale2"]
    assert "add_big" in report.float32_nodes  # initializer 1e6 > fp16 max
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert any(t.data_type == TensorProto.FLOAT16 for t in proto.graph.initializer)
    assert report.budget_met
    outputs = budget.run_outputs(proto, feeds)
    assert np.all(np.isfinite(outputs[0][0]))
    assert FP16_MAX == 65504.0


def test_fp16_initializer_checks():
    from onnxforge.passes.quant.fp16 import initializer_fp16_problem

    weight = RNG.standard_normal(100_000).astype(np.float32) * 0.05
    weight[:5] = [1e-9, -3e-10, 1e-12, 2e-8, -5e-9]  # flush to zero in fp16: harmless
    assert initializer_fp16_problem(weight) is None
    assert "overflows" in initializer_fp16_problem(np.array([1.0, 1e6], np.float32))
    assert "underflows" in initializer_fp16_problem(np.array(1e-6, np.float32))  # an epsilon
    assert "underflows" in initializer_fp16_problem(np.array(1e-12, np.float32))
    assert initializer_fp16_problem(np.zeros(4, np.float32)) is None
    mostly_tiny = np.full(10_000, 1e-6, np.float32)
    mostly_tiny[0] = 1.0e-4  # in range, but most of the tensor's energy lies in fp16's subnormals
    assert "precision" in initializer_fp16_problem(mostly_tiny)


def test_fp16_converts_weights_with_a_few_tiny_values():
    """A large weight with some values below fp16's smallest subnormal is fp16 in the result."""
    w = (RNG.standard_normal((8, 8)) * 0.1).astype(np.float32)
    w[0, 0] = 1e-10
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    out, report = convert_fp16(model, log=lambda _m: None)
    assert "mm" not in report.float32_nodes
    assert [t.data_type for t in out.to_proto().graph.initializer] == [TensorProto.FLOAT16]


def test_fp16_io_types_on_request():
    feeds = [{"x": np.ones((2, 8), np.float32)}]
    out, _ = convert_fp16(_overflow_model(), calib=feeds, keep_io_types=False, log=lambda _m: None)
    proto = out.to_proto()
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16


# ------------------------------------------------------------------ commands


def _parser():
    from onnxforge.passes.quant.commands import add_fp16_parser, add_quantize_parser

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_quantize_parser(sub)
    add_fp16_parser(sub)
    return parser


def test_quantize_command_exit_codes(tmp_path):
    model_path, calib = tmp_path / "m.onnx", tmp_path / "calib"
    onnx.save(_conv_model(), model_path)
    calib.mkdir()
    for i, feed in enumerate(_feeds(3)):
        np.savez(calib / f"{i:04d}.npz", **feed)
    args = _parser().parse_args(["quantize", str(model_path), "-o", str(tmp_path / "q.onnx"), "--calib", str(calib),
                                 "--no-latency", "--report", str(tmp_path / "r.json")])
    assert args.func(args) == 0
    assert (tmp_path / "q.onnx").exists() and (tmp_path / "r.json").exists()
    args = _parser().parse_args(["quantize", str(model_path), "-o", str(tmp_path / "q2.onnx"), "--calib", str(calib),
                                 "--no-latency", "--max-drop", "0", "--budget-seconds", "0"])
    assert args.func(args) == 3


def test_fp16_keeps_an_initializer_that_is_also_a_graph_input():
    """The input's default stays (else the input becomes required); nodes read the fp16 copy."""
    from onnxforge.passes.quant.fp16 import to_fp16

    w = numpy_helper.from_array(np.full((4, 4), 0.5, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]), helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    out = to_fp16(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), set())
    onnx.checker.check_model(out)
    assert {t.name: t.data_type for t in out.graph.initializer} == {"w": TensorProto.FLOAT, "w_fp16": TensorProto.FLOAT16}
    import onnxruntime as ort

    y = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": np.ones((1, 4), np.float32)})[0]
    np.testing.assert_allclose(y, np.full((1, 4), 2.0))


def test_fp16_keeps_ops_whose_schema_has_no_float16():
    """Range takes float but not float16 (yolov8's anchor grid): onnxruntime rejects the
    graph outright, so it stays float32 with the reason, and the rest converts."""
    from onnxforge.passes.quant.fp16 import nodes_without_fp16_types

    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("start", 0.0), ("delta", 1.0))]
    graph = helper.make_graph(
        [helper.make_node("Range", ["start", "limit", "delta"], ["r"], name="grid"),
         helper.make_node("Add", ["x", "r"], ["y"], name="add")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("limit", TensorProto.FLOAT, [])],  # not folded away
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert set(nodes_without_fp16_types(model)) == {"grid"}
    feeds = [{"x": np.arange(4, dtype=np.float32).reshape(1, 4), "limit": np.array(4.0, np.float32)}]
    out, report = convert_fp16(model, calib=feeds, log=lambda _m: None)
    assert "takes no float16" in report.float32_nodes["grid"] and "add" not in report.float32_nodes
    assert report.score > 0.999
