"""Typed option specs: validate user-written option dicts and turn them into
what onnxruntime expects.

Every option a profile may hold is declared here or in a provider module as an
``OptionSpec``. Validation is strict: an unknown name or a value of the wrong
type or outside its range is refused with one line naming the option, never
passed on for onnxruntime to ignore silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import onnxruntime as ort

from onnxforge.errors import OptionError

BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


@dataclass(frozen=True)
class OptionSpec:
    """One option: ``kind`` is bool, int, float, choice or str.

    ``forward`` says whether the option is handed to onnxruntime (a provider
    option) or used by onnxforge itself (e.g. IO binding in the run loop).
    """

    kind: str
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    forward: bool = True

    def normalize(self, name: str, value: Any, error=OptionError) -> Any:
        if self.kind == "bool":
            return _as_bool(name, value, error)
        if self.kind == "int":
            return self._in_range(name, _as_int(name, value, error), error)
        if self.kind == "float":
            return self._in_range(name, _as_float(name, value, error), error)
        if self.kind == "choice":
            text = str(value)
            matches = [c for c in self.choices if c.lower() == text.lower()]
            if not matches:
                raise error(f"option {name}={value!r}: expected one of {', '.join(self.choices)}")
            return matches[0]
        if self.kind == "str":
            if not isinstance(value, str) or not value:
                raise error(f"option {name}={value!r}: expected a non-empty string")
            return value
        raise AssertionError(f"unknown option kind {self.kind}")

    def _in_range(self, name, number, error):
        if self.minimum is not None and number < self.minimum:
            raise error(f"option {name}={number}: must be >= {_fmt(self.minimum)}")
        if self.maximum is not None and number > self.maximum:
            raise error(f"option {name}={number}: must be <= {_fmt(self.maximum)}")
        return number


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _as_bool(name, value, error) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in BOOL_WORDS:
        return BOOL_WORDS[value.strip().lower()]
    raise error(f"option {name}={value!r}: expected true/false")


def _as_int(name, value, error) -> int:
    if isinstance(value, bool):
        raise error(f"option {name}={value!r}: expected an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise error(f"option {name}={value!r}: expected an integer")


def _as_float(name, value, error) -> float:
    if isinstance(value, bool):
        raise error(f"option {name}={value!r}: expected a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise error(f"option {name}={value!r}: expected a number") from None


def validate(specs: Mapping[str, OptionSpec], options: Mapping[str, Any] | None, where: str, error=OptionError) -> dict:
    """Normalized copy of ``options``; refuses unknown names and bad values."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise error(f"{where}: expected a mapping of option names to values, got {type(options).__name__}")
    unknown = [k for k in options if k not in specs]
    if unknown:
        raise error(
            f"{where}: unknown option {unknown[0]!r}",
            hint=f"known options: {', '.join(sorted(specs))}",
        )
    return {name: specs[name].normalize(name, value, error) for name, value in options.items()}


def as_ort_string(value: Any) -> str:
    """Provider options reach onnxruntime as strings; booleans as "1"/"0"."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


# ----------------------------------------------------------------- session options

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
EXECUTION_MODES = {"sequential": ort.ExecutionMode.ORT_SEQUENTIAL, "parallel": ort.ExecutionMode.ORT_PARALLEL}

SESSION_OPTIONS: dict[str, OptionSpec] = {
    "intra_op_num_threads": OptionSpec("int", "threads inside one operator (0 = onnxruntime's default)", minimum=0, maximum=1024),
    "inter_op_num_threads": OptionSpec("int", "threads running independent operators in parallel mode (0 = default)", minimum=0, maximum=1024),
    "execution_mode": OptionSpec("choice", "run operators one at a time or independent branches in parallel", choices=tuple(EXECUTION_MODES)),
    "graph_optimization_level": OptionSpec("choice", "onnxruntime's own graph rewrites at session creation", choices=tuple(OPT_LEVELS)),
    "enable_cpu_mem_arena": OptionSpec("bool", "keep freed CPU buffers in an arena for reuse"),
    "enable_mem_pattern": OptionSpec("bool", "pre-plan buffer offsets from the first run (static shapes)"),
    "enable_mem_reuse": OptionSpec("bool", "let tensors with disjoint lifetimes share buffers"),
    "allow_spinning": OptionSpec("bool", "intra-op worker threads spin while waiting for work"),
    "inter_op_allow_spinning": OptionSpec("bool", "inter-op worker threads spin while waiting for work"),
    "denormal_as_zero": OptionSpec("bool", "flush denormal floats to zero (avoids slow denormal arithmetic)"),
    "use_deterministic_compute": OptionSpec("bool", "pick deterministic kernels where onnxruntime has a choice"),
    "log_severity_level": OptionSpec("int", "onnxruntime log level (0 verbose .. 4 fatal)", minimum=0, maximum=4),
}

# Session options that are onnxruntime config entries rather than attributes.
CONFIG_ENTRIES = {
    "allow_spinning": "session.intra_op.allow_spinning",
    "inter_op_allow_spinning": "session.inter_op.allow_spinning",
    "denormal_as_zero": "session.set_denormal_as_zero",
}


def validate_session_options(options: Mapping[str, Any] | None) -> dict:
    return validate(SESSION_OPTIONS, options, "session options")


def build_session_options(options: Mapping[str, Any] | None) -> ort.SessionOptions:
    """An ``ort.SessionOptions`` from a validated (or raw, then validated) dict."""
    opts = validate_session_options(options)
    so = ort.SessionOptions()
    so.log_severity_level = 3  # warnings from ORT would clutter tables; errors still raise
    for name, value in opts.items():
        if name in CONFIG_ENTRIES:
            so.add_session_config_entry(CONFIG_ENTRIES[name], as_ort_string(value))
        elif name == "graph_optimization_level":
            so.graph_optimization_level = OPT_LEVELS[value]
        elif name == "execution_mode":
            so.execution_mode = EXECUTION_MODES[value]
        else:
            setattr(so, name, value)
    return so
