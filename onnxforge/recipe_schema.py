"""The recipe format: each key's type, default, range and meaning (docs/recipes.md is
written from these), per step kind. Validation against them is recipe.validate."""
from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Mapping

RECIPE_VERSION = 1
PROVIDERS = ("cpu", "cuda", "tensorrt")


@dataclasses.dataclass(frozen=True)
class Field:
    """One recipe key: its type, default, allowed values and documentation.

    ``kind``: int, float, bool, str, str_list, shapes (name -> list of ints),
    tables (name -> table: per-pass options), path (a file or folder that must
    exist, relative to the recipe's folder), data (a path, or "random" where
    ``random_ok``)."""

    kind: str
    doc: str
    default: Any = None
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    required: bool = False
    random_ok: bool = False


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """A step kind: its keys, whether its result is cached, and the feature
    (``module:function``) it needs; a missing feature refuses the recipe."""

    kind: str
    doc: str
    fields: Mapping[str, Field]
    cacheable: bool = False
    feature: str | None = None


COMMON_FIELDS = MappingProxyType({
    "step": Field("str", "the step kind", required=True),
    "name": Field("str", "a label for the report (default: the step kind)"),
})
CACHE_FIELD = Field("bool", "reuse a cached result of this step when the model, parameters and environment match", True)
VERIFY_MODES = ("none", "structural", "numeric")

TOP_FIELDS = MappingProxyType({
    "version": Field("int", "recipe format version", RECIPE_VERSION, choices=(RECIPE_VERSION,)),
    "name": Field("str", "what this recipe is for (shown in the report)"),
    "description": Field("str", "free text"),
    "provider": Field("str", "target execution provider", "cpu", choices=PROVIDERS),
    "input_shapes": Field("shapes", "pinned dims of dynamic inputs, e.g. { input_ids = [1, 128] }", {}),
    "seed": Field("int", "seed of synthetic inputs", 0, minimum=0),
    "ray": Field("str", "fleets (onnxforge run RECIPE MODELS... -o DIR) run as Ray tasks: \"auto\" (the cluster "
                 "`ray start` made here, or RAY_ADDRESS) or a cluster address; --ray overrides it"),
    "model_timeout": Field("float", "fleets: seconds one model may run before its worker process is killed and the "
                           "model reported as failed (default 10800); --model-timeout overrides it", minimum=1),
    "external_data": Field("bool", "write weights to OUTPUT.data (default: only when the input had external data or is near 2 GB)"),
    "steps": Field("steps", "the steps, in order ([[steps]] tables)", required=True),
})

