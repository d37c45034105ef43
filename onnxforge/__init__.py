"""onnxforge: an ONNX graph-rewriting optimizer that verifies every step.

    import onnxforge
    model, report = onnxforge.optimize("model.onnx", level=3, provider="cpu")
    onnxforge.save(model, "model.opt.onnx")
"""
from .api import build_pipeline, optimize
from .context import PassContext, Refusal
from .errors import (
    DataError,
    InputError,
    ModelLoadError,
    ModelSaveError,
    OnnxForgeError,
    OptionError,
    PassError,
    ProviderError,
    UnsafeModelError,
    VerificationError,
)
from .io import load, save
from .model import Model
from .pass_manager import PassManager

__version__ = "0.1.0"


def __getattr__(name):
    # The pass API lives in onnxforge.passes; import lazily to keep `import onnxforge` light.
    if name in ("Pass", "PassResult", "Rule", "Match", "RulePass"):
        from .passes import base

        return getattr(base, name)
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)


__all__ = [
    "optimize", "build_pipeline", "load", "save", "Model", "PassManager", "PassContext", "Refusal",
    "Pass", "PassResult", "Rule", "Match", "RulePass", "Pipeline",
    "OnnxForgeError", "InputError", "ModelLoadError", "ModelSaveError", "UnsafeModelError", "OptionError",
    "DataError", "VerificationError", "PassError", "ProviderError",
]
