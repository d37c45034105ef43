"""Where passes are found by name, and which pipeline each -O level names.

Each pass module lists its passes in a module-level ``PASSES`` tuple (immutable);
``all_passes()`` builds the name -> class table on every call, so nothing here is
mutable global state. User-defined passes are given by import path
(``mypkg.passes:FuseMyOp``) and resolved by ``resolve``.
"""
from __future__ import annotations

import importlib

from onnxforge.errors import OptionError

from .base import Pass

PASS_MODULES = (
    "onnxforge.passes.cleanup",
    "onnxforge.passes.fusion",
    "onnxforge.passes.qdq",
    "onnxforge.passes.quant.int4_rules",  # quantize --bits 4 runs it; listed and explained like every rule
    "onnxforge.passes.quant.rotate_residual",  # quantize --bits 4 --rotate runs it before the INT4 solve
    "onnxforge.passes.quant.fp16_rules",  # convert-fp16 runs it
    "onnxforge.passes.quant.equalize_rules",  # quantize's cross-layer equalization / smoothing runs it
    "onnxforge.passes.quant.bias_rules",  # quantize's bias correction runs it
    "onnxforge.passes.quant.ort_qdq",  # quantize's static QDQ placement (onnxruntime's, wrapped) runs it
    "onnxforge.passes.quant.subgraph_pairs",  # the static placement runs it (pairs onnxruntime would abort on)
    "onnxforge.passes.quant.accuracy_level",  # quantize --bits auto's int4-acc4 candidate runs it
    "onnxforge.passes.quant.ort_dynamic",  # quantize's dynamic MatMul format (onnxruntime's, wrapped) runs it
    "onnxforge.passes.quant.baseline_rules",  # quantize's and convert-fp16's float baseline runs them
)

CLEANUP_PIPELINE = (
    "constant-to-initializer",
    "eliminate-identity",
    "eliminate-noop",
    "fold-constants",
    "sink-transposes",
    "collapse-chains",
    "eliminate-common-subexpressions",
    "merge-duplicate-initializers",
    "eliminate-dead-code",
)


# Runs after every other pass of a level (fusions included): folding a static dim read from a
# partly dynamic shape, or a Reshape target into 0-copies, removes the Shape -> Gather chains
# the attention fusions match on, so the fusions see the chains first (the pipeline iterates to
# a fixpoint, so what the late pass enables still folds in the next iteration).
LATE_PIPELINE = ("simplify-shapes",)


def all_passes() -> dict[str, type[Pass]]:
    """Name -> pass class. Two passes with one name are a defect (the second would
    silently win), so they raise."""
    table: dict[str, type[Pass]] = {}
    for module_name in PASS_MODULES:
        module = importlib.import_module(module_name)
        for cls in getattr(module, "PASSES", ()):
            other = table.get(cls.name)
            if other is not None and other is not cls:
                raise DuplicatePassError(
                    f"two passes are named {cls.name!r}: {other.__module__}.{other.__name__} and "
                    f"{cls.__module__}.{cls.__name__}")
            table[cls.name] = cls
    return table


class DuplicatePassError(RuntimeError):
    """A pass name registered twice: a bug of onnxforge or of a plugin, not bad input."""


def rule_locations(cls: type[Pass]) -> list[tuple[str, str]]:
    """(rule name, ``path:line`` of its class) for each rule of a rule pass."""
    import inspect
    import os

    out = []
    for rule in getattr(cls, "rules", ()) or ():
        try:
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the source tree
            path = os.path.relpath(inspect.getsourcefile(rule) or "?", root)
            line = inspect.getsourcelines(rule)[1]
        except (OSError, TypeError):
            path, line = "?", 0
        out.append((getattr(rule, "name", rule.__name__), f"{path}:{line}"))
    return out


def level_pipeline(level: int, provider: str = "cpu") -> list[str]:
    """Pass names of an optimization level: O0 nothing, O1 cleanup, O2 + exact
    provider-neutral fusions, O3 + the provider's preferred fusions."""
    if level not in (0, 1, 2, 3):
        raise OptionError(f"optimization level -O{level} does not exist", hint="use -O0, -O1, -O2 or -O3")
    if level == 0:
        return []
    names = list(CLEANUP_PIPELINE)
    if level >= 2:
        fusion = importlib.import_module("onnxforge.passes.fusion")
        names += [n for n in getattr(fusion, "NEUTRAL_PIPELINE", ()) if n not in names]
    if level >= 3:
        from onnxforge.runtime.providers import provider_fusions

        names += [n for n in provider_fusions(provider) if n not in names]
    names += [n for n in LATE_PIPELINE if n not in names]
    available = all_passes()
    return [n for n in names if n in available]


def resolve(name: str) -> Pass:
    """A pass instance from a registered name or an import path ``module:Class``."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise OptionError(f"pass {name!r}: cannot import it ({exc})") from exc
        if not (isinstance(obj, type) and issubclass(obj, Pass)):
            raise OptionError(f"pass {name!r}: {attr} is not a subclass of onnxforge Pass")
        return obj()
    table = all_passes()
    if name not in table:
        close = [n for n in table if name.split("-")[0] in n]
        raise OptionError(
            f"unknown pass {name!r}",
            hint=f"did you mean {', '.join(close[:3])}?" if close else "`onnxforge passes` lists them",
        )
    return table[name]()
