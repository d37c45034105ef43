"""The machine a result was measured on: providers that really work, CPU model,
cores, ISA features, library versions and GPU.

``onnxruntime.get_available_providers()`` lists every provider the wheel was
built with: onnxruntime-gpu lists CUDA and TensorRT even when libcudart,
cuDNN or TensorRT are missing, and a session then silently falls back to CPU.
So each provider is probed by building a one-node session and reading
``session.get_providers()``; when it fell back, the reason is the first useful
line of onnxruntime's log.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from onnxforge.runtime.capture import first_reason, provider_log
from onnxforge.runtime.cpuclass import cpu_class, has_int8_dot

PROBED = (("cpu", "CPUExecutionProvider"), ("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider"))
# ISA features that decide which kernels MLAS and the quantizers can use.
ISA_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
    "asimd", "asimddp", "i8mm", "bf16", "sve", "sve2",  # ARM "Features"
)


@dataclass
class ProviderStatus:
    name: str  # cpu, cuda, tensorrt
    ort_name: str
    listed: bool  # in onnxruntime.get_available_providers()
    works: bool  # a session really got it
    reason: str = ""  # why not, one line


def probe_model() -> bytes:
    """A one-Relu model (input x: float[1]) for probing providers."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model.SerializeToString()


def probe_provider(name: str, ort_name: str) -> ProviderStatus:
    listed = ort_name in ort.get_available_providers()
    if not listed:
        return ProviderStatus(name, ort_name, False, False, f"this onnxruntime build ({_ort_package()}) lacks it")
    so = ort.SessionOptions()
    so.log_severity_level = 1  # library load failures are logged as errors/warnings
    with provider_log() as log:
        try:
            providers = list(dict.fromkeys([ort_name, "CPUExecutionProvider"]))
            sess = ort.InferenceSession(probe_model(), so, providers=providers)
            got = sess.get_providers()
            error = ""
        except Exception as exc:  # onnxruntime raises RuntimeError/Fail subclasses
            got, error = [], str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if ort_name in got:
        return ProviderStatus(name, ort_name, True, True)
    reason = first_reason(log.text) or error or "onnxruntime fell back to CPU without saying why"
    return ProviderStatus(name, ort_name, True, False, reason)


def probe_providers() -> list[ProviderStatus]:
    return [probe_provider(name, ort_name) for name, ort_name in PROBED]


def _ort_package() -> str:
    from importlib import metadata

    for dist in ("onnxruntime-gpu", "onnxruntime", "onnxruntime-openvino", "onnxruntime-directml"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return f"onnxruntime {ort.__version__}"


def cpu_info(cpuinfo_text: str | None = None) -> dict:
    """CPU model, logical/usable/physical cores and ISA flags from /proc/cpuinfo."""
    if cpuinfo_text is None:
        try:
            with open("/proc/cpuinfo") as handle:
                cpuinfo_text = handle.read()
        except OSError:
            cpuinfo_text = ""
    fields = _cpuinfo_fields(cpuinfo_text)
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {
        "model": fields.get("model name") or fields.get("Hardware") or platform.processor() or platform.machine(),
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "physical_cores": _physical_cores(cpuinfo_text),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "class": cpu_class(cpuinfo_text) if cpuinfo_text else "unknown",
    }


def _cpuinfo_fields(text: str) -> dict:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return fields


def _physical_cores(text: str) -> int | None:
    cores = set()
    physical_id = core_id = None
    for line in text.splitlines() + [""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical_id = value.strip()
        elif key == "core id":
            core_id = value.strip()
        elif not line.strip():
            if core_id is not None:
                cores.add((physical_id, core_id))
            physical_id = core_id = None
    return len(cores) or None


def gpu_info() -> list[dict]:
    """One dict per GPU from nvidia-smi; empty when there is none or no driver."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    query = "name,driver_version,memory.total,compute_cap"
    try:
        out = subprocess.run([smi, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            gpus.append({"name": parts[0], "driver": parts[1], "memory_mib": parts[2], "compute_capability": parts[3]})
    return gpus


def versions() -> dict:
    from onnxforge import __version__ as onnxforge_version

    return {
        "onnxforge": onnxforge_version,
        "onnxruntime": ort.__version__,
        "onnxruntime_package": _ort_package(),
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def environment() -> dict:
    """Everything above as one JSON-ready dict (recorded with every bench result)."""
    return {
        "host": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": cpu_info(),
        "gpus": gpu_info(),
        "versions": versions(),
        "providers": [asdict(p) for p in probe_providers()],
    }


def working_providers(env: dict) -> list[str]:
    return [p["name"] for p in env["providers"] if p["works"]]


def render_environment(env: dict, console=None) -> None:
    """Print ``env`` as a rich table (plain text when not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    cpu = env["cpu"]
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("host", f"{env['host']} ({env['os']})")
    table.add_row("cpu", f"{cpu['model']} [{cpu['arch']}]")
    table.add_row("cores", f"{cpu['usable_cores']} usable, {cpu['logical_cores']} logical, "
                           f"{cpu['physical_cores'] or '?'} physical")
    table.add_row("isa", " ".join(cpu["isa"]) or "-")
    if cpu.get("class"):
        dot = "int8 dot products" if has_int8_dot(cpu["class"]) else "no int8 dot products: INT8 weights 7-bit or uint8"
        table.add_row("cpu class", f"{cpu['class']} ({dot})")
    table.add_row("gpu", "; ".join(f"{g['name']} ({g['memory_mib']} MiB, driver {g['driver']})" for g in env["gpus"]) or "none")
    for key, value in env["versions"].items():
        table.add_row(key, str(value))
    for p in env["providers"]:
        state = "[green]works[/green]" if p["works"] else ("[red]unavailable[/red]" if p["listed"] else "[dim]not built in[/dim]")
        table.add_row(f"provider {p['name']}", f"{state}" + (f": {p['reason']}" if p["reason"] else ""))
    console.print(table)
