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


def _ir3_linear():
    """As PyTorch exported nn.Linear(bias=False) at IR 3: the weight is an initializer
    listed as a graph input (IR < 4 requires it), transposed by a node."""
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    g = helper.make_graph(
        [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)])
    m.ir_version = 3
    return m


def test_fold_at_ir3_lists_the_folded_constant_as_an_input():
    import onnx
    import onnxruntime as ort

    original = _ir3_linear()
    out, report = optimize(original, level=1)
    proto = out.to_proto()
    assert [n.op_type for n in proto.graph.node] == ["MatMul"]  # the Transpose folded, not rolled back
    assert not report.rolled_back
    assert proto.ir_version == 3
    assert {i.name for i in proto.graph.initializer} <= {i.name for i in proto.graph.input}
    onnx.checker.check_model(proto, full_check=True)
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
           for m in (original, proto)]
    assert np.array_equal(run[0], run[1])
