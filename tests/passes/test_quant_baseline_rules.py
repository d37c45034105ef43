"""The float baseline's library calls as registered passes (passes/quant/baseline_rules.py):
graphsurgeon-fold-constants, raise-opset, onnxruntime-basic. Where each fires (counts, parity on
onnxruntime CPU, checker), one case per refusal reason, and the ModelProto path prepare.py takes
(the call's own bytes, no export in between), on onnx.parser graphs."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest

from onnxforge.context import PassContext
from onnxforge.model import Model
from onnxforge.passes.quant.baseline_rules import converted
from onnxforge.passes.quant.registered import apply_call
from onnxforge.passes.registry import resolve

from fusion_support import reasons_by_node, session

FOLD, FOLD_RULE = "graphsurgeon-fold-constants", "graphsurgeon-folded-node"
RAISE, RAISE_RULE = "raise-opset", "onnx-version-conversion"
ORT, ORT_RULE = "onnxruntime-basic", "onnxruntime-basic-rewrites"


def _named(text: str) -> onnx.ModelProto:
    """``text`` parsed, its main-graph nodes named n0, n1, ... in order."""
    model = onnx.parser.parse_model(text)
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
    return model


def _run(proto: onnx.ModelProto, name: str, denied=(), **settings):
    model = Model.from_proto(proto)
    ctx = PassContext(model=model, options={name: settings}, denied_rewrites=frozenset(denied))
    result = resolve(name).run(model.graph, ctx)
    return model.to_proto(), result, ctx


def _same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, feed: dict, rtol=1e-6, atol=1e-6) -> None:
    onnx.checker.check_model(after, full_check=True)
    for want, got in zip(session(before).run(None, feed), session(after).run(None, feed)):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


# ------------------------------------------------------------------ graphsurgeon-fold-constants
def _folding(extra: str = "", out: str = "y") -> onnx.ModelProto:
    """x * (a + b) with a, b Constant nodes (n0, n1; the sum n2, the product n3), then ``extra``."""
    return _named(f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] {out}) {{
      a = Constant <value = float[3] {{1, 2, 3}}> ()
      b = Constant <value = float[3] {{0.5, 0.5, 0.5}}> ()
      s = Add (a, b)
      y = Mul (x, s)
      {extra}
    }}""")


def test_fold_lowers_constants_and_folds_their_sum():
    model = _folding()
    out, result, ctx = _run(model, FOLD)
    assert result.stats == {FOLD_RULE: 3} and not ctx.refusals
    assert [r[1:] for r in ctx.rewrites] == [(FOLD_RULE, ("n0",)), (FOLD_RULE, ("n1",)), (FOLD_RULE, ("n2",))]
    assert [n.op_type for n in out.graph.node] == ["Mul"]
    _same_outputs(model, out, {"x": np.arange(6, dtype=np.float32).reshape(2, 3)})


def test_fold_refuses_a_random_op_and_keeps_what_reads_it():
    model = _folding("r = RandomNormalLike <dtype = 1> (s)\n      z = Add (r, x)", out="y, float[2,3] z")
    out, result, ctx = _run(model, FOLD)
    assert reasons_by_node(ctx, FOLD_RULE) == {"n4": "random op RandomNormalLike: folding would store one draw for every run"}
    assert result.stats == {FOLD_RULE: 3}
    assert [n.op_type for n in out.graph.node] == ["Mul", "RandomNormalLike", "Add"]
    onnx.checker.check_model(out, full_check=True)


def test_fold_refuses_a_fold_rolled_back_by_the_pass_manager():
    model = _folding()
    out, result, ctx = _run(model, FOLD, denied={(FOLD_RULE, ("n2",))})
    assert reasons_by_node(ctx, FOLD_RULE) == {"n2": "rolled back: this rewrite broke verification"}
    assert result.stats == {FOLD_RULE: 2}  # the Constant nodes still become initializers
    assert [n.op_type for n in out.graph.node] == ["Add", "Mul"]
    _same_outputs(model, out, {"x": np.ones((2, 3), np.float32)})


def test_fold_on_a_proto_with_nothing_to_fold_is_that_proto():
    model = _named("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] y) { y = Relu (x) }""")
    out, ctx = apply_call(model, FOLD)
    assert out is model and not ctx.rewrites


# ------------------------------------------------------------------ raise-opset
def _opset11(extra: str = "", domains: str = "") -> onnx.ModelProto:
    """Squeeze with the axes attribute (an input from opset 13), then ``extra``."""
    return _named(f"""<ir_version: 7, opset_import: ["" : 11{domains}]>
    g (float[1,3] x) => (float[3] y) {{
      s = Squeeze <axes = [0]> (x)
      y = Relu (s)
      {extra}
    }}""")


def test_raise_opset_converts_the_model_and_outputs_are_equal():
    model = _opset11()
    out, result, ctx = _run(model, RAISE)
    assert result.stats == {RAISE_RULE: 1} and not ctx.refusals
    assert [o.version for o in out.opset_import if o.domain in ("", "ai.onnx")] == [13]
    squeeze = next(n for n in out.graph.node if n.op_type == "Squeeze")
    assert len(squeeze.input) == 2 and not squeeze.attribute  # axes is an input from opset 13
    _same_outputs(model, out, {"x": np.array([[-1, 2, 3]], np.float32)}, rtol=0, atol=0)


