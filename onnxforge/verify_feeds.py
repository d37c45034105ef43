"""Inputs the original model runs on, found before any pass runs.

Seeded inputs (``inputs.seeded_feeds``) fit most models. Some need more: a dim of at
least N samples (audio front-ends), a Reshape that needs one size, indices or shapes
fed as inputs, sequence and optional inputs, rank-0 bools. When the seeded inputs do
not run, candidates are tried in a fixed order, a bounded number of times, on one
onnxruntime session of the original:

1. the seeded sizes with other values for integer inputs: zeros (always a valid
   index), then ones with -1 last where the input is a Reshape target;
2. for a decoder, an empty cache, so a mask of the total length (past + new) is as long
   as the new sequence: 0 for each dim named ``past*`` and each dynamic dim (but the
   batch) of a cache input, one named so (``past_key_values.*``, ``*cache*``) or
   concatenated straight into a graph output (``present = Concat(past, new)``), whatever
   its dims are called (dynamo exports name them ``s0``, ``s1``...);
3. a ladder of sizes for the dynamic dims (every dim but the first, then all of them),
   larger than the defaults first, then smaller from large to small, with the seeded
   values, then with zeros for integers.

Dims the user pinned (``--input-shape``, ``--verify-shape``) never vary. Candidates
over ``MAX_ELEMENTS`` are skipped, and so are those whose node outputs would hold more
than ``intermediate_budget()`` elements by an estimate from onnx shape inference (see
``intermediate_elements``: dims inference leaves unknown, as a decoder's attention over
a guessed cache length, count as quadratic in the made-up size), so a decoder is not run
at a cache length whose attention would not fit in memory. So the search is bounded by
a count of runs and a size, and the same model always gets the same inputs (the budget
depends on physical memory, not on the load). One safety net uses a clock: a run
that uses more than ``RUN_LIMIT_S`` seconds of this process's CPU time (a model that
blows up on made-up inputs) is stopped and ends the search, reported as such; it only
cuts the search short. CPU time, not wall time, so a busy machine (where a run's wall
time stretches with the load) does not change which inputs a model gets; a wall-clock
cap of ``RUN_LIMIT_WALL_S`` keeps a run bounded anyway.

Just over 400 lines on purpose: the candidate order above, the memory budget that bounds it and
the bounded run that tries it are one search; splitting them would scatter its bounds.
"""
from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Mapping

import numpy as np
import onnx

from .errors import first_line
from .inputs import default_dim, graph_of, index_bounds, seeded_values

MAX_TRIES = 24
RUN_LIMIT_S = 30.0  # CPU seconds of this process (onnxruntime's threads included)
RUN_LIMIT_WALL_S = 900.0  # the outer bound, whatever the load
MAX_ELEMENTS = 1 << 26  # 64 M elements over all inputs of one candidate
# Larger sizes first (audio front-ends need >= 400 samples), then smaller ones from large
# to small: the largest size a model accepts verifies the most (OCR recognizers of height
# 48 run at 64 here, not at 1).
SIZE_LADDER = (400, 512, 1024, 2048, 4096, 16000, 256, 128, 64, 32, 16, 8, 4, 3, 2, 1)
ALL_DIMS_LADDER = (2, 3, 4)

