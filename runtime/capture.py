"""Capture what onnxruntime's C++ code writes to stdout/stderr.

onnxruntime reports a provider library that fails to load only in its log
(file descriptor 2) and falls back to CPU. To turn that into a one-line reason
we redirect the process's descriptors 1 and 2 into a temporary file for the
duration of a session creation.

onnxforge's CLI raises onnxruntime's default logger to fatal-only (its lines
would interleave with ours), which also hides the library-load error that is
the reason. ``provider_log`` therefore lowers the default logger to warnings
for the capture and restores the process's level afterwards; onnxruntime has
no getter, so the level the CLI chose is kept in the environment variable
``ONNXFORGE_ORT_LOG_SEVERITY`` (``quiet_onnxruntime`` sets both).
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


ORT_DEFAULT_SEVERITY = 2  # onnxruntime's own default: warnings
SEVERITY_VARIABLE = "ONNXFORGE_ORT_LOG_SEVERITY"


def quiet_onnxruntime(severity: int = 4) -> None:
    """Raise onnxruntime's default logger to ``severity`` for this process (4: fatal only)."""
    try:
        import onnxruntime
    except ImportError:
        return
    os.environ[SEVERITY_VARIABLE] = str(severity)
    onnxruntime.set_default_logger_severity(severity)


@contextlib.contextmanager
def provider_log():
    """``captured_output`` with onnxruntime's default logger at warnings, so a
    provider library that fails to load says why; the level is restored after."""
    import onnxruntime

    try:
        restore = int(os.environ.get(SEVERITY_VARIABLE, ORT_DEFAULT_SEVERITY))
    except ValueError:
        restore = ORT_DEFAULT_SEVERITY
    with captured_output() as result:
        onnxruntime.set_default_logger_severity(min(restore, ORT_DEFAULT_SEVERITY))
        try:
            yield result
        finally:
            onnxruntime.set_default_logger_severity(restore)


ANSI = re.compile(r"\x1b\[[0-9;]*m")
LOAD_ERROR = re.compile(r"with error: ([^\n]+)")
INFO_LINE = re.compile(r"\[[IV]:onnxruntime")


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
    # Info and verbose lines (a session's own log) never say why a provider is missing.
    lines = [line.strip() for line in log.splitlines() if line.strip() and not INFO_LINE.search(line)]
    return lines[-1][:300] if lines else ""
