"""``onnxforge reduce MODEL``: shrink a model to a small subgraph that still fails.

A candidate is a subset of the model's nodes. Its graph inputs are the tensors its
nodes read that no node of it makes (initializers stay initializers): the model's
inputs and the cut tensors, fed with values recorded from one run of the whole model
on the feed (``--data``, first feed; else made-up inputs). Its outputs are every
tensor its nodes make. "Fails" is one of:

  * ``--until CMD``: the shell command exits non-zero; ``{model}`` and ``{data}`` in
    it are replaced by the candidate's path and its feed (.npz). A run past
    ``--timeout`` seconds counts as not failing.
  * ``--reference ORIGINAL``: some output differs from the original's same-named
    tensor beyond rtol/atol; the cut tensors are fed with the original's values
    where it has them, so a node that computes wrongly is caught alone.
  * neither: onnxruntime (all graph optimizations) disagrees with onnx's reference
    evaluator on some output (an onnxruntime bug).

Search (each check is a step, at most ``--max-steps``): the shortest failing prefix
of the topological order (bisection), then the latest start that still fails
(bisection), then each remaining node removed alone if the rest still fails. The
bisections assume failure is monotone in the prefix/suffix; the greedy pass does
not, and the result is checked to fail. A candidate that does not build or load
does not fail (in the comparison modes). Candidates live in a temporary folder,
removed at the end; the result is written with its feed beside it (``OUT`` and
``OUT`` with ``.inputs.npz``).
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from .debug import CHUNK, _exposing, _node_outputs, _runnable
from .errors import DataError
from .inputs import checked_feeds
from .output_diff import compare_arrays
from .verify_feeds import runnable_feeds

DEFAULT_MAX_STEPS = 200
DEFAULT_TIMEOUT = 60.0
DEFAULT_RTOL, DEFAULT_ATOL = 1e-3, 1e-4


@dataclasses.dataclass
class Outcome:
    fails: bool
    why: str = ""


@dataclasses.dataclass
class ReduceResult:
    nodes: list[dict]
    steps: int
    max_steps: int
    why: str
    original_nodes: int
    inputs: list[str]
    output: str = ""
    feed: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def record_values(model, feed: dict, names: list[str], chunk: int = CHUNK) -> dict[str, np.ndarray]:
    """``names`` (node outputs) of ``model`` on ``feed``, exposed ``chunk`` at a time
    (the debug command's runner)."""
    values: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="onnxforge-reduce-") as tmp:
        path = _runnable(model, Path(tmp) / "m")
        for start in range(0, len(names), chunk):
            part = names[start:start + chunk]
            with _exposing(path, part, "the model") as run:
                got = run(feed)
            values.update({k: v for k, v in got.items() if k in set(part) and isinstance(v, np.ndarray)})
    return values