_ORT_TYPES = {
    "float": np.float32, "double": np.float64, "float16": np.float16, "bool": np.bool_, "string": np.object_,
    "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
    "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One graph input as onnxruntime sees it: ``kind`` tensor|seq|optional-tensor|optional-seq|map."""

    name: str
    kind: str
    dtype: np.dtype | None
    shape: tuple  # ints, or dim names / None for dynamic dims


def input_specs(session) -> list[InputSpec]:
    specs = []
    for arg in session.get_inputs():
        kind, elem = _parse_type(arg.type)
        shape = tuple(arg.shape) if arg.shape is not None and kind in ("tensor", "optional-tensor") else ()
        specs.append(InputSpec(arg.name, kind, np.dtype(_ORT_TYPES[elem]) if elem in _ORT_TYPES else None, shape))
    return specs


def _parse_type(text: str) -> tuple[str, str | None]:
    """'seq(tensor(float))' -> ('seq', 'float'); 'optional(tensor(int64))' -> ('optional-tensor', 'int64')."""
    m = re.fullmatch(r"(optional\()?(seq\()?tensor\((\w+)\)\)?\)?", text)
    if m:
        kind = "seq" if m.group(2) else "tensor"
        return ("optional-" + kind) if m.group(1) else kind, m.group(3)
    return ("map" if text.startswith("map") else "other"), None


def candidate_plans(specs: list[InputSpec], pinned: Mapping[str, tuple],
                    caches: frozenset[str] = frozenset()) -> list[tuple[str, dict, str]]:
    """(label, {name: shape}, value strategy) in the order they are tried; ``caches``: the
    inputs that hold a decoder's cache (``cache_inputs``)."""
    default = {s.name: _shape(s, pinned, None, True) for s in specs}
    plans = [("seeded", default, "seeded"), ("zeros for integers", default, "zeros"),
             ("ones for integers", default, "ones")]
    dynamic = any(d is None or isinstance(d, str) for s in specs if s.name not in pinned for d in s.shape)
    if any(_is_past(s, i, caches) for s in specs if s.name not in pinned for i in range(len(s.shape))):
        # a decoder's first step: an empty cache, so the mask's total length is the sequence's
        plans.append(("an empty past", {s.name: _shape(s, pinned, None, True, caches) for s in specs}, "seeded"))
    if dynamic:
        for size in SIZE_LADDER:
            plans.append((f"dynamic dims {size}", {s.name: _shape(s, pinned, size, True) for s in specs}, "seeded"))
        for size in ALL_DIMS_LADDER:
            plans.append((f"all dynamic dims {size}", {s.name: _shape(s, pinned, size, False) for s in specs}, "seeded"))
        for size in SIZE_LADDER:
            plans.append((f"dynamic dims {size}, zeros", {s.name: _shape(s, pinned, size, True) for s in specs}, "zeros"))
    seen, unique = set(), []
    for label, shapes, values in plans:
        key = (tuple(sorted(shapes.items())), values)
        if key not in seen:
            seen.add(key)
            unique.append((label, shapes, values))
    return unique


_CACHE_NAME = re.compile(r"past|cache", re.IGNORECASE)


def cache_inputs(graph) -> frozenset[str]:
    """Graph inputs that hold a decoder's cache: named so, or concatenated straight into a
    graph output (a present = Concat(past, new))."""
    outputs = {t.name for t in graph.outputs}
    return frozenset(t.name for t in graph.inputs if _CACHE_NAME.search(t.name) or any(
        node.op == "Concat" and any(o.name in outputs for o in node.outputs) for node in t.outputs))


def _is_past(spec: InputSpec, index: int, caches: frozenset[str]) -> bool:
    """A dim an empty cache makes 0: named ``past*``, or dynamic (but the batch) in a cache input."""
    dim = spec.shape[index]
    if isinstance(dim, int) and dim >= 0:
        return False
    return (isinstance(dim, str) and "past" in dim.lower()) or (spec.name in caches and index > 0)


def _shape(spec: InputSpec, pinned: Mapping[str, tuple], size: int | None, keep_first: bool,
           caches: frozenset[str] | None = None) -> tuple[int, ...]:
    """``caches`` given: the empty-past shapes (see ``_is_past``)."""
    if spec.name in pinned:
        return tuple(pinned[spec.name])
    dims = []
    for i, d in enumerate(spec.shape):
        if isinstance(d, int) and d >= 0:
            dims.append(d)
        elif caches is not None and _is_past(spec, i, caches):
            dims.append(0)
        elif size is None or (keep_first and i == 0 and len(spec.shape) > 1):
            dims.append(default_dim(i, d, spec.shape))
        else:
            dims.append(size)
    return tuple(dims)


def make_feed(specs: list[InputSpec], shapes: Mapping[str, tuple], values: str, bounds: Mapping[str, int],
              reshape_targets: set[str], seed: int) -> dict | None:
    """One feed dict, or None when it would exceed ``MAX_ELEMENTS``."""
    if sum(int(np.prod(shapes[s.name], dtype=np.int64)) for s in specs) > MAX_ELEMENTS:
        return None
    feed = {}
    for spec in specs:
        rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
        dtype = spec.dtype if spec.dtype is not None else np.dtype(np.float32)
        shape = shapes[spec.name]
        if spec.kind in ("seq", "optional-seq"):
            shape = shape or (2, 3)
            feed[spec.name] = [_tensor(spec.name, shape, dtype, values, bounds, set(), rng) for _ in range(2)]
        elif spec.kind in ("tensor", "optional-tensor"):
            feed[spec.name] = _tensor(spec.name, shape, dtype, values, bounds, reshape_targets, rng)
        else:
            return None  # maps and other types are not fed from Python
    return feed


def _tensor(name, shape, dtype, values, bounds, reshape_targets, rng) -> np.ndarray:
    integer = np.issubdtype(dtype, np.integer)
    if integer and values == "zeros":
        return np.zeros(shape, dtype)
    if integer and values == "ones":
        out = np.ones(shape, dtype)
        if name in reshape_targets and out.size:
            out.reshape(-1)[-1] = -1
        return out
    # np.asarray: a rank-0 bool comes back from numpy as a scalar, which onnxruntime refuses.
    return np.asarray(seeded_values(name, shape, dtype, bounds.get(name), rng), dtype=dtype)


def reshape_target_inputs(graph) -> set[str]:
    names = set()
    for inp in graph.inputs:
        for node in inp.outputs:
            if node.op == "Reshape" and len(node.inputs) > 1 and node.inputs[1] is inp:
                names.add(inp.name)
    return names


@dataclasses.dataclass
class FoundInputs:
    feeds: list[dict] | None
    reference: list[list] | None
    label: str
    tries: int
    error: str = ""
    plan: tuple | None = None  # (shapes, values) of the candidate that ran


MAX_INTERMEDIATE = 1 << 29  # elements all node outputs of one run may hold (2 GiB of float32)


def intermediate_budget() -> int:
    """Elements one made-up run may hold: ``MAX_INTERMEDIATE``, less on a machine with
    under 16 GiB of memory (an eighth of it, in float32). Physical memory, not free
    memory: the inputs a model gets must not depend on the load."""
    import os

    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return MAX_INTERMEDIATE
    return max(1 << 20, min(MAX_INTERMEDIATE, physical // 8 // 4))


def made_up_dims(specs: list[InputSpec], pinned: Mapping[str, tuple], shapes: Mapping[str, tuple]) -> tuple[int, int]:
    """The largest dim of ``shapes`` that was made up (dynamic in the model, not pinned),
    and the largest made-up first dim of an input of rank 2 or more (a batch)."""
    dims = [(i, len(s.shape), int(shapes[s.name][i])) for s in specs if s.name not in pinned and s.name in shapes
            for i, d in enumerate(s.shape) if not (isinstance(d, int) and d >= 0) and i < len(shapes[s.name])]
    return (max((v for _, _, v in dims), default=1),
            max((v for i, rank, v in dims if i == 0 and rank > 1), default=1))


def _weightless(model) -> onnx.ModelProto:
    from .io import checker_view
    from .model import Model
    from .shared_weights import lifted_proto

    return lifted_proto(model)[0] if isinstance(model, Model) else checker_view(model)


def intermediate_elements(light: onnx.ModelProto, shapes: Mapping[str, tuple], made_up: int = 1,
                          batch: int = 1) -> int | None:
    """Elements all node outputs would hold for these input shapes, by onnx shape
    inference on a weightless copy; None when inference cannot run.

    Inference leaves some dims unknown (a Range or Slice whose bounds come from input
    shapes: an attention mask [S, P+S] built from Shape ops), and those are the tensors
    that grow fastest with made-up sizes. So an unknown dim counts as ``2 * made_up`` (the
    largest made-up dim: a past and a new sequence concatenated), for at most two dims
    of a tensor (quadratic growth; the rest count 1), except the first dim of a tensor
    of rank 2 or more, which counts as ``batch`` (the largest made-up first dim); an
    output inference says nothing of counts as its largest input. An estimate, meant to
    be on the high side."""
    probe = onnx.ModelProto()
    probe.CopyFrom(light)
    del probe.graph.value_info[:]
    for info in probe.graph.input:
        if info.name in shapes and info.type.HasField("tensor_type"):
            dims = info.type.tensor_type.shape
            dims.Clear()
            for d in shapes[info.name]:
                dims.dim.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception:
        return None
    unknown = 2 * max(int(made_up), 1)
    sizes: dict[str, float] = {name: float(np.prod(shape, dtype=np.float64)) for name, shape in shapes.items()}
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            sizes[info.name] = _elements(info.type.tensor_type.shape.dim, unknown, max(int(batch), 1))
    total = 0.0
    for node in inferred.graph.node:
        for out in node.output:
            if out and out not in sizes:
                sizes[out] = max((sizes.get(i, 0.0) for i in node.input if i), default=0.0)
            total += sizes.get(out, 0.0)
    return int(total)


def _elements(dims, unknown: int, batch: int) -> float:
    count, free = 1.0, 2
    for i, d in enumerate(dims):
        if d.HasField("dim_value"):
            count *= d.dim_value
        elif i == 0 and len(dims) > 1:
            count *= batch
        elif free:
            count, free = count * unknown, free - 1
    return count


def find_inputs(model, session_factory, pinned: Mapping[str, tuple], seed: int = 0) -> FoundInputs:
    """The first candidate the original runs on. ``session_factory()`` opens the session
    (a model that onnxruntime cannot load is bad input: its error propagates)."""
    with session_factory() as session:
        specs = input_specs(session)
        graph = graph_of(model)
        bounds = index_bounds(graph)
        targets = reshape_target_inputs(graph)
        names = [s.name for s in specs]
        tries, last_error, light, sizes, budget = 0, "", None, {}, intermediate_budget()
        for label, shapes, values in candidate_plans(specs, pinned, cache_inputs(graph)):
            if tries >= MAX_TRIES:
                break
            feed = make_feed(specs, shapes, values, bounds, targets, seed)
            if feed is None:
                continue
            key = tuple(sorted(shapes.items()))
            if key not in sizes:  # a run that would blow up is not tried (the clock cannot stop one kernel)
                light = light if light is not None else _weightless(model)
                sizes[key] = intermediate_elements(light, shapes, *made_up_dims(specs, pinned, shapes))
            if sizes[key] is not None and sizes[key] > budget:
                last_error = (f"{label} inputs would make about {sizes[key]:.3g} intermediate elements, over the "
                              f"{budget:.3g} allowed; give sizes with --input-shape")
                continue
            tries += 1
            try:
                outputs = _bounded_run(session, {n: feed[n] for n in names})
            except _TooLong:
                return FoundInputs(None, None, "", tries, f"a run on {label} inputs took over {RUN_LIMIT_S:.0f} s "
                                   f"of CPU time (or {RUN_LIMIT_WALL_S:.0f} s in all) and was stopped")
            except Exception as exc:
                last_error = first_line(exc, limit=200)
                continue
            return FoundInputs([feed], [outputs], label, tries, plan=(shapes, values))
        return FoundInputs(None, None, "", tries, last_error)


class _TooLong(Exception):
    pass


def watch(stop, done, cpu_limit: float, wall_limit: float, cpu_clock=None, wall_clock=None, poll: float = 0.05) -> bool:
    """Calls ``stop()`` once ``cpu_clock`` has advanced ``cpu_limit`` or ``wall_clock``
    ``wall_limit`` before the event ``done`` is set; True when it stopped."""
    import time

    cpu_clock, wall_clock = cpu_clock or time.process_time, wall_clock or time.monotonic
    cpu0, wall0 = cpu_clock(), wall_clock()
    while not done.wait(poll):
        if cpu_clock() - cpu0 > cpu_limit or wall_clock() - wall0 > wall_limit:
            stop()
            return True
    return False


def _bounded_run(session, feed: dict):
    """``session.run`` that onnxruntime terminates after ``RUN_LIMIT_S`` CPU seconds (see the module docstring)."""
    import threading

    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4
    fired, done = threading.Event(), threading.Event()

    def stop() -> None:
        fired.set()
        options.terminate = True

    watcher = threading.Thread(target=watch, args=(stop, done, RUN_LIMIT_S, RUN_LIMIT_WALL_S), daemon=True)
    watcher.start()
    try:
        return session.run(None, feed, options)
    except Exception:
        if fired.is_set():
            raise _TooLong() from None
        raise
    finally:
        done.set()
        watcher.join()


def runnable_feeds(model, pinned: Mapping[str, tuple] | None = None, samples: int = 1, seed: int = 0) -> list[dict]:
    """``samples`` seeded feed dicts of the first kind the model runs on (the inputs every
    command makes up when the user gives none). A model that runs on none of them is
    bad input: one line, with how to give inputs. Only the float inputs of the further
    samples are drawn anew: integer and bool inputs (sizes, indices, flags, which decide
    shapes and branches) keep the values the model was seen to run on."""
    from .errors import DataError
    from .verify import session_for

    try:
        found = find_inputs(model, lambda: session_for(model), pinned or {}, seed)
    except Exception as exc:
        raise DataError(f"onnxruntime cannot load the model: {first_line(exc, limit=300)}",
                        hint="check the model with `onnxforge inspect`") from exc
    if found.feeds is None:
        raise DataError(
            f"no made-up inputs run the model ({found.tries} tried; last: {found.error})",
            hint="give real inputs with --data DIR (a folder of .npz feed dicts)",
        )
    feeds = list(found.feeds)
    with session_for(model) as session:
        specs = input_specs(session)
    shapes, values = found.plan
    graph = graph_of(model)
    for k in range(1, samples):
        feed = make_feed(specs, shapes, values, index_bounds(graph), reshape_target_inputs(graph), seed + k)
        feeds.append({name: value if np.asarray(value).dtype.kind in "fc" else feeds[0].get(name, value)
                      for name, value in feed.items()})
    return feeds
