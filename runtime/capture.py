"""Capture what onnxruntime's C++ code writes to stdout/stderr.

onnxruntime reports a provider library that fails to load only in its log
(file descriptor 2) and falls back to CPU. To turn that into a one-line reason
we redirect the process's descriptors 1 and 2 into a temporary file for the
duration of a session creation.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass


@dataclass
class Captured:
    text: str = ""


@contextlib.contextmanager
def captured_output():
    """Redirect fds 1 and 2 to a temporary file; ``.text`` holds it afterwards."""
    result = Captured()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            # Python-level prints (onnxruntime's "EP Error" banner) go nowhere either.
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
                    contextlib.redirect_stderr(devnull):
                yield result
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            result.text = sink.read().decode("utf-8", "replace")


ANSI = re.compile(r"\x1b\[[0-9;]*m")
LOAD_ERROR = re.compile(r"with error: ([^\n]+)")


def first_reason(log: str) -> str:
    """The most useful single line of an onnxruntime provider failure log."""
    log = ANSI.sub("", log)
    match = LOAD_ERROR.search(log)
    if match:
        return match.group(1).strip()
    for line in log.splitlines():
        line = line.strip()
        if "Failed to create" in line or "Please install" in line or "EP Error" in line:
            return re.sub(r"^.*?\] ", "", line)[:300]
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