def test_raise_opset_takes_its_minimum_and_leaves_a_model_already_there():
    model = _opset11()
    assert _run(model, RAISE, minimum=11)[1].stats == {}
    out, ctx = apply_call(model, RAISE, {"minimum": 14})
    assert [o.version for o in out.opset_import if o.domain == ""] == [14] and ctx.rewrites
    assert out.SerializeToString() == converted(model, 14).SerializeToString()  # the converter's bytes


def _with_local_function() -> onnx.ModelProto:
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 11, "local" : 1]>
    g (float[1,3] x) => (float[3] y) {
      f = local.Twice (x)
      y = Squeeze <axes = [0]> (f)
    }
    <domain: "local", opset_import: ["" : 11]>
    Twice (a) => (b) { b = Add (a, a) }""")
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
    return model


def test_raise_opset_refuses_a_model_with_local_functions():
    model = _with_local_function()
    out, result, ctx = _run(model, RAISE)
    assert result.stats == {}
    assert reasons_by_node(ctx, RAISE_RULE) == {
        "n0": "model-local functions (local:Twice): onnx's version converter drops them, and the nodes calling them "
              "would not load"}
    assert [o.version for o in out.opset_import if o.domain == ""] == [11] and len(out.functions) == 1


def test_prepare_reports_a_refused_opset_raise_as_bad_input():
    from onnxforge.errors import DataError
    from onnxforge.passes.quant.prepare import raise_opset

    with pytest.raises(DataError, match="cannot raise the model to opset 13: model-local functions"):
        raise_opset(_with_local_function(), 13)


def test_raise_opset_refuses_a_conversion_rolled_back_by_the_pass_manager():
    _, result, ctx = _run(_opset11(), RAISE, denied={(RAISE_RULE, ("n0",))})
    assert result.stats == {}
    assert reasons_by_node(ctx, RAISE_RULE) == {"n0": "rolled back: this rewrite broke verification"}


def test_optimize_explain_lists_the_opset_refusal(tmp_path, capsys):
    from onnxforge.cli import main

    path = tmp_path / "m.onnx"
    onnx.save(_with_local_function(), str(path))
    rc = main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--passes", RAISE, "--explain"])
    printed = capsys.readouterr()
    assert rc in (0, None), printed.out + printed.err
    assert "onnx's version converter drops them" in printed.out + printed.err


# ------------------------------------------------------------------ onnxruntime-basic
def _conv_bn(extra: str = "", domains: str = "") -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def floats(*shape):
        return ", ".join(f"{v:.4f}" for v in rng.standard_normal(shape).ravel())

    return _named(f"""<ir_version: 8, opset_import: ["" : 17{domains}]>
    g (float[1,2,5,5] x) => (float[1,3,5,5] y) <float[3,2,3,3] w = {{{floats(3, 2, 3, 3)}}},
        float[3] sc = {{1.5, 0.5, 2}}, float[3] bi = {{{floats(3)}}}, float[3] mu = {{{floats(3)}}},
        float[3] var = {{1, 2, 0.5}}> {{
      c = Conv <pads = [1, 1, 1, 1]> (x, w)
      y = BatchNormalization (c, sc, bi, mu, var)
      {extra}
    }}""")


def test_onnxruntime_basic_folds_batchnorm_into_the_conv():
    model = _conv_bn()
    out, result, ctx = _run(model, ORT)
    assert result.stats == {ORT_RULE: 1} and not ctx.refusals
    assert [r[1:] for r in ctx.rewrites] == [(ORT_RULE, ("n0",))]
    assert [n.op_type for n in out.graph.node] == ["Conv"]
    feed = {"x": np.random.default_rng(1).standard_normal((1, 2, 5, 5)).astype(np.float32)}
    _same_outputs(model, out, feed, rtol=1e-4, atol=1e-5)


def test_onnxruntime_basic_refuses_a_model_with_an_op_it_does_not_know():
    model = _conv_bn("z = custom.Foo (y)", domains=', "custom" : 1')
    out, result, ctx = _run(model, ORT)
    assert result.stats == {}
    assert reasons_by_node(ctx, ORT_RULE) == {
        "n2": "no onnxruntime op or local function for custom:Foo: onnxruntime would refuse the model"}
    assert [n.op_type for n in out.graph.node] == ["Conv", "BatchNormalization", "Foo"]


def test_onnxruntime_basic_takes_contrib_ops_and_local_functions():
    model = _conv_bn("z = com.microsoft.Gelu (y)", domains=', "com.microsoft" : 1')
    assert not _run(model, ORT)[2].refusals
    _, _, ctx = _run(_with_local_function(), ORT)
    assert not ctx.refusals and ctx.rewrites


def test_onnxruntime_basic_refuses_a_run_rolled_back_by_the_pass_manager():
    _, result, ctx = _run(_conv_bn(), ORT, denied={(ORT_RULE, ("n0",))})
    assert result.stats == {}
    assert reasons_by_node(ctx, ORT_RULE) == {"n0": "rolled back: this rewrite broke verification"}


def test_prepare_reports_onnxruntimes_refusal_as_its_rejection():
    from onnxforge.passes.quant.prepare import OnnxRuntimeRejects, _checked_offline

    with pytest.raises(OnnxRuntimeRejects, match="no onnxruntime op or local function for custom:Foo"):
        _checked_offline(_conv_bn("z = custom.Foo (y)", domains=', "custom" : 1'))
