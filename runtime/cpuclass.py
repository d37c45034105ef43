"""The CPU class an INT8 model is quantized for, and the warning when it runs on another.

Classes, from /proc/cpuinfo flags (x86 ``flags``, ARM ``Features``), best first:
  amx-int8, avx512-vnni, avx-vnni: int8 dot products (VPDPBUSD, TDPBUSD) accumulate
      u8 x s8 in 32 bits: 8-bit s8 weights are exact;
  avx512, avx2: no VNNI; onnxruntime's u8 x s8 GEMM kernels (VPMADDUBSW) add two
      u8 x s8 products in 16 bits and saturate (255 * 127 * 2 > 32767), so weights of
      GEMM-based kernels get 7 bits (reduce_range) or uint8 (u8 x u8 kernels widen first);
  arm-i8mm, arm-dotprod: SMMLA/UDOT int8 dot products (32-bit accumulation);
  arm, other: none of the above; unknown: no cpuinfo to read (not Linux).

``quantize`` records the class it chose formats for in the model's metadata
(``onnxforge.quantized_for``); bench, compare and run warn when a model quantized for
a class with int8 dot products runs on one without (its full-range weights saturate
there) or the reverse (its 7-bit weights give away accuracy a re-quantization keeps).
"""
from __future__ import annotations

import os
from pathlib import Path

METADATA_KEY = "onnxforge.quantized_for"
DOT_CLASSES = ("amx-int8", "avx512-vnni", "avx-vnni", "arm-i8mm", "arm-dotprod")
CLASSES = DOT_CLASSES + ("avx512", "avx2", "arm", "other", "unknown")


def read_cpuinfo() -> str | None:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def cpu_flags(cpuinfo: str) -> set[str]:
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def cpu_class(cpuinfo: str | None = None) -> str:
    """The class of the CPU ``cpuinfo`` describes (None: this machine's /proc/cpuinfo)."""
    text = read_cpuinfo() if cpuinfo is None else cpuinfo
    if text is None:
        return "unknown"
    flags = cpu_flags(text)
    for flag, name in (("amx_int8", "amx-int8"), ("avx512_vnni", "avx512-vnni"), ("avx_vnni", "avx-vnni"),
                       ("i8mm", "arm-i8mm"), ("asimddp", "arm-dotprod"), ("avx512bw", "avx512"), ("avx2", "avx2")):
        if flag in flags:
            return name
    if "asimd" in flags or "Features" in text:
        return "arm"
    return "other" if flags else "unknown"


def has_int8_dot(cls: str) -> bool:
    """True for classes whose u8 x s8 products accumulate in 32 bits; "unknown" counts as
    one (onnxruntime's full-range default is what such hosts expect)."""
    return cls in DOT_CLASSES or cls == "unknown"


def metadata_value(path: str | os.PathLike, key: str = METADATA_KEY) -> str | None:
    """``key`` from a model file's metadata_props, read from the top-level protobuf fields
    without parsing the graph (a 2 GB model costs a few seeks)."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        while handle.tell() < size:
            tag = _varint(handle)
            if tag is None:
                return None
            field, wire = tag >> 3, tag & 7
            if wire == 0:
                _varint(handle)
            elif wire == 2:
                length = _varint(handle) or 0
                if field == 14:  # ModelProto.metadata_props: StringStringEntryProto
                    entry = _entry(handle.read(length))
                    if entry.get(1) == key:
                        return entry.get(2, "")
                else:
                    handle.seek(length, os.SEEK_CUR)
            elif wire in (1, 5):
                handle.seek(8 if wire == 1 else 4, os.SEEK_CUR)
            else:
                return None  # not a ModelProto we understand: no warning rather than a wrong one
    return None


def _varint(handle) -> int | None:
    value = shift = 0
    while True:
        byte = handle.read(1)
        if not byte:
            return None
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
        shift += 7


def _entry(data: bytes) -> dict[int, str]:
    import io

    stream, out = io.BytesIO(data), {}
    while stream.tell() < len(data):
        tag = _varint(stream)
        length = _varint(stream)
        if tag is None or length is None or tag & 7 != 2:
            break
        out[tag >> 3] = stream.read(length).decode("utf-8", "replace")
    return out


def mismatch(quantized_for: str | None, here: str) -> str | None:
    """One line when a model quantized for ``quantized_for`` runs on a ``here`` CPU whose
    int8 arithmetic differs; None when they agree or either is unknown."""
    if not quantized_for or quantized_for == "unknown" or here == "unknown" or quantized_for == here:
        return None
    built, runs = has_int8_dot(quantized_for), has_int8_dot(here)
    if built and not runs:
        return (f"quantized for {quantized_for} (int8 dot products), running on {here} without them: its full-range "
                f"int8 weights can saturate onnxruntime's u8 x s8 kernels here; re-quantize on this CPU class")
    if runs and not built:
        return (f"quantized for {quantized_for} (no int8 dot products: 7-bit or uint8 weights), running on {here}: "
                f"a re-quantization on this CPU class keeps full 8-bit weights (more accurate)")
    return None


def warn_for(paths, console_print, here: str | None = None) -> list[str]:
    """Print (with ``console_print``) and return the mismatch line of each model file in ``paths``."""
    here = here or cpu_class()
    lines = []
    for path in paths:
        try:
            built = metadata_value(path)
        except OSError:
            continue
        line = mismatch(built, here)
        if line:
            lines.append(f"warning: {path}: {line}")
            console_print(lines[-1])
    return lines
