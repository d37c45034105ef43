"""Runs a pipeline of passes to a fixpoint, verifies the result, and finds and
rolls back the pass responsible when verification fails.

What a run is judged against (``verify.Verifier``) is fixed before any pass runs:
inputs the original runs on (``verify_feeds``) and its outputs, whether onnx's
checker can judge (not when the original itself fails it), which outputs are
random, and the original's outputs at onnxruntime's default optimization level.
The result is judged with onnxruntime's optimizations off and then, once, at the
default level; a failure only there is bisected (below) with every step judged at
both levels. Every pass that changed the graph is recorded as a step. When the final
model fails verification, the steps are replayed from a snapshot of the input and
bisected to the first step whose result fails (the empty prefix failing is nobody's
fault: the run stops); with ``debug_dir`` the models before and after it are saved.
A rule-based step is then bisected over its own rewrites (rule + matched nodes, in the
order they fired): the step is replayed allowing only its first k rewrites, and the
first k that fails names the guilty rewrite, which alone is denied (the rule refuses
it from then on) and the pipeline rerun, keeping that pass's other rewrites. Otherwise
(no rewrites recorded, or the step fails with none allowed, or MAX_DENIED rewrites
already denied) the pass is either disabled and the pipeline rerun (default, reported
as a warning) or the run stops with ``VerificationError`` (``strict``). A pass that
raises is handled the same way. Each rerun denies a rewrite or disables a pass not
denied or disabled before, so restarts are bounded by MAX_DENIED plus the pipeline's length.

The passes record, as they rewrite, which original tensor each new tensor stands for
(``PassContext.name_map``); the result carries it as the ``onnxforge.name_map``
metadata entry (JSON, new name -> original name, composed with the input's own map),
which ``onnxforge debug`` reads to match fused tensors.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

from .context import PassContext
from .errors import OptionError, PassError, VerificationError
from .io import runtime_only_op
from .model import Model
from .model_prep import apply_input_shapes, apply_pinned_inputs, forget_negative_dims, snapshot
from .name_map import NAME_MAP_KEY, read_name_map, record_name_map  # noqa: F401  (the first two re-exported)
from .report import OptimizeReport, PassRecord, model_stats
from .shared_weights import share_weights
from .output_diff import compare_arrays
from .verify import (
    MODES,
    Verification,
    Verifier,
    random_outputs,
    reference_outputs,
    run_outputs,
    structural_check,
)

log = logging.getLogger("onnxforge")

DEFAULT_MAX_ITERATIONS = 10
DEFAULT_TOLERANCE = (1e-5, 1e-6)
# Rewrites one run may roll back one by one before a failing pass is disabled whole.
MAX_DENIED = 8


@dataclasses.dataclass
class Step:
    index: int  # position of the pass in the pipeline
    record: PassRecord
    rewrites: list = dataclasses.field(default_factory=list)  # (pass, rule, nodes) it made, in order


class PassFailure(Exception):
    def __init__(self, pass_index: int, error: BaseException):
        super().__init__(str(error))
        self.pass_index = pass_index
        self.error = error
        self.trace = traceback.format_exc()


class PassManager:
    """``PassManager(passes).run(model)`` -> (optimized model, OptimizeReport).

    ``verify``: "none", "structural" or "numeric" (default). ``feeds``: inputs for
    numeric verification (seeded from the model when None). ``debug_dir``: where
    models around a failing pass are saved (a temporary folder when None).
    """

    def __init__(
        self,
        passes: Sequence,
        *,
        max_iterations: int = DEFAULT_MAX_ITERATIONS,
        verify: str = "numeric",
        strict: bool = False,
        feeds: Sequence[dict] | None = None,
        debug_dir: str | Path | None = None,
        progress: Callable[[str], None] | None = None,
    ):
        if verify not in MODES:
            raise OptionError(f"--verify {verify!r}: choose one of {', '.join(MODES)}")
        self.passes = list(passes)
        self.max_iterations = max_iterations
        self.verify = verify
        self.strict = strict
        self.feeds = list(feeds) if feeds is not None else None
        self.debug_dir = Path(debug_dir) if debug_dir else None
        self.progress = progress or (lambda _msg: None)
        self._bisect_at_default = False

    # ------------------------------------------------------------------ run

    def run(self, model: Model, ctx: PassContext | None = None) -> tuple[Model, OptimizeReport]:
        start = time.perf_counter()
        ctx = ctx or PassContext()
        forget_negative_dims(model)
        apply_input_shapes(model, ctx.input_shapes)
        apply_pinned_inputs(model, ctx.pinned_inputs)
        if self.feeds is not None and ctx.pinned_inputs:  # a pinned input is no longer fed
            self.feeds = [{k: v for k, v in f.items() if k not in ctx.pinned_inputs} for f in self.feeds]
        report = OptimizeReport(before=model_stats(model))
        share_weights(model)  # one read-only copy of each weight, shared by snapshots and sessions
        original = snapshot(model)
        verifier = self.verifier = self._verifier(original, ctx)
        verifier.judge_at_default(original)
        # Bisections judge at the default level too once a result failed only there.
        self._bisect_at_default = False
        disabled: set[int] = set()
        current = model
        while True:
            try:
                steps, iterations = self._run_pipeline(current, ctx, disabled, report)
                verification = self._check(current, steps)
                if verification.ok and not self._bisect_at_default:
                    # One more session, for the result only: what users run is the default level.
                    at_default = verifier.check_default(current, self._tolerance(steps))
                    if not at_default.ok:
                        verification, self._bisect_at_default = at_default, True
            except PassFailure as failure:
                name = self.passes[failure.pass_index].name
                if self.strict:
                    raise PassError(f"pass {name} failed: {failure.error}") from failure.error
                log.debug(failure.trace)
                self._disable(disabled, failure.pass_index, str(failure.error))
                report.rolled_back.append({"pass": name, "reason": f"raised {type(failure.error).__name__}: {failure.error}"})
                current, ctx = self._restart(original, ctx, report)
                continue
            if verification.ok:
                break
            position, saved = self._bisect(original, ctx, steps, verification)
            culprit = steps[position].index
            name = self.passes[culprit].name
            where = (f"models before and after it saved in {saved}" if saved
                     else "rerun with --debug-dir DIR to save the models before and after it")
            guilty = (self._guilty_rewrite(original, ctx, steps, position)
                      if len(ctx.denied_rewrites) < MAX_DENIED else None)
            if self.strict:
                what = f"rule {guilty[1]} on node(s) {', '.join(guilty[2])} of pass {name}" if guilty else f"pass {name}"
                raise VerificationError(
                    f"{what} breaks {verification.mode} verification ({verification.detail}); {where}",
                    hint="rerun without --strict to roll it back, or --disable " + name,
                )
            if guilty is not None:
                _pass, rule, nodes = guilty
                ctx = dataclasses.replace(ctx, denied_rewrites=ctx.denied_rewrites | {(rule, nodes)})
                report.rolled_back.append({
                    "pass": name, "rule": rule, "nodes": list(nodes),
                    "reason": f"{verification.detail}; its other rewrites are kept ({where})"})
                current, ctx = self._restart(original, ctx, report)
                continue
            self._disable(disabled, culprit, verification.detail)
            report.rolled_back.append({"pass": name, "reason": f"{verification.detail} ({where})"})
            current, ctx = self._restart(original, ctx, report)
        report.iterations = iterations
        report.verification = ({**verification.as_dict(), "at_default_level": verifier.at_default}
                               if self.verify != "none" else None)
        report.verifier = verifier
        report.after = model_stats(current)
        report.warnings = list(dict.fromkeys(verifier.notes + current.notes + ctx.warnings))
        report.refusals = [dataclasses.asdict(r) for r in ctx.refusals]
        record_name_map(current, ctx.name_map)
        report.seconds = time.perf_counter() - start
        return current, report

    def _disable(self, disabled: set[int], index: int, why: str) -> None:
        """Each restart disables a pass not disabled before, so restarts are bounded by
        the pipeline's length; blaming a pass twice means the fault lies elsewhere."""
        if index in disabled or len(disabled) >= len(self.passes):
            raise VerificationError(
                f"verification still fails with pass {self.passes[index].name} disabled: {why}",
                hint="rerun with --verify structural, or report this model",
            )
        disabled.add(index)

    def _restart(self, original: Model, ctx: PassContext, report: OptimizeReport) -> tuple[Model, PassContext]:
        report.records.clear()
        fresh = snapshot(original)
        return fresh, ctx.fresh(fresh)

    # ------------------------------------------------------------------ pipeline

    def _run_pipeline(self, model: Model, ctx: PassContext, disabled: set[int], report: OptimizeReport):
        ctx.model = model
        steps: list[Step] = []
        for iteration in range(1, self.max_iterations + 1):
            changed_now = []
            for index, p in enumerate(self.passes):
                if index in disabled:
                    continue
                self.progress(f"iteration {iteration}: {p.name}")
                fired = len(ctx.rewrites)
                record = self._run_pass(index, p, model, ctx, iteration)
                report.records.append(record)
                if record.changed:
                    steps.append(Step(index, record, ctx.rewrites[fired:]))
                    changed_now.append(p.name)
            if not changed_now:
                return steps, iteration
        raise PassError(
            f"no fixpoint after {self.max_iterations} iterations; still changing the graph: "
            f"{', '.join(dict.fromkeys(changed_now))}",
            hint="report this pipeline; meanwhile --disable one of these passes",
        )

    @staticmethod
    def _run_pass(index: int, p, model: Model, ctx: PassContext, iteration: int) -> PassRecord:
        t0 = time.perf_counter()
        try:
            result = p.run(model.graph, ctx)
        except (VerificationError, OptionError):
            raise
        except Exception as exc:
            raise PassFailure(index, exc) from exc
        return PassRecord(p.name, iteration, bool(result.changed), dict(result.stats), time.perf_counter() - t0)

    # ------------------------------------------------------------------ verification

    def _verifier(self, original: Model, ctx: PassContext) -> Verifier:
        """Fixes what the run is judged against before any pass runs."""
        if self.verify == "none":
            return Verifier("none")
        names = [t.name for t in original.graph.outputs]
        notes: list[str] = []
        checked = structural_check(original)
        fails = None if checked.ok or runtime_only_op(checked.detail) else checked.detail
        if fails and not any(fails in note for note in original.notes):  # load may have said it already
            # Not a pass's fault: the checker cannot judge the result, onnxruntime does.
            notes.append(f"the original model fails onnx's checker ({fails}); results are judged by onnxruntime")
        if self.verify == "structural":
            return self._loadable(Verifier("structural", output_names=names, original_fails_checker=fails,
                                           notes=notes), original)
        if self.feeds:
            feeds, reference = self.feeds, reference_outputs(original, self.feeds)
        else:
            found = self._find_inputs(original, ctx)
            if found.feeds is None:
                notes.append(
                    f"verified structurally only: no made-up inputs ran the original ({found.tries} tried; last: "
                    f"{found.error}); give real inputs with --data DIR or sizes with --verify-shape"
                )
                return self._loadable(Verifier("structural", output_names=names, original_fails_checker=fails,
                                               notes=notes), original)
            if found.label != "seeded":
                notes.append(f"verification inputs: {found.label} (the original does not run on the seeded ones)")
            feeds, reference = found.feeds, found.reference
        unstable = self._unstable(original, feeds, reference, names)
        if unstable:
            notes.append(f"output(s) {', '.join(sorted(unstable))} differ between two runs of the original (random "
                         "ops): compared by type and shape only")
        return Verifier("numeric", feeds, reference, names, fails, unstable, notes)

    @staticmethod
    def _loadable(verifier: Verifier, original: Model) -> Verifier:
        """A structural verifier judges by loading in onnxruntime: an original that does
        not load is bad input, not something a pass broke."""
        from .errors import DataError

        loads = verifier.check(original, DEFAULT_TOLERANCE)
        if not loads.ok:
            raise DataError(f"the model fails structural verification before any pass runs: {loads.detail}",
                            hint="check the model with `onnxforge inspect`; --verify none skips verification")
        return verifier

    @staticmethod
    def _find_inputs(original: Model, ctx: PassContext):
        from .errors import DataError, first_line
        from .verify import session_for
        from .verify_feeds import find_inputs

        pinned = {**ctx.input_shapes, **ctx.verify_shapes}
        try:
            return find_inputs(original, lambda: session_for(original), pinned, ctx.seed)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(
                f"onnxruntime cannot load the original model: {first_line(exc, limit=300)}",
                hint="verify with --verify structural, or check the model with `onnxforge inspect`",
            ) from exc

    @staticmethod
    def _unstable(original: Model, feeds, reference, names) -> frozenset:
        """Outputs that differ between two runs of the original (random ops): no pass
        can be judged on their values."""
        unstable = set(random_outputs(original))
        again = run_outputs(original, feeds)
        for refs, outs in zip(reference, again):
            for name, r, o in zip(names, refs, outs):
                if not compare_arrays(name, r, o, *DEFAULT_TOLERANCE).ok:
                    unstable.add(name)
        return frozenset(unstable)

    def _tolerance(self, steps: Sequence[Step]) -> tuple[float, float]:
        tol = DEFAULT_TOLERANCE
        for step in steps:
            rtol, atol = self.passes[step.index].tolerance
            tol = (max(tol[0], rtol), max(tol[1], atol))
        return tol

    def _check(self, model: Model, steps: Sequence[Step]) -> Verification:
        tolerance = self._tolerance(steps)
        result = self.verifier.check(model, tolerance)
        if result.ok and self._bisect_at_default:
            result = self.verifier.check_default(model, tolerance)
        return result

    def _replay(self, original: Model, ctx: PassContext, steps: Sequence[Step], k: int,
                last_budget: int | None = None) -> Model:
        """The original after ``steps[:k]``; ``last_budget``: the last of them may make
        only that many rewrites."""
        m = snapshot(original)
        scratch = dataclasses.replace(ctx.fresh(m), warnings=[])
        for i, step in enumerate(steps[:k]):
            scratch.rewrite_budget = last_budget if i == k - 1 else None
            try:
                self.passes[step.index].run(m.graph, scratch)
            except Exception:
                pass  # the failing prefix is found either way
        return m

    def _guilty_rewrite(self, original: Model, ctx: PassContext, steps: Sequence[Step], position: int):
        """The rewrite of ``steps[position]`` (failing after a passing prefix) that breaks
        verification: the step replayed with only its first k rewrites, bisected to the
        first k that fails. None when it fails with none of them (the pass changes the
        graph outside its rules) or records none."""
        rewrites = steps[position].rewrites
        window = steps[:position + 1]
        if not rewrites or not self._check(self._replay(original, ctx, window, position + 1, 0), window[:-1]).ok:
            return None
        lo, hi = 0, len(rewrites)  # lo rewrites pass, hi fail
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._check(self._replay(original, ctx, window, position + 1, mid), window).ok:
                lo = mid
            else:
                hi = mid
        return rewrites[hi - 1]

    def _bisect(self, original: Model, ctx: PassContext, steps: Sequence[Step], verification: Verification):
        """Position in ``steps`` of the first step whose replayed prefix fails; saves the
        models around it when ``debug_dir`` is set (once per culprit, overwritten on a rerun)."""

        def replay(k: int) -> Model:
            return self._replay(original, ctx, steps, k)

        empty = self._check(replay(0), [])
        if not steps or not empty.ok:
            raise VerificationError(
                f"the unchanged model fails {verification.mode} verification, so no pass is to blame: "
                f"{empty.detail or verification.detail}",
                hint="rerun with --verify structural, or give real inputs with --data DIR",
            )
        lo, hi = 0, len(steps)  # prefix lo passes, prefix hi fails
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._check(replay(mid), steps[:mid]).ok:
                lo = mid
            else:
                hi = mid
        culprit = steps[hi - 1].index
        saved = self._save_pair(replay(hi - 1), replay(hi), self.passes[culprit].name) if self.debug_dir else None
        return hi - 1, saved

    def _save_pair(self, before: Model, after: Model, name: str) -> Path:
        from .io import save

        folder = self.debug_dir
        folder.mkdir(parents=True, exist_ok=True)
        for label, m in (("before", before), ("after", after)):
            try:
                save(m, folder / f"{label}_{name}.onnx")
            except Exception as exc:  # saving is a courtesy; the verdict stands
                log.warning("could not save %s model: %s", label, exc)
        return folder
