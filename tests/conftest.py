import os
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ONNXFORGE_SHARED", ROOT.parent / "shared"))
CORPUS = Path(os.environ.get("ONNXFORGE_CORPUS", Path.home() / ".cache" / "onnxforge" / "corpus"))


def shared_model(name: str) -> Path:
    path = SHARED / "models" / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} not present (the shared models live in ../shared)")
    return path


def corpus_model(name: str) -> Path:
    path = CORPUS / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} not present: run ../shared/corpus/make_synth.sh {CORPUS}")
    return path


def tensor_ranges(model: onnx.ModelProto, feeds, input_name: str = "x", output_name: str = "y") -> dict:
    """Exact min/max (widened to include 0) of the graph input and every node output over ``feeds``."""
    import onnxruntime as ort

    names = [input_name] + [o for n in model.graph.node for o in n.output]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n != output_name)
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    lo, hi = {}, {}
    for feed in feeds:
        for info, value in zip(session.get_outputs(), session.run(None, feed)):
            lo[info.name] = min(lo.get(info.name, 0.0), float(value.min()))
            hi[info.name] = max(hi.get(info.name, 0.0), float(value.max()))
    return {k: (lo[k], hi[k]) for k in lo}


def run_proto(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
