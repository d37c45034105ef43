"""INT4 weight-only quantization: ``quantize_int4(model, calib, ...) -> (Model, Int4Report)``.

Order of work:
  1. the MatMuls with a constant float32 weight (``int4_rules.matmul_weight``) and the Gather tables
     equal to a weight's transpose (a tied embedding / LM head, stored once afterwards);
  2. what stays float, with why: the LM head when asked (``lm_head=False``), weights with fewer than
     16 inputs (a single padded block would be mostly zeros);
  2b. with ``rotate`` (default: for GPTQ only, where it wins on SmolLM2): the residual stream rotated by an orthogonal matrix first (``rotate_residual.py``:
     exact in float, the RMSNorm weights folded into their readers; its d x d basis change before a tied LM
     head stays float); everything below then sees the rotated weights, the check compares with the model
     as given;
  3. calibration (GPTQ / AWQ): H = X^T X / n of each distinct MatMul input over the calibration feeds,
     streamed a group of tensors at a time (``hessians.py``); with ``stages`` > 1, sequentially: the
     inputs cut into stages in graph order, each stage's H (and cross moment C = Xq^T Xf / n) taken on the
     model whose earlier stages are already quantized, each weight then solved on those inputs for its own
     output (``stage_target`` "quantized", GPTQ's sequential mode) or for the float model's ("float"):
     ||Xq W^ - Xf W||^2 = ||Xq (W^ - W*)||^2 + const, W* = W + H^-1 (C - H) W (damped H);
  4. per input tensor, the weights reading it solved together (their rows stacked: they share H and,
     for AWQ, one input scale): ``rtn`` round to nearest (onnxruntime's MatMulNBitsQuantizer grid);
     ``gptq`` GPTQ with per-block clip search weighted by diag(H) (``gptq.py``); ``awq`` the
     activation-aware scale search then clip-searched rounding (``awq.py``); ``awq+gptq`` both;
     every calibrated method ends by refitting the block scales to the codes it chose (least squares
     on the output error, ``gptq.refit_scales``); the GPTQ methods then alternate ``refine`` times (default
     0) a coordinate-descent pass over the codes (``gptq.refine_codes``) with that refit;
     AWQ is not applied to a tied LM head (its scaled weight would no longer be the embedding table);
     a tied embedding reads the head's codes with block scales of its own, refit to the table's rows
     (least squares, ``gptq.refit_rows``): the codes GPTQ chose for the head's output error move the
     rows far in directions the final hidden states barely use (SmolLM2: 70% relative error of the
     table with the head's scales, 11% with its own; round to nearest: 3%);
  5. the graph rewrite through the rules of ``int4_rules.Int4Weights`` (the plan in the pass options);
  6. the check: on validation feeds (default: the calibration feeds) the float and INT4 models run side
     by side; the report gives the mean and minimum cosine of the output vectors (last axis, mean
     removed: softmax ignores a shift) and, for an output named ``logits`` with ``input_ids`` in the
     feed, the perplexity of both (next-token, unmasked positions). The budget: perplexity at most
     ``max_ppl_increase`` above the float one (relative), else the cosine at least 1 - ``max_drop``.
Nothing depends on time: the same model, data and options give the same bytes.

Just over 400 lines on purpose: the entry reads as its order of work above, top to bottom; the
solvers (gptq.py, awq.py), rules (int4_rules.py) and rotation (rotate_residual.py) live apart.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.context import PassContext
from onnxforge.errors import DataError, OptionError
from onnxforge.model import Model, weight_bytes

from .awq import awq_scale
from .gptq import DAMP, gptq, output_error, refine_codes, refit_rows, refit_scales
from .int4_rules import PASS_NAME, Int4Weights, PlannedWeight, matmul_weight, weight_key, weight_rows
from .nbits import BLOCK_SIZES, dequantize, k_blocks, quantize_rtn, quantize_searched
from .rotate_residual import HEAD_BASIS

METHODS = ("rtn", "gptq", "awq", "awq+gptq")
CALIBRATED = ("gptq", "awq", "awq+gptq")
MIN_INPUTS = 16
MAX_PPL_INCREASE = 0.10
MAX_VALIDATION_FEEDS = 16
# methods that rotate the residual stream unless told otherwise: SmolLM2 val perplexity, GPTQ 45.82 -> 43.20
# rotated (fake quantization, cached Hessians); RTN loses (58.94 -> 157.91): benchmarks/int4_smollm2.md
ROTATE_METHODS = ("gptq",)
REFINE_PASSES = 0  # SmolLM2: 3 passes cut the mean layer error 9% but val perplexity went 45.82 -> 46.00


@dataclasses.dataclass
class Int4Report:
    method: str
    block_size: int
    symmetric: bool
    lm_head: str
    calibration: str
    calibration_tokens: int = 0
    validation: str = ""
    quantized: int = 0
    kept_float: dict[str, str] = dataclasses.field(default_factory=dict)  # weight -> why
    tied_embeddings: list[str] = dataclasses.field(default_factory=list)
    awq: dict[str, float] = dataclasses.field(default_factory=dict)  # input tensor -> alpha
    layer_error: dict[str, float] = dataclasses.field(default_factory=dict)  # weight -> relative output error
    refusals: list[str] = dataclasses.field(default_factory=list)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    max_ppl_increase: float = MAX_PPL_INCREASE
    max_drop: float = 0.05
    accuracy_level: int = 0
    refine_passes: int = 0
    stages: int = 1  # sequential calibration stages (1: every input from the float model)
    rotation: str = ""  # the residual stream's rotation (rotate_residual.py), or why there was none
    rotated: bool = False
    budget_metric: str = ""  # what the budget judged: perplexity (increase) or cosine
    budget_met: bool | None = None
    score: float | None = None
    weight_bytes_float: int = 0
    weight_bytes_int4: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.as_dict(), indent=1))

    def summary(self) -> str:
        lines = [f"int4 weights: {self.quantized} MatMuls, method {self.method}, block {self.block_size}, "
                 f"{'symmetric' if self.symmetric else 'asymmetric (uint4 zero points)'}, LM head {self.lm_head}"]
        if self.tied_embeddings:
            lines.append(f"tied embedding stored once (GatherBlockQuantized on the LM head's codes): "
                         f"{', '.join(self.tied_embeddings)}")
        if self.rotation:
            lines.append(f"residual stream rotation: {self.rotation}")
        lines.append("activations stay float" + (f" (MatMulNBits accuracy_level {self.accuracy_level}: "
                                                  "int8 inside the kernel)" if self.accuracy_level else "")
                     + "; other weights (norms, biases) float")
        for name, why in list(self.kept_float.items())[:8]:
            lines.append(f"float: {name}: {why}")
        for refusal in self.refusals[:8]:
            lines.append(f"left as it was: {refusal}")
        lines.append(f"weights {self.weight_bytes_float / 2**20:.1f} MiB -> {self.weight_bytes_int4 / 2**20:.1f} MiB")
        m = self.metrics
        if "perplexity" in m:
            lines.append(f"perplexity {m['perplexity_float']:.3f} -> {m['perplexity']:.3f} "
                         f"({100 * (m['perplexity'] / m['perplexity_float'] - 1):+.1f}%"
                         + (f", budget +{100 * self.max_ppl_increase:.0f}%)" if self.budget_metric == "perplexity" else ")"))
        if "cosine_mean" in m:
            lines.append(f"output cosine (mean removed) mean {m['cosine_mean']:.5f}, min {m['cosine_min']:.5f}"
                         + (f"; top-1 agreement {100 * m['top1_agreement']:.1f}%" if "top1_agreement" in m else ""))
        if self.budget_met is not None:
            lines.append(f"accuracy budget ({self.budget_metric}) " + ("met" if self.budget_met else "MISSED"))
        return "\n".join(lines)


def quantize_int4(model: Model, calib: str | None, *, method: str = "gptq", block_size: int = 128,
                  symmetric: bool = True, lm_head: bool = True, act_order: bool = True,
                  refine: int = REFINE_PASSES, stages: int = 1, stage_target: str = "quantized",
                  accuracy_level: int = 0, val: str | None = None, max_ppl_increase: float = MAX_PPL_INCREASE,
                  max_drop: float = 0.05, calib_limit: int | None = None, check: bool = True,
                  budget_metric: str = "auto", rotate: bool | None = None,
                  log: Callable[[str], None] | None = None) -> tuple[Model, Int4Report]:
    """Quantize ``model`` (changed in place and returned) to INT4 weights; see the module docstring."""
    start = time.monotonic()
    log = log or (lambda _msg: None)
    if method not in METHODS:
        raise OptionError(f"unknown INT4 method {method!r}", hint=f"choose one of {', '.join(METHODS)}")
    if block_size not in BLOCK_SIZES:
        raise OptionError(f"block size {block_size} is not one MatMulNBits takes",
                          hint=f"choose one of {', '.join(map(str, BLOCK_SIZES))}")
    if method in CALIBRATED and (calib is None or calib == "random"):
        raise DataError(f"method {method} needs calibration data (--calib FOLDER)", hint="or use --weight-method rtn")
    report = Int4Report(method, block_size, symmetric, "int4" if lm_head else "float", calib or "none",
                        validation=val or calib or "", max_ppl_increase=max_ppl_increase, max_drop=max_drop,
                        accuracy_level=accuracy_level, refine_passes=refine if method in ("gptq", "awq+gptq") else 0)
    reference = model.to_proto() if check and calib not in (None, "random") else None
    rotated = (method in ROTATE_METHODS if rotate is None else rotate) and _rotate(model, report, log)
    # calibration reads the model as it will be quantized; the check compares with the model as given
    calibrated = (lambda: reference if reference is not None and not rotated else model.to_proto())
    sites = _sites(model.graph)
    heads = _lm_heads(model.graph, sites)
    tables = _tied_tables(model.graph, sites)
    report.tied_embeddings = sorted(tables.values())
    report.weight_bytes_float = weight_bytes(model.graph)
    for key, (constant, transposed, node) in sites.items():
        inputs = constant.shape[1 if transposed else 0]
        if HEAD_BASIS in node.name:
            report.kept_float[key] = "the residual rotation's basis change before the tied LM head (d x d, kept exact)"
        elif np.dtype(constant.dtype) != np.float32:
            report.kept_float[key] = f"{np.dtype(constant.dtype)} weight"
        elif inputs < MIN_INPUTS:
            report.kept_float[key] = f"{inputs} inputs (< {MIN_INPUTS}: one mostly padded block)"
        elif key in heads and not lm_head:
            report.kept_float[key] = "LM head kept float (--lm-head float)"
    todo = {k: v for k, v in sites.items() if k not in report.kept_float}
    hessians: dict[str, np.ndarray] = {}
    if method in CALIBRATED:
        from onnxforge.inputs import iter_feed_files
        from .hessians import collect_hessians

        inputs = sorted({node.inputs[0].name for _c, _t, node in todo.values()})
        feeds = (lambda: _limited(iter_feed_files(calib), calib_limit))
        if stages <= 1:
            hessians, report.calibration_tokens = collect_hessians(calibrated(), feeds, inputs, log=log)
    plan = {"weights": {}, "float": dict(report.kept_float)}
    groups: dict[str, list[str]] = {}
    for key, (_c, _t, node) in todo.items():
        groups.setdefault(node.inputs[0].name, []).append(key)
    solve = (lambda tensor, h, cross=None: _solve(plan, report, groups[tensor], sites, tables, h, tensor, method,
                                                 block_size, symmetric, act_order, heads, refine, cross))
    if method in CALIBRATED and stages > 1:
        if stage_target not in ("quantized", "float"):
            raise OptionError(f"unknown stage target {stage_target!r}", hint="choose quantized or float")
        _sequential(plan, report, groups, sites, calibrated(), feeds,
                    stages, solve, log, stage_target == "float")
    else:
        for index, (tensor, keys) in enumerate(sorted(groups.items())):
            log(f"int4: {method} {index + 1}/{len(groups)}: {', '.join(keys)}")
            solve(tensor, hessians.get(tensor))
    ctx = PassContext(model=model, options={PASS_NAME: {"plan": plan, "accuracy_level": accuracy_level}})
    stats = Int4Weights().run(model.graph, ctx)
    report.quantized = stats.stats.get("matmul-to-nbits", 0)
    report.refusals += [str(r) for r in ctx.refusals]
    report.weight_bytes_int4 = weight_bytes(model.graph)
    if reference is not None:
        _judge(report, reference, model, val or calib, log, budget_metric != "cosine")
    report.seconds = time.monotonic() - start
    return model, report


def _rotate(model: Model, report: Int4Report, log) -> bool:
    """The residual stream rotated in place (``rotate_residual.py``); whether it was."""
    from .rotate_residual import KINDS, PASS_NAME as ROTATE_PASS, RotateResidual

    log("int4: rotating the residual stream")
    ctx = PassContext(model=model, options={ROTATE_PASS: {"kind": KINDS[0], "seed": 0}})
    fired = RotateResidual().run(model.graph, ctx).stats.get(ROTATE_PASS, 0)
    report.refusals += [str(r) for r in ctx.refusals]
    report.rotated = bool(fired)
    report.rotation = (f"{KINDS[0]}, seed 0 (RMSNorm weights folded into the readers)" if fired else
                       "none: " + ("; ".join(str(r) for r in ctx.refusals) or "no embedding feeding RMSNorms"))
    return bool(fired)


def _limited(it, limit):
    for i, feed in enumerate(it):
        if limit is not None and i >= limit:
            return
        yield feed


def _sites(graph: gs.Graph) -> dict[str, tuple[gs.Constant, bool, gs.Node]]:
    sites = {}
    for node in graph.nodes:
        found = matmul_weight(node)
        if found is not None:
            sites.setdefault(weight_key(*found), (*found, node))
    return sites


def _lm_heads(graph: gs.Graph, sites) -> set[str]:
    """Weights of MatMuls whose output is a graph output (the logits)."""
    outputs = {id(t) for t in graph.outputs}
    return {k for k, (_c, _t, node) in sites.items() if id(node.outputs[0]) in outputs}


def _tied_tables(graph: gs.Graph, sites) -> dict[str, str]:
    """weight key -> Gather table name, where the table equals the weight's Wt (a tied embedding)."""
    tied = {}
    for node in graph.nodes:
        if node.op != "Gather" or not isinstance(node.inputs[0], gs.Constant) or len(node.inputs[0].shape) != 2:
            continue
        table = node.inputs[0]
        for key, (constant, transposed, _n) in sites.items():
            if key in tied or tuple(constant.shape[::-1] if not transposed else constant.shape) != tuple(table.shape):
                continue
            if constant is table or np.array_equal(weight_rows(constant, transposed), weight_rows(table, True)):
                tied[key] = table.name
    return tied


