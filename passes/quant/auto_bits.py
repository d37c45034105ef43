"""``onnxforge quantize --bits auto``: fp32, INT8 dynamic and INT4 weight-only, measured; one is kept.

Candidates, smallest first (the order of preference): INT4 (``quantize_int4``, MatMulNBits with
accuracy_level 0: fp32 activations), the same codes with accuracy_level 4 (activations quantized to
int8 per block inside the kernel: faster on CPUs, slightly less accurate), INT8 dynamic (MatMul/Gemm
weights per column in the CPU class's format, ``formats.spec_for``: u8 without int8 dot products, s8
with them; u8 activations quantized per call: the pass onnxruntime-dynamic, ort_dynamic.py) with the MatMul/Gemm whose
input has outlier channels kept float (its rule refuses them, ``outliers.py``: more than ``max_input_error`` relative error
from per-tensor u8 quantization on the first calibration feeds; the report lists them with reasons),
and the fp32 input.

Accuracy: each quantized candidate against fp32 on the validation feeds (``int4.judge``): perplexity
increase at most ``max_ppl_increase`` for a model with ``logits`` and ``input_ids``, else the mean
output cosine at least 1 - ``max_drop``. fp32 always meets it.

Speed, on the CPU provider with ``threads`` threads, all candidates interleaved (shuffled order per
round): a decoder with a KV cache (``bench.generate.decoder_io`` recognises it) runs a greedy
generation per round (prefill of a val prompt, then one-token decode steps); the decisive figure is
the median decode step (tokens/s), prefill latency is reported beside it. Any other model (e.g. a
fixed-length causal LM without a cache) is timed per forward pass on the validation feeds (``bench.
harness``), which is then the decisive figure.

The choice: the smallest candidate that meets the budget is kept unless a larger one that also meets
it is faster by more than ``margin`` with its whole 95% interval (per-round ratios, ``stats.ratio_ci``)
below 1 - margin. A near tie therefore always resolves to the same (smaller) model, so the written
bytes change only where the timing is clear-cut; the report records every interval and says whether
a timing decided (``decided_by_timing``): only then can a rerun on another machine choose otherwise.
Each candidate itself is deterministic (``quantize_int4``, onnxruntime's quantizer).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from onnxforge.errors import DataError
from onnxforge.model import ExternalValues, Model, constants

from .outliers import FEEDS as OUTLIER_FEEDS, MAX_ERROR as MAX_INPUT_ERROR, measured_outliers
from .registered import apply_to_model

MARGIN = 0.10
ROUNDS = 8
PROMPT = 32  # tokens of the first validation feed the generation starts from


@dataclasses.dataclass
class Candidate:
    name: str
    path: str
    file_bytes: int
    metrics: dict = dataclasses.field(default_factory=dict)
    score: float | None = None  # perplexity increase (relative) or cosine
    budget_met: bool = True
    prefill_ms: float | None = None
    decode_ms: float | None = None  # per token, generation models
    ratio: dict | None = None  # decisive latency / the chosen one's, with its 95% interval


@dataclasses.dataclass
class AutoReport:
    candidates: list[Candidate]
    chosen: str
    reason: str
    timing: str  # "decode step" | "forward pass"
    decided_by_timing: bool
    margin: float
    threads: int
    rounds: int
    int4: dict = dataclasses.field(default_factory=dict)
    int8: dict = dataclasses.field(default_factory=dict)  # kept_float: node -> reason (outlier inputs)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.as_dict(), indent=1))

    def summary(self) -> str:
        lines = [f"bits auto: kept {self.chosen} ({self.reason})",
                 f"timing: {self.timing}, CPU provider, {self.threads} threads, {self.rounds} interleaved rounds"]
        for c in self.candidates:
            acc = (f"cosine {c.metrics['cosine_mean']:.5f}" if c.metrics else "reference")
            if "perplexity" in c.metrics:
                acc = f"perplexity {c.metrics['perplexity']:.3f} ({100 * (c.metrics['perplexity'] / c.metrics['perplexity_float'] - 1):+.1f}%), " + acc
            speed = (f"decode {c.decode_ms:.1f} ms/token, prefill {c.prefill_ms:.1f} ms" if c.decode_ms is not None
                     else f"forward {c.prefill_ms:.1f} ms")
            ratio = "" if c.ratio is None else (f", {c.ratio['ratio']:.3f} [{c.ratio['low']:.3f}, {c.ratio['high']:.3f}] "
                                               f"of {self.chosen}")
            lines.append(f"  {c.name}: {c.file_bytes / 2**20:.1f} MiB, {acc}, budget "
                         f"{'met' if c.budget_met else 'MISSED'}; {speed}{ratio}")
        kept = self.int8.get("kept_float", {})
        if kept:
            lines.append(f"  int8-dynamic keeps {len(kept)} MatMul/Gemm float (input outliers): {', '.join(sorted(kept))}")
        return "\n".join(lines)


def quantize_auto(model_path: str, model: Model, calib: str, *, val: str | None = None, int4_options: dict | None = None,
                  max_ppl_increase: float = 0.10, max_drop: float = 0.05, threads: int = 2, rounds: int = ROUNDS,
                  margin: float = MARGIN, seed: int = 0, perplexity: bool = True, log: Callable[[str], None] | None = None,
                  max_input_error: float | None = MAX_INPUT_ERROR) -> tuple[Model, AutoReport]:
    """Build, judge and time the candidates (module docstring); return the kept one as a Model.
    ``max_input_error``: the INT8 candidate's bound for outlier inputs (None: every MatMul/Gemm quantized)."""
    from onnxforge.io import load, save

    from .formats import spec_for
    from .int4 import judge, quantize_int4
    from .ortsession import return_freed_memory, with_external_data_loaded

    log = log or (lambda _msg: None)
    data = val or calib
    if data in (None, "random"):
        raise DataError("--bits auto needs validation feeds (--val or --calib FOLDER) to judge the candidates")
    with tempfile.TemporaryDirectory(prefix="onnxforge-bits-auto-") as tmp:
        paths = {"fp32": str(model_path)}
        log("bits auto: INT8 dynamic")
        proto = with_external_data_loaded(model.to_proto(), Path(model_path).resolve().parent)
        settings: dict = {"spec": spec_for("cpu", proto, "dynamic")}
        outliers = {}
        if max_input_error is not None:
            feeds = _first_feeds(calib if calib not in (None, "random") else data, OUTLIER_FEEDS)
            stats, outliers = measured_outliers(proto, feeds, max_input_error)
            # the rule onnxruntime-dynamic-matmul refuses these from the same statistics
            settings.update(input_stats=stats, max_input_error=max_input_error)
            log(f"bits auto: INT8 keeps {len(outliers)} MatMul/Gemm float (input outliers)")
        # the weights read once: the pass exports the graph (which reads ``proto``'s) for onnxruntime
        int8 = Model.from_proto(proto)
        apply_to_model(int8, ("onnxruntime-dynamic",), max_iterations=1, options={"onnxruntime-dynamic": settings})
        del proto
        return_freed_memory()
        paths["int8-dynamic"] = _write(save, int8, Path(tmp) / "int8.onnx")
        del int8
        log("bits auto: INT4")
        options = dict(int4_options or {})
        options.pop("accuracy_level", None)
        int4, int4_report = quantize_int4(model, calib, check=False, log=log, **options)
        paths["int4"] = _write(save, int4, Path(tmp) / "int4.onnx")
        apply_to_model(int4, ("matmulnbits-accuracy-level",), max_iterations=1,
                       options={"matmulnbits-accuracy-level": {"level": 4}})
        paths["int4-acc4"] = _write(save, int4, Path(tmp) / "int4_acc4.onnx")
        del int4
        order = ["int4", "int4-acc4", "int8-dynamic", "fp32"]
        cands = {name: Candidate(name, paths[name], _file_bytes(paths[name])) for name in order}
        for name in order[:-1]:
            log(f"bits auto: judging {name} against fp32")
            cands[name].metrics, cands[name].score, cands[name].budget_met = judge(
                paths["fp32"], paths[name], data, max_ppl_increase, max_drop, perplexity)
        log("bits auto: timing the candidates (interleaved)")
        timing, times = _time(cands, order, data, threads, rounds, seed)
        chosen, reason, by_timing = _choose([cands[n] for n in order], times, margin)
        report = AutoReport([cands[n] for n in order], chosen, reason, timing, by_timing, margin, threads, rounds,
                            int4=_int4_summary(int4_report),
                            int8={"max_input_error": max_input_error, "kept_float": outliers})
        result = load(paths[chosen])
        if chosen != "fp32":  # its file goes with the temporary folder: values read now
            for const in constants(result.graph):
                if isinstance(const._values, ExternalValues):
                    const.values = const._values.load()
        return result, report