STEPS = MappingProxyType({
    "optimize": StepSpec("optimize", "graph optimization with a level or a pass list, verified", MappingProxyType({
        "level": Field("int", "0 nothing, 1 cleanup, 2 + exact fusions, 3 + provider fusions", 2, minimum=0, maximum=3),
        "passes": Field("str_list", "pass names (or module:Class / file.py:Class) instead of the level's pipeline"),
        "disable": Field("str_list", "pass names to skip", []),
        "extra_passes": Field("str_list", "passes run after the level's: names, module:Class or file.py:Class", []),
        "options": Field("tables", "per-pass options: { pass-name = { key = value } }", {}),
        "verify": Field("str", "verification of the result", "numeric", choices=VERIFY_MODES),
        "strict": Field("bool", "fail (exit 3) instead of rolling a pass back when verification fails", False),
        "data": Field("path", "feeds for numeric verification: folder of .npz feed dicts or .npy files"),
        "max_iterations": Field("int", "fixpoint iterations", 10, minimum=1),
    })),
    "check": StepSpec("check", "accuracy of the current model against the pipeline's input model", MappingProxyType({
        "data": Field("path", "feeds: folder of .npz feed dicts or .npy files (default: seeded inputs)"),
        "samples": Field("int", "feeds compared", 4, minimum=1),
        "min_cosine": Field("float", "fail (exit 3) when an output's cosine similarity is below this", minimum=-1, maximum=1),
        "max_abs": Field("float", "fail (exit 3) when an output's max absolute error exceeds this", minimum=0),
        "max_rel": Field("float", "fail (exit 3) when an output's max relative error exceeds this", minimum=0),
    })),
    "bench": StepSpec("bench", "latency of the current model against the pipeline's input, measured interleaved", MappingProxyType({
        "rounds": Field("int", "interleaved rounds", 10, minimum=1),
        "warmup": Field("int", "warmup runs per model", 3, minimum=0),
        "iterations": Field("int", "runs per model per round (default: about 0.15 s worth)", minimum=1),
        "threads": Field("int", "intra-op threads (0: onnxruntime's default)", 2, minimum=0),
        "data": Field("path", "feeds: folder of .npz feed dicts or .npy files (default: seeded inputs)"),
    }), feature="onnxforge.bench.harness:compare_latency"),
    "quantize": StepSpec("quantize", "INT8 quantization with calibration and an accuracy budget", MappingProxyType({
        "calibration": Field("data", "calibration feeds (folder of .npz/.npy), or \"random\" (accuracy then means nothing)",
                             required=True, random_ok=True),
        "validation": Field("path", "validation feeds for the accuracy budget (default: the first calibration feeds)"),
        "method": Field("str", "calibration method (auto: the better of minmax and percentile, scored)", "auto", choices=("auto", "minmax", "entropy", "percentile", "mse")),
        "mode": Field("str", "static QDQ, dynamic MatMul, or auto (per model and provider)", "auto",
                      choices=("auto", "static", "dynamic")),
        "max_drop": Field("float", "accuracy budget: the metric may drop at most this much below 1", 0.01,
                          minimum=0, maximum=0.999999),
        "metric": Field("str", "accuracy metric against the float model", "cosine", choices=("cosine", "sqnr", "top1")),
        "max_evaluations": Field("int", "models the search may build and score (default: all it can need); "
                                 "the result never depends on time", None, minimum=1),
        "budget_seconds": Field("float", "optional time limit: stops the search early, the result is then "
                                "marked not reproducible (default: none)", None, minimum=0),
        "measure_latency": Field("bool", "measure INT8 against float latency (CPU)", True),
        "rounding": Field("str", "static formats: weight rounding, nearest or learned per layer (AdaRound-style, "
                          "biases refit)", "nearest", choices=("nearest", "learned")),
        "max_input_error": Field("float", "dynamic INT8: keep float each MatMul/Gemm whose input loses more than this "
                                 "(median per-token relative L2) to per-tensor u8 quantization on the calibration feeds (outlier "
                                 "channels; 1: none kept for it)", 0.06, minimum=1e-9),
        "bits": Field("choice", "8: INT8 (the keys above); 4: INT4 weight-only MatMulNBits (the keys below); \"auto\": "
                      "fp32, INT8 dynamic and INT4 judged and timed, the fastest within the budget kept", 8,
                      choices=(8, 4, "auto")),
        "weight_method": Field("str", "INT4 weights: rtn, gptq (calibrated), awq, awq+gptq", "gptq",
                               choices=("rtn", "gptq", "awq", "awq+gptq")),
        "block_size": Field("int", "INT4 block along K", 128, choices=(16, 32, 64, 128, 256)),
        "symmetric": Field("bool", "INT4 without zero points", True),
        "lm_head": Field("bool", "INT4 also for the MatMul making a graph output (and a tied embedding)", True),
        "max_ppl_increase": Field("float", "INT4 budget: relative perplexity increase (models with logits)", 0.10,
                                  minimum=0),
        "act_order": Field("bool", "INT4 GPTQ: visit input channels by decreasing energy", True),
        "accuracy_level": Field("int", "INT4: MatMulNBits accuracy_level (4: int8 activations in the kernel)", 0,
                                choices=(0, 1, 2, 3, 4)),
        "budget_metric": Field("str", "INT4 and auto: perplexity where the model has logits and input_ids (auto), "
                               "or always the output cosine", "auto", choices=("auto", "cosine")),
        "auto_rounds": Field("int", "bits auto: interleaved timing rounds", 8, minimum=2),
        "auto_margin": Field("float", "bits auto: a larger candidate replaces a smaller one only when its whole 95% "
                             "interval is faster by more than this", 0.10, minimum=0, maximum=0.99),
        "cache": CACHE_FIELD,
    }), cacheable=True, feature="onnxforge.passes.quant.quantize:quantize"),
    "fp16": StepSpec("fp16", "float16 conversion, keeping in float32 what overflows or has no fp16 kernel", MappingProxyType({
        "calibration": Field("data", "feeds whose activation ranges show which nodes overflow fp16 "
                             "(default: only initializers are checked)", random_ok=True),
        "validation": Field("path", "validation feeds for the accuracy budget (default: the calibration feeds)"),
        "keep_io_types": Field("bool", "keep float32 graph inputs and outputs", True),
        "max_drop": Field("float", "accuracy budget: the metric may drop at most this much below 1", 0.01,
                          minimum=0, maximum=0.999999),
        "metric": Field("str", "accuracy metric against the float model", "cosine", choices=("cosine", "sqnr", "top1")),
        "cache": CACHE_FIELD,
    }), cacheable=True, feature="onnxforge.passes.quant.fp16:convert_fp16"),
    "prune": StepSpec("prune", "structured channel pruning with least-squares reconstruction; sparsity", MappingProxyType({
        "target_flops": Field("float", "keep at most this fraction of the FLOPs (0 < x < 1)", minimum=0.001, maximum=0.999),
        "ratio": Field("float", "fraction of channels removed per layer (0 < x < 1)", minimum=0.001, maximum=0.999),
        "target_params": Field("float", "keep at most this fraction of the parameters (default: target_flops)",
                               minimum=0.001, maximum=0.999),
        "importance": Field("str", "channel importance", "l1", choices=("l1", "l2", "activation")),
        "calibration": Field("path", "feeds for activation importance and reconstruction"),
        "validation": Field("path", "feeds for the sensitivity-aware allocation (default: the calibration feeds)"),
        "reconstruct": Field("bool", "refit consumers by least squares on calibration activations", True),
        "sensitivity": Field("bool", "allocate by measured output sensitivity (default: when data is given)"),
        "max_ratio": Field("float", "at most this fraction of any layer's channels is removed", 0.75,
                           minimum=0.001, maximum=0.999),
        "round_to": Field("int", "keep channel counts multiples of this", 16, minimum=1),
        "sparsity": Field("float", "unstructured magnitude sparsity level (0 < x < 1)", minimum=0.001, maximum=0.999),
        "pattern": Field("str", "N:M semi-structured sparsity, e.g. \"2:4\""),
        "cache": CACHE_FIELD,
    }), cacheable=True, feature="onnxforge.passes.prune.prune:prune"),
    "tune": StepSpec("tune", "search session options for the provider; writes OUTPUT's profile beside it", MappingProxyType({
        "budget_seconds": Field("float", "time limit of the search", 60.0, minimum=1),
        "data": Field("path", "feeds for the timing runs (default: seeded inputs)"),
        "allow_lossy": Field("bool", "let FP16/TF32 options into the search", False),
        "cache": CACHE_FIELD,
    }), cacheable=True, feature="onnxforge.runtime.tune:tune"),
})
