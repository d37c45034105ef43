"""Results are judged at onnxruntime's default optimization level too (what users run).

The model is the construct onnx's expanded AffineGrid holds: Range reads a one-element
1-D tensor (the spec wants scalars) from an If whose condition is Size(input) == 2. With
the condition unknown, shape inference cannot see the Range input's shape, and the model
loads at every level. Folding Size (a static shape) makes the condition a constant;
onnxforge's own inlining of that If is refused by onnx's checker, and onnxruntime, at its
default level, inlines the If itself and rejects the Range when the session is built."""
import numpy as np
import onnx
import onnx.parser
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxforge import Model, optimize
from onnxforge import verify

RANGE_IF = """<ir_version: 8, opset_import: ["" : 17]>
g (int64[2] size) => (int64[M] y) {
  two = Constant <value = int64 {2}> ()
  five = Constant <value = int64[1] {5}> ()
  n = Size(size)
  c = Equal(n, two)
  w = If(c) <then_branch = g1 () => (w_then) { w_then = Identity(five) },
             else_branch = g2 () => (w_else) { w_else = Constant <value = int64 {3}> () }>
  zero = Constant <value = int64 {0}> ()
  one = Constant <value = int64 {1}> ()
  y = Range(zero, w, one)
}"""
FEED = {"size": np.array([2, 7], np.int64)}


def _session(proto: onnx.ModelProto, level):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 4
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _model() -> Model:
    proto = onnx.parser.parse_model(RANGE_IF)
    onnx.checker.check_model(proto, full_check=True)
    return Model.from_proto(proto)


def test_a_fold_that_onnxruntimes_default_level_rejects_is_rolled_back():
    original = _model().to_proto()
    out, report = optimize(_model(), level=3)
    proto = out.to_proto()
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        got = _session(proto, level).run(None, FEED)[0]
        assert got.tolist() == _session(original, level).run(None, FEED)[0].tolist() == [0, 1, 2, 3, 4]
    blamed = [(rb.get("rule"), tuple(rb.get("nodes", ()))) for rb in report.rolled_back
              if "default optimization level" in rb["reason"]]
    assert blamed == [("folded_shape", ("Size:n",))]
    assert report.verification["ok"] and report.verification["at_default_level"]


def test_an_original_that_fails_at_the_default_level_is_judged_with_optimizations_off():
    """What the unfixed optimizer wrote: loads with optimizations off only. Not a pass's
    fault: the run goes on, judged at ORT_DISABLE_ALL, and says so."""
    model = _model()
    for node in model.graph.nodes:
        if node.op == "Size":  # the constant that Size folds to
            node.op, node.inputs = "Identity", [gs.Constant("n4", np.array(2, np.int64))]
    model.graph.cleanup()
    proto = model.to_proto()
    _session(proto, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    try:
        _session(proto, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        raise AssertionError("the model should not load at the default level")
    except Exception as exc:
        assert "Range" in str(exc)
    out, report = optimize(Model.from_proto(proto), level=3)
    assert any("does not run at onnxruntime's default optimization level" in w for w in report.warnings)
    assert report.verification["ok"] and not report.verification["at_default_level"]
    got = _session(out.to_proto(), ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, FEED)[0]
    assert got.tolist() == [0, 1, 2, 3, 4]


def test_the_default_level_costs_one_session_per_model_when_nothing_fails(monkeypatch):
    """The original once and the result once at the default level, no more."""
    at_default = []
    real = verify.session_for

    def counting(model, *, optimize=False, threads=0, providers=None):
        if optimize:
            at_default.append(type(model).__name__)
        return real(model, optimize=optimize, threads=threads, providers=providers)

    monkeypatch.setattr(verify, "session_for", counting)
    proto = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 4] y) { a = Identity(x) b = Relu(a) y = Abs(b) }""")
    _out, report = optimize(Model.from_proto(proto), level=3)
    assert report.verification["ok"] and report.verification["at_default_level"]
    assert len(at_default) == 2


def test_quantization_baseline_reruns_the_passes_verified_when_onnxruntime_rejects_them():
    """quantize and convert-fp16 start from onnxforge's -O2 output, unverified for speed,
    then onnxruntime's basic level: a fold it rejects is rolled back on a verified rerun."""
    from onnxforge.passes.quant.prepare import float_baseline

    baseline = float_baseline(_model())
    got = _session(baseline, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(None, FEED)[0]
    assert got.tolist() == [0, 1, 2, 3, 4]


def test_made_up_samples_keep_the_integer_inputs_the_model_ran_on():
    """Random calibration feeds: floats drawn per sample, sizes and indices as found to run
    (onnx's AffineGrid reads its output size from an int64 input: other values fail)."""
    from onnxforge.verify_feeds import runnable_feeds

    proto = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x, int64[2] size) => (float[M] y, int64[K] r) {
      y = Flatten <axis = 0> (x)
      zero = Constant <value = int64 {0}> ()
      one = Constant <value = int64 {1}> ()
      k = ReduceMax <keepdims = 0> (size)
      r = Range(zero, k, one)
    }""")
    feeds = runnable_feeds(Model.from_proto(proto), samples=4)
    assert len(feeds) == 4
    assert all(f["size"].tolist() == feeds[0]["size"].tolist() for f in feeds)
    assert len({f["x"].tobytes() for f in feeds}) == 4


def _recorded_sessions(monkeypatch, works: set[str]):
    """Sessions onnxruntime is asked for: (providers, optimization level); GPU providers
    report `works` as given, and every session is really built on CPU."""
    from onnxforge.runtime import env

    made = []
    real = ort.InferenceSession

    def session(model, options=None, providers=None, **kw):
        made.append(([p if isinstance(p, str) else p[0] for p in providers or []], options.graph_optimization_level))
        return real(model, options, providers=["CPUExecutionProvider"], **kw)

    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(env, "probe_provider", lambda name, ort_name: env.ProviderStatus(
        name, ort_name, True, ort_name in works, "" if ort_name in works else "no GPU"))
    return made


def test_the_written_file_runs_at_the_default_level_on_the_deployment_providers(tmp_path, monkeypatch, caplog):
    """quantize/convert-fp16/prune/run check the written file at onnxruntime's default level: with the
    target's providers (their default options, CPU as the fallback) where they work here, else on CPU
    with a warning saying so."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    default = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for provider, works, want, warned in [
        ("cuda", {"CUDAExecutionProvider"}, ["CUDAExecutionProvider", "CPUExecutionProvider"], False),
        ("tensorrt", {"TensorrtExecutionProvider", "CUDAExecutionProvider"},
         ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], False),
        ("cuda", set(), ["CPUExecutionProvider"], True),
        ("cpu", set(), ["CPUExecutionProvider"], False),
    ]:
        made = _recorded_sessions(monkeypatch, works)
        caplog.clear()
        verify.written_equals(Model.from_proto(proto), provider=provider)(path)
        assert [p for p, level in made if level == default] == [want], (provider, made)
        assert all(p == ["CPUExecutionProvider"] for p, level in made if level != default)
        assert ("does not work on this machine" in caplog.text) == warned, caplog.text
