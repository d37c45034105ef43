"""--pin-input: an input's default (or a given value) is assumed only when the user pins it.

A silero-vad-like model branches on its sample rate, a scalar input with a default
initializer: unpinned, the If stays (the user may feed 8000), pinned it folds to the
taken branch, equal to the original fed that value at two batch sizes."""
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxforge import optimize
from onnxforge.cli import main
from onnxforge.errors import OptionError

SR_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
vad (float[N,4] x, int64 sr) => (float[N,4] y)
DEFAULT
{
  k = Constant <value = int64 {16000}> ()
  is16 = Equal(sr, k)
  y = If(is16) <
    then_branch = g1 () => (float[N,4] a) { two = Constant <value = float {2.0}> ()
                                             a = Mul(x, two) },
    else_branch = g2 () => (float[N,4] b) { three = Constant <value = float {3.0}> ()
                                             b = Mul(x, three) }
  >
}
"""


def sr_model(default=True):
    return onnx.parser.parse_model(SR_MODEL.replace("DEFAULT", "<int64 sr = {16000}>" if default else ""))


def run(model, x, sr=None):
    feed = {"x": x} if sr is None else {"x": x, "sr": np.array(sr, np.int64)}
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def xs():
    return [np.arange(n * 4, dtype=np.float32).reshape(n, 4) / 3 for n in (1, 3)]


def test_unpinned_default_is_not_assumed():
    out, report = optimize(sr_model(), level=2)
    proto = out.to_proto()
    assert [n.op_type for n in proto.graph.node] == ["Equal", "If"]
    assert [i.name for i in proto.graph.input] == ["x", "sr"]
    reasons = [r["reason"] for r in report.refusals]
    assert "reads the default of input sr, which may be fed another value (--pin-input sr fixes it)" in reasons
    for x in xs():
        for sr in (16000, 8000):  # feeding another rate still takes the other branch
            assert np.array_equal(run(proto, x, sr), run(sr_model(), x, sr))


@pytest.mark.parametrize("pin, rate", [({"sr": None}, 16000), ({"sr": (8000,)}, 8000)])
def test_pinned_input_folds_the_branch(pin, rate):
    out, report = optimize(sr_model(), level=2, pinned_inputs=pin)
    proto = out.to_proto()
    assert [n.op_type for n in proto.graph.node] == ["Mul"]
    assert [i.name for i in proto.graph.input] == ["x"]
    assert not any("default initializers" in w for w in report.warnings)
    for x in xs():
        assert np.array_equal(run(proto, x), run(sr_model(), x, rate))


def test_pinned_value_of_an_input_without_default(tmp_path):
    src, dst = tmp_path / "vad.onnx", tmp_path / "vad.opt.onnx"
    onnx.save(sr_model(default=False), src)
    assert main(["optimize", str(src), "-o", str(dst), "--pin-input", "sr=8000"]) == 0
    proto = onnx.load(dst)
    assert [n.op_type for n in proto.graph.node] == ["Mul"]
    for x in xs():
        assert np.array_equal(run(proto, x), run(sr_model(default=False), x, 8000))


@pytest.mark.parametrize("default, pin, message", [
    (True, {"rate": None}, "--pin-input names rate, which is not a graph input of the model"),
    (False, {"sr": None}, "--pin-input sr: the input has no default initializer"),
    (False, {"sr": (1, 2)}, "--pin-input sr: 2 value(s) for an input of shape []"),
    (False, {"sr": (0.5,)}, "--pin-input sr: the input is int64; the values must be whole numbers"),
])
def test_bad_pins_say_why(default, pin, message):
    with pytest.raises(OptionError, match=re.escape(message)):
        optimize(sr_model(default), level=2, pinned_inputs=pin)
