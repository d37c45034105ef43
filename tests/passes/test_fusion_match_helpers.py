"""Helpers of passes/fusion/_match.py that rules build new tensors with."""
import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.passes.fusion._match import fresh_constant


def test_fresh_constant_keeps_shape_and_makes_a_new_name():
    graph = gs.Graph(nodes=[gs.Node("Identity", inputs=[gs.Constant("k", np.array(1.0, np.float32))],
                                    outputs=[gs.Variable("y")])])
    scalar = fresh_constant(graph, "k", np.array(2.0, np.float32))
    assert scalar.name == "k_1" and scalar.values.shape == ()  # a scalar stays 0-d, not [1]
    transposed = fresh_constant(graph, "w", np.arange(6, dtype=np.float32).reshape(2, 3).T)
    assert transposed.values.shape == (3, 2) and transposed.values.flags.c_contiguous
