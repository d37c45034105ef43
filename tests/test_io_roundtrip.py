"""load -> save -> reload keeps what the user had: interface, opsets, doc strings,
metadata, producer, functions, node names, weights, and the outputs in onnxruntime."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from io_helpers import SHARED_MODELS, run_ort, shared_model_paths, weight
from onnxforge.io import load, save
from onnxforge.model import Model

SHARED_DATA = SHARED_MODELS.parent / "data"
# Inputs for the models without feed files: symbolic dims pinned to these shapes.
SHAPES = {
    "yolov8n_320": {"images": (1, 3, 320, 320)},
    "magika_v3_3": {"bytes": (1, 2048)},
    "ppocrv4_det": {"x": (1, 3, 64, 64)},
    "ppocrv4_rec": {"x": (1, 3, 48, 96)},
}


def _dims(vi: onnx.ValueInfoProto) -> list:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param") else "?"
            for d in t.shape.dim]


def _interface(values) -> list:
    return [(v.name, v.type.tensor_type.elem_type, _dims(v)) for v in values]


def _user_fields(proto: onnx.ModelProto) -> dict:
    return {
        "ir_version": proto.ir_version,
        "opsets": sorted((i.domain or "ai.onnx", i.version) for i in proto.opset_import),
        "producer": (proto.producer_name, proto.producer_version, proto.domain, proto.model_version),
        "doc": (proto.doc_string, proto.graph.doc_string, proto.graph.name),
        "metadata": [(p.key, p.value) for p in proto.metadata_props],
        "inputs": _interface(proto.graph.input),
        "outputs": _interface(proto.graph.output),
        "functions": [f.SerializeToString(deterministic=True) for f in proto.functions],
        "node_names": Counter(n.name for n in proto.graph.node),
        "ops": Counter((n.domain, n.op_type) for n in proto.graph.node),
    }


def _weights(proto: onnx.ModelProto, folder: Path) -> dict[str, np.ndarray]:
    onnx.load_external_data_for_model(proto, str(folder)) if any(
        t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer) else None
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def _assert_round_trip(original: onnx.ModelProto, saved_path: Path):
    saved = onnx.load(str(saved_path), load_external_data=False)
    want, got = _user_fields(original), _user_fields(saved)
    for key in want:
        assert got[key] == want[key], f"{key} changed"
    before = _weights(original, saved_path.parent)
    after = _weights(saved, saved_path.parent)
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def _feeds(path: Path, model: Model) -> dict:
    files = sorted((SHARED_DATA / path.stem / "val").glob("*.npz")) or sorted(
        (SHARED_DATA / path.stem / "calib").glob("*.npz"))
    if files:
        with np.load(files[0]) as data:
            return {k: data[k] for k in data.files}
    from onnxforge.inputs import seeded_feeds

    return seeded_feeds(model, SHAPES.get(path.stem, {}), seed=0)


@pytest.mark.parametrize("path", shared_model_paths(), ids=lambda p: p.stem)
def test_shared_model_round_trip(path, tmp_path):
    original = onnx.load(str(path))
    model = load(path)
    assert model.notes == [], "the shared models are within onnxruntime's limits"
    out = tmp_path / "out.onnx"
    save(model, out)
    _assert_round_trip(original, out)
    feeds = _feeds(path, model)
    names = [i.name for i in original.graph.input]
    feeds = {k: v for k, v in feeds.items() if k in names}
    for a, b in zip(run_ort(path, feeds), run_ort(out, feeds)):
        np.testing.assert_array_equal(a, b)


def test_shared_models_present():
    if not SHARED_MODELS.is_dir():
        pytest.skip("../shared/models is absent")
    assert len(shared_model_paths()) == 8


def _rich_model() -> onnx.ModelProto:
    """Local function, custom and ml domains, doc strings, metadata, symbolic and unknown dims."""
    w = weight((4, 4), seed=11)
    scale_fn = helper.make_function(
        "my.local", "ScaledRelu", ["a", "s"], ["b"],
        [helper.make_node("Relu", ["a"], ["r"], name="fn_relu"), helper.make_node("Mul", ["r", "s"], ["b"])],
        [helper.make_opsetid("", 17)],
        doc_string="relu then scale",
    )
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W"], ["H"], name="project"),
            helper.make_node("ScaledRelu", ["H", "S"], ["Y"], domain="my.local", name="call_fn"),
            helper.make_node("Identity", ["Y"], ["Z"], name="ident"),
        ],
        "rich_graph",
        [x, helper.make_tensor_value_info("S", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("H", TensorProto.FLOAT, ["batch", None])],
        [numpy_helper.from_array(w, "W")],
        doc_string="graph doc",
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3),
                       helper.make_opsetid("my.local", 1)],
        functions=[scale_fn],
        producer_name="handmade", producer_version="9.9", doc_string="model doc", domain="org.example",
        model_version=42,
    )
    model.ir_version = 8
    helper.set_model_props(model, {"author": "tests", "licence": "Apache-2.0"})
    return model


def test_hand_built_model_round_trip(tmp_path):
    proto = _rich_model()
    onnx.checker.check_model(proto)
    src = tmp_path / "rich.onnx"
    src.write_bytes(proto.SerializeToString())
    save(load(src), tmp_path / "out.onnx")
    _assert_round_trip(proto, tmp_path / "out.onnx")
    feeds = {"X": weight((3, 4), seed=2), "S": np.array(0.5, np.float32)}
    for a, b in zip(run_ort(src, feeds), run_ort(tmp_path / "out.onnx", feeds)):
        np.testing.assert_array_equal(a, b)


def test_hand_built_model_round_trip_with_external_data(tmp_path):
    proto = _rich_model()
    src = tmp_path / "rich.onnx"
    src.write_bytes(proto.SerializeToString())
    save(load(src), tmp_path / "out.onnx", external_data=True, size_threshold=0)
    assert (tmp_path / "out.onnx.data").exists()
    _assert_round_trip(proto, tmp_path / "out.onnx")


def test_to_proto_declares_new_domains_without_touching_existing_ones(tmp_path):
    import onnx_graphsurgeon as gs

    proto = _rich_model()
    model = Model.from_proto(proto)
    y = model.graph.outputs[0]
    fused = gs.Variable("F", dtype=np.float32)
    model.graph.nodes.append(gs.Node("FusedThing", "fused", inputs=[y], outputs=[fused], domain="com.microsoft"))
    model.graph.outputs.append(fused)
    opsets = {i.domain: i.version for i in model.to_proto().opset_import}
    assert opsets == {"": 17, "ai.onnx.ml": 3, "my.local": 1, "com.microsoft": 1}
    model.ensure_domain("com.example", 2)
    model.set_opset(18)
    opsets = {i.domain: i.version for i in model.to_proto().opset_import}
    assert opsets["com.example"] == 2 and opsets[""] == 18 and opsets["ai.onnx.ml"] == 3


def test_model_fields_do_not_copy_the_graph():
    proto = _rich_model()
    model = Model.from_proto(proto)
    assert not model.meta.HasField("graph")
    assert [f.name for f in model.meta.functions] == ["ScaledRelu"]
    assert model.meta.producer_name == "handmade"
