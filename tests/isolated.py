"""Run many tasks each in isolation from the test process, with a time limit per task.

Workers are spawned, not forked (forking a process that holds onnxruntime sessions can
deadlock the child), and live for many tasks (an import of onnxforge per task would cost
seconds). A task that hangs or kills its worker costs that task only: the worker is
replaced and the task reported as ``timeout`` or ``crash`` through ``on_failure``.

The time limit counts the worker's CPU time where /proc gives it, so a busy machine
(CI runners, several jobs on two cores) does not turn slow tasks into timeouts; a
task that waits without computing (a deadlock) is still stopped at WALL_FACTOR times
the limit of wall time.

``run(tasks, fn, ...)``: ``fn`` must be importable by the worker (a module-level function
of a module on the tests' path); it is called as ``fn(task)`` and returns the result.
"""
from __future__ import annotations

import importlib
import multiprocessing
import os
import sys
import time
from typing import Callable

TESTS = os.path.dirname(os.path.abspath(__file__))
WALL_FACTOR = 5


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (its threads included), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _serve(conn, module: str, name: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    fn = getattr(importlib.import_module(module), name)
    import onnxforge.cli  # noqa: F401  (imported once per worker)

    conn.send(("ready", None))  # the import's CPU time is not the first task's
    while True:
        task = conn.recv()
        if task is None:
            return
        try:
            result = ("ok", fn(task))
        except BaseException as exc:  # the task's own failure is its result to judge
            lines = str(exc).strip().splitlines()
            result = ("error", f"{type(exc).__name__}: {lines[0][:200] if lines else ''}")
        conn.send(result)


class _Worker:
    def __init__(self, ctx, fn: Callable):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, fn.__module__, fn.__name__), daemon=True)
        self.proc.start()
        child.close()
        self.task = None
        self.started = 0.0
        self.cpu_started: float | None = None
        self.ready = False

    def give(self, task) -> None:
        if not self.ready:
            try:  # a worker that died importing shows up as a crash of its first task
                if self.conn.poll(300):
                    self.conn.recv()
            except (EOFError, OSError):
                pass
            self.ready = True
        self.task, self.started = task, time.monotonic()
        self.cpu_started = _cpu_seconds(self.proc.pid)
        try:
            self.conn.send(task)
        except OSError:
            pass

    def over(self, timeout: float) -> bool:
        """Past the limit: CPU time where known (and a wall cap), else wall time."""
        wall = time.monotonic() - self.started
        cpu = _cpu_seconds(self.proc.pid) if self.cpu_started is not None else None
        if cpu is None:
            return wall > timeout
        return cpu - self.cpu_started > timeout or wall > WALL_FACTOR * timeout

    def stop(self, kill: bool = False) -> None:
        if not kill:
            try:
                self.conn.send(None)
            except OSError:
                kill = True
        if kill:
            self.proc.kill()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def run(tasks: list, fn: Callable, *, jobs: int = 2, timeout: float = 60.0,
        on_failure: Callable[[object, str, str], object], on_result: Callable | None = None) -> list:
    """Results of ``fn(task)`` in completion order. ``on_failure(task, status, detail)``
    makes the result of a task that raised (``error``), hung (``timeout``) or killed its
    worker (``crash``)."""
    ctx = multiprocessing.get_context("spawn")
    pending = list(tasks)
    workers = [_Worker(ctx, fn) for _ in range(max(1, min(jobs, len(tasks))))]
    results: list = []
    try:
        while pending or any(w.task is not None for w in workers):
            for w in workers:
                if w.task is None and pending:
                    w.give(pending.pop(0))
            time.sleep(0.01)
            for i, w in enumerate(workers):
                if w.task is None:
                    continue
                status, value = None, None
                if w.conn.poll():
                    try:
                        status, value = w.conn.recv()
                    except (EOFError, OSError):
                        status, value = "crash", f"worker died (exit {w.proc.exitcode})"
                elif not w.proc.is_alive():
                    status, value = "crash", f"worker died (exit {w.proc.exitcode})"
                elif w.over(timeout):
                    status, value = "timeout", f"no answer after {timeout:.0f} s of CPU time"
                if status is None:
                    continue
                result = value if status == "ok" else on_failure(w.task, status, value)
                if status in ("crash", "timeout"):
                    w.stop(kill=True)
                    workers[i] = w = _Worker(ctx, fn)
                w.task = None
                results.append(result)
                if on_result:
                    on_result(result)
    finally:
        for w in workers:
            w.stop()
    return results
