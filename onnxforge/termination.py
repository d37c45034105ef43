"""SIGTERM ends a run the way Ctrl-C does, and a child is stopped the same way.

``timeout``, job schedulers, ``docker stop`` and the fleet's per-model limit end a
process with SIGTERM, whose default action exits at once without unwinding: the
temporary folder a model was written to for verification (its weights: up to the
model's size) and a half-written output beside its target would stay on disk.
``raising_on_sigterm`` makes SIGTERM raise ``Terminated``, a ``KeyboardInterrupt``,
so the stack unwinds as for Ctrl-C and every ``finally`` and context manager
cleans up; a second SIGTERM during that cleanup is ignored (whoever sent it
escalates to SIGKILL when it must). ``stop_process`` ends a child the same way:
SIGTERM, a grace period for its cleanup, then SIGKILL.
"""
from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
from typing import Iterator

EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process SIGTERM ended
GRACE_S = 30.0  # a child's cleanup: removing temporary files, not finishing its work


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the cleanup this starts must not be cut short
    raise Terminated()


@contextlib.contextmanager
def raising_on_sigterm() -> Iterator[None]:
    """Within this block SIGTERM raises ``Terminated`` in the main thread; the previous
    handler is restored after it (off the main thread: nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_process(proc: subprocess.Popen, grace: float = GRACE_S) -> None:
    """End ``proc``: SIGTERM, then SIGKILL when it has not exited within ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
