"""Checking that an optimized model still is the model the user had.

``structural``: the onnx checker with full_check (strict shape inference).
``numeric``: both models run on onnxruntime's CPU provider with graph
optimizations disabled (so onnxruntime's own rewrites cannot hide or cause a
difference) on the same feeds; every output is compared against a tolerance.

``at the default level``: users run at onnxruntime's default graph optimization
level (ORT_ENABLE_ALL), whose rewrites can fail on a graph that loads with them
off (onnxruntime inlines an If whose condition became a constant, then its shape
inference rejects what the branch held). So the result is also loaded, run and
compared at that level, against the original's outputs at that level: one more
session per model judged, and only where the original itself runs there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import DataError, VerificationError, first_line
from .model import Model, iter_graphs
from .output_diff import OutputDiff, compare_arrays, merge_diffs, same_kind

MODES = ("none", "structural", "numeric")


@dataclasses.dataclass
class Verification:
    mode: str
    ok: bool
    detail: str = ""
    diffs: list[OutputDiff] = dataclasses.field(default_factory=list)
    tolerance: tuple[float, float] = (0.0, 0.0)

    def as_dict(self) -> dict:
        return {
            "mode": self.mode,
            "ok": self.ok,
            "detail": self.detail,
            "tolerance": {"rtol": self.tolerance[0], "atol": self.tolerance[1]},
            "outputs": [d.as_dict() for d in self.diffs],
        }


# ------------------------------------------------------------------ sessions


@contextlib.contextmanager
def session_for(model: Model | onnx.ModelProto | Path, *, optimize: bool = False, threads: int = 0,
                providers: list | None = None) -> Iterator:
    """An onnxruntime session (CPU unless ``providers`` says otherwise: ``deployment_providers``)
    for an in-memory model or a model file; an in-memory ``Model`` shares its weights with the
    session (``shared_weights.model_session``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures reach the user as one line, not as onnxruntime's log
    if threads:
        options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    providers = providers or ["CPUExecutionProvider"]
    if isinstance(model, (str, Path)):
        yield ort.InferenceSession(str(model), options, providers=providers)
        return
    if isinstance(model, Model):  # its weights shared with the session, not copied
        from .shared_weights import model_session

        with model_session(model, options, providers) as session:
            yield session
        return
    yield ort.InferenceSession(model.SerializeToString(), options, providers=providers)


def deployment_providers(provider: str = "cpu") -> tuple[list, str | None]:
    """The onnxruntime providers, with their default options, a deployment on ``provider``
    (cpu, cuda, tensorrt) runs a model with, as far as they work on this machine (CPU last,
    as its fallback), and a note when the target's own provider does not work here."""
    from .runtime.env import probe_provider
    from .runtime.profile import default_profile, provider_name
    from .runtime.session import ort_providers

    if provider_name(provider) == "cpu":  # what every other check runs on: nothing to probe
        return ["CPUExecutionProvider"], None
    profile = default_profile(provider)
    wanted = ort_providers(profile)
    usable = [(name, options) for (name, options), entry in zip(wanted, profile.providers)
              if name == "CPUExecutionProvider" or probe_provider(entry.name, name).works]
    if usable[0][0] == wanted[0][0]:
        return usable, None
    return usable, (f"{wanted[0][0]} does not work on this machine: the written file was run at onnxruntime's "
                    f"default optimization level on {', '.join(name for name, _ in usable)} instead")


def run_outputs(model: Model | onnx.ModelProto | Path, feeds: Sequence[dict], *,
                optimize: bool = False, providers: list | None = None) -> list[list[np.ndarray]]:
    """Outputs per feed; ``optimize``: at onnxruntime's default optimization level;
    ``providers``: onnxruntime's (default: CPU)."""
    with session_for(model, optimize=optimize, providers=providers) as sess:
        names = [i.name for i in sess.get_inputs()]
        return [sess.run(None, {n: f[n] for n in names if n in f}) for f in feeds]


# ------------------------------------------------------------------ checks


def structural_check(model: Model) -> Verification:
    from .shared_weights import lifted_proto

    try:  # large weights as typed inputs: same shapes and types, nothing copied
        onnx.checker.check_model(lifted_proto(model)[0], full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        return Verification("structural", False, first_line(exc, limit=300))
    except Exception as exc:  # the checker raises bare errors for some custom-domain ops
        return Verification("structural", False, f"{type(exc).__name__}: {first_line(exc, limit=300)}")
    return Verification("structural", True)


def reference_outputs(model: Model, feeds: Sequence[dict]) -> list[list[np.ndarray]]:
    """Outputs of the unoptimized model; a model that cannot run on the feeds is bad input."""
    try:
        return run_outputs(model, feeds)
    except Exception as exc:
        raise DataError(
            f"the original model does not run on the verification inputs: {first_line(exc, limit=300)}",
            hint="give real inputs with --data DIR, or pin dynamic dims with --input-shape NAME:1x3x224x224",
        ) from exc


def numeric_check(
    candidate: Model | Path, feeds: Sequence[dict], reference: list[list[np.ndarray]], output_names: list[str],
    tolerance: tuple[float, float], unstable: frozenset = frozenset(), *, optimize: bool = False,
) -> Verification:
    """``unstable`` outputs (random in the original itself) must only keep their type and shape.
    ``optimize``: the candidate runs at onnxruntime's default optimization level."""
    rtol, atol = tolerance
    try:
        outputs = run_outputs(candidate, feeds, optimize=optimize)
    except Exception as exc:
        return Verification("numeric", False, f"onnxruntime cannot run the optimized model: {first_line(exc, limit=300)}",
                            tolerance=tolerance)
    per_feed = [
        [compare_arrays(n, r, o, rtol, atol) if n not in unstable else same_kind(n, r, o)
         for n, r, o in zip(output_names, refs, outs)]
        for refs, outs in zip(reference, outputs)
    ]
    if any(len(outs) != len(output_names) for outs in outputs):
        return Verification("numeric", False, "the optimized model has another number of outputs", tolerance=tolerance)
    diffs = merge_diffs(per_feed)
    bad = [d for d in diffs if not d.ok]
    detail = "; ".join(f"{d.name}: max abs {d.max_abs:.3g}, rel {d.max_rel:.3g}" for d in bad)
    return Verification("numeric", not bad, detail, diffs, tolerance)


def file_structural_check(path: Path) -> Verification:
    """The checker on a written file (reads its external data from beside it)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        return Verification("structural", False, first_line(exc, limit=300))
    return Verification("structural", True)


@dataclasses.dataclass
class Verifier:
    """What one run is verified against, fixed before any pass runs.

    ``numeric``: the original's outputs on ``feeds``. ``original_fails_checker``: why
    the original itself fails onnx's checker (then the checker cannot judge a result
    and onnxruntime does). ``unstable``: outputs that differ between two runs of the
    original (random ops), compared by type and shape only. ``notes``: how the feeds
    were found, or why numeric verification fell back to structural.
    ``at_default``: whether a result is judged at onnxruntime's default optimization
    level too (the original loads there), ``default_reference`` the original's outputs
    there (numeric mode)."""

    mode: str
    feeds: list[dict] | None = None
    reference: list[list] | None = None
    output_names: list[str] = dataclasses.field(default_factory=list)
    original_fails_checker: str | None = None
    unstable: frozenset = frozenset()
    notes: list[str] = dataclasses.field(default_factory=list)
    at_default: bool = False
    default_reference: list[list] | None = None

    def judge_at_default(self, original: Model) -> None:
        """Decide, from the original, whether results are judged at the default level too:
        one session of the original at that level (and its outputs on the feeds)."""
        if self.mode == "none":
            return
        try:
            if self.mode == "numeric":
                self.default_reference = run_outputs(original, self.feeds, optimize=True)
            else:
                with session_for(original, optimize=True):
                    pass
        except Exception as exc:
            self.notes.append(f"the original does not run at onnxruntime's default optimization level "
                              f"({first_line(exc, limit=200)}); results are judged with its optimizations off only")
            return
        self.at_default = True

    def check_default(self, model: Model | Path, tolerance: tuple[float, float]) -> Verification:
        """The candidate at onnxruntime's default optimization level: loads (structural),
        and gives the original's outputs at that level (numeric)."""
        if not self.at_default:
            return Verification(self.mode, True)
        where = "at onnxruntime's default optimization level"
        if self.mode != "numeric":
            try:
                with session_for(model, optimize=True):
                    pass
            except Exception as exc:
                return Verification(self.mode, False, f"onnxruntime cannot load it {where}: {first_line(exc, limit=300)}")
            return Verification(self.mode, True)
        result = numeric_check(model, self.feeds, self.default_reference, self.output_names, tolerance,
                               self.unstable, optimize=True)
        if not result.ok:
            result.detail = f"{where}: {result.detail}"
        return result

    def check(self, model: Model, tolerance: tuple[float, float]) -> Verification:
        """Judge an in-memory candidate."""
        if self.mode == "none":
            return Verification("none", True)
        if self.original_fails_checker is None:
            from .io import runtime_only_op

            structural = structural_check(model)
            # In numeric mode an op only onnxruntime knows is judged by running it, not by the checker.
            if not structural.ok and (self.mode == "structural" or not runtime_only_op(structural.detail)):
                return structural
        if self.mode == "structural":
            return self._loads(model)
        return self._numeric(model, tolerance)

    def check_file(self, path: Path, tolerance: tuple[float, float]) -> Verification:
        """Judge the file written, reloaded from disk (with its external data)."""
        if self.mode == "none":
            return Verification("none", True)
        if self.original_fails_checker is None and self.mode == "structural":
            structural = file_structural_check(path)
            if not structural.ok:
                return structural
        if self.mode == "structural":
            return self._loads(path)
        return self._numeric(path, tolerance)

    def _loads(self, model) -> Verification:
        try:
            with session_for(model):
                pass
        except Exception as exc:
            return Verification("structural", False, f"onnxruntime cannot load it: {first_line(exc, limit=300)}")
        return Verification("structural", True)

    def _numeric(self, model, tolerance: tuple[float, float]) -> Verification:
        return numeric_check(model, self.feeds, self.reference, self.output_names, tolerance, self.unstable)


def written_equals(model: Model, tolerance: tuple[float, float] = (1e-5, 1e-6),
                   pinned: Mapping[str, tuple] | None = None, provider: str = "cpu"):
    """A ``check`` for ``io.save``: the file written, reloaded from disk, gives what the
    in-memory ``model`` (the one a command judged) gives, on inputs it runs on. Outputs
    of random ops are compared by type and shape only. The file must also load and run
    at onnxruntime's default optimization level (one more session), giving outputs of
    the same types and shapes, finite where those are: its fusions (QDQ into integer
    kernels) change values by design, so the command's own measure judges them.
    ``pinned``: input shapes the user gave, kept as they are (the other dims are made up).
    ``provider``: the deployment target; the default-level session is built with its
    providers where they work here (``deployment_providers``; else CPU, with a warning)."""

    def check(path: Path) -> None:
        from .verify_feeds import find_inputs

        try:
            found = find_inputs(model, lambda: session_for(model), dict(pinned or {}))
        except Exception as exc:
            raise VerificationError(f"onnxruntime cannot load the model to write: {first_line(exc, limit=300)}",
                                    hint="report this model") from None
        names = [t.name for t in model.graph.outputs]
        if found.feeds is None:  # nothing runs it: the file must at least load
            result = Verifier("structural", original_fails_checker="not judged").check_file(path, tolerance)
        else:
            result = numeric_check(path, found.feeds, found.reference, names, tolerance,
                                   frozenset(random_outputs(model)))
            if result.ok:
                providers, note = deployment_providers(provider)
                if note:
                    logging.getLogger("onnxforge").warning("warning: %s", note)
                result = runs_at_default_level(path, found.feeds, found.reference, names, providers)
        if not result.ok:
            raise VerificationError(f"the written model is not the one verified, so it was not written: {result.detail}",
                                    hint="report this model")

    return check


def runs_at_default_level(path: Path, feeds: Sequence[dict], reference: list[list], names: list[str],
                          providers: list | None = None) -> Verification:
    """The file at onnxruntime's default optimization level (on ``providers``, default CPU):
    it runs, and each output has the reference's type and shape and is finite wherever the
    reference is."""
    where = "at onnxruntime's default optimization level"
    try:
        outputs = run_outputs(path, feeds, optimize=True, providers=providers)
    except Exception as exc:
        return Verification("numeric", False, f"onnxruntime cannot run it {where}: {first_line(exc, limit=300)}")
    for refs, outs in zip(reference, outputs):
        for name, r, o in zip(names, refs, outs):
            if not same_kind(name, r, o).ok:
                return Verification("numeric", False, f"{where}: output {name} changes type or shape")
            if isinstance(r, np.ndarray) and r.dtype.kind in "fc" and np.any(np.isfinite(r) & ~np.isfinite(o)):
                return Verification("numeric", False, f"{where}: output {name} has NaN or Inf where it had none")
    return Verification("numeric", True)


def assert_ok(verification: Verification) -> None:
    if not verification.ok:
        raise VerificationError(f"{verification.mode} verification failed: {verification.detail}")


RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                        "Bernoulli"})


def random_outputs(model: Model) -> set[str]:
    """Graph outputs downstream of a random op (a node whose subgraphs hold one counts):
    onnxruntime draws other numbers once the graph around it changes."""
    def is_random(node) -> bool:
        return node.op in RANDOM_OPS or any(
            n.op in RANDOM_OPS for v in node.attrs.values() if isinstance(v, gs.Graph)
            for g in iter_graphs(v) for n in g.nodes)

    tainted: set[int] = set()
    for node in model.graph.nodes:  # topological order
        if is_random(node) or any(id(t) in tainted for t in node.inputs):
            tainted.update(id(t) for t in node.outputs)
    return {t.name for t in model.graph.outputs if id(t) in tainted}