def _sequential(plan, report, groups, sites, proto, feeds, stages, solve, log, aim_float: bool) -> None:
    """Stages of MatMul inputs in graph order; each stage calibrated on the model whose earlier stages are
    already quantized (their dequantized weights fed to one session in place of the float ones). Each weight
    is solved on those inputs for its own outputs (GPTQ's sequential mode) or, ``aim_float``, for the float
    model's outputs (``_solve``'s ``cross``; on SmolLM2 layers 0-4 that over-fits: 37.97 against 36.00)."""
    from .hessians import collect_moments, weights_as_inputs

    position = {}
    for index, node in enumerate(proto.graph.node):
        for name in node.input:
            position.setdefault(name, index)
    order = sorted(groups, key=lambda t: position.get(t, len(position)))
    names = {sites[k][0].name for keys in groups.values() for k in keys}
    model, float_weights = weights_as_inputs(proto, names)
    del proto
    quantized: dict[str, np.ndarray] = {}
    for index, chunk in enumerate(np.array_split(np.array(order, object), min(stages, len(order)))):
        chunk = [str(t) for t in chunk]
        log(f"int4: stage {index + 1}/{min(stages, len(order))}: calibrating {len(chunk)} inputs on the model "
            f"quantized so far")
        # the float model's inputs are only wanted for the cross moment of the float target
        hs, cs, tokens = collect_moments(model, feeds, chunk, float_weights, quantized or None, cross=aim_float)
        report.calibration_tokens = tokens
        for tensor in chunk:
            solve(tensor, hs.pop(tensor), cs.pop(tensor, None))
            for key in groups[tensor]:
                entry = plan["weights"][key]
                constant, transposed, _node = sites[key]
                approx = dequantize(entry.codes, entry.scales, entry.zeros, entry.block, entry.k)
                if entry.input_scale is not None:
                    approx = approx / entry.input_scale[None, :]
                quantized[constant.name] = np.ascontiguousarray(approx if transposed else approx.T, np.float32)
    report.stages = min(stages, len(order))


