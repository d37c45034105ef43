"""Small models for the model-IO tests, built with onnx.helper / onnx.parser (no binary fixtures)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conftest import SHARED

SHARED_MODELS = SHARED / "models"


def shared_model_paths() -> list[Path]:
    return sorted(SHARED_MODELS.glob("*.onnx")) if SHARED_MODELS.is_dir() else []


def weight(shape=(4, 4), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def set_external(tensor: TensorProto, location: str, offset: int | None = 0, length: int | None = None) -> None:
    """Point ``tensor`` at external data without writing anything."""
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    entries = [("location", location)]
    if offset is not None:
        entries.append(("offset", str(offset)))
    if length is not None:
        entries.append(("length", str(length)))
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def matmul_model(w: np.ndarray | None = None, *, opset: int = 17, ir: int = 8) -> onnx.ModelProto:
    """Y = MatMul(X, W) with W an initializer."""
    w = weight() if w is None else w
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", w.shape[0]])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", w.shape[1]])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    return model


def write_external_model(folder: Path, location: str = "weights.bin", *, offset: int | None = 0,
                         length: int | None = None, w: np.ndarray | None = None,
                         data: bytes | None = None, name: str = "model.onnx",
                         with_length: bool = True) -> Path:
    """A MatMul model whose W lives in ``location``; writes the data file unless it exists
    or ``data`` is given as b"" (then nothing is written)."""
    w = weight() if w is None else w
    model = matmul_model(w)
    tensor = model.graph.initializer[0]
    payload = w.tobytes()
    if with_length:
        length = len(payload) if length is None else length
    set_external(tensor, location, offset, length)
    target = folder / location
    if data is None and not target.exists() and "\x00" not in location and not Path(location).is_absolute():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"\0" * (offset or 0) + payload)
    elif data:
        target.write_bytes(data)
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


def constant_node_model(folder: Path, location: str = "const.bin") -> tuple[Path, np.ndarray]:
    """Y = X + C where C comes from a Constant node whose ``value`` is external."""
    c = weight((4, 128), seed=3)  # 2 KB: above save()'s inline threshold
    value = numpy_helper.from_array(c, "c_value")
    (folder / location).write_bytes(c.tobytes())
    set_external(value, location, 0, c.nbytes)
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["C"], name="const", value=value),
            helper.make_node("Add", ["X", "C"], ["Y"], name="add"),
        ],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(c.shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, list(c.shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "const_model.onnx"
    path.write_bytes(model.SerializeToString())
    return path, c


def run_ort(model: str | Path | onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())
