"""Integer HardSwish / HardSigmoid and constant shifts in CPU QDQ models: the registered
pass integer-activations (passes/qdq/integer_act.py holds the math, the preconditions and
the refusal reasons); formats.static_qdq runs it through ``integer_activations``."""
from __future__ import annotations

import onnx


def integer_activations(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """(model rewritten, rewrites). One sweep, as the rules were written for: the shifts
    first, then the activations (whose own Adds are not shifts)."""
    from .registered import apply_passes

    return apply_passes(model, ("integer-activations",), max_iterations=1)
