"""``onnxforge bench --generate N``: greedy generation with a KV cache, interleaved over models.

A decoder with past is recognised from its session's I/O (the Optimum / onnxruntime-genai
convention): ``input_ids`` [B, S]; optional ``attention_mask`` [B, P+S] and ``position_ids`` [B, S];
cache inputs and outputs paired by name (``past_key_values.*`` / ``past.*`` -> ``present.*``), rank 4
[B, H, P, D] with the sequence on axis 2; ``logits`` [B, S, V] (else the first other output).

One generation: prefill the left-padded prompt with an empty past (P = 0), take the argmax of the last
position, then N - 1 decode steps of one token, feeding each present back as past; the mask grows by
a 1 per step and position = (ones in the mask) - 1, pads at position 1, as transformers' generate does.

Timing: each round every model (in a freshly shuffled order) generates N tokens; a round gives one
prefill latency (time to first token) and the median decode-step latency per model. Ratios to the
first model come from the per-round figures (``stats.ratio_ci``, 95% interval), so machine noise hits
all models alike. tokens/s = B / median step time. Memory: the peak RSS above the level before the
session was made, over creation and one untimed generation (as ``harness`` measures it). Each model's
tokens are compared with the first model's ("same tokens").
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import random
import re
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from onnxforge.bench.memory import reset_peak_rss, status_kb
from onnxforge.bench.variants import Variant
from onnxforge.bench.stats import RatioCI, ratio_ci
from onnxforge.errors import DataError, OptionError
from onnxforge.runtime.env import environment
from onnxforge.runtime.session import session

_PAST = re.compile(r"^(past_key_values|past)([._].*)$")
_ORT_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclasses.dataclass(frozen=True)
class CacheSlot:
    past: str
    present: str
    heads: int
    head_size: int
    dtype: type


@dataclasses.dataclass(frozen=True)
class DecoderIO:
    input_ids: str
    attention_mask: str | None
    position_ids: str | None
    logits: str
    cache: tuple[CacheSlot, ...]


def decoder_io(sess, label: str = "the model") -> DecoderIO:
    """The generation I/O of a session, or DataError saying what is missing."""
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = {o.name: o for o in sess.get_outputs()}
    if "input_ids" not in inputs:
        raise DataError(f"{label}: no input_ids input, so it is not a decoder --generate can drive")
    slots = []
    for name, info in inputs.items():
        found = _PAST.match(name)
        if found is None:
            continue
        present = "present" + found.group(2)
        shape = list(info.shape)
        if present not in outputs or len(shape) != 4:
            raise DataError(f"{label}: cache input {name} has no rank-4 output {present} to feed back")
        if not all(isinstance(d, int) for d in shape[1::2]) or info.type not in _ORT_FLOATS:
            raise DataError(f"{label}: cache input {name} {shape} {info.type}: heads and head size must be "
                            "static and the type floating point")
        slots.append(CacheSlot(name, present, shape[1], shape[3], _ORT_FLOATS[info.type]))
    if not slots:
        raise DataError(f"{label}: no past_key_values.* / past.* inputs with present.* outputs (a KV cache)")
    known = {"input_ids", "attention_mask", "position_ids"} | {s.past for s in slots}
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise DataError(f"{label}: inputs --generate does not know how to feed: {', '.join(unknown)}")
    others = [n for n in outputs if n not in {s.present for s in slots}]
    logits = "logits" if "logits" in outputs else (others[0] if others else None)
    if logits is None:
        raise DataError(f"{label}: no logits output")
    return DecoderIO("input_ids", "attention_mask" if "attention_mask" in inputs else None,
                     "position_ids" if "position_ids" in inputs else None, logits, tuple(slots))


# ------------------------------------------------------------------ prompts


def left_padded(rows: Sequence[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask [B, max length] with each row's tokens at the right."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = row
        mask[b, width - len(row):] = 1
    return ids, mask


def prompt_rows(length: int, batch: int, vocab: int | None, data: str | None, seed: int) -> list[np.ndarray]:
    """``batch`` prompts: row b has ``length - b * length // (2 * batch)`` tokens (so a batch is left
    padded), taken from the first .npz files of ``data`` (their input_ids where the mask is 1) or drawn
    with ``seed`` from [0, vocab)."""
    lengths = [max(1, length - b * length // (2 * batch)) for b in range(batch)]
    if data:
        files = sorted(Path(data).glob("*.npz"))
        if not files:
            raise DataError(f"--data {data}: no .npz files with input_ids")
        rows = []
        for b, size in enumerate(lengths):
            with np.load(files[b % len(files)]) as feed:
                if "input_ids" not in feed:
                    raise DataError(f"{files[b % len(files)]}: no input_ids")
                ids = feed["input_ids"][0]
                keep = feed["attention_mask"][0].astype(bool) if "attention_mask" in feed else slice(None)
                tokens = ids[keep]
            if len(tokens) < size:
                raise DataError(f"{files[b % len(files)]}: {len(tokens)} tokens, the prompt needs {size}")
            rows.append(tokens[:size].astype(np.int64))
        return rows
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab or 1000, size).astype(np.int64) for size in lengths]


# ------------------------------------------------------------------ the loop


@dataclasses.dataclass
class Generation:
    tokens: np.ndarray  # [B, N]
    prefill_ms: float
    step_ms: list[float]


def generate(sess, io: DecoderIO, ids: np.ndarray, mask: np.ndarray, steps: int) -> Generation:
    batch = ids.shape[0]
    feeds = {io.input_ids: ids}
    for slot in io.cache:
        feeds[slot.past] = np.zeros((batch, slot.heads, 0, slot.head_size), slot.dtype)
    wanted = [io.logits] + [s.present for s in io.cache]
    tokens, times = [], []
    for step in range(steps):
        if io.attention_mask:
            feeds[io.attention_mask] = mask
        if io.position_ids:
            positions = np.cumsum(mask, axis=1) - 1
            positions[mask == 0] = 1
            feeds[io.position_ids] = positions[:, -feeds[io.input_ids].shape[1]:]
        t0 = time.perf_counter_ns()
        outputs = sess.run(wanted, feeds)
        times.append((time.perf_counter_ns() - t0) / 1e6)
        token = outputs[0][:, -1].argmax(-1).astype(np.int64)
        tokens.append(token)
        feeds = {io.input_ids: token[:, None]}
        feeds.update({slot.past: value for slot, value in zip(io.cache, outputs[1:])})
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
    return Generation(np.stack(tokens, axis=1), times[0], times[1:])


# ------------------------------------------------------------------ the bench


@dataclasses.dataclass
class GenerateConfig:
    tokens: int = 16
    prompt_length: int = 32
    batch: int = 1
    rounds: int = 10
    threads: int | None = None
    seed: int = 0
    data: str | None = None

    def __post_init__(self):
        if self.tokens < 2 or self.prompt_length < 1 or self.batch < 1 or self.rounds < 1:
            raise OptionError("bench --generate: need N >= 2 tokens, --prompt-length >= 1, --batch >= 1, "
                              "--rounds >= 1")


@dataclasses.dataclass
class GenerateModelResult:
    label: str
    path: str
    providers: list[str]
    peak_rss_mb: float | None
    prefill_ms: list[float]  # one per round
    step_ms: list[float]  # median decode step per round
    tokens: list[list[int]]
    same_tokens: bool
    prefill_ratio: RatioCI | None = None
    decode_ratio: RatioCI | None = None

    @property
    def ttft_ms(self) -> float:
        return float(np.median(self.prefill_ms))

    @property
    def decode_ms(self) -> float:
        return float(np.median(self.step_ms))

    def tokens_per_s(self, batch: int) -> float:
        return batch * 1e3 / self.decode_ms

    def to_dict(self, batch: int) -> dict:
        out = dataclasses.asdict(self)
        out.update(ttft_ms=self.ttft_ms, decode_ms_per_token=self.decode_ms, tokens_per_s=self.tokens_per_s(batch))
        for key in ("prefill_ratio", "decode_ratio"):
            value = getattr(self, key)
            out[key] = None if value is None else dataclasses.asdict(value) | {"verdict": value.verdict}
        return out


@dataclasses.dataclass
class GenerateResult:
    models: list[GenerateModelResult]
    config: dict
    environment: dict

    def to_dict(self) -> dict:
        batch = self.config["batch"]
        return {"config": self.config, "environment": self.environment,
                "models": [m.to_dict(batch) for m in self.models]}


@dataclasses.dataclass
class _Live:
    variant: Variant
    sess: object
    io: DecoderIO
    peak_rss_mb: float | None
    prefill: list[float] = dataclasses.field(default_factory=list)
    steps: list[float] = dataclasses.field(default_factory=list)
    tokens: np.ndarray | None = None


def _release_free_memory() -> None:
    """Hand freed heap back to the OS (glibc), so the RSS before a session is the live memory and the
    model bytes read when validating the file are not silently reused by the session."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure stays a lower bound
        pass


