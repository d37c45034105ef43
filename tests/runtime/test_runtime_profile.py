"""Deployment profiles: round trip, sessions from profiles, and every refusal."""
import json

import numpy as np
import onnx
import onnx.parser
import pytest

from onnxforge.errors import OptionError, ProviderError
from onnxforge.runtime import Profile, default_profile, load_profile, profile_path_for, save_profile, session
from onnxforge.runtime.env import probe_provider
from onnxforge.runtime.options import build_session_options

TINY = """
<ir_version: 8, opset_import: ["" : 17]>
tiny (float[2, 4] x) => (float[2, 3] y) {
    w = Constant <value = float[4, 3] {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}> ()
    m = MatMul(x, w)
    y = Relu(m)
}
"""


@pytest.fixture
def tiny_path(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(onnx.parser.parse_model(TINY), path)
    return path


def test_profile_path_is_beside_the_model(tmp_path):
    assert profile_path_for(tmp_path / "model.onnx") == tmp_path / "model.profile.json"


@pytest.mark.parametrize("provider", ["cpu", "cuda", "tensorrt"])
def test_round_trip(tmp_path, provider):
    prof = default_profile(provider, cache_dir=tmp_path / "cache")
    prof.session_options.update(intra_op_num_threads=2, allow_spinning=False, execution_mode="parallel")
    path = save_profile(prof, tmp_path / "p.json")
    loaded = load_profile(path)
    assert loaded.to_dict() == prof.validated().to_dict()
    assert loaded.primary == provider
    assert json.loads(path.read_text())["version"] == 1


def test_values_are_normalized():
    prof = Profile.from_dict({"schema": "onnxforge.profile", "version": 1,
                              "providers": [{"name": "CUDAExecutionProvider",
                                             "options": {"use_tf32": "0", "cudnn_conv_algo_search": "heuristic"}}],
                              "session_options": {"intra_op_num_threads": "3", "enable_mem_pattern": "false"}})
    assert prof.primary == "cuda"
    assert prof.providers[0].options == {"use_tf32": False, "cudnn_conv_algo_search": "HEURISTIC"}
    assert prof.session_options == {"intra_op_num_threads": 3, "enable_mem_pattern": False}


def _doc(**changes):
    doc = {"schema": "onnxforge.profile", "version": 1, "providers": [{"name": "cpu", "options": {}}],
           "session_options": {}}
    doc.update(changes)
    return doc


REFUSALS = [
    (_doc(schema="other"), OptionError, "not an onnxforge profile"),
    (_doc(version=2), OptionError, "newer"),
    (_doc(version=True), OptionError, "version"),
    (_doc(colour="blue"), OptionError, "unknown key 'colour'"),
    (_doc(providers=[]), OptionError, "non-empty"),
    (_doc(providers=[{"name": "tpu"}]), ProviderError, "unknown provider 'tpu'"),
    (_doc(providers=[{"name": "cpu"}, {"name": "CPUExecutionProvider"}]), ProviderError, "listed twice"),
    (_doc(providers=[{"name": "cpu", "opts": {}}]), OptionError, "each provider"),
    (_doc(providers=[{"name": "cpu", "options": {"use_arena": True}}]), ProviderError, "unknown option 'use_arena'"),
    (_doc(session_options={"intra_op_threads": 2}), OptionError, "unknown option 'intra_op_threads'"),
    (_doc(session_options={"intra_op_num_threads": -1}), OptionError, "must be >= 0"),
    (_doc(session_options={"intra_op_num_threads": 1.5}), OptionError, "expected an integer"),
    (_doc(session_options={"execution_mode": "fast"}), OptionError, "expected one of"),
    (_doc(session_options={"graph_optimization_level": "max"}), OptionError, "expected one of"),
    (_doc(session_options={"allow_spinning": "maybe"}), OptionError, "true/false"),
    (_doc(providers=[{"name": "cuda", "options": {"cudnn_conv_algo_search": "FAST"}}]), ProviderError, "EXHAUSTIVE"),
    (_doc(providers=[{"name": "cuda", "options": {"device_id": -1}}]), ProviderError, ">= 0"),
    (_doc(providers=[{"name": "cuda", "options": {"enable_cuda_graph": True, "io_binding": False}}]),
     ProviderError, "needs io_binding"),
    (_doc(providers=[{"name": "tensorrt", "options": {"trt_builder_optimization_level": 7}}]), ProviderError, "<= 5"),
    (_doc(providers=[{"name": "tensorrt", "options": {"trt_profile_min_shapes": "x:1x3"}}]), ProviderError,
     "all of trt_profile"),
    (_doc(providers=[{"name": "tensorrt", "options": {"trt_profile_min_shapes": "x:4x3", "trt_profile_opt_shapes": "x:2x3",
                                                      "trt_profile_max_shapes": "x:8x3"}}]), ProviderError, "min <= opt"),
    (_doc(providers=[{"name": "tensorrt", "options": {"trt_profile_min_shapes": "x1x3", "trt_profile_opt_shapes": "x:2x3",
                                                      "trt_profile_max_shapes": "x:8x3"}}]), ProviderError, "expected name"),
    (_doc(providers=[{"name": "tensorrt", "options": {"trt_engine_cache_enable": False,
                                                      "trt_engine_cache_path": "/tmp/e"}}]), ProviderError, "is off"),
]


@pytest.mark.parametrize("doc,error,fragment", REFUSALS, ids=[r[2] for r in REFUSALS])
def test_invalid_profiles_are_refused_with_one_line(doc, error, fragment, tmp_path):
    path = tmp_path / "bad.profile.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(error) as info:
        load_profile(path)
    assert fragment in info.value.message
    assert "\n" not in info.value.message and str(path) in info.value.message


def test_unreadable_profile_files(tmp_path):
    with pytest.raises(OptionError, match="no such profile"):
        load_profile(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(OptionError, match="not a readable JSON profile"):
        load_profile(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(OptionError, match="JSON object"):
        load_profile(tmp_path / "list.json")


def test_save_refuses_invalid_profile_and_leaves_no_file(tmp_path):
    prof = default_profile("cpu")
    prof.session_options["intra_op_num_threads"] = -4
    with pytest.raises(OptionError):
        save_profile(prof, tmp_path / "p.json")
    assert list(tmp_path.iterdir()) == []


def test_session_options_reach_onnxruntime():
    so = build_session_options({"intra_op_num_threads": 3, "allow_spinning": False, "denormal_as_zero": True,
                                "graph_optimization_level": "basic", "execution_mode": "parallel"})
    assert so.intra_op_num_threads == 3
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.get_session_config_entry("session.set_denormal_as_zero") == "1"
    assert str(so.graph_optimization_level).endswith("ORT_ENABLE_BASIC")
    assert str(so.execution_mode).endswith("ORT_PARALLEL")


def test_session_from_proto_and_profile_dict(tiny_path):
    proto = onnx.load(tiny_path)
    x = np.ones((2, 4), np.float32)
    expected = np.maximum(x @ np.arange(1, 13, dtype=np.float32).reshape(4, 3), 0)
    for model in (proto, tiny_path, str(tiny_path), proto.SerializeToString()):
        sess = session(model, profile={**_doc(), "session_options": {"intra_op_num_threads": 1}})
        np.testing.assert_allclose(sess.run(None, {"x": x})[0], expected)


def test_auto_profile_is_read_from_beside_the_model(tiny_path):
    beside = profile_path_for(tiny_path)
    beside.write_text(json.dumps(_doc(session_options={"intra_op_num_threads": "many"})))
    with pytest.raises(OptionError, match="expected an integer"):
        session(tiny_path)  # "auto" found and validated the beside profile
    assert session(tiny_path, profile=None).get_providers() == ["CPUExecutionProvider"]
    beside.write_text(json.dumps(_doc(session_options={"intra_op_num_threads": 1})))
    assert session(tiny_path).get_providers() == ["CPUExecutionProvider"]


def test_session_refuses_silent_fallback_from_a_missing_gpu_provider(tiny_path):
    status = probe_provider("cuda", "CUDAExecutionProvider")
    if status.works:
        pytest.skip("CUDA works here: nothing falls back")
    with pytest.raises(ProviderError, match="fell back|lacks|cannot create"):
        session(tiny_path, profile=None, provider="cuda")
    # strict=False accepts the fallback on purpose
    if status.listed:
        assert session(tiny_path, profile=None, provider="cuda", strict=False).get_providers() == ["CPUExecutionProvider"]


def test_session_refuses_a_bad_model(tmp_path):
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(ProviderError, match="cannot create a session"):
        session(path, profile=None)
