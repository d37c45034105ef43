"""tensorrt provider profile: TensorRT engines built per subgraph.

Preferred graph form: fusions in FUSIONS, symmetric s8s8 QDQ. Engines and
kernel timings are cached in folders beside the model; optimization profiles
(min/opt/max shapes) come from ``--input-shape`` ranges so an engine covers
every shape it will see and is not rebuilt at run time.
"""
FUSIONS: tuple[str, ...] = ("fuse-layernorm", "fuse-hardswish")  # standard ONNX only

# --- session profile (runtime issue); FUSIONS above is filled by the fusion passes.
from pathlib import Path
from typing import Mapping

from onnxforge.errors import ProviderError
from onnxforge.runtime.options import OptionSpec, as_ort_string, validate
from onnxforge.runtime.shapes import ShapeRange, format_shape
from onnxforge.runtime.space import Dimension

NAME = "tensorrt"
ORT_NAME = "TensorrtExecutionProvider"
# TensorRT's explicit quantization reads symmetric s8 Q/DQ pairs (zero point 0).
QUANT_FORMAT = "qdq-s8s8-symmetric"
PROFILE_KEYS = ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")

OPTIONS: dict[str, OptionSpec] = {
    "device_id": OptionSpec("int", "GPU index", minimum=0),
    "trt_max_workspace_size": OptionSpec("int", "builder workspace in bytes", minimum=1),
    "trt_fp16_enable": OptionSpec("bool", "allow FP16 kernels (lossy)"),
    "trt_bf16_enable": OptionSpec("bool", "allow BF16 kernels (lossy)"),
    "trt_int8_enable": OptionSpec("bool", "allow INT8 kernels (needs Q/DQ or a calibration table)"),
    "trt_int8_calibration_table_name": OptionSpec("str", "INT8 calibration table file"),
    "trt_int8_use_native_calibration_table": OptionSpec("bool", "the table is TensorRT's native format"),
    "trt_engine_cache_enable": OptionSpec("bool", "save built engines and reuse them in later sessions"),
    "trt_engine_cache_path": OptionSpec("str", "folder of cached engines"),
    "trt_timing_cache_enable": OptionSpec("bool", "reuse kernel timings across engine builds"),
    "trt_timing_cache_path": OptionSpec("str", "folder of the timing cache"),
    "trt_force_timing_cache": OptionSpec("bool", "use the timing cache even if the device differs slightly"),
    "trt_builder_optimization_level": OptionSpec("int", "builder effort 0..5 (3 = TensorRT default)", minimum=0, maximum=5),
    "trt_max_partition_iterations": OptionSpec("int", "partitioning rounds", minimum=1),
    "trt_min_subgraph_size": OptionSpec("int", "smallest subgraph handed to TensorRT", minimum=1),
    "trt_cuda_graph_enable": OptionSpec("bool", "capture runs as CUDA graphs (static shapes)"),
    "trt_auxiliary_streams": OptionSpec("int", "extra streams per engine (-1 = heuristic)", minimum=-1),
    "trt_sparsity_enable": OptionSpec("bool", "use 2:4 structured-sparse kernels"),
    "trt_context_memory_sharing_enable": OptionSpec("bool", "share activation memory across engines"),
    "trt_layer_norm_fp32_fallback": OptionSpec("bool", "keep LayerNorm in FP32 under FP16"),
    "trt_dla_enable": OptionSpec("bool", "run on a DLA core (Jetson)"),
    "trt_dla_core": OptionSpec("int", "DLA core index", minimum=0),
    "trt_detailed_build_log": OptionSpec("bool", "log engine build details"),
    "trt_profile_min_shapes": OptionSpec("str", "optimization profile: smallest shapes, name:1x16,..."),
    "trt_profile_opt_shapes": OptionSpec("str", "optimization profile: shapes the engine is tuned for"),
    "trt_profile_max_shapes": OptionSpec("str", "optimization profile: largest shapes"),
    "io_binding": OptionSpec("bool", "keep inputs and outputs on the GPU between runs (onnxforge run loop)",
                             forward=False),
}


def validate_options(options) -> dict:
    opts = validate(OPTIONS, options, "tensorrt provider options", ProviderError)
    present = [k for k in PROFILE_KEYS if k in opts]
    if present and len(present) != 3:
        raise ProviderError("tensorrt provider options: give all of trt_profile_min/opt/max_shapes or none")
    if present:
        _check_profile_strings(opts)
    for flag, path in (("trt_engine_cache_enable", "trt_engine_cache_path"),
                       ("trt_timing_cache_enable", "trt_timing_cache_path")):
        if opts.get(path) and opts.get(flag) is False:
            raise ProviderError(f"tensorrt provider options: {path} is set but {flag} is off")
    return opts


