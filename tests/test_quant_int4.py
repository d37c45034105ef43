"""INT4 weight-only quantization (passes/quant/int4*.py, nbits.py, gptq.py, awq.py, hessians.py):
the packing onnxruntime's MatMulNBits reads, each rule firing (counts, checker, onnxruntime parity with
the dequantized weights) and each refusal reason, GPTQ / AWQ beating round-to-nearest where they should,
and the end-to-end entry on a tiny language model with calibration files."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.context import PassContext
from onnxforge.model import Model
from onnxforge.io import load
from onnxforge.passes.quant import nbits
from onnxforge.passes.quant.awq import awq_scale
from onnxforge.passes.quant.gptq import refine_codes, refit_rows, gptq, output_error, refit_scales
from onnxforge.passes.quant.hessians import collect_hessians, collect_moments, prefix, weights_as_inputs
from onnxforge.passes.quant.int4 import quantize_int4
from onnxforge.passes.quant.int4_rules import PASS_NAME, Int4Weights, PlannedWeight

RNG = np.random.default_rng(18)
V, H, F = 96, 72, 40  # vocabulary, hidden (not a multiple of 32: a padded last block), MLP width


def _lm(tied_transposed: bool = False, output: str = "logits") -> onnx.ModelProto:
    """ids -> Gather(E) -> Mul(gamma) -> MatMul(W1) -> MatMul(W2) -> MatMul(LM head = E^T) -> logits.
    The LM head is a second, transposed copy of E (TorchScript) or Transpose(E) (dynamo)."""
    e = RNG.standard_normal((V, H)).astype(np.float32)
    inits = [numpy_helper.from_array(e, "E"),
             numpy_helper.from_array((1 + 0.5 * RNG.random(H)).astype(np.float32), "gamma"),
             numpy_helper.from_array((RNG.standard_normal((H, F)) / 8).astype(np.float32), "W1"),
             numpy_helper.from_array((RNG.standard_normal((F, H)) / 6).astype(np.float32), "W2")]
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["x"], name="embed"),
             helper.make_node("Mul", ["x", "gamma"], ["xn"], name="norm"),
             helper.make_node("MatMul", ["xn", "W1"], ["h1"], name="up"),
             helper.make_node("MatMul", ["h1", "W2"], ["h2"], name="down")]
    if tied_transposed:
        nodes.append(helper.make_node("Transpose", ["E"], ["ET"], perm=[1, 0], name="tie"))
    else:
        inits.append(numpy_helper.from_array(e.T.copy(), "ET"))
    nodes.append(helper.make_node("MatMul", ["h2", "ET"], [output], name="lm_head"))
    graph = helper.make_graph(nodes, "lm", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["b", "s", V])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _load(proto: onnx.ModelProto, tmp_path, name="m.onnx", check=True) -> Model:
    path = tmp_path / name
    onnx.save(proto, path)
    return load(path, check=check)


def _run(proto: onnx.ModelProto, feed: dict) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _inits(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def _entry(wt, block=32, symmetric=True, **extra) -> PlannedWeight:
    codes, scales, zeros = nbits.quantize_rtn(wt, block, symmetric)
    return PlannedWeight(codes, scales, zeros, wt.shape[1], wt.shape[0], block, symmetric, "rtn", **extra)


def _deq(entry: PlannedWeight) -> np.ndarray:
    return nbits.dequantize(entry.codes, entry.scales, entry.zeros, entry.block, entry.k)


def _rewrite(model: Model, plan=None, **options) -> tuple[onnx.ModelProto, PassContext]:
    if plan is not None:
        options["plan"] = plan
    ctx = PassContext(model=model, options={PASS_NAME: options})
    result = Int4Weights().run(model.graph, ctx)
    ctx.stats = result.stats
    proto = model.to_proto()
    onnx.checker.check_model(proto)
    return proto, ctx


# ------------------------------------------------------------------ grids and packing


def test_pack_roundtrip_and_nibble_order():
    codes = RNG.integers(0, 16, size=(5, 64)).astype(np.uint8)
    packed = nbits.pack(codes, 32)
    assert packed.shape == (5, 2, 16)
    assert packed[0, 0, 0] == codes[0, 0] | (codes[0, 1] << 4)  # even value low nibble
    np.testing.assert_array_equal(nbits.unpack(packed), codes)
    zeros = RNG.integers(0, 16, size=(5, 3))
    zp = nbits.pack_zero_points(zeros)
    assert zp.shape == (5, 2) and zp[1, 1] == zeros[1, 2]


def test_symmetric_rtn_puts_the_largest_magnitude_on_code_zero():
    wt = RNG.standard_normal((4, 40)).astype(np.float32)
    codes, scales, zeros = nbits.quantize_rtn(wt, 32, True)
    assert codes.shape == (4, 64) and scales.shape == (4, 2) and (zeros == 8).all()
    j = np.abs(wt[:, :32]).argmax(1)
    assert (codes[np.arange(4), j] == 0).all()  # |max| / -8: onnxruntime's grid, the extreme exact
    np.testing.assert_allclose(nbits.dequantize(codes, scales, zeros, 32, 40)[np.arange(4), j], wt[np.arange(4), j], rtol=1e-6)
    assert (codes[:, 40:] == 8).all()  # padding stands for 0


# ------------------------------------------------------------------ MatMulToNBits


@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_to_nbits_fires_and_matches_the_dequantized_weights(tmp_path, symmetric):
    proto = _lm()
    model = _load(proto, tmp_path)
    inits = _inits(proto)
    plan = {"weights": {k: _entry(inits[k].T, 32, symmetric) for k in ("W1", "W2", "ET")}, "float": {}}
    out, ctx = _rewrite(model, plan)
    assert ctx.stats["matmul-to-nbits"] == 3
    assert sum(n.op_type == "MatMulNBits" for n in out.graph.node) == 3 and not any(n.op_type == "MatMul" for n in out.graph.node)
    ids = RNG.integers(0, V, (2, 5))
    q = {k: _deq(e) for k, e in plan["weights"].items()}
    x = inits["E"][ids]  # no tie in this plan: the table stays float
    ref = ((x * inits["gamma"]) @ q["W1"].T @ q["W2"].T) @ q["ET"].T
    np.testing.assert_allclose(_run(out, {"input_ids": ids}), ref, rtol=1e-4, atol=1e-3)


def test_matmul_to_nbits_without_a_plan_rounds_to_nearest(tmp_path):
    proto = _lm()
    out, ctx = _rewrite(_load(proto, tmp_path), block_size=16, symmetric=True)
    assert ctx.stats["matmul-to-nbits"] == 3
    assert {a.i for n in out.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"} == {16}


def test_matmul_to_nbits_reads_a_transposed_constant(tmp_path):
    proto = _lm(tied_transposed=True)
    inits = _inits(proto)
    plan = {"weights": {"W1": _entry(inits["W1"].T), "W2": _entry(inits["W2"].T),
                        "E^T": _entry(inits["E"], embedding="E")}, "float": {}}
    out, ctx = _rewrite(_load(proto, tmp_path), plan)
    assert ctx.stats["matmul-to-nbits"] == 3 and ctx.stats["tied-embedding-to-gather-block-quantized"] == 1
    assert not any(n.op_type in ("Transpose", "Gather") for n in out.graph.node)
    assert "E" not in _inits(out)  # the float table is gone: stored once, as codes
    ids = RNG.integers(0, V, (1, 7))
    q = {k: _deq(e) for k, e in plan["weights"].items()}
    ref = ((q["E^T"][ids] * inits["gamma"]) @ q["W1"].T @ q["W2"].T) @ q["E^T"].T
    np.testing.assert_allclose(_run(out, {"input_ids": ids}), ref, rtol=1e-4, atol=1e-3)


def _refusals(ctx) -> list[str]:
    return [r.reason for r in ctx.refusals]


def test_matmul_to_nbits_refuses_a_float16_weight(tmp_path):
    w = numpy_helper.from_array(RNG.standard_normal((32, 8)).astype(np.float16), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 8])], [w])
    _out, ctx = _rewrite(_load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path))
    assert "matmul-to-nbits" not in ctx.stats and "weight W is float16, not float32" in _refusals(ctx)


def test_matmul_to_nbits_refuses_a_rank_one_input(tmp_path):
    w = numpy_helper.from_array(RNG.standard_normal((32, 8)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8])], [w])
    _out, ctx = _rewrite(_load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path))
    assert "input A has rank 1 (MatMulNBits multiplies [..., M, K])" in _refusals(ctx)


def test_matmul_to_nbits_refuses_what_the_plan_keeps_float_lacks_or_solved_for_another_shape(tmp_path):
    proto = _lm()
    inits = _inits(proto)
    plan = {"weights": {"W1": _entry(inits["W1"].T), "W2": _entry(inits["W2"])}, "float": {"ET": "LM head kept float"}}
    _out, ctx = _rewrite(_load(proto, tmp_path), plan)
    reasons = _refusals(ctx)
    assert ctx.stats["matmul-to-nbits"] == 1
    assert "kept float: LM head kept float" in reasons
    assert "the plan's codes were solved for another weight shape" in reasons
    plan = {"weights": {}, "float": {}}
    _out, ctx = _rewrite(_load(proto, tmp_path, "b.onnx"), plan)
    assert "the quantization plan has no codes for this weight" in _refusals(ctx)


# ------------------------------------------------------------------ tied embedding


def test_tied_embedding_shares_the_lm_head_codes(tmp_path):
    proto = _lm()
    inits = _inits(proto)
    plan = {"weights": {"ET": _entry(inits["E"], embedding="E")}, "float": {}}
    out, ctx = _rewrite(_load(proto, tmp_path), plan)
    assert ctx.stats["tied-embedding-to-gather-block-quantized"] == 1
    gbq = next(n for n in out.graph.node if n.op_type == "GatherBlockQuantized")
    mnb = next(n for n in out.graph.node if n.op_type == "MatMulNBits")
    assert gbq.input[0] == mnb.input[1]  # one packed tensor
    assert "E" not in _inits(out) and "ET" not in _inits(out)


def test_tied_embedding_reads_scales_of_its_own_when_the_plan_gives_them(tmp_path):
    proto = _lm()
    proto.graph.output.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", H]))  # the gathered rows
    inits = _inits(proto)
    entry = _entry(inits["E"], embedding="E")
    own = (entry.scales * (0.5 + RNG.random(entry.scales.shape))).astype(np.float32)
    plan = {"weights": {"ET": dataclasses.replace(entry, embedding_scales=own)}, "float": {}}
    out, ctx = _rewrite(_load(proto, tmp_path), plan)
    assert ctx.stats["tied-embedding-to-gather-block-quantized"] == 1
    ids = np.array([[3, 0, 7]], np.int64)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    x = ort.InferenceSession(out.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(["x"], {"input_ids": ids})[0]
    table = nbits.dequantize(entry.codes, own, entry.zeros, entry.block, entry.k)
    np.testing.assert_allclose(x[0], table[ids[0]], rtol=1e-6, atol=1e-6)
    gbq = next(n for n in out.graph.node if n.op_type == "GatherBlockQuantized")
    assert gbq.input[0] == next(n for n in out.graph.node if n.op_type == "MatMulNBits").input[1]  # codes once


def test_refit_rows_brings_gptq_codes_back_to_the_table():
    wt, h = _correlated(k=96)
    codes, scales, zeros = gptq(wt, h, 32, True)
    refit = refit_rows(wt, codes, scales, zeros, 32)
    before = np.square(nbits.dequantize(codes, scales, zeros, 32, 96) - wt).sum()
    after = np.square(nbits.dequantize(codes, refit, zeros, 32, 96) - wt).sum()
    assert after < before  # least squares per block: never worse, strictly better unless already optimal


def test_quantize_int4_gptq_gives_the_tied_table_its_own_scales(tmp_path):
    source = _lm()
    table = numpy_helper.to_array(source.graph.initializer[0])
    result, _report = quantize_int4(_load(source, tmp_path), _calib(tmp_path / "calib"), method="gptq", block_size=32)
    proto = result.to_proto()
    inits = _inits(proto)
    gbq = next(n for n in proto.graph.node if n.op_type == "GatherBlockQuantized")
    mnb = next(n for n in proto.graph.node if n.op_type == "MatMulNBits" and n.input[1] == gbq.input[0])
    kb = nbits.k_blocks(H, 32)
    assert gbq.input[2] in inits and inits[gbq.input[2]].shape == (V, kb, 1)
    codes = nbits.unpack(inits[mnb.input[1]])
    zeros = np.full((V, kb), 8, np.int32)
    own = nbits.dequantize(codes, inits[gbq.input[2]][..., 0], zeros, 32, H)
    head = nbits.dequantize(codes, inits[mnb.input[2]].reshape(V, -1), zeros, 32, H)
    assert np.square(own - table).sum() <= np.square(head - table).sum()


def test_tied_embedding_refusals(tmp_path):
    proto = _lm()
    inits = _inits(proto)
    # not tied to anything planned
    _out, ctx = _rewrite(_load(proto, tmp_path), {"weights": {}, "float": {}})
    assert "the table is not the weight of a quantized (tied) LM head" in _refusals(ctx)
    # asymmetric codes cannot be shared
    plan = {"weights": {"ET": _entry(inits["E"], symmetric=False, embedding="E")}, "float": {}}
    _out, ctx = _rewrite(_load(proto, tmp_path, "a.onnx"), plan)
    assert any(r.startswith("asymmetric codes") for r in _refusals(ctx))
    # the LM head itself stayed float
    plan = {"weights": {"ET": _entry(inits["E"], embedding="E")}, "float": {}}
    plan_lm_float = {"weights": plan["weights"], "float": {"ET": "kept"}}
    _out, ctx = _rewrite(_load(proto, tmp_path, "c.onnx"), plan_lm_float)
    assert any("was not rewritten to MatMulNBits" in r for r in _refusals(ctx))


def test_tied_embedding_refuses_axis_one_and_unknown_index_rank(tmp_path):
    e = RNG.standard_normal((V, H)).astype(np.float32)
    for axis, ids_shape, reason in ((1, [2, 3], "gathers along axis 1, not rows"),
                                    (0, None, "the index tensor's rank is unknown (the output reshape needs it)")):
        graph = helper.make_graph([helper.make_node("Gather", ["E", "ids"], ["x"], axis=axis, name="g")], "g",
                                  [helper.make_tensor_value_info("ids", TensorProto.INT64, ids_shape)],
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(e, "E")])
        model = _load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path, f"{axis}.onnx", check=False)
        plan = {"weights": {"X": _entry(e, embedding="E")}, "float": {}}
        ctx = PassContext(model=model, options={PASS_NAME: {"plan": plan}})
        Int4Weights().run(model.graph, ctx)
        assert reason in _refusals(ctx)


# ------------------------------------------------------------------ AWQ scaling in the graph


def test_awq_scale_folds_into_the_norm_weight(tmp_path):
    proto = _lm()
    inits = _inits(proto)
    s = (0.5 + RNG.random(H)).astype(np.float32)
    w1 = _entry(inits["W1"].T * s[None, :], input_scale=s)
    plan = {"weights": {"W1": w1}, "float": {"W2": "-", "ET": "-"}}
    out, ctx = _rewrite(_load(proto, tmp_path), plan)
    assert ctx.stats["fold-awq-scale-into-constant-mul"] == 1
    assert sum(n.op_type == "Mul" for n in out.graph.node) == 1  # no extra Mul at run time
    ids = RNG.integers(0, V, (2, 4))
    ref = (inits["E"][ids] * inits["gamma"]) @ (_deq(w1) / s[None, :]).T @ inits["W2"] @ inits["ET"]
    np.testing.assert_allclose(_run(out, {"input_ids": ids}), ref, rtol=1e-4, atol=1e-3)


def test_awq_scale_stays_a_mul_when_the_input_has_other_readers(tmp_path):
    proto = _lm()
    proto.graph.output.append(helper.make_tensor_value_info("xn", TensorProto.FLOAT, ["b", "s", H]))
    inits = _inits(proto)
    s = (0.5 + RNG.random(H)).astype(np.float32)
    w1 = _entry(inits["W1"].T * s[None, :], input_scale=s)
    out, ctx = _rewrite(_load(proto, tmp_path), {"weights": {"W1": w1}, "float": {"W2": "-", "ET": "-"}})
    assert "the scaled tensor has other readers" in _refusals(ctx)
    ids = RNG.integers(0, V, (1, 3))
    ref = (inits["E"][ids] * inits["gamma"]) @ (_deq(w1) / s[None, :]).T @ inits["W2"] @ inits["ET"]
    np.testing.assert_allclose(_run(out, {"input_ids": ids}), ref, rtol=1e-4, atol=1e-3)


def test_awq_scale_refuses_a_mul_without_a_constant_vector(tmp_path):
    w = RNG.standard_normal((32, 8)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Mul", ["a", "b"], ["x"], name="prod"),
                               helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 32]) for n in "ab"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                              [numpy_helper.from_array(w, "W")])
    model = _load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path)
    s = (0.5 + RNG.random(32)).astype(np.float32)
    out, ctx = _rewrite(model, {"weights": {"W": _entry(w.T * s[None, :], input_scale=s)}, "float": {}})
    assert "the Mul before it has no float32 constant vector to absorb the scale" in _refusals(ctx)
    assert sum(n.op_type == "Mul" for n in out.graph.node) == 2


# ------------------------------------------------------------------ methods


def _correlated(k=128, n=64, tokens=2048):
    base = RNG.standard_normal((tokens, 16))
    x = base @ RNG.standard_normal((16, k)) + 0.05 * RNG.standard_normal((tokens, k))
    return RNG.standard_normal((n, k)).astype(np.float32), x.T @ x / tokens


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_error_is_below_rtn_on_a_correlated_input_layer(act_order):
    wt, h = _correlated()
    rtn = nbits.dequantize(*nbits.quantize_rtn(wt, 32, True), 32, 128)
    q = gptq(wt, h, 32, True, act_order=act_order)
    assert output_error(wt, nbits.dequantize(*q, 32, 128), h) < 0.5 * output_error(wt, rtn, h)


def test_refit_scales_lowers_the_output_error_for_fixed_codes():
    wt, h = _correlated(k=80)
    codes, scales, zeros = nbits.quantize_rtn(wt, 32, True)
    refit = refit_scales(wt, codes, scales, zeros, h, 32)
    before = output_error(wt, nbits.dequantize(codes, scales, zeros, 32, 80), h)
    after = output_error(wt, nbits.dequantize(codes, refit, zeros, 32, 80), h)
    assert after < 0.95 * before


def test_refine_codes_lowers_gptqs_error_on_a_correlated_input_layer():
    """Coordinate descent revisits every channel with all the others fixed: below GPTQ + scale refit."""
    wt, h = _correlated()
    codes, scales, zeros = gptq(wt, h, 32, True, act_order=True)
    scales = refit_scales(wt, codes, scales, zeros, h, 32)
    before = output_error(wt, nbits.dequantize(codes, scales, zeros, 32, 128), h)
    refined = refine_codes(wt, codes, scales, zeros, h, 32, passes=2)
    assert refined.max() <= 15 and not np.array_equal(refined, codes)
    assert output_error(wt, nbits.dequantize(refined, scales, zeros, 32, 128), h) < 0.9 * before


def test_refine_codes_keeps_a_local_optimum():
    """Codes that are already the exact weights (error 0) stay as they are."""
    wt, h = _correlated(k=64)
    codes, scales, zeros = nbits.quantize_rtn(wt, 32, True)
    exact = nbits.dequantize(codes, scales, zeros, 32, 64)
    assert np.array_equal(refine_codes(exact, codes, scales, zeros, h, 32), codes)


def test_gptq_asymmetric_codes_stay_in_range_and_beat_rtn():
    wt, h = _correlated(k=80)
    codes, scales, zeros = gptq(wt, h, 32, False)
    assert codes.max() <= 15 and zeros.min() >= 0 and zeros.max() <= 15
    rtn = nbits.dequantize(*nbits.quantize_rtn(wt, 32, False), 32, 80)
    assert output_error(wt, nbits.dequantize(codes, scales, zeros, 32, 80), h) < output_error(wt, rtn, h)


def test_awq_scales_up_the_channels_that_meet_large_activations():
    k = 64
    x = RNG.standard_normal((1024, k))
    x[:, :4] *= 30  # outlier channels
    h = x.T @ x / len(x)
    wt = RNG.standard_normal((32, k)).astype(np.float32)
    s, alpha, before, after = awq_scale([wt], h, 32, True)
    assert alpha > 0 and after < before
    assert s[:4].min() > s[4:].max()


def test_collect_hessians_equals_x_transpose_x_without_padding():
    w = RNG.standard_normal((6, 4)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("MatMul", ["r", "W"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", 6]),
                                    helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, "s"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "W")])
    graph.node.append(helper.make_node("Identity", ["attention_mask"], ["m"]))
    graph.output.append(helper.make_tensor_value_info("m", TensorProto.INT64, None))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feeds = [{"x": RNG.standard_normal((1, 5, 6)).astype(np.float32), "attention_mask": np.array([[0, 1, 1, 1, 1]])},
             {"x": RNG.standard_normal((1, 3, 6)).astype(np.float32), "attention_mask": np.ones((1, 3), np.int64)}]
    hs, tokens = collect_hessians(proto, lambda: iter(feeds), ["r"])
    rows = np.concatenate([np.maximum(feeds[0]["x"][0, 1:], 0), np.maximum(feeds[1]["x"][0], 0)])
    assert tokens == 7
    np.testing.assert_allclose(hs["r"], rows.T @ rows / 7, rtol=1e-6)


# ------------------------------------------------------------------ the entry


def _calib(folder, count=6, seq=12):
    folder.mkdir()
    for i in range(count):
        np.savez(folder / f"{i:02d}.npz", input_ids=RNG.integers(0, V, (1, seq)), attention_mask=np.ones((1, seq), np.int64))
    return str(folder)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "awq+gptq"])
def test_quantize_int4_reports_and_keeps_the_embedding_once(tmp_path, method):
    model = _load(_lm(), tmp_path)
    calib = _calib(tmp_path / "calib")
    result, report = quantize_int4(model, calib, method=method, block_size=32)
    proto = result.to_proto()
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulNBits") == 3 and "GatherBlockQuantized" in ops and report.quantized == 3
    assert report.tied_embeddings == ["E"] and not (set(_inits(proto)) & {"E", "ET"})
    assert {"perplexity", "perplexity_float", "cosine_mean"} <= set(report.metrics)
    assert report.metrics["cosine_mean"] > 0.9
    assert report.weight_bytes_int4 < 0.3 * report.weight_bytes_float
    if method != "rtn":
        assert set(report.layer_error) == {"W1", "W2", "ET"}
    if method.startswith("awq"):
        assert "ET" not in {k for k in report.awq}  # never scales the tied LM head's input


def _chain(k=64):
    """x -> MatMul(W0) -> MatMul(W1) -> MatMul(W2) -> y: each layer's INT4 error reaches the next one's input."""
    ws = [numpy_helper.from_array((RNG.standard_normal((k, k)) / 8).astype(np.float32), f"W{i}") for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h0"]), helper.make_node("MatMul", ["h0", "W1"], ["h1"]),
             helper.make_node("MatMul", ["h1", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], ws)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_collect_moments_pairs_the_quantized_and_float_inputs():
    """H = Xq^T Xq / n on the model fed the changed weights, C = Xq^T Xf / n against the float one; the graph is
    cut to what the asked tensor needs (the later MatMuls are not run)."""
    model, weights = weights_as_inputs(_chain(), {"W0", "W1", "W2"})
    assert not model.graph.initializer and set(weights) == {"W0", "W1", "W2"}
    cut = prefix(model, ["h1"])
    assert [n.output[0] for n in cut.graph.node] == ["h0", "h1"] and "W2" not in {i.name for i in cut.graph.input}
    xs = [RNG.standard_normal((1, 5, 64)).astype(np.float32) for _ in range(2)]
    changed = {"W0": weights["W0"] * 0.9}
    hs, cs, tokens = collect_moments(model, lambda: ({"x": x} for x in xs), ["h1"], weights, changed)
    xf = np.concatenate([x[0] @ weights["W0"] @ weights["W1"] for x in xs])
    xq = np.concatenate([x[0] @ changed["W0"] @ weights["W1"] for x in xs])
    assert tokens == 10
    np.testing.assert_allclose(hs["h1"], xq.T @ xq / 10, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cs["h1"], xq.T @ xf / 10, rtol=1e-4, atol=1e-6)
    # without the cross moment (the quantized target) the float model is not run: the same H, no C
    hs2, cs2, _ = collect_moments(model, lambda: ({"x": x} for x in xs), ["h1"], weights, changed, cross=False)
    assert cs2 == {}
    np.testing.assert_allclose(hs2["h1"], hs["h1"], rtol=1e-6)


def test_sequential_stages_lower_the_end_error_on_a_chain(tmp_path):
    """Each stage calibrated on the already quantized earlier layers: the chain's output error drops below one-shot
    GPTQ's, and well below it when aimed at the float outputs (the later layers take up the earlier ones' error)."""
    folder = tmp_path / "calib"
    folder.mkdir()
    basis = RNG.standard_normal((12, 64))
    xs = [(RNG.standard_normal((1, 64, 12)) @ basis + 0.05 * RNG.standard_normal((1, 64, 64))).astype(np.float32)
          for _ in range(8)]
    for i, x in enumerate(xs):
        np.savez(folder / f"{i:02d}.npz", x=x)
    proto = _chain()
    ref = np.concatenate([_run(proto, {"x": x}) for x in xs])
    errors = {}
    for stages, target in ((1, "quantized"), (3, "quantized"), (3, "float")):
        result, report = quantize_int4(_load(proto, tmp_path, f"m{stages}{target}.onnx"), str(folder), method="gptq",
                                       block_size=32, stages=stages, stage_target=target, refine=0, check=False)
        assert report.stages == stages and report.quantized == 3
        out = np.concatenate([_run(result.to_proto(), {"x": x}) for x in xs])
        errors[stages, target] = np.square(out - ref).sum() / np.square(ref).sum()
    assert errors[3, "quantized"] < errors[1, "quantized"]
    assert errors[3, "float"] < 0.7 * errors[1, "quantized"]


def test_quantize_int4_lm_head_float_keeps_the_table_float(tmp_path):
    model = _load(_lm(), tmp_path)
    result, report = quantize_int4(model, _calib(tmp_path / "calib"), method="rtn", block_size=32, lm_head=False)
    ops = [n.op_type for n in result.to_proto().graph.node]
    assert ops.count("MatMulNBits") == 2 and "Gather" in ops and "MatMul" in ops
    assert report.kept_float == {"ET": "LM head kept float (--lm-head float)"}


def test_quantize_int4_calibrated_methods_need_data(tmp_path):
    from onnxforge.errors import DataError

    with pytest.raises(DataError, match="needs calibration data"):
        quantize_int4(_load(_lm(), tmp_path), "random", method="gptq")


def test_quantize_cli_bits_4_writes_a_running_model_and_a_report(tmp_path, capsys):
    import json

    from onnxforge.cli import main

    src = tmp_path / "lm.onnx"
    onnx.save(_lm(), src)
    calib = _calib(tmp_path / "calib")
    code = main(["quantize", str(src), "-o", str(tmp_path / "q4.onnx"), "--bits", "4", "--calib", calib,
                 "--block-size", "32", "--weight-method", "gptq", "--max-ppl-increase", "10",
                 "--report", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "method gptq, block 32, symmetric, LM head int4" in out and "perplexity" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["quantized"] == 3 and report["budget_met"] is True
    proto = onnx.load(tmp_path / "q4.onnx")
    assert _run(proto, {"input_ids": RNG.integers(0, V, (1, 4))}).shape == (1, 4, V)


def test_quantize_cli_bits_4_budget_missed_exits_3(tmp_path, capsys):
    """An output not named logits is judged on its cosine; INT4 never gives exactly 1."""
    from onnxforge.cli import main

    src = tmp_path / "lm.onnx"
    onnx.save(_lm(output="y"), src)
    code = main(["quantize", str(src), "-o", str(tmp_path / "q4.onnx"), "--bits", "4", "--calib",
                 _calib(tmp_path / "calib"), "--block-size", "32", "--weight-method", "rtn", "--max-drop", "0"])
    assert code == 3 and "accuracy budget missed: cosine" in capsys.readouterr().err
    assert (tmp_path / "q4.onnx").exists()


def test_recipe_quantize_step_with_bits_4(tmp_path, capsys):
    import json

    from onnxforge.cli import main

    src = tmp_path / "lm.onnx"
    onnx.save(_lm(), src)
    _calib(tmp_path / "calib")
    recipe = tmp_path / "r.toml"
    recipe.write_text('version = 1\nprovider = "cpu"\n\n[[steps]]\nstep = "quantize"\ncalibration = "calib"\n'
                      'bits = 4\nweight_method = "awq+gptq"\nblock_size = 32\nmax_ppl_increase = 10.0\n')
    code = main(["run", str(recipe), str(src), "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "rep.json"),
                 "--no-cache", "--quiet"])
    assert code == 0, capsys.readouterr().err
    ops = [n.op_type for n in onnx.load(tmp_path / "out.onnx").graph.node]
    assert ops.count("MatMulNBits") == 3
    assert "int4" in json.dumps(json.loads((tmp_path / "rep.json").read_text()))


def test_weights_in_external_data_are_read_without_being_kept(tmp_path):
    from io_helpers import weight, write_external_model
    from onnx_graphsurgeon.ir.tensor import LazyValues

    from onnxforge.passes.quant.int4_rules import matmul_weight, weight_rows

    model = load(write_external_model(tmp_path))
    constant, transposed = matmul_weight(next(n for n in model.graph.nodes if n.name == "mm"))
    np.testing.assert_array_equal(weight_rows(constant, transposed), weight().T)
    assert isinstance(constant._values, LazyValues)  # still a reference into the file


def test_quantize_int4_budget_metric_cosine_judges_the_cosine_even_with_logits(tmp_path):
    calib = _calib(tmp_path / "calib")
    _, by_ppl = quantize_int4(_load(_lm(), tmp_path), calib, method="rtn", block_size=32)
    _, by_cos = quantize_int4(_load(_lm(), tmp_path), calib, method="rtn", block_size=32, budget_metric="cosine")
    assert by_ppl.budget_metric == "perplexity" and by_ppl.score == pytest.approx(
        by_ppl.metrics["perplexity"] / by_ppl.metrics["perplexity_float"] - 1)
    assert by_cos.budget_metric == "cosine" and by_cos.score == by_cos.metrics["cosine_mean"]
    assert "perplexity" in by_cos.metrics  # still reported
