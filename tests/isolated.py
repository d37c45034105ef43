"""Run many tasks each in isolation from the test process, with a time limit per task.

Workers are spawned, not forked (forking a process that holds onnxruntime sessions can
deadlock the child), and live for many tasks (an import of onnxforge per task would cost
seconds). A task that hangs or kills its worker costs that task only: the worker is
replaced and the task reported as ``timeout`` or ``crash`` through ``on_failure``.

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


def _serve(conn, module: str, name: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    fn = getattr(importlib.import_module(module), name)
    import onnxforge.cli  # noqa: F401  (imported once per worker)

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

    def give(self, task) -> None:
        self.task, self.started = task, time.monotonic()
        self.conn.send(task)

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
                elif time.monotonic() - w.started > timeout:
                    status, value = "timeout", f"no answer after {timeout:.0f} s"
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
