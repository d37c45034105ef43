"""Layer-by-layer bias correction (passes/quant/bias_correct.py) and ranges narrowed to
what HardSwish readers do not saturate (calibrate.saturated_by_readers)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxforge.passes.quant import formats
from onnxforge.passes.quant.bias_correct import _channel_means, _session, _sites, apply_deltas, correct_biases
from onnxforge.passes.quant.calibrate import HARDSWISH_FLOOR, calibrate, saturated_by_readers

RNG = np.random.default_rng(11)


def _chain(depth: int = 4) -> onnx.ModelProto:
    """x -> (Conv 3x3 -> HardSwish) x depth -> Conv 1x1 -> y: means drift through the HardSwishes."""
    nodes, inits, prev = [], [], "x"
    for i in range(depth):
        w = (RNG.standard_normal((8, 8, 3, 3)) * 0.25).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array((RNG.standard_normal(8) * 0.5).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("HardSwish", [f"c{i}"], [f"h{i}"], name=f"hswish{i}")]
        prev = f"h{i}"
    inits += [numpy_helper.from_array((RNG.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32), "wo"),
              numpy_helper.from_array(np.zeros(4, np.float32), "bo")]
    nodes.append(helper.make_node("Conv", [prev, "wo", "bo"], ["y"], name="conv_out"))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 10, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


def _feeds(n, seed):
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal((1, 8, 10, 10)) * 2 + 0.5).astype(np.float32)} for _ in range(n)]


def _run(model, feed):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _qdq(model, ranges):
    return formats.static_qdq(model, ranges, formats.spec_for("cpu", model, vnni=True))


def test_bias_correction_removes_the_output_mean_shift_on_held_out_feeds():
    model = _chain()
    calib, held_out = _feeds(8, 1), _feeds(4, 2)
    ranges, _, _ = calibrate(model, calib, "percentile", percentile=99.0)  # clipping: biased rounding
    qdq = _qdq(model, ranges)
    deltas = correct_biases(model, qdq, calib)
    assert {"b0", "b1", "b2", "b3"} <= set(deltas)
    corrected = onnx.ModelProto()
    corrected.CopyFrom(model)
    assert apply_deltas(corrected, deltas) == len(deltas)
    qdq_corrected = _qdq(corrected, ranges)

    def conv_mean_shift(q, feeds):
        """Mean |E[float] - E[int8]| per channel at the corrected convolutions' outputs."""
        names = [site.output for site in _sites(model, q)]
        want = _channel_means(_session(model, names, {}), names, feeds, {})
        got = _channel_means(_session(q, names, {}), names, feeds, {})
        return np.mean([np.abs(w - g).mean() for w, g in zip(want, got)])

    assert conv_mean_shift(qdq_corrected, calib) < 0.1 * conv_mean_shift(qdq, calib)
    assert conv_mean_shift(qdq_corrected, held_out) < 0.5 * conv_mean_shift(qdq, held_out)
    # the float model itself only moved by the deltas
    for name, delta in deltas.items():
        before = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))
        after = numpy_helper.to_array(next(t for t in corrected.graph.initializer if t.name == name))
        np.testing.assert_allclose(after - before, delta, atol=1e-6)


def test_bias_correction_skips_convs_whose_output_name_changed_meaning():
    """A Relu folded into its Conv's Q range: the QDQ Conv writes the Relu's tensor name,
    whose float twin is the Relu output (a different mean): not a site."""
    w = numpy_helper.from_array((RNG.standard_normal((8, 8, 1, 1))).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(8, np.float32), "b")
    float_model = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["y"], name="relu")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 4])], [w, b]), opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    renamed = onnx.ModelProto()
    renamed.CopyFrom(float_model)
    del renamed.graph.node[1]
    renamed.graph.node[0].output[0] = "y"
    ranges, _, _ = calibrate(renamed, [{"x": np.ones((1, 8, 4, 4), np.float32)}], "minmax")
    assert _sites(float_model, _qdq(renamed, ranges)) == []


def test_ranges_read_only_by_hardswish_start_just_below_minus_three():
    model = _chain(depth=1)
    ranges = {"c0": (-40.0, 10.0), "h0": (-0.4, 10.0), "x": (-5.0, 5.0)}
    narrowed = saturated_by_readers(model, ranges)
    low, high = narrowed["c0"]
    assert high == 10.0 and HARDSWISH_FLOOR - 0.2 < low < HARDSWISH_FLOOR
    # the u8 grid still reaches -3 whatever the zero point rounding: values below give hardswish 0
    scale = (high - low) / 255
    assert -round(-low / scale) * scale <= HARDSWISH_FLOOR + 1e-6
    assert narrowed["h0"] == ranges["h0"] and narrowed["x"] == ranges["x"]  # other readers: unchanged
    assert saturated_by_readers(model, {"c0": (-2.0, 10.0)})["c0"] == (-2.0, 10.0)  # nothing to narrow


def test_layers_returned_to_float_drop_their_bias_correction():
    """A correction compensates rounding; in a float layer it would be an error of its own
    (PP-OCRv4 det: with it, returning all 133 layers to float scored 0.970, not 1.0)."""
    from onnxforge.passes.quant.quantize import _with_deltas

    model = _chain(depth=2)
    deltas = {"b0": np.full(8, 0.5, np.float32), "b1": np.full(8, -0.25, np.float32)}
    out = _with_deltas(model, deltas, {"conv1"})
    values = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_allclose(values["b0"], original["b0"] + 0.5)
    np.testing.assert_array_equal(values["b1"], original["b1"])  # conv1 is float: uncorrected
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[1]), original["b0"])  # input untouched


