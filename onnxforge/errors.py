"""One error hierarchy for onnxforge.

Every error carries a one-line message (what went wrong, and where) and a hint
(what to do about it). The CLI prints ``error: <message>`` and ``hint: <hint>``
and exits with ``exit_code``: 2 for bad input, 3 for failed verification or a
missed accuracy budget, 1 for internal errors.
"""
from __future__ import annotations


class OnnxForgeError(Exception):
    """Base class of every error onnxforge raises on purpose."""

    exit_code = 1
    default_hint = "rerun with --debug for the full traceback and report it"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint or self.default_hint

    def __str__(self) -> str:
        return self.message


class InputError(OnnxForgeError):
    """The user gave us something we cannot use (a file, an option, a value)."""

    exit_code = 2
    default_hint = "check the command line and the input files"


class ModelLoadError(InputError):
    """The model file is missing, empty, truncated, not ONNX or otherwise unreadable."""

    default_hint = "check that the path points to a complete .onnx file"


class UnsafeModelError(ModelLoadError):
    """External data points outside the model's folder or is otherwise unsafe to read."""

    default_hint = "external data must be regular files inside the model's folder, referenced by relative paths"


class ModelSaveError(InputError):
    """The output cannot be written where the user asked."""

    default_hint = "choose another output path"


class OptionError(InputError):
    """An option, pass name, shape spec, profile or recipe key is invalid."""


class DataError(InputError):
    """Input or calibration data is missing or does not fit the model."""

    default_hint = "check the data folder: .npz feed dicts or .npy files named after the model inputs"


class VerificationError(OnnxForgeError):
    """The optimized model does not match the original (or the accuracy budget is missed)."""

    exit_code = 3
    default_hint = "rerun without --strict to roll the failing pass back, or --verify none to skip the check"


class PassError(OnnxForgeError):
    """A pass failed or the pipeline did not reach a fixpoint."""

    exit_code = 1


class ProviderError(InputError):
    """An execution provider or one of its options is unavailable or invalid."""

    default_hint = "run `onnxforge env` to see which providers really work here"


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (library errors run to many lines)."""
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else type(exc).__name__
    return line[:limit] if limit else line
