"""Where independent work runs: this process, a pool of local processes (or
threads), or tasks on a Ray cluster.

One interface, ``Workers.run(fn, items, common)``: it calls ``fn(common, item)``
for every item and yields ``(index, Outcome)`` as each finishes (completion
order); ``gather`` puts them back in item order. ``fn`` must be a module-level
function (it is pickled to spawned processes and Ray workers); ``common`` is
sent once per worker where the backend allows it (Ray: one ``ray.put``).

A failing item never stops the others: its outcome holds the one-line error
(a Python exception, a worker process that died, a Ray task that crashed).

Ray is optional (``pip install onnxforge[ray]``): it is imported only when a
``RayWorkers`` is made, never by importing onnxforge. ``RayWorkers(address)``
joins a running cluster (``"auto"``: the one ``ray start`` made on this machine,
or the RAY_ADDRESS variable); without an address it starts a private local
one with ``num_cpus`` CPUs, and shuts it down on ``close()``.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing
import os
import platform
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator

from .errors import OptionError, first_line


@dataclasses.dataclass
class Outcome:
    ok: bool
    value: Any = None  # fn's result when ok
    error: str | None = None  # one line when not


class Workers:
    """Base: runs in this process, one item after the other."""

    kind = "in-process"

    @property
    def count(self) -> int:
        return 1

    @property
    def where(self) -> str:
        return f"this process on {platform.node()}"

    def run(self, fn: Callable[[Any, Any], Any], items: Iterable[Any], common: Any = None) -> Iterator[tuple[int, Outcome]]:
        for index, item in enumerate(items):
            try:
                yield index, Outcome(True, fn(common, item))
            except Exception as exc:  # noqa: BLE001 - reported per item
                yield index, Outcome(False, error=_one_line(exc))

    def gather(self, fn, items, common: Any = None) -> list[Outcome]:
        items = list(items)
        out: list[Outcome | None] = [None] * len(items)
        for index, outcome in self.run(fn, items, common):
            out[index] = outcome
        return out

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LocalWorkers(Workers):
    """``jobs`` spawned processes (``threads=True``: threads, for work that runs in
    its own subprocess anyway) on this machine."""

    kind = "local"

    def __init__(self, jobs: int, *, threads: bool = False):
        if jobs < 1:
            raise OptionError(f"--jobs {jobs}: must be at least 1")
        self.jobs, self.threads = jobs, threads

    @property
    def count(self) -> int:
        return self.jobs

    @property
    def where(self) -> str:
        return f"{self.jobs} local {'thread' if self.threads else 'process'}(es) on {platform.node()}"

    def run(self, fn, items, common=None):
        items = list(items)
        if self.threads:
            pool = cf.ThreadPoolExecutor(self.jobs)
        else:  # spawn: no fork of a process holding onnxruntime threads
            pool = cf.ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"))
        with pool:
            futures = {pool.submit(fn, common, item): index for index, item in enumerate(items)}
            for future in cf.as_completed(futures):
                try:
                    yield futures[future], Outcome(True, future.result())
                except BrokenProcessPool as exc:
                    yield futures[future], Outcome(False, error=f"a worker process died: {first_line(exc)}")
                except Exception as exc:  # noqa: BLE001
                    yield futures[future], Outcome(False, error=_one_line(exc))


class RayWorkers(Workers):
    """Ray tasks (one CPU each, no retries: a failure is reported, not repeated)."""

    kind = "ray"

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None):
        try:
            import ray
        except ImportError:
            raise OptionError("--ray: Ray is not installed", hint="pip install 'onnxforge[ray]'") from None
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "configure_logging": False}
            if address:
                kwargs["address"] = address
            else:
                kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
            try:
                ray.init(**kwargs)
            except Exception as exc:  # noqa: BLE001 - no cluster at that address, ...
                raise OptionError(f"--ray {address or ''}: cannot join the Ray cluster: {first_line(exc)}".replace("  ", " "),
                                  hint="start one with `ray start --head`, or give its address (ray://HOST:10001 or HOST:6379)") from None
            self.started = True
        self.address = address

    @property
    def count(self) -> int:
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    @property
    def where(self) -> str:
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        return f"Ray cluster ({len(nodes)} node(s), {self.count} CPU(s))"

    def run(self, fn, items, common=None):
        ray = self.ray
        remote = ray.remote(num_cpus=1, max_retries=0)(fn)
        shared = ray.put(common)
        pending = {remote.remote(shared, item): index for index, item in enumerate(items)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                try:
                    yield index, Outcome(True, ray.get(ref))
                except ray.exceptions.RayTaskError as exc:
                    yield index, Outcome(False, error=_one_line(exc.cause if exc.cause is not None else exc))
                except ray.exceptions.RayError as exc:  # the worker died, the node went away
                    yield index, Outcome(False, error=f"Ray task failed: {first_line(exc)}")

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False


def make_workers(jobs: int | None = None, ray: str | bool | None = None, *, threads: bool = False) -> Workers:
    """``ray``: None/False: local (``threads``: for work that starts its own processes);
    True or "": a private local Ray; "auto" or an address: that cluster."""
    if ray is None or ray is False:
        return LocalWorkers(jobs or 1, threads=threads) if (jobs or 1) > 1 else Workers()
    return RayWorkers(None if ray is True or ray == "" else ray, num_cpus=jobs)


def host_name() -> str:
    return platform.node()


def _one_line(exc: BaseException) -> str:
    from .errors import OnnxForgeError

    if isinstance(exc, OnnxForgeError):
        return exc.message.splitlines()[0] if exc.message else type(exc).__name__
    return f"{type(exc).__name__}: {first_line(exc)}"
