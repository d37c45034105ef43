"""Structured pruning: dependency groups, refusals, exact structure, refit, sparsity, FLOPs."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.model import Model
from onnxforge.passes.prune.flops import estimate_flops
from onnxforge.passes.prune.groups import ChannelAnalysis
from onnxforge.passes.prune.prepare import analysis_shapes, prepare
from onnxforge.passes.prune.prune import prune
from onnxforge.passes.prune.sparsity import satisfies_nm, sparsify
from onnxforge.passes.prune.structured import apply_pruning

RNG = np.random.default_rng(0)


def weight(*shape, scale=0.3):
    return RNG.standard_normal(shape).astype(np.float32) * scale


def make(nodes, inputs, outputs, inits) -> Model:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [onnx.ValueInfoProto(name=n) for n in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    inferred = onnx.shape_inference.infer_shapes(proto)  # give the outputs their types and shapes
    known = {vi.name: vi for vi in inferred.graph.value_info}
    for out in proto.graph.output:
        out.CopyFrom(known.get(out.name, out))
    del proto.graph.value_info[:]
    onnx.checker.check_model(proto)
    return Model.from_proto(proto)


def conv(name, x, w, out, **attrs):
    return helper.make_node("Conv", [x, w, f"{w}_b"], [out], name=name, **attrs)


def conv_inits(w_name, cout, cin, k=1):
    return {w_name: weight(cout, cin, k, k), f"{w_name}_b": weight(cout)}


def analyse(model: Model):
    prepared = prepare(model)
    return prepared, ChannelAnalysis(prepared.graph, analysis_shapes(prepared), prepared.opset())


def run(model: Model, feed: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.to_proto().SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def group_of(groups, source_name):
    return next(g for g in groups if source_name in g.sources)


def zeroed_reference(prepared: Model, analysis, removed: set[int]) -> Model:
    """The unpruned model with removed positions zeroed in every consumer: what pruning must equal."""
    ref = prepared.copy()
    nodes = {n.name: n for n in ref.graph.nodes}
    for site in analysis.sites:
        if site.kind != "sink":
            continue
        mask = np.array([analysis.uf.find(int(i)) in removed for i in site.ids])
        node = nodes[site.node.name]
        values = np.array(node.inputs[1].values)
        index = [slice(None)] * values.ndim
        index[site.axis] = mask
        values[tuple(index)] = 0
        import onnx_graphsurgeon as gs
        node.inputs[1] = gs.Constant(node.inputs[1].name + "_zeroed", values)
    return ref


def remove_and_compare(model: Model, pick, feed: dict):
    """Remove the classes ``pick(groups)`` chooses; the result must equal the zeroed reference."""
    prepared, analysis = analyse(model)
    groups = analysis.groups()
    removed = set(pick(groups))
    pruned = prepared.copy()
    apply_pruning(pruned.graph, analysis, removed)
    onnx.checker.check_model(pruned.to_proto())
    expected = run(zeroed_reference(prepared, analysis, removed), feed)
    got = run(pruned, feed)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)
    return prepared, analysis, groups, pruned


X = {"x": RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)}


def test_residual_join_ties_all_branches():
    inits = {**conv_inits("wa", 8, 4), **conv_inits("wb", 8, 4), **conv_inits("wc", 8, 8), **conv_inits("wd", 3, 8)}
    model = make([conv("A", "x", "wa", "a"), conv("B", "x", "wb", "b"),
                  helper.make_node("Add", ["a", "b"], ["s"], name="add1"),
                  helper.make_node("Relu", ["s"], ["r"], name="relu"),
                  conv("C", "r", "wc", "c"), helper.make_node("Add", ["c", "r"], ["s2"], name="add2"),
                  conv("D", "s2", "wd", "y")], [("x", [1, 4, 8, 8])], ["y"], inits)
    _, _, groups, pruned = remove_and_compare(model, lambda gs_: group_of(gs_, "A").classes[[1, 5]], X)
    residual = group_of(groups, "A")
    assert set(residual.sources) == {"A", "B", "C"} and residual.size == 8
    assert "D" in residual.sinks and "C" in residual.sinks
    shapes = {n.name: n.inputs[1].shape for n in pruned.graph.nodes if n.op == "Conv"}
    assert shapes["A"][0] == shapes["B"][0] == shapes["C"][0] == 6 and shapes["D"][1] == 6


def test_depthwise_conv_ties_its_channels():
    inits = {**conv_inits("w1", 8, 4), "wdw": weight(8, 1, 3, 3), "wdw_b": weight(8), **conv_inits("w2", 4, 8)}
    model = make([conv("C1", "x", "w1", "a"),
                  helper.make_node("Conv", ["a", "wdw", "wdw_b"], ["d"], name="DW", group=8, pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["d"], ["r"], name="relu"), conv("C2", "r", "w2", "y")],
                 [("x", [1, 4, 8, 8])], ["y"], inits)
    _, _, groups, pruned = remove_and_compare(model, lambda gs_: group_of(gs_, "C1").classes[:3], X)
    assert len(groups) == 2  # C1 (through the depthwise conv) and C2
    dw = next(n for n in pruned.graph.nodes if n.name == "DW")
    assert dw.attrs["group"] == 5 and dw.inputs[1].shape[0] == 5


def test_concat_offsets():
    inits = {**conv_inits("wa", 4, 4), **conv_inits("wb", 6, 4), **conv_inits("wc", 3, 10)}
    model = make([conv("A", "x", "wa", "a"), conv("B", "x", "wb", "b"),
                  helper.make_node("Concat", ["a", "b"], ["c"], name="cat", axis=1), conv("C", "c", "wc", "y")],
                 [("x", [1, 4, 8, 8])], ["y"], inits)
    prepared, analysis = analyse(model)
    assert analysis.tracked["c"].ids.tolist() == analysis.tracked["a"].ids.tolist() + analysis.tracked["b"].ids.tolist()
    pick = lambda gs_: [group_of(gs_, "A").classes[1], group_of(gs_, "B").classes[2]]  # noqa: E731
    _, _, _, pruned = remove_and_compare(model, pick, X)
    wc = next(n for n in pruned.graph.nodes if n.name == "C").inputs[1].values
    original = inits["wc"]
    np.testing.assert_array_equal(wc, original[:, [0, 2, 3, 4, 5, 7, 8, 9]])


def test_flatten_into_gemm_repeats_channels():
    inits = {**conv_inits("w1", 4, 4), "wg": weight(3, 4 * 2 * 2), "bg": weight(3)}
    model = make([conv("C1", "x", "w1", "a", strides=[4, 4]), helper.make_node("Flatten", ["a"], ["f"], name="flat"),
                  helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="G", transB=1)],
                 [("x", [1, 4, 8, 8])], ["y"], inits)
    _, _, groups, pruned = remove_and_compare(model, lambda gs_: group_of(gs_, "C1").classes[[1]], X)
    assert "G" in group_of(groups, "C1").sinks
    wg = next(n for n in pruned.graph.nodes if n.name == "G").inputs[1].values
    np.testing.assert_array_equal(wg, np.delete(inits["wg"], [4, 5, 6, 7], axis=1))


REFUSALS = [
    ("graph output", lambda: ([conv("C1", "x", "w1", "y")], conv_inits("w1", 4, 4)), "graph output"),
    ("reshape mixing", lambda: ([conv("C1", "x", "w1", "a"),
                                 helper.make_node("Reshape", ["a", "shp"], ["r"], name="rs"),
                                 helper.make_node("Relu", ["r"], ["y"])],
                                {**conv_inits("w1", 4, 4), "shp": np.array([1, 2, 128], np.int64)}),
     "mixes the channel dim"),
    ("grouped conv", lambda: ([conv("C1", "x", "w1", "a"), conv("C2", "a", "w2", "y", group=2)],
                              {**conv_inits("w1", 4, 4), **conv_inits("w2", 4, 2)}), "not depthwise"),
    ("softmax", lambda: ([conv("C1", "x", "w1", "a"), helper.make_node("Softmax", ["a"], ["y"], axis=1)],
                         conv_inits("w1", 4, 4)), "softmax over the channel axis"),
    ("reduction", lambda: ([conv("C1", "x", "w1", "a"),
                            helper.make_node("ReduceMax", ["a"], ["y"], axes=[1], keepdims=1)],
                           conv_inits("w1", 4, 4)), "reduction over the channel axis"),
    ("unmodelled op", lambda: ([conv("C1", "x", "w1", "a"),
                                helper.make_node("DepthToSpace", ["a"], ["y"], blocksize=2)],
                               conv_inits("w1", 4, 4)), "not modelled"),
]


@pytest.mark.parametrize("label,build,reason", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusal_reasons(label, build, reason):
    nodes, inits = build()
    model = make(nodes, [("x", [1, 4, 8, 8])], ["y"], inits)
    _, analysis = analyse(model)
    group = group_of(analysis.groups(), "C1")
    assert not group.prunable.any()
    assert any(reason in r for r in group.reasons()), group.reasons()


def test_matmul_between_activations_is_refused():
    inits = {"w1": weight(8, 8)}
    model = make([helper.make_node("MatMul", ["x", "w1"], ["a"], name="M1"),
                  helper.make_node("Transpose", ["a"], ["t"], perm=[0, 2, 1]),
                  helper.make_node("MatMul", ["a", "t"], ["y"], name="M2")], [("x", [1, 5, 8])], ["y"], inits)
    _, analysis = analyse(model)
    assert any("two activations" in r for r in group_of(analysis.groups(), "M1").reasons())


def small_cnn() -> Model:
    inits = {**conv_inits("w1", 16, 3, 3), **conv_inits("w2", 16, 16, 3), "wdw": weight(16, 1, 3, 3),
             "wdw_b": weight(16), **conv_inits("w3", 16, 16), "wg": weight(5, 16), "bg": weight(5)}
    return make([conv("C1", "x", "w1", "a", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["ar"]),
                 conv("C2", "ar", "w2", "b", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["b"], ["br"]),
                 helper.make_node("Conv", ["br", "wdw", "wdw_b"], ["d"], name="DW", group=16, pads=[1, 1, 1, 1]),
                 conv("C3", "d", "w3", "c"), helper.make_node("Add", ["c", "br"], ["s"]),
                 helper.make_node("GlobalAveragePool", ["s"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
                 helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="G", transB=1)],
                [("x", [1, 3, 16, 16])], ["y"], inits)


def test_prune_shrinks_shapes_passes_checker_and_runs():
    model = small_cnn()
    pruned, report = prune(model, ratio=0.5, round_to=4)
    assert report.params_after < report.params_before and report.flops_after < report.flops_before
    onnx.checker.check_model(pruned.to_proto(), full_check=True)
    w2 = next(n for n in pruned.graph.nodes if n.name == "C2").inputs[1]
    assert w2.shape[0] == 8 and w2.shape[1] == 8
    out = run(pruned, {"x": RNG.standard_normal((1, 3, 16, 16)).astype(np.float32)})
    assert out[0].shape == (1, 5)


def test_target_flops_is_met():
    pruned, report = prune(small_cnn(), target_flops=0.6, round_to=2)
    assert report.flops_ratio <= 0.6 and report.params_ratio <= 0.6
    assert estimate_flops(pruned) == report.flops_after


def redundant_model() -> Model:
    """C1's channels 8..15 are half of channels 0..7: a refit of C2 can absorb them exactly."""
    w1 = weight(8, 3, 3, 3)
    b1 = weight(8)
    inits = {"w1": np.concatenate([w1, 0.5 * w1]), "w1_b": np.concatenate([b1, 0.5 * b1]),
             **conv_inits("w2", 6, 16)}
    return make([conv("C1", "x", "w1", "a", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["r"]),
                 conv("C2", "r", "w2", "y")], [("x", [1, 3, 12, 12])], ["y"], inits)