def _start(variant: Variant, config: GenerateConfig, prompt) -> tuple[_Live, tuple]:
    """Session, its I/O, one untimed generation (allocations, kernel choice) and the peak memory of
    all that; ``prompt`` is (ids, mask) or None to make it now (the vocabulary comes from the logits)."""
    _release_free_memory()
    before = status_kb("VmRSS")
    tracked = reset_peak_rss() and before is not None
    overrides = {"intra_op_num_threads": config.threads} if config.threads is not None else None
    sess = session(variant.path, variant.profile, overrides=overrides)
    io = decoder_io(sess, str(variant.path))
    if prompt is None:
        vocab = next(o.shape[-1] for o in sess.get_outputs() if o.name == io.logits)
        rows = prompt_rows(config.prompt_length, config.batch, vocab if isinstance(vocab, int) else None,
                           config.data, config.seed)
        prompt = left_padded(rows)
    first = generate(sess, io, *prompt, config.tokens)
    peak = status_kb("VmHWM") if tracked else None
    live = _Live(variant, sess, io, None if peak is None else (peak - before) / 1024)
    live.tokens = first.tokens
    return live, prompt


def run_generate_bench(variants: Sequence[Variant], config: GenerateConfig,
                       progress: Callable[[], None] | None = None) -> GenerateResult:
    lives: list[_Live] = []
    prompt = None
    for variant in variants:
        live, prompt = _start(variant, config, prompt)
        lives.append(live)
    ids, mask = prompt
    order_rng = random.Random(config.seed)
    for _ in range(config.rounds):
        order = list(range(len(lives)))
        order_rng.shuffle(order)
        for index in order:
            live = lives[index]
            run = generate(live.sess, live.io, ids, mask, config.tokens)
            live.prefill.append(run.prefill_ms)
            live.steps.append(float(np.median(run.step_ms)))
        if progress:
            progress()
    base = lives[0]
    models = []
    for k, live in enumerate(lives):
        result = GenerateModelResult(
            live.variant.label, str(live.variant.path), live.sess.get_providers(), live.peak_rss_mb,
            live.prefill, live.steps, live.tokens.tolist(), bool(np.array_equal(live.tokens, base.tokens)))
        if k:
            result.prefill_ratio = ratio_ci(base.prefill, live.prefill)
            result.decode_ratio = ratio_ci(base.steps, live.steps)
        models.append(result)
    cfg = dataclasses.asdict(config) | {"prompt_tokens": int(mask.sum()), "prompt_shape": list(ids.shape)}
    return GenerateResult(models, cfg, environment())


