"""CPU classes (runtime/cpuclass.py): read from injected cpuinfo strings, recorded by
quantize in the model's metadata, and warned about by bench/compare/run when a model
quantized for one class runs on another. Only the last tests read this machine's CPU,
and then only to check its own class."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.cli import main
from onnxforge.passes.quant import formats
from onnxforge.runtime import cpuclass
from onnxforge.runtime.env import cpu_info

EPYC_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse sse4_2 avx avx2 fma f16c\n\n"
SKYLAKE = "model name\t: Xeon\nflags\t\t: fpu avx2 avx512f avx512bw avx512vl\n"
CASCADE = "model name\t: Xeon\nflags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n"
ALDER = "model name\t: Core\nflags\t\t: fpu avx2 avx_vnni\n"
SAPPHIRE = "flags\t\t: avx2 avx512f avx512_vnni amx_tile amx_int8 amx_bf16\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 asimddp\n"
GRAVITON3 = "Features\t: fp asimd asimddp i8mm sve bf16\n"
CORTEX_A53 = "Features\t: fp asimd evtstrm crc32\n"


@pytest.mark.parametrize("text,cls,dot", [
    (EPYC_AVX2, "avx2", False), (SKYLAKE, "avx512", False), (CASCADE, "avx512-vnni", True),
    (ALDER, "avx-vnni", True), (SAPPHIRE, "amx-int8", True), (GRAVITON2, "arm-dotprod", True),
    (GRAVITON3, "arm-i8mm", True), (CORTEX_A53, "arm", False), ("", "unknown", True),
    ("flags\t\t: fpu sse sse2\n", "other", False),
])
def test_cpu_class_from_cpuinfo(text, cls, dot):
    assert cpuclass.cpu_class(text) == cls
    assert cpuclass.has_int8_dot(cls) is dot
    assert formats.cpu_has_vnni(text) is dot


def test_formats_follow_the_class():
    from test_quant import _conv_model

    model = _conv_model()
    avx2 = formats.spec_for("cpu", model, "static", cpu="avx2")
    assert avx2.reduce_range and avx2.weight_type == "s8" and avx2.cpu_class == "avx2"
    vnni = formats.spec_for("cpu", model, "static", cpu="avx512-vnni")
    assert not vnni.reduce_range and vnni.weight_type == "s8"
    # dynamic MatMul without dot products: uint8 weights (u8 x u8, 8 bits, no saturation)
    dynamic = formats.spec_for("cpu", model, "dynamic", cpu="avx2")
    assert dynamic.weight_type == "u8" and not dynamic.reduce_range
    assert formats.spec_for("cpu", model, "dynamic", cpu="arm-dotprod").weight_type == "s8"


def test_env_reports_the_class():
    assert cpu_info(CASCADE)["class"] == "avx512-vnni"
    assert cpu_info(EPYC_AVX2)["class"] == "avx2"
    # this machine: its class is the one its own cpuinfo gives
    here = cpuclass.read_cpuinfo()
    assert cpu_info()["class"] == (cpuclass.cpu_class(here) if here else "unknown")


@pytest.mark.parametrize("built,runs,expect", [
    ("avx512-vnni", "avx2", "saturate"), ("amx-int8", "avx512", "saturate"),
    ("avx2", "avx512-vnni", "re-quantization"), ("avx2", "avx2", None), ("avx512-vnni", "avx-vnni", None),
    ("avx2", "avx512", None), (None, "avx2", None), ("avx512-vnni", "unknown", None),
])
def test_mismatch_lines(built, runs, expect):
    line = cpuclass.mismatch(built, runs)
    assert (line is None) if expect is None else (expect in line and built in line and runs in line)


def _model(tag: str | None, big: bool = False) -> onnx.ModelProto:
    w = np.ones((256, 256) if big else (2, 2), np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[1]])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    model.metadata_props.add(key="other", value="x")
    if tag:
        model.metadata_props.add(key=cpuclass.METADATA_KEY, value=tag)
    return model


def test_metadata_read_without_parsing_the_graph(tmp_path):
    onnx.save(_model("avx512-vnni", big=True), tmp_path / "a.onnx")
    onnx.save(_model(None), tmp_path / "b.onnx")
    assert cpuclass.metadata_value(tmp_path / "a.onnx") == "avx512-vnni"
    assert cpuclass.metadata_value(tmp_path / "a.onnx", "other") == "x"
    assert cpuclass.metadata_value(tmp_path / "b.onnx") is None
    (tmp_path / "c.onnx").write_bytes(b"\xff\xff\xff")
    assert cpuclass.metadata_value(tmp_path / "c.onnx") is None


@pytest.mark.parametrize("command", ["compare", "bench", "run"])
def test_commands_warn_about_a_model_for_another_class(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr(cpuclass, "cpu_class", lambda cpuinfo=None: "avx2")
    vnni, plain = tmp_path / "vnni.onnx", tmp_path / "plain.onnx"
    onnx.save(_model("avx512-vnni"), vnni)
    onnx.save(_model(None), plain)
    if command == "compare":
        args = ["compare", str(vnni), str(plain), "--samples", "1"]
    elif command == "bench":
        args = ["bench", str(plain), str(vnni), "--rounds", "2", "--warmup", "0", "--iterations", "1"]
    else:
        recipe = tmp_path / "r.toml"
        recipe.write_text('version = 1\nname = "o"\nprovider = "cpu"\n\n[[steps]]\nstep = "optimize"\nlevel = 1\n')
        args = ["run", str(recipe), str(vnni), "-o", str(tmp_path / "out.onnx")]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "quantized for avx512-vnni" in line]
    assert len(warnings) == 1 and "vnni.onnx" in warnings[0] and "avx2" in warnings[0]
    assert "plain.onnx" not in "".join(warnings)


def test_quantize_records_the_class(tmp_path):
    from test_quant import _conv_model, _feeds

    from onnxforge.passes.quant.quantize import quantize

    out, report = quantize(_conv_model(), _feeds(4), measure_latency=False, max_drop=0.5)
    here = cpuclass.cpu_class()
    assert report.quantized_for == here == out.to_proto().metadata_props[-1].value
    assert {p.key: p.value for p in out.to_proto().metadata_props}[cpuclass.METADATA_KEY] == here
    assert f"for CPU class {here}" in report.summary()