def test_fallback_reruns_bias_correction_for_each_configuration(monkeypatch):
    """When the corrected model misses the budget, layers go back to float one at a time
    and the corrections are recomputed for what stays int8 (not reused stale)."""
    from onnxforge.passes.quant import budget as budget_mod
    from onnxforge.passes.quant.quantize import _fallback_recorrected, _Plan, _with_deltas

    model = _chain(depth=3)
    calib = _feeds(6, 1)
    ranges, _, _ = calibrate(model, calib, "percentile", percentile=99.0)
    spec = formats.spec_for("cpu", model, vnni=True)
    from onnxforge.passes.quant.quantize import without_tensors_of

    def build(excluded):
        kept, floats = without_tensors_of(plan.float_model, plan.ranges, excluded)
        source = _with_deltas(plan.float_model, plan.bias_deltas, set(floats)) if plan.bias_deltas else plan.float_model
        return formats.static_qdq(source, kept, spec, floats)

    candidates = {n.name: n.op_type for n in model.graph.node}
    plan = _Plan(build, candidates, {}, ranges, calib, model)
    plan.bias_deltas = correct_biases(model, build([]), calib)
    reference = [[_run(model, f)] for f in calib[:3]]
    evaluate = lambda m: budget_mod.cosine(reference, [[_run(m, f)] for f in calib[:3]])  # noqa: E731
    first = build([])
    start = budget_mod.BudgetResult(first, evaluate(first), False, [], [])
    seen = []
    real = correct_biases

    class Report:
        metric = "cosine"

    import importlib

    quantize_mod = importlib.import_module("onnxforge.passes.quant.quantize")

    def spy(float_model, qdq_model, feeds, stop=None):
        producers = {o: n.op_type for n in qdq_model.graph.node for o in n.output}
        seen.append({n.name for n in qdq_model.graph.node if n.op_type == "Conv" and producers.get(n.input[0]) == "DequantizeLinear"})
        return real(float_model, qdq_model, feeds, stop)

    monkeypatch.setattr(quantize_mod, "correct_biases", spy)
    result = _fallback_recorrected(plan, start, evaluate, threshold=1.1, search=budget_mod.SearchBudget(100), report=Report(), log=lambda _m: None)
    assert len(result.steps) == len(seen) >= 2  # one recorrection per configuration
    assert all(len(a) > len(b) for a, b in zip(seen, seen[1:]))  # ever fewer int8 convs
    assert [len(s.excluded) for s in result.steps] == list(range(1, len(result.steps) + 1))
    assert result.score >= start.score and not result.met
    assert plan.bias_deltas is not None


def _branched() -> onnx.ModelProto:
    """x -> conv_a, conv_b (parallel) -> Add -> HardSwish -> conv_c -> y."""
    inits, nodes = [], []
    for name in ("a", "b", "c"):
        inits += [numpy_helper.from_array((RNG.standard_normal((8, 8, 3, 3)) * 0.25).astype(np.float32), f"w{name}"),
                  numpy_helper.from_array((RNG.standard_normal(8) * 0.5).astype(np.float32), f"b{name}")]
    nodes += [helper.make_node("Conv", ["x", "wa", "ba"], ["ca"], name="conv_a", pads=[1, 1, 1, 1]),
              helper.make_node("Conv", ["x", "wb", "bb"], ["cb"], name="conv_b", pads=[1, 1, 1, 1]),
              helper.make_node("Add", ["ca", "cb"], ["s"], name="add"),
              helper.make_node("HardSwish", ["s"], ["h"], name="hswish"),
              helper.make_node("Conv", ["h", "wc", "bc"], ["y"], name="conv_c", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "branched", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 10, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


def test_grouped_runs_on_the_cut_model_give_the_one_layer_at_a_time_corrections():
    """Parallel convs measured in one run, each run on the model cut above what it measures: the same
    deltas as measuring one conv at a time on the whole model (the definition)."""
    for model in (_branched(), _chain()):
        calib = _feeds(4, 1)
        ranges, _, _ = calibrate(model, calib, "percentile", percentile=99.0)
        qdq = _qdq(model, ranges)
        sites = _sites(model, qdq)
        want = _channel_means(_session(model, [s.output for s in sites], {}), [s.output for s in sites], calib, {})
        biases = {s.int_name: s.int_value.copy() for s in sites}
        whole = _session(qdq, [s.output for s in sites], biases)
        expected = {}
        for site, target in zip(sites, want):
            got = _channel_means(whole, [site.output], calib, biases)[0]
            biases[site.int_name] = (biases[site.int_name] + np.round((target - got) / site.scale)).astype(np.int32)
            expected[site.float_name] = ((biases[site.int_name].astype(np.float64) - site.int_value) * site.scale).astype(np.float32)
        deltas = correct_biases(model, qdq, calib)
        assert set(deltas) == set(expected)
        for name, delta in expected.items():
            np.testing.assert_array_equal(deltas[name], delta)