# ------------------------------------------------------------------ output


def summary_rows(result: GenerateResult) -> list[dict]:
    batch = result.config["batch"]
    rows = []
    for m in result.models:
        rows.append({"model": m.label, "ttft_ms": m.ttft_ms, "decode_ms": m.decode_ms,
                     "tokens_per_s": m.tokens_per_s(batch), "peak_rss_mb": m.peak_rss_mb,
                     "prefill_ratio": "baseline" if m.prefill_ratio is None else str(m.prefill_ratio),
                     "decode_ratio": "baseline" if m.decode_ratio is None else str(m.decode_ratio),
                     "same_tokens": "yes" if m.same_tokens else "NO"})
    return rows


COLUMNS = (("model", "model"), ("TTFT ms", "ttft_ms"), ("decode ms/token", "decode_ms"),
           ("tokens/s", "tokens_per_s"), ("peak MB", "peak_rss_mb"), ("prefill ratio [95% CI]", "prefill_ratio"),
           ("decode ratio [95% CI]", "decode_ratio"), ("same tokens", "same_tokens"))


def _cells(row: dict) -> list[str]:
    return [f"{row[k]:.2f}" if isinstance(row[k], float) else ("-" if row[k] is None else str(row[k]))
            for _, k in COLUMNS]


def title(result: GenerateResult) -> str:
    cfg = result.config
    return (f"onnxforge bench --generate {cfg['tokens']} (prompt {cfg['prompt_shape']}, "
            f"{cfg['rounds']} interleaved rounds)")


def markdown_table(result: GenerateResult) -> str:
    lines = [f"{title(result)}", "", "| " + " | ".join(t for t, _ in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in summary_rows(result)]
    return "\n".join(lines) + "\n"


def render(result: GenerateResult, console=None) -> None:
    """Rich table on a terminal; the Markdown table otherwise (logs, pipes)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if not console.is_terminal:
        console.print(markdown_table(result).rstrip("\n"), markup=False, highlight=False, soft_wrap=True)
        return
    table = Table(title=title(result))
    for name, _ in COLUMNS:
        table.add_column(name, justify="left" if name in ("model", "same tokens") else "right")
    for row in summary_rows(result):
        table.add_row(*_cells(row))
    console.print(table)
