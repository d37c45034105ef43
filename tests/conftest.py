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


def run_proto(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