def test_reconstruction_lowers_output_error():
    feeds = [{"x": RNG.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(8)]
    _, report = prune(redundant_model(), ratio=0.5, round_to=1, calib_data=feeds[:6], eval_data=feeds[6:],
                      method="l1")
    rec = report.reconstruction
    assert rec["cosine_refit"] > rec["cosine_plain"]
    assert rec["cosine_refit"] > 0.999
    fit = rec["layers"][0]
    assert fit["error_after"] < fit["error_before"]


def test_two_four_pattern_is_exact():
    inits = {**conv_inits("w1", 8, 8, 3), "wm": weight(8, 12)}
    model = make([conv("C1", "x", "w1", "a", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["r"]),
                  helper.make_node("GlobalAveragePool", ["r"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
                  helper.make_node("MatMul", ["f", "wm"], ["y"], name="M")], [("x", [1, 8, 8, 8])], ["y"], inits)
    stats = sparsify(model.graph, pattern="2:4")
    w1 = next(n for n in model.graph.nodes if n.name == "C1").inputs[1].values
    wm = next(n for n in model.graph.nodes if n.name == "M").inputs[1].values
    assert satisfies_nm(np.moveaxis(w1, 1, -1), 3, 2, 4) and satisfies_nm(wm, 0, 2, 4)
    assert (w1 == 0).mean() == 0.5 and (wm == 0).mean() == 0.5
    assert "no speed" in stats["note"]


def test_magnitude_sparsity_level():
    model = make([conv("C1", "x", "w1", "y")], [("x", [1, 4, 8, 8])], ["y"], conv_inits("w1", 8, 4, 3))
    sparsify(model.graph, level=0.5)
    w = model.graph.nodes[0].inputs[1].values
    assert (w == 0).mean() == 0.5


def test_flops_of_a_known_conv():
    model = make([conv("C1", "x", "w1", "a", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["y"])],
                 [("x", [1, 3, 16, 16])], ["y"], conv_inits("w1", 8, 3, 3))
    assert estimate_flops(model) == 2 * 8 * 16 * 16 * 3 * 9 + 8 * 16 * 16


def test_cli_prune_writes_a_smaller_model_and_report(tmp_path):
    import argparse
    import json

    from onnxforge.io import save
    from onnxforge.passes.prune.commands import add_prune_parser

    src, dst, rep = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    save(small_cnn(), src)
    parser = argparse.ArgumentParser()
    add_prune_parser(parser.add_subparsers())
    args = parser.parse_args(["prune", str(src), "-o", str(dst), "--ratio", "0.5", "--round-to", "4",
                              "--report", str(rep)])
    assert args.func(args) == 0
    report = json.loads(rep.read_text())
    assert report["params_ratio"] < 1 and dst.stat().st_size < src.stat().st_size


def test_reshape_reading_the_channel_count_at_run_time_is_prunable():
    """torch's x.view(x.size(0), x.size(1)): the target shape follows the pruned channel count."""
    inits = {**conv_inits("w1", 8, 4), "wg": weight(3, 8), "bg": weight(3), "i0": np.array(0, np.int64),
             "i1": np.array(1, np.int64), "ax": np.array([0], np.int64)}
    nodes = [conv("C1", "x", "w1", "a"), helper.make_node("GlobalAveragePool", ["a"], ["p"]),
             helper.make_node("Shape", ["p"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
             helper.make_node("Gather", ["s", "i1"], ["c"], axis=0),
             helper.make_node("Unsqueeze", ["n", "ax"], ["nu"]), helper.make_node("Unsqueeze", ["c", "ax"], ["cu"]),
             helper.make_node("Concat", ["nu", "cu"], ["shape"], axis=0),
             helper.make_node("Reshape", ["p", "shape"], ["f"], name="rs"),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="G", transB=1)]
    model = make(nodes, [("x", [1, 4, 8, 8])], ["y"], inits)
    _, _, groups, pruned = remove_and_compare(model, lambda gs_: group_of(gs_, "C1").classes[[0, 3, 6]], X)
    assert group_of(groups, "C1").prunable.all() and "G" in group_of(groups, "C1").sinks
    assert next(n for n in pruned.graph.nodes if n.name == "G").inputs[1].shape == (3, 5)


def test_reshape_reading_another_dim_stays_refused():
    """The same chain reading the batch dim for the channel entry proves nothing: refused."""
    inits = {**conv_inits("w1", 8, 4), "i0": np.array(0, np.int64), "ax": np.array([0], np.int64),
             "rest": np.array([-1], np.int64)}
    nodes = [conv("C1", "x", "w1", "a"), helper.make_node("GlobalAveragePool", ["a"], ["p"]),
             helper.make_node("Shape", ["p"], ["s"]), helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "ax"], ["nu"]),
             helper.make_node("Concat", ["rest", "nu"], ["shape"], axis=0),
             helper.make_node("Reshape", ["p", "shape"], ["r"], name="rs"), helper.make_node("Relu", ["r"], ["y"])]
    model = make(nodes, [("x", [1, 4, 8, 8])], ["y"], inits)
    _, analysis = analyse(model)
    assert not group_of(analysis.groups(), "C1").prunable.any()


def ffn_model(hidden=16, inner=64, tokens=6) -> Model:
    """Transformer FFN: MatMul -> bias -> GELU (erf form) -> MatMul -> bias -> residual -> LayerNorm."""
    inits = {"w1": weight(hidden, inner), "b1": weight(inner), "w2": weight(inner, hidden), "b2": weight(hidden),
             "sqrt2": np.array(np.sqrt(2.0), np.float32), "one": np.array(1.0, np.float32),
             "half": np.array(0.5, np.float32), "gamma": np.ones(hidden, np.float32),
             "beta": np.zeros(hidden, np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Div", ["hb", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["hb", "e1"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["g"]), helper.make_node("MatMul", ["g", "w2"], ["o"], name="down"),
             helper.make_node("Add", ["o", "b2"], ["ob"]), helper.make_node("Add", ["ob", "x"], ["res"]),
             helper.make_node("LayerNormalization", ["res", "gamma", "beta"], ["y"], axis=-1)]
    return make(nodes, [("x", [1, tokens, hidden])], ["y"], inits)


def test_ffn_intermediate_dim_is_pruned_exactly():
    feed = {"x": RNG.standard_normal((1, 6, 16)).astype(np.float32)}
    _, _, groups, pruned = remove_and_compare(ffn_model(), lambda gs_: group_of(gs_, "up").classes[:24], feed)
    inner = group_of(groups, "up")
    assert inner.size == 64 and inner.prunable.all() and inner.sinks == ["down"]
    assert not group_of(groups, "down").prunable.any()  # the residual stream is tied to the graph input
    shapes = {n.name: n.inputs[1].shape for n in pruned.graph.nodes if n.op == "MatMul"}
    assert shapes == {"up": (16, 40), "down": (40, 16)}


def test_ffn_refit_lowers_output_error():
    feeds = [{"x": RNG.standard_normal((1, 32, 16)).astype(np.float32)} for _ in range(12)]
    pruned, report = prune(ffn_model(tokens=32), ratio=0.5, round_to=8, calib_data=feeds[:8], eval_data=feeds[8:],
                           method="activation", calib_limit=None)
    down = next(n for n in pruned.graph.nodes if n.name == "down")
    assert down.inputs[1].shape == (32, 16)
    rec = report.reconstruction
    assert rec["cosine_refit"] > rec["cosine_plain"]


def high_and_low_resolution_cnn() -> Model:
    """H: 64 channels at 32x32 through a depthwise conv (memory-bound); L: 64 channels at 8x8 read
    from 256 (compute-bound). Their convs have the same FLOPs."""
    inits = {**conv_inits("wh", 64, 16), "wdw": weight(64, 1, 3, 3), "wdw_b": weight(64), **conv_inits("wp", 256, 64),
             **conv_inits("wl", 64, 256), **conv_inits("wq", 8, 64)}
    return make([conv("H", "x", "wh", "h"), helper.make_node("Relu", ["h"], ["hr"]),
                 helper.make_node("Conv", ["hr", "wdw", "wdw_b"], ["d"], name="DW", group=64, pads=[1, 1, 1, 1]),
                 conv("P", "d", "wp", "p", strides=[4, 4]), helper.make_node("Relu", ["p"], ["pr"]),
                 conv("L", "pr", "wl", "l"), helper.make_node("Relu", ["l"], ["lr"]),
                 conv("Q", "lr", "wq", "y")], [("x", [1, 16, 32, 32])], ["y"], inits)


def test_latency_proxy_values_memory_bound_channels(monkeypatch):
    from onnxforge.model import parameter_count
    from onnxforge.passes.prune import allocate
    from onnxforge.passes.prune.flops import flops_by_node

    prepared, analysis = analyse(high_and_low_resolution_cnn())
    flops = flops_by_node(prepared, shapes=analysis.shapes)
    cost = allocate.build_cost_model(analysis, flops, sum(flops.values()), parameter_count(prepared.graph))
    dense = {int(r): k for k, r in enumerate(cost.classes)}

    def per_flop(source: str) -> float:
        tally = allocate._Tally(cost)
        idx = np.array([dense[int(c)] for c in group_of(analysis.groups(), source).classes[:16]])
        return tally.latency_saving(idx) / tally.saving(idx)[0]

    assert per_flop("H") > 1.5 * per_flop("L")  # the depthwise conv's and the wide activations' traffic
    monkeypatch.setattr(allocate, "TRAFFIC_FLOPS", 0.0)
    assert per_flop("H") == pytest.approx(1.0) and per_flop("L") == pytest.approx(1.0)


def test_kept_channel_counts_are_multiples_of_sixteen_by_default():
    _, report = prune(high_and_low_resolution_cnn(), target_flops=0.7)
    assert report.flops_ratio <= 0.7
    assert any(g["kept"] < g["size"] for g in report.groups)
    assert all(g["kept"] % 16 == 0 for g in report.groups if g["size"] % 16 == 0)


def attention_model(tokens=6, heads=4, head_dim=4) -> Model:
    """Self-attention: Q/K/V projections split into heads by Reshape, scores, softmax, values,
    heads merged by Reshape, output projection, residual, LayerNorm."""
    hidden = heads * head_dim
    inits = {f"w{p}": weight(hidden, hidden) for p in "qkvo"}
    inits.update({f"b{p}": weight(hidden) for p in "qkv"})
    inits.update({"split": np.array([1, tokens, heads, head_dim], np.int64),
                  "merge": np.array([1, tokens, hidden], np.int64), "scale": np.array(0.5, np.float32),
                  "gamma": np.ones(hidden, np.float32), "beta": np.zeros(hidden, np.float32)})
    nodes = []
    for p, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("MatMul", ["x", f"w{p}"], [f"{p}0"], name=p.upper()),
                  helper.make_node("Add", [f"{p}0", f"b{p}"], [f"{p}1"]),
                  helper.make_node("Reshape", [f"{p}1", "split"], [f"{p}2"], name=f"split_{p}"),
                  helper.make_node("Transpose", [f"{p}2"], [f"{p}3"], perm=perm)]
    nodes += [helper.make_node("MatMul", ["q3", "k3"], ["s"], name="scores"),
              helper.make_node("Mul", ["s", "scale"], ["ss"]), helper.make_node("Softmax", ["ss"], ["pr"], axis=-1),
              helper.make_node("MatMul", ["pr", "v3"], ["ctx"], name="context"),
              helper.make_node("Transpose", ["ctx"], ["ct"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ct", "merge"], ["cm"], name="merge_heads"),
              helper.make_node("MatMul", ["cm", "wo"], ["o"], name="O"), helper.make_node("Add", ["o", "x"], ["res"]),
              helper.make_node("LayerNormalization", ["res", "gamma", "beta"], ["y"], axis=-1)]
    return make(nodes, [("x", [1, tokens, hidden])], ["y"], inits)


def test_attention_heads_are_pruned_whole_and_exactly():
    feed = {"x": RNG.standard_normal((1, 6, 16)).astype(np.float32)}
    _, analysis, groups, pruned = remove_and_compare(attention_model(), lambda gs_: group_of(gs_, "Q").classes[[2]],
                                                     feed)
    heads = group_of(groups, "Q")
    assert set(heads.sources) == {"Q", "K", "V"} and heads.size == 4 and heads.width == 4 and heads.sinks == ["O"]
    weights = {n.name: n.inputs[1].shape for n in pruned.graph.nodes if n.name in ("Q", "K", "V", "O")}
    assert weights == {"Q": (16, 12), "K": (16, 12), "V": (16, 12), "O": (12, 16)}
    shapes = {n.name: n.inputs[1].values.tolist() for n in pruned.graph.nodes if n.op == "Reshape"}
    assert shapes["split_q"] == [1, 6, 3, 4] and shapes["merge_heads"] == [1, 6, 12]


def test_matmul_of_untracked_activations_is_left_alone():
    """x @ x^T before any weighted layer: nothing to track, and the conv after it stays prunable."""
    inits = {"w1": weight(6, 4), "w2": weight(4, 3)}
    model = make([helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
                  helper.make_node("MatMul", ["x", "xt"], ["g"], name="gram"),
                  helper.make_node("MatMul", ["g", "w1"], ["h"], name="M1"), helper.make_node("Relu", ["h"], ["r"]),
                  helper.make_node("MatMul", ["r", "w2"], ["y"], name="M2")], [("x", [1, 6, 6])], ["y"], inits)
    _, analysis = analyse(model.copy())
    assert group_of(analysis.groups(), "M1").prunable.all()


def test_heads_leave_one_at_a_time():
    pruned, report = prune(attention_model(), ratio=0.25, round_to=4)  # head width 4: one head per chunk
    q = next(n for n in pruned.graph.nodes if n.name == "Q")
    assert q.inputs[1].shape == (16, 12)
    assert next(g for g in report.groups if "Q" in g["sources"])["kept"] == 3
    onnx.checker.check_model(pruned.to_proto(), full_check=True)
