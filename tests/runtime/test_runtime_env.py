"""Environment detection: CPU facts from /proc/cpuinfo text, real provider probing."""
import io
import json

import pytest

from rich.console import Console

from onnxforge.runtime import env
from onnxforge.runtime.capture import captured_output, first_reason

CPUINFO = """processor\t: 0
model name\t: Test CPU 9000
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_vnni amx_tile amx_int8

processor\t: 1
model name\t: Test CPU 9000
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_vnni amx_tile amx_int8

processor\t: 2
model name\t: Test CPU 9000
physical id\t: 0
core id\t\t: 1
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_vnni amx_tile amx_int8
"""


def test_cpu_info_reads_model_isa_and_physical_cores():
    info = env.cpu_info(CPUINFO)
    assert info["model"] == "Test CPU 9000"
    assert info["physical_cores"] == 2  # three logical CPUs on two cores (SMT)
    assert {"avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"} <= set(info["isa"])
    assert "avx512_bf16" not in info["isa"] and "fpu" not in info["isa"]


def test_cpu_info_on_arm_features_line():
    info = env.cpu_info("processor\t: 0\nFeatures\t: fp asimd asimddp i8mm sve\nCPU part\t: 0xd40\n")
    assert {"asimd", "asimddp", "i8mm", "sve"} <= set(info["isa"])


def test_cpu_provider_really_works_and_others_say_why_not():
    statuses = env.probe_providers()
    by_name = {s.name: s for s in statuses}
    assert by_name["cpu"].works and by_name["cpu"].listed
    for status in statuses:
        if not status.works:
            assert status.reason and "\n" not in status.reason


def test_environment_is_json_and_renders():
    data = env.environment()
    json.dumps(data)
    assert data["versions"]["onnxruntime"] and data["cpu"]["usable_cores"] >= 1
    assert "cpu" in env.working_providers(data)
    out = io.StringIO()
    env.render_environment(data, Console(file=out, width=200))
    text = out.getvalue()
    assert "provider cpu" in text and "onnxruntime" in text


def test_first_reason_picks_the_library_error():
    log = ("\x1b[1;31m2026 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] ... Failed to load "
           "library libonnxruntime_providers_cuda.so with error: libcublasLt.so.12: cannot open shared object file\n"
           "\x1b[m\n[W:onnxruntime] Failed to create CUDAExecutionProvider. Require cuDNN 9.*\n")
    assert first_reason(log) == "libcublasLt.so.12: cannot open shared object file"
    assert "Failed to create CUDAExecutionProvider" in first_reason("[W:onnxruntime:x] Failed to create CUDAExecutionProvider.")
    assert first_reason("") == ""


def test_captured_output_catches_fd_level_writes():
    import os

    with captured_output() as cap:
        os.write(2, b"from C code\n")
        print("from python")
    assert "from C code" in cap.text


def test_first_reason_skips_a_sessions_info_lines():
    log = ("2026 [I:onnxruntime:, inference_session.cc:2767 operator()] Initializing session.\n"
           "2026 [I:onnxruntime:, inference_session.cc:3296 operator()] Session successfully initialized.\n")
    assert first_reason(log) == ""


def test_a_missing_gpu_provider_says_why_after_the_cli_quieted_onnxruntime(monkeypatch):
    """The CLI sets onnxruntime's default logger to fatal-only; the probe must still
    see the library-load error, not a session's info line, and restore the level."""
    import onnxruntime as ort

    from onnxforge.runtime.capture import SEVERITY_VARIABLE, captured_output, quiet_onnxruntime

    monkeypatch.setenv(SEVERITY_VARIABLE, "2")
    quiet_onnxruntime(4)
    try:
        status = env.probe_provider("cuda", "CUDAExecutionProvider")
        if not status.listed or status.works:
            pytest.skip("needs an onnxruntime build that lists CUDA without a usable GPU")
        assert status.reason and "[I:" not in status.reason and "Session" not in status.reason
        with captured_output() as after:  # quiet again: a failing provider logs nothing now
            ort.InferenceSession(env.probe_model(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        assert "Failed to" not in after.text
    finally:
        quiet_onnxruntime(2)
