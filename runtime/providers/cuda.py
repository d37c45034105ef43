"""cuda provider profile: cuDNN/cuBLAS kernels on NVIDIA GPUs.

Preferred graph form: fusions in FUSIONS, symmetric s8s8 QDQ. Runs with IO
binding so inputs and outputs stay on the GPU; searches cuDNN conv algorithm
selection, NHWC layout, CUDA graphs (static shapes only) and TF32 (lossy, only
when allowed).
"""
FUSIONS: tuple[str, ...] = (
    "fuse-layernorm-ort", "fuse-rmsnorm", "fuse-gelu", "fuse-silu", "fuse-skip-layernorm",
    "fuse-attention", "fuse-causal-attention", "fuse-sdpa", "fuse-gqa-rotary",
)

# --- session profile (runtime issue); FUSIONS above is filled by the fusion passes.
from onnxforge.errors import ProviderError
from onnxforge.runtime.options import OptionSpec, as_ort_string, validate
from onnxforge.runtime.space import Dimension

NAME = "cuda"
ORT_NAME = "CUDAExecutionProvider"
# Symmetric s8 x s8 QDQ: what cuDNN/cuBLAS int8 paths and TensorRT consume.
QUANT_FORMAT = "qdq-s8s8-symmetric"

OPTIONS: dict[str, OptionSpec] = {
    "device_id": OptionSpec("int", "GPU index", minimum=0),
    "cudnn_conv_algo_search": OptionSpec("choice", "how cuDNN picks conv algorithms",
                                         choices=("EXHAUSTIVE", "HEURISTIC", "DEFAULT")),
    "cudnn_conv_use_max_workspace": OptionSpec("bool", "let cuDNN use its largest workspace (faster convs)"),
    "cudnn_conv1d_pad_to_nc1d": OptionSpec("bool", "pad 1-D convs as [N,C,1,D] instead of [N,C,D,1]"),
    "do_copy_in_default_stream": OptionSpec("bool", "copy in the compute stream (safe) or a separate one"),
    "enable_cuda_graph": OptionSpec("bool", "capture the run as a CUDA graph (static shapes + IO binding only)"),
    "use_tf32": OptionSpec("bool", "TF32 tensor-core math for float32 MatMul/Conv (lossy: 10-bit mantissa)"),
    "prefer_nhwc": OptionSpec("bool", "channels-last kernels for convolutions"),
    "gpu_mem_limit": OptionSpec("int", "arena size limit in bytes", minimum=1),
    "arena_extend_strategy": OptionSpec("choice", "arena growth", choices=("kNextPowerOfTwo", "kSameAsRequested")),
    "tunable_op_enable": OptionSpec("bool", "use TunableOp kernels"),
    "tunable_op_tuning_enable": OptionSpec("bool", "let TunableOp time its kernels online"),
    "io_binding": OptionSpec("bool", "keep inputs and outputs on the GPU between runs (onnxforge run loop)",
                             forward=False),
}


def validate_options(options) -> dict:
    opts = validate(OPTIONS, options, "cuda provider options", ProviderError)
    if opts.get("enable_cuda_graph") and opts.get("io_binding") is False:
        raise ProviderError("cuda provider options: enable_cuda_graph needs io_binding (inputs at fixed GPU addresses)")
    return opts


def ort_provider(options) -> tuple[str, dict[str, str]]:
    opts = validate_options(options)
    return ORT_NAME, {k: as_ort_string(v) for k, v in opts.items() if OPTIONS[k].forward}


def default_options(**_) -> dict:
    return {"device_id": 0, "io_binding": True}


def default_session_options() -> dict:
    return {"graph_optimization_level": "all"}


def search_space(static_shapes: bool = True, allow_lossy: bool = False, **_) -> list[Dimension]:
    """Conv algorithm search, layout, CUDA graphs (static shapes only), TF32 (lossy)."""
    dims = [
        Dimension("conv_algo", "provider", ({}, {"cudnn_conv_algo_search": "HEURISTIC"},
                                            {"cudnn_conv_algo_search": "DEFAULT"})),
        Dimension("conv_workspace", "provider", ({}, {"cudnn_conv_use_max_workspace": True})),
        Dimension("nhwc", "provider", ({}, {"prefer_nhwc": True})),
    ]
    if static_shapes:
        dims.append(Dimension("cuda_graph", "provider", ({}, {"enable_cuda_graph": True, "io_binding": True})))
    if allow_lossy:
        dims.append(Dimension("tf32", "provider", ({"use_tf32": False}, {"use_tf32": True}), lossy=True))
    dims.append(Dimension("graph_level", "session", ({}, {"graph_optimization_level": "extended"})))
    return dims