def _check_profile_strings(opts: dict) -> None:
    parsed = [parse_profile_string(opts[k]) for k in PROFILE_KEYS]
    if not parsed[0].keys() == parsed[1].keys() == parsed[2].keys():
        raise ProviderError("tensorrt provider options: min/opt/max profile shapes name different inputs")
    for name in parsed[0]:
        lo, mid, hi = (p[name] for p in parsed)
        if not len(lo) == len(mid) == len(hi) or not all(a <= b <= c for a, b, c in zip(lo, mid, hi)):
            raise ProviderError(f"tensorrt profile shapes for {name!r}: need min <= opt <= max with equal ranks")


def parse_profile_string(text: str) -> dict[str, tuple[int, ...]]:
    """``"ids:1x16,mask:1x16"`` -> {"ids": (1, 16), "mask": (1, 16)}."""
    shapes = {}
    for item in text.split(","):
        name, sep, dims = item.strip().rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = tuple(int(d) for d in dims.split("x")) if dims else ()
        except ValueError:
            raise ProviderError(f"tensorrt profile shapes {text!r}: expected name:DxD[,name:DxD]") from None
    return shapes


def profile_shape_options(ranges: Mapping[str, ShapeRange],
                          model_inputs: Mapping[str, tuple] | None = None) -> dict[str, str]:
    """trt_profile_{min,opt,max}_shapes from ``--input-shape`` ranges.

    ``model_inputs`` maps each graph input to its shape (None or str for
    dynamic dims). Every input with a dynamic dim must get a range, or
    TensorRT would rebuild its engine whenever that input's shape changes;
    ranges must match the model's rank and its fixed dims.
    """
    if model_inputs is not None:
        _check_ranges_against_model(ranges, model_inputs)
    return {
        key: ",".join(f"{name}:{format_shape(getattr(rng, part))}" for name, rng in ranges.items())
        for key, part in zip(PROFILE_KEYS, ("min", "opt", "max"))
    }


def _check_ranges_against_model(ranges, model_inputs) -> None:
    unknown = [n for n in ranges if n not in model_inputs]
    if unknown:
        raise ProviderError(f"--input-shape {unknown[0]!r}: the model has no such input "
                            f"(inputs: {', '.join(model_inputs)})")
    uncovered = [n for n, shape in model_inputs.items() if shape is None or any(not isinstance(d, int) or d < 0 for d in shape)]
    uncovered = [n for n in uncovered if n not in ranges]
    if ranges and uncovered:
        raise ProviderError(f"tensorrt profile: dynamic input(s) {', '.join(uncovered)} need an --input-shape range too")
    for name, rng in ranges.items():
        shape = model_inputs[name]
        if shape is None:
            continue
        if len(shape) != len(rng.min):
            raise ProviderError(f"--input-shape {name}: rank {len(rng.min)} but the model's input has rank {len(shape)}")
        for i, d in enumerate(shape):
            if isinstance(d, int) and d >= 0 and not rng.min[i] == rng.max[i] == d:
                raise ProviderError(f"--input-shape {name}: dim {i} is fixed at {d} in the model")


def cache_options(cache_dir: str | Path) -> dict:
    """Engine and timing caches in ``cache_dir`` so engines are built once, not per session."""
    cache_dir = Path(cache_dir)
    return {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir / "engines"),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir / "timing"),
    }


def ort_provider(options) -> tuple[str, dict[str, str]]:
    opts = validate_options(options)
    for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
        if key in opts:
            Path(opts[key]).mkdir(parents=True, exist_ok=True)
    return ORT_NAME, {k: as_ort_string(v) for k, v in opts.items() if OPTIONS[k].forward}


def default_options(cache_dir: str | Path | None = None, **_) -> dict:
    opts = {"device_id": 0, "io_binding": True, "trt_builder_optimization_level": 3}
    if cache_dir is not None:
        opts.update(cache_options(cache_dir))
    return opts


def default_session_options() -> dict:
    return {"graph_optimization_level": "all"}


def search_space(static_shapes: bool = True, allow_lossy: bool = False, **_) -> list[Dimension]:
    """Builder effort, CUDA graphs (static shapes only), FP16 (lossy)."""
    dims = []
    if allow_lossy:
        dims.append(Dimension("fp16", "provider", ({}, {"trt_fp16_enable": True}), lossy=True))
    dims.append(Dimension("builder_level", "provider", ({}, {"trt_builder_optimization_level": 5},
                                                        {"trt_builder_optimization_level": 2})))
    if static_shapes:
        dims.append(Dimension("cuda_graph", "provider", ({}, {"trt_cuda_graph_enable": True})))
    dims.append(Dimension("aux_streams", "provider", ({}, {"trt_auxiliary_streams": 0})))
    return dims