def _first_feeds(data: str, count: int) -> list[dict]:
    from onnxforge.inputs import iter_feed_files

    feeds = []
    for feed in iter_feed_files(data):
        feeds.append(feed)
        if len(feeds) == count:
            break
    return feeds


def _write(save, model: Model, path: Path) -> str:
    save(model, path)
    return str(path)


def _file_bytes(path: str) -> int:
    """The model file plus its external data files (the same folder, referenced by the model)."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    files = {t.external_data[i].value for t in proto.graph.initializer for i in range(len(t.external_data))
             if t.external_data[i].key == "location"}
    folder = Path(path).parent
    return os.path.getsize(path) + sum(os.path.getsize(folder / f) for f in files if (folder / f).exists())


def _int4_summary(report) -> dict:
    d = report.as_dict()
    return {k: d[k] for k in ("method", "block_size", "symmetric", "lm_head", "quantized", "tied_embeddings",
                              "kept_float", "weight_bytes_float", "weight_bytes_int4", "calibration_tokens")}


def _time(cands: dict, order: list[str], data: str, threads: int, rounds: int, seed: int):
    """(kind of timing, {name: per-round decisive latencies}); fills each candidate's latency fields."""
    import onnxruntime as ort

    from onnxforge.bench.generate import GenerateConfig, decoder_io, run_generate_bench
    from onnxforge.bench.harness import compare_latency, make_variants
    from onnxforge.inputs import iter_feed_files

    options = ort.SessionOptions()
    options.log_severity_level = 3
    probe = ort.InferenceSession(cands["int4"].path, options, providers=["CPUExecutionProvider"])
    try:
        decoder_io(probe)
        generates = True
    except Exception:  # noqa: BLE001 - no KV cache: time a forward pass instead
        generates = False
    del probe
    if generates:
        first = next(iter(iter_feed_files(data)))
        length = min(PROMPT, int(np.asarray(first["attention_mask"] if "attention_mask" in first
                                            else first["input_ids"]).sum(-1).min()))
        config = GenerateConfig(tokens=8, prompt_length=length, batch=1, rounds=rounds, threads=threads, seed=seed, data=data)
        result = run_generate_bench(make_variants([cands[n].path for n in order]), config)
        for name, m in zip(order, result.models):
            cands[name].prefill_ms, cands[name].decode_ms = m.ttft_ms, m.decode_ms
        return "decode step", {name: m.step_ms for name, m in zip(order, result.models)}
    feeds = _first_feeds(data, 4)
    result = compare_latency([cands[n].path for n in order], feeds, threads=threads, rounds=rounds, seed=seed)
    for name, m in zip(order, result.models):
        cands[name].prefill_ms = m.stats["p50"]
    return "forward pass", {name: m.round_medians_ms for name, m in zip(order, result.models)}


def _choose(cands: list[Candidate], times: dict, margin: float) -> tuple[str, str, bool]:
    from onnxforge.bench.stats import ratio_ci

    passing = [c for c in cands if c.budget_met]
    chosen = passing[0]
    missed = [c.name for c in cands if not c.budget_met]
    reason = (f"the smallest within the accuracy budget" + (f"; over budget: {', '.join(missed)}" if missed else ""))
    by_timing = False
    for c in passing[1:]:
        r = ratio_ci(times[chosen.name], times[c.name])
        if r.high < 1 - margin:
            reason = (f"{c.name} is faster than {chosen.name} by more than {100 * margin:.0f}%: {r.ratio:.3f} "
                      f"[{r.low:.3f}, {r.high:.3f}]" + (f"; over budget: {', '.join(missed)}" if missed else ""))
            chosen, by_timing = c, True
    for c in cands:
        r = ratio_ci(times[chosen.name], times[c.name])
        c.ratio = {"ratio": r.ratio, "low": r.low, "high": r.high}
    return chosen.name, reason, by_timing
