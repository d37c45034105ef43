import numpy as np
import onnx
from onnx import helper, numpy_helper

from cleanup_support import assert_parity, model_from_text, run_pass

from onnxforge.io import load, save
from onnxforge.model import ExternalValues, Model, constants

OPSET = '<ir_version: 8, opset_import: ["" : 17]>'


def tied_embedding_model(vocab=64, dim=32) -> onnx.ModelProto:
    """GPT-2 style: the embedding table and the output projection hold the same bytes."""
    table = np.random.default_rng(0).standard_normal((vocab, dim)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["wte", "ids"], ["h"]),
        helper.make_node("Transpose", ["lm_head"], ["lm_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "lm_t"], ["logits"]),
        helper.make_node("Add", ["logits", "bias_a"], ["p"]),
        helper.make_node("Add", ["p", "bias_b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "tied",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, 5])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 5, vocab])],
        [numpy_helper.from_array(table, "wte"), numpy_helper.from_array(table.copy(), "lm_head"),
         numpy_helper.from_array(np.zeros(vocab, np.float32), "bias_a"),
         numpy_helper.from_array(np.zeros(vocab, np.float64).astype(np.float32) * -1.0, "bias_b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_tied_weights_are_stored_once():
    proto = tied_embedding_model()
    model = Model.from_proto(proto)
    result, _ = run_pass("merge-duplicate-initializers", model)
    # lm_head duplicates wte; bias_b (-0.0 bytes) differs from bias_a (+0.0 bytes).
    assert result.stats == {"merged_initializer": 1, "bytes_saved": 64 * 32 * 4}
    out = model.to_proto()
    assert sorted(i.name for i in out.graph.initializer) == ["bias_a", "bias_b", "wte"]
    assert_parity(proto, model, {"ids": np.array([[0, 5, 63, 7, 7]], np.int64)})


def test_different_dtype_or_shape_not_merged():
    model = model_from_text(OPSET + """
    g (float[2] x, double[2] z) => (float[2] y, double[2] w, float[1,2] v) {
      a = Constant <value = float[2] {1.0, 2.0}> ()
      b = Constant <value = double[2] {1.0, 2.0}> ()
      c = Constant <value = float[1,2] {1.0, 2.0}> ()
      y = Add(x, a)
      w = Add(z, b)
      v = Add(x, c)
    }""")
    run_pass("constant-to-initializer", model)
    result, _ = run_pass("merge-duplicate-initializers", model)
    assert not result.changed


def test_external_weights_are_streamed_not_loaded(tmp_path):
    src = tmp_path / "tied.onnx"
    onnx.save(tied_embedding_model(vocab=512, dim=64), src, save_as_external_data=True,
              all_tensors_to_one_file=True, location="tied.onnx.data", size_threshold=1024)
    model = load(src)
    externals = {c.name for c in constants(model.graph) if isinstance(c._values, ExternalValues)}
    assert {"wte", "lm_head"} <= externals
    result, _ = run_pass("merge-duplicate-initializers", model)
    assert result.stats["merged_initializer"] == 1
    # Still lazy: the survivor was hashed from the file, never materialised.
    assert all(isinstance(c._values, ExternalValues) for c in constants(model.graph) if c.name == "wte")
    out = save(model, tmp_path / "merged.onnx")
    merged = onnx.load(out)
    assert sorted(i.name for i in merged.graph.initializer) == ["bias_a", "bias_b", "wte"]
