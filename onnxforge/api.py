"""The public Python API: ``onnxforge.optimize`` and friends."""
from __future__ import annotations

import os
from typing import Callable, Iterable, Sequence

import onnx

from .context import PassContext
from .errors import OptionError
from .io import load
from .model import Model
from .pass_manager import PassManager
from .report import OptimizeReport


def as_model(model: Model | onnx.ModelProto | str | os.PathLike) -> Model:
    if isinstance(model, Model):
        return model
    if isinstance(model, onnx.ModelProto):
        from .versions import cap_proto_versions

        # As io.load does for files: ir_version and opset lowered to what onnxruntime reads.
        capped, notes = cap_proto_versions(model)
        m = Model.from_proto(capped)
        m.notes.extend(notes)
        return m
    return load(model)


def build_pipeline(
    level: int = 2,
    passes: Sequence[str] | None = None,
    disable: Iterable[str] = (),
    provider: str = "cpu",
    extra: Sequence = (),
) -> list:
    """Pass instances: ``passes`` when given (names or ``module:Class``), else the
    level's pipeline for the provider; minus ``disable``; plus ``extra`` instances."""
    from .passes.registry import all_passes, level_pipeline, resolve

    names = list(passes) if passes else level_pipeline(level, provider)
    disable = list(disable)
    known = all_passes()
    unknown = [d for d in disable if d not in known and ":" not in d]
    if unknown:
        raise OptionError(f"--disable names unknown pass(es): {', '.join(unknown)}", hint="`onnxforge passes` lists them")
    return [resolve(n) for n in names if n not in disable] + list(extra)


def check_options(pipeline: Sequence, options: dict[str, dict]) -> None:
    """Per-pass options must name a pass of the pipeline and options it declares."""
    by_name = {type(p).name: type(p) for p in pipeline}
    for name, settings in options.items():
        if name not in by_name:
            raise OptionError(f"options for pass {name!r}, which this pipeline does not run",
                              hint=f"it runs {', '.join(by_name) or 'no pass'}")
        problem = by_name[name].option_problem(dict(settings or {}))
        if problem:
            raise OptionError(problem)


def optimize(
    model: Model | onnx.ModelProto | str | os.PathLike,
    *,
    level: int = 2,
    passes: Sequence[str] | None = None,
    disable: Iterable[str] = (),
    extra_passes: Sequence = (),
    provider: str = "cpu",
    input_shapes: dict[str, tuple] | None = None,
    verify_shapes: dict[str, tuple] | None = None,
    pinned_inputs: dict[str, tuple | None] | None = None,
    options: dict[str, dict] | None = None,
    verify: str = "numeric",
    strict: bool = False,
    feeds: Sequence[dict] | None = None,
    max_iterations: int = 10,
    debug_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Model, OptimizeReport]:
    """Optimize a model; returns the optimized ``Model`` and its report.

    >>> model, report = onnxforge.optimize("model.onnx", level=3, provider="cpu")
    >>> onnxforge.save(model, "model.opt.onnx")
    """
    m = as_model(model)
    pipeline = build_pipeline(level, passes, disable, provider, extra_passes)
    check_options(pipeline, options or {})
    ctx = PassContext(
        model=m, provider=provider, input_shapes=dict(input_shapes or {}), options=dict(options or {}),
        verify_shapes=dict(verify_shapes or {}), pinned_inputs=dict(pinned_inputs or {}),
    )
    manager = PassManager(
        pipeline, max_iterations=max_iterations, verify=verify, strict=strict, feeds=feeds,
        debug_dir=debug_dir, progress=progress,
    )
    result, report = manager.run(m, ctx)
    if m.source is not None:
        report.input = str(m.source)
    return result, report
