"""Static formats per CPU class (formats.static_formats) and rule seven-bit-gemm-input
(ort_qdq.py): without int8 dot products quantize scores 7-bit weights and 8-bit weights
with the inputs of GEMM-based kernels on a 7-bit grid, and keeps the better; each CPU
class's behaviour is asserted by forcing the class, so the tests pass on every CPU."""
from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxforge.runtime.cpuclass as cpuclass
from onnxforge.context import PassContext
from onnxforge.model import Model
from onnxforge.passes.quant import formats
from onnxforge.passes.quant.ort_qdq import PASS_NAME, SevenBitGemmInput
from onnxforge.passes.registry import resolve

RNG = np.random.default_rng(23)
RULE = SevenBitGemmInput.name


def _dw_pw() -> onnx.ModelProto:
    """x -> pointwise Conv -> depthwise Conv -> Gemm-like MatMul -> y."""
    c = 8
    inits = [numpy_helper.from_array(RNG.standard_normal((c, 4, 1, 1)).astype(np.float32), "w_pw"),
             numpy_helper.from_array(RNG.standard_normal((c, 1, 3, 3)).astype(np.float32), "w_dw"),
             numpy_helper.from_array(RNG.standard_normal((6, 5)).astype(np.float32), "w_mm")]
    nodes = [helper.make_node("Conv", ["x", "w_pw"], ["p"], name="pw"),
             helper.make_node("Conv", ["p", "w_dw"], ["d"], name="dw", group=c, pads=[1, 1, 1, 1]),
             helper.make_node("MatMul", ["d", "w_mm"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 6, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


RANGES = {"x": (-2.0, 3.0), "p": (-4.0, 5.0), "d": (-6.0, 6.0), "y": (-9.0, 9.0)}


def _place(model: onnx.ModelProto, spec, ranges=RANGES, exclude=None):
    m = Model.from_proto(model)
    ctx = PassContext(model=m, options={PASS_NAME: {"ranges": dict(ranges), "spec": spec, "exclude": exclude or {}}})
    result = resolve(PASS_NAME).run(m.graph, ctx)
    return m.to_proto(), result, {n: r.reason for r in ctx.refusals if r.rule == RULE for n in r.nodes}


def _input_scales(q: onnx.ModelProto) -> dict[str, float]:
    """Float tensor -> the scale of the QuantizeLinear that quantizes it."""
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in q.graph.node if n.op_type == "QuantizeLinear"}


@pytest.mark.parametrize("cls, count", [("avx2", 2), ("avx512", 2), ("avx512-vnni", 1), ("arm-dotprod", 1)])
def test_static_formats_per_cpu_class(cls, count):
    model = _dw_pw()
    spec = formats.spec_for("cpu", model, "static", cpu=cls)
    found = formats.static_formats(spec)
    assert len(found) == count and next(iter(found.values())) == spec
    if count == 2:  # 7-bit weights first, then 8-bit weights with 7-bit GEMM inputs
        narrowed = list(found.values())[1]
        assert narrowed.narrow_gemm_inputs and not narrowed.reduce_range and spec.reduce_range
    assert len(formats.static_formats(formats.spec_for("tensorrt", model, "static"))) == 1


def test_narrowed_range_puts_the_calibrated_range_on_codes_0_to_128():
    for low, high in ((-2.0, 3.0), (0.0, 6.0), (-5.0, 0.0), (0.5, 2.0)):
        lo, hi = formats.narrowed_range(low, high)
        scale = (hi - lo) / 255
        zero = round(-lo / scale)
        codes = [round(v / scale) + zero for v in (min(low, 0.0), max(high, 0.0))]
        assert 0 <= zero <= 127 and 0 <= codes[0] and codes[1] <= 128, (low, high, codes)


def test_gemm_inputs_narrowed_depthwise_input_kept():
    model = _dw_pw()
    spec = formats.static_formats(formats.spec_for("cpu", model, "static", cpu="avx2"))["s8 8-bit weights, 7-bit GEMM inputs"]
    q, result, refused = _place(model, spec)
    onnx.checker.check_model(q, full_check=True)
    assert result.stats.get(RULE) == 2  # the pointwise Conv's and the MatMul's inputs
    assert "depthwise" in refused["dw"]
    scales = _input_scales(q)
    assert scales["x"] == pytest.approx(5.0 / 127, rel=1e-5) and scales["d"] == pytest.approx(12.0 / 127, rel=1e-5)
    assert scales["p"] == pytest.approx(9.0 / 255, rel=1e-5)  # read by the depthwise Conv only
    weights = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer if t.data_type == TensorProto.INT8}
    assert max(int(np.abs(w).max()) for w in weights.values()) == 127  # 8-bit weights
    # the integer kernels of this CPU equal onnxruntime's unfused QDQ arithmetic: nothing saturates
    feed = {"x": np.clip(RNG.standard_normal((1, 4, 6, 6)), -2, 3).astype(np.float32)}
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fused = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    unfused = ort.InferenceSession(q.SerializeToString(), plain, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(fused, unfused, atol=2 * 18.0 / 255)  # an output step or two


def test_refusals_and_the_seven_bit_format_untouched():
    model = _dw_pw()
    avx2 = formats.spec_for("cpu", model, "static", cpu="avx2")
    narrow = formats.static_formats(avx2)["s8 8-bit weights, 7-bit GEMM inputs"]
    _q, result, refused = _place(model, narrow, exclude={"mm": "kept float by the test"})
    assert result.stats.get(RULE) == 1 and "the node stays float (kept float: kept float by the test)" == refused["mm"]
    ranges = {k: v for k, v in RANGES.items() if k != "x"}
    _q, _result, refused = _place(model, narrow, ranges=ranges, exclude={"mm": "kept float by the test"})
    assert refused["pw"] == "its input x has no calibrated range"
    q, result, refused = _place(model, avx2)  # 7-bit weights: the rule does not run
    assert RULE not in result.stats and not refused
    assert _input_scales(q)["x"] == pytest.approx(5.0 / 255, rel=1e-5)


def _conv_chain() -> onnx.ModelProto:
    w1 = RNG.standard_normal((8, 4, 3, 3)).astype(np.float32)
    w2 = RNG.standard_normal((8, 8, 1, 1)).astype(np.float32) * 0.2
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.mark.parametrize("cls", ["avx2", "avx512-vnni"])
def test_quantize_keeps_the_better_scored_format(monkeypatch, cls):
    from onnxforge.passes.quant.quantize import quantize

    monkeypatch.setattr(cpuclass, "cpu_class", lambda cpuinfo=None: cls)
    model = _conv_chain()
    feeds = [{"x": RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(4)]
    runs = [quantize(model, feeds, measure_latency=False, log=lambda m: None, max_drop=0.5) for _ in range(2)]
    (out, report), (again, _) = runs
    assert out.to_proto().SerializeToString() == again.to_proto().SerializeToString()  # scores decide, not time
    scored = {}
    for note in report.notes:
        found = re.match(r"ranges (\w+)(?:, ([^:]+))?: cosine ([0-9.]+)(?:, ([0-9.]+) after bias correction)?", note)
        if found:
            scored.setdefault(found.group(2) or "", []).append(max(float(found.group(3)), float(found.group(4) or 0)))
    assert report.quantized_for == cls
    if cls == "avx2":
        assert set(scored) == set(formats.static_formats(formats.spec_for("cpu", model, "static", cpu="avx2")))
        kept = next(n for n in report.notes if n.startswith("static format: ")).split(": ", 1)[1].split(" (")[0]
        assert max(scored[kept]) == max(max(v) for v in scored.values()) == pytest.approx(report.score_before_fallback, abs=1e-5)
        assert report.format["narrow_gemm_inputs"] is (kept != "s8 7-bit weights")
    else:  # int8 dot products: one format, full-range weights, no format note
        assert set(scored) == {""} and not any(n.startswith("static format") for n in report.notes)
