"""-O3 per provider: CPU gets onnxruntime contrib ops, TensorRT only standard ONNX ops
that pass the checker; both match the original numerically."""
import onnx
import pytest

from onnxforge import optimize
from onnxforge.demo_models import small_cnn, small_encoder


def _domains(model):
    return {n.domain or "" for n in model.to_proto().graph.node}


@pytest.mark.parametrize("build", [small_cnn, small_encoder])
def test_tensorrt_profile_emits_only_default_domain(build):
    out, report = optimize(build(), level=3, provider="tensorrt")
    assert _domains(out) <= {"", "ai.onnx"}
    assert report.verification["ok"]
    onnx.checker.check_model(out.to_proto(), full_check=True)


def test_cpu_profile_fuses_encoder_into_contrib_ops():
    out, report = optimize(small_encoder(), level=3, provider="cpu")
    ops = report.after["ops"]
    assert report.verification["ok"]
    assert ops.get("com.microsoft.MultiHeadAttention", 0) == 2  # one per layer
    assert ops.get("LayerNormalization", 0) == 5  # embeddings + 2 per layer
    assert "Erf" not in ops and "Softmax" not in ops
    assert [d for d in out.graph.inputs[0].shape] == ["batch", "sequence"]  # dynamic dims stay dynamic


def test_cuda_profile_uses_contrib_ops_too():
    out, report = optimize(small_encoder(), level=3, provider="cuda")
    assert "com.microsoft" in _domains(out)
