"""Graph inputs that are also initializers (overridable defaults) stay graph inputs, in order."""
import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnxforge import optimize
from onnxforge.model import Model


def _model():
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        initializer=[numpy_helper.from_array(np.ones(2, np.float32), "b")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_round_trip_keeps_overridable_input_and_order():
    model = Model.from_proto(_model())
    assert [i.name for i in model.to_proto().graph.input] == ["b", "x"]
    assert any("default initializers" in n for n in model.notes)


def test_optimize_keeps_interface():
    out, report = optimize(_model(), level=1)
    assert [i.name for i in out.to_proto().graph.input] == ["b", "x"]
    assert any("default initializers" in w for w in report.warnings)