class Reducer:
    """Builds candidates of ``model`` and asks ``check(path, feed_path, inputs, outputs)``."""

    def __init__(self, model, feed: dict, values: dict[str, np.ndarray], check: Callable[..., Outcome],
                 folder: Path, max_steps: int):
        model.graph.toposort()
        self.model = model
        self.nodes = list(model.graph.nodes)
        self.feed = feed
        self.values = values  # every recorded tensor (cut inputs are fed from here)
        self.check = check
        self.folder = folder
        self.max_steps = max_steps
        self.steps = 0
        self.last_why = ""

    # ------------------------------------------------------------ candidates

    def _subgraph(self, keep: list[int]):
        """(model, inputs feed) for the nodes at positions ``keep``; None if a cut
        tensor has no recorded value."""
        cand = self.model.copy()
        nodes = list(cand.graph.nodes)  # same order as self.nodes (copy keeps it)
        chosen = [nodes[i] for i in keep]
        made = {t.name for n in chosen for t in n.outputs}
        feed, inputs, seen = {}, [], set()
        for n in chosen:
            for t in n.inputs:
                if not t.name or t.name in made or t.name in seen or isinstance(t, gs.Constant):
                    continue
                seen.add(t.name)
                value = self.values.get(t.name, self.feed.get(t.name))
                if value is None:
                    return None
                t.dtype, t.shape = value.dtype, list(value.shape)
                inputs.append(t)
                feed[t.name] = value
        outputs = [t for n in chosen for t in n.outputs
                   if t.name and getattr(t, "type", "tensor_type") == "tensor_type"]
        for t in outputs:  # types from the recording; unknown ones left for onnxruntime
            if t.name in self.values:
                t.dtype, t.shape = self.values[t.name].dtype, list(self.values[t.name].shape)
        cand.graph.nodes = chosen
        cand.graph.inputs = inputs
        cand.graph.outputs = outputs
        cand.graph.cleanup(remove_unused_graph_inputs=False)
        cand.input_order = [t.name for t in inputs]
        cand.overridable_inputs = []
        return cand, feed

    def fails(self, keep: list[int]) -> bool | None:
        """Whether the candidate fails; None when the step budget is spent."""
        if self.steps >= self.max_steps:
            return None
        self.steps += 1
        built = self._subgraph(keep)
        if built is None:
            return False
        cand, feed = built
        from .io import save

        step = self.folder / f"step{self.steps}"
        step.mkdir()
        try:
            path = save(cand, step / "candidate.onnx")
            data = step / "candidate.inputs.npz"
            _savez(data, feed)
            outcome = self.check(path, data, feed, [t.name for t in cand.graph.outputs])
        except DataError:
            raise
        except Exception as exc:  # a candidate that does not build does not reproduce
            outcome = Outcome(False, f"candidate failed to build: {exc}")
        finally:
            _remove_tree(step)
        if outcome.fails:
            self.last_why = outcome.why
        return outcome.fails

    # ------------------------------------------------------------ search

    def reduce(self) -> list[int]:
        n = len(self.nodes)
        every = list(range(n))
        if not self.fails(every):
            raise DataError("the model does not fail on this input, so there is nothing to reduce",
                            hint="check the --until command or comparison by hand on the whole model")
        lo, hi = 0, n  # shortest failing prefix: [:lo] passes (lo=0: empty), [:hi] fails
        while hi - lo > 1:
            mid = (lo + hi) // 2
            verdict = self.fails(every[:mid])
            if verdict is None:
                break
            lo, hi = (lo, mid) if verdict else (mid, hi)
        end = hi
        a, b = 0, end - 1  # [a:end] fails; the latest failing start lies in [a, b]
        while a < b:
            mid = (a + b + 1) // 2
            verdict = self.fails(every[mid:end])
            if verdict is None:
                break
            a, b = (mid, b) if verdict else (a, mid - 1)
        start = a
        keep = every[start:end]
        for i in list(keep):  # each node alone, latest first (readers before their producers)
            if len(keep) == 1:
                break
            trial = [k for k in keep if k != i]
            verdict = self.fails(trial)
            if verdict is None:
                break
            if verdict:
                keep = trial
        return keep


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------ checks


def until_check(command: str, timeout: float) -> Callable[..., Outcome]:
    def check(path: Path, data: Path, _feed, _outputs) -> Outcome:
        cmd = command.replace("{model}", shlex.quote(str(path))).replace("{data}", shlex.quote(str(data)))
        env = dict(os.environ, ONNXFORGE_REDUCE_MODEL=str(path), ONNXFORGE_REDUCE_DATA=str(data))
        try:
            done = subprocess.run(cmd, shell=True, env=env, timeout=timeout, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, errors="replace")
        except subprocess.TimeoutExpired:
            return Outcome(False, f"timed out after {timeout:g} s")
        tail = (done.stderr or "").strip().splitlines()
        return Outcome(done.returncode != 0, f"`{command}` exits {done.returncode}" + (f": {tail[-1]}" if tail else ""))
    return check


def _ort_outputs(path: Path, feed: dict, names: list[str], optimize: bool) -> dict:
    from .verify import session_for

    with session_for(path, optimize=optimize) as sess:
        wanted = [o.name for o in sess.get_outputs()]
        return dict(zip(wanted, sess.run(wanted, {i.name: feed[i.name] for i in sess.get_inputs()})))