def _solve(plan, report, keys, sites, tables, hessian, tensor, method, block, symmetric, act_order, heads, refine,
           cross=None):
    rows = [weight_rows(sites[k][0], sites[k][1]).astype(np.float32) for k in keys]
    k = rows[0].shape[1]
    stacked = np.concatenate(rows, 0) if len(rows) > 1 else rows[0]
    if cross is not None:
        # min ||Xq W^ - Xf W||: GPTQ on Xq's Hessian aims at W* = W + H^-1 (C - H) W, C = Xq^T Xf / n
        damped = hessian + DAMP * np.diag(hessian).mean() * np.eye(k)
        stacked = (stacked + np.linalg.solve(damped, (cross - hessian) @ stacked.T).T).astype(np.float32)
    scale = None
    if method.startswith("awq") and not any(key in tables for key in keys):
        scale, alpha, _before, _after = awq_scale(rows, hessian, block, symmetric)
        report.awq[tensor] = alpha
        if alpha == 0.0:
            scale = None
    h = hessian
    target = stacked if scale is None else stacked * scale[None, :]
    if scale is not None:
        h = hessian / np.outer(scale, scale)
    if method == "rtn":
        codes, scales, zeros = quantize_rtn(target, block, symmetric)
    elif method in ("gptq", "awq+gptq"):
        codes, scales, zeros = gptq(target, h, block, symmetric, act_order=act_order)
    else:
        codes, scales, zeros = quantize_searched(target, block, symmetric, np.diag(h))
    if h is not None and method != "rtn":
        scales = refit_scales(target, codes, scales, zeros, h, block)
    if h is not None and method in ("gptq", "awq+gptq"):
        for _ in range(refine):  # codes for the grids, then grids for the codes: the error never grows
            codes = refine_codes(target, codes, scales, zeros, h, block, passes=1)
            scales = refit_scales(target, codes, scales, zeros, h, block)
    start = 0
    for key, w in zip(keys, rows):
        n = w.shape[0]
        table_scales = None
        if key in tables and method != "rtn":  # the table itself wants the rows back (MSE), not the head's output
            table_scales = refit_rows(w, codes[start:start + n], scales[start:start + n], zeros[start:start + n], block)
        entry = PlannedWeight(codes[start:start + n], scales[start:start + n], zeros[start:start + n], k, n, block,
                              symmetric, method, scale, tables.get(key), table_scales)
        plan["weights"][key] = entry
        if hessian is not None:
            approx = dequantize(entry.codes, entry.scales, entry.zeros, block, k)
            if scale is not None:
                approx = approx / scale[None, :]
            report.layer_error[key] = output_error(w, approx, hessian)
        start += n


