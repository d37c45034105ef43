"""cpu provider profile: MLAS kernels on x86/ARM.

Preferred graph form: fusions in FUSIONS, u8s8 QDQ quantization. Search space:
thread counts, spinning, graph optimization level, execution mode, memory
arena/pattern, denormals. No provider options: everything is a session option.
"""
# fuse-skip-layernorm and fuse-embed-layernorm stay out of the CPU profile: measured
# (single-thread CPU time, interleaved, seq 128) they cost more than they save here,
# distilbert_base 1.052x raw with them vs 1.013x without, minilm_l6_real 1.074x vs
# 0.970x; onnxruntime's CPU session fuses residual Add + LayerNormalization itself.
# Both remain available by name (--passes) and in the CUDA profile.
FUSIONS: tuple[str, ...] = (
    "fuse-layernorm-ort", "fuse-rmsnorm", "fuse-gelu", "fuse-silu",
    "fuse-attention", "fuse-causal-attention", "fuse-sdpa", "fuse-gqa-rotary",
)

# --- session profile (runtime issue); FUSIONS above is filled by the fusion passes.
import os

from onnxforge.errors import ProviderError
from onnxforge.runtime.options import OptionSpec, validate
from onnxforge.runtime.space import Dimension, thread_counts

NAME = "cpu"
ORT_NAME = "CPUExecutionProvider"
# u8 activations x s8 weights: the combination MLAS's VNNI/AVX2 int8 GEMM kernels take.
QUANT_FORMAT = "qdq-u8s8"

# The CPU provider takes no provider options: all its knobs are session options.
OPTIONS: dict[str, OptionSpec] = {}


def validate_options(options) -> dict:
    return validate(OPTIONS, options, "cpu provider options", ProviderError)


def ort_provider(options) -> tuple[str, dict[str, str]]:
    validate_options(options)
    return ORT_NAME, {}


def default_options(**_) -> dict:
    return {}


def default_session_options() -> dict:
    return {"graph_optimization_level": "all"}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def search_space(static_shapes: bool = True, cores: int | None = None, **_) -> list[Dimension]:
    """Ordered by expected impact: threads first, then spinning, graph level,
    execution mode, memory planning, denormals. The first value of each is
    onnxruntime's default (for threads: its own choice of count)."""
    cores = cores or usable_cores()
    threads = ({}, *({"intra_op_num_threads": n} for n in thread_counts(cores)))
    dims = [
        Dimension("intra_op_threads", "session", threads),
        Dimension("spinning", "session", ({}, {"allow_spinning": False})),
        Dimension("graph_level", "session", ({}, {"graph_optimization_level": "extended"},
                                              {"graph_optimization_level": "basic"})),
    ]
    if cores >= 2:
        dims.append(Dimension("execution_mode", "session", (
            {}, {"execution_mode": "parallel", "inter_op_num_threads": 2})))
    memory = ({}, {"enable_mem_pattern": False}, {"enable_cpu_mem_arena": False})
    if not static_shapes:  # memory patterns are only planned for static shapes
        memory = ({}, {"enable_cpu_mem_arena": False})
    dims.append(Dimension("memory", "session", memory))
    dims.append(Dimension("denormals", "session", ({}, {"denormal_as_zero": True})))
    return dims