def reference_check(reference: dict[str, np.ndarray], rtol: float, atol: float) -> Callable[..., Outcome]:
    """Fails when an output differs from the original's same-named value."""
    def check(path: Path, _data, feed: dict, outputs: list[str]) -> Outcome:
        try:
            got = _ort_outputs(path, feed, outputs, optimize=False)
        except Exception:
            return Outcome(False, "candidate does not run")
        for name in outputs:
            if name in reference and name in got:
                diff = compare_arrays(name, reference[name], got[name], rtol, atol)
                if not diff.ok:
                    return Outcome(True, f"{name} differs from the original's (max abs {diff.max_abs:.3e}, "
                                         f"max rel {diff.max_rel:.3e})")
        return Outcome(False)
    return check


def evaluator_check(rtol: float, atol: float) -> Callable[..., Outcome]:
    """Fails when onnxruntime (all optimizations) and onnx's reference evaluator disagree."""
    def check(path: Path, _data, feed: dict, outputs: list[str]) -> Outcome:
        import onnx
        from onnx.reference import ReferenceEvaluator

        try:
            got = _ort_outputs(path, feed, outputs, optimize=True)
            ref = dict(zip(outputs, ReferenceEvaluator(onnx.load(str(path))).run(outputs, feed)))
        except Exception:
            return Outcome(False, "candidate does not run on both")
        for name in outputs:
            diff = compare_arrays(name, np.asarray(ref[name]), got[name], rtol, atol)
            if not diff.ok:
                return Outcome(True, f"{name}: onnxruntime and onnx's reference evaluator differ "
                                     f"(max abs {diff.max_abs:.3e}, max rel {diff.max_rel:.3e})")
        return Outcome(False)
    return check


# ------------------------------------------------------------------ command


def reduce_file(model_path, output, *, data=None, until: str | None = None, reference_path=None,
                max_steps: int = DEFAULT_MAX_STEPS, timeout: float = DEFAULT_TIMEOUT,
                rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL) -> ReduceResult:
    from .io import check_output_paths, load_input, save, write_file

    output = Path(output)
    feed_path = output.with_name(output.name.removesuffix(".onnx") + ".inputs.npz")
    check_output_paths(output, feed_path)
    model = load_input(model_path, "the model")
    feeds = checked_feeds(model, data, "--data", limit=1) if data else runnable_feeds(model, {}, 1)
    if not feeds:
        raise DataError(f"{data}: no feeds")
    feed = feeds[0]
    model.graph.toposort()
    names = [t.name for t in _node_outputs(model.graph, set(model.value_types))]
    values = record_values(model, feed, names)
    if reference_path is not None:
        original = load_input(reference_path, "the reference model")
        ref_names = [t.name for t in _node_outputs(original.graph, set(original.value_types))]
        reference = record_values(original, feed, ref_names)
        del original
        values = {**values, **reference}  # cut tensors are fed the original's values where it has them
        check = reference_check(reference, rtol, atol)
    elif until:
        check = until_check(until, timeout)
    else:
        check = evaluator_check(rtol, atol)
    with tempfile.TemporaryDirectory(prefix="onnxforge-reduce-") as tmp:
        reducer = Reducer(model, feed, values, check, Path(tmp), max_steps)
        keep = reducer.reduce()
        reducer.max_steps += 1  # the last check is not the search's
        if reducer.fails(keep) is False:
            raise DataError("the reduced model no longer fails (the failure depends on more than one cut)",
                            hint="rerun with a larger --max-steps, or report the whole model")
        cand, cand_feed = reducer._subgraph(keep)
    save(cand, output)
    write_file(feed_path, lambda tmp: _savez(tmp, cand_feed))
    nodes = [{"name": reducer.nodes[i].name, "op": reducer.nodes[i].op} for i in keep]
    return ReduceResult(nodes, reducer.steps, max_steps, reducer.last_why, len(reducer.nodes),
                        sorted(cand_feed), str(output), str(feed_path))


def _savez(path: Path, feed: dict) -> None:
    with open(path, "wb") as f:  # a file object: numpy adds no ".npz" to the name
        np.savez(f, **feed)