def _judge(report: Int4Report, reference, model: Model, data: str, log, perplexity: bool) -> None:
    log("int4: checking the INT4 model against the float one")
    metrics, report.score, report.budget_met = judge(reference, model.to_proto(), data, report.max_ppl_increase,
                                                     report.max_drop, perplexity)
    report.metrics.update(metrics)
    report.budget_metric = "perplexity" if perplexity and "perplexity" in metrics else "cosine"


def judge(reference, candidate, data: str, max_ppl_increase: float = MAX_PPL_INCREASE, max_drop: float = 0.05,
          perplexity: bool = True) -> tuple[dict[str, float], float, bool]:
    """Float (``reference``) and quantized (``candidate``) outputs side by side on the validation feeds (see
    the module docstring); each model a ModelProto or a file path. ``perplexity`` False: the budget is the
    cosine even for a model with logits (e.g. random weights, whose perplexity means nothing).
    Returns (metrics, score, budget met)."""
    import onnxruntime as ort

    from onnxforge.inputs import iter_feed_files
    from .ortsession import session

    options = ort.SessionOptions()
    options.log_severity_level = 3

    def start(m):
        if isinstance(m, (str, os.PathLike)):
            return ort.InferenceSession(str(m), options, providers=["CPUExecutionProvider"])
        return session(m, options)

    float_session = start(reference)
    del reference
    int4_session = start(candidate)
    del candidate
    name = next((o.name for o in int4_session.get_outputs() if o.name == "logits"), int4_session.get_outputs()[0].name)
    cos, nll, nll_float, top1 = [], [], [], []
    for feed in _limited(iter_feed_files(data), MAX_VALIDATION_FEEDS):
        wanted = {i.name for i in int4_session.get_inputs()}
        feed = {k: v for k, v in feed.items() if k in wanted}
        a = int4_session.run([name], feed)[0].astype(np.float64)
        b = float_session.run([name], feed)[0].astype(np.float64)
        mask = np.asarray(feed.get("attention_mask", np.ones(a.shape[:-1]))).astype(bool)
        if mask.shape != a.shape[:-1]:
            mask = np.ones(a.shape[:-1], bool)
        va, vb = a[mask], b[mask]
        top1.append(va.argmax(-1) == vb.argmax(-1))
        va, vb = va - va.mean(-1, keepdims=True), vb - vb.mean(-1, keepdims=True)
        cos.append((va * vb).sum(-1) / np.maximum(np.linalg.norm(va, axis=-1) * np.linalg.norm(vb, axis=-1), 1e-30))
        ids = feed.get("input_ids")
        if name == "logits" and ids is not None and a.ndim == 3 and ids.shape == a.shape[:2]:
            scored = mask[:, :-1] & mask[:, 1:]
            for logits, out in ((a, nll), (b, nll_float)):
                lp = logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)
                lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
                out.append(-np.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0][scored])
    if not cos:
        raise DataError(f"{data}: no validation feeds")
    cos = np.concatenate(cos)
    metrics = dict(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()),
                   top1_agreement=float(np.concatenate(top1).mean()))
    if nll:
        metrics.update(perplexity=float(np.exp(np.concatenate(nll).mean())),
                       perplexity_float=float(np.exp(np.concatenate(nll_float).mean())))
    if nll and perplexity:
        ratio = metrics["perplexity"] / metrics["perplexity_float"]
        return metrics, ratio - 1, bool(ratio <= 1 + max_ppl_increase)
    return metrics, metrics["cosine_mean"], bool(metrics["cosine_mean"] >= 1 - max_drop)
