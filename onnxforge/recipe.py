"""Recipe files: a pipeline of steps written as TOML, validated before any work.

A recipe mirrors the Python API (see docs/recipes.md)::

    version = 1
    provider = "cpu"
    input_shapes = { pixel_values = [1, 3, 32, 32] }

    [[steps]]
    step = "optimize"
    level = 3

    [[steps]]
    step = "bench"
    rounds = 5

Validation refuses, with one line naming the key and its line, an unknown step,
an unknown key, a value of the wrong type or out of range, a pass name that does
not resolve, a data folder that does not exist, and a step whose feature this
build does not have. ``tomllib`` reports no positions, so ``KeyLines`` scans the
text itself for where each key (and each ``[[steps]]`` header) is written.

YAML is not supported: PyYAML is not a dependency, and TOML's comments, tables
and arrays of tables cover everything a recipe needs.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import re
import stat
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

from .errors import DataError, OptionError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

RECIPE_VERSION = 1
PROVIDERS = ("cpu", "cuda", "tensorrt")
Path_ = tuple  # a key's position in the document: ("steps", 0, "level")


# ============================================================== key -> line


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class KeyLines:
    """Line numbers (1-based) of the keys and table headers of a TOML text.

    Handles bare, quoted and dotted keys, ``[table]`` and ``[[array]]`` headers
    (each ``[[steps]]`` is ``("steps", i)``), and skips multi-line strings and
    arrays. Keys inside inline tables map to their parent key's line.
    """

    def __init__(self, text: str):
        self.lines: dict[Path_, int] = {}
        self._arrays: dict[Path_, int] = {}  # array-of-tables path -> last index
        self._scan(text)

    def line_of(self, path: Path_) -> int | None:
        """The line of ``path``, or of its nearest ancestor that has one."""
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None

    # ---------------------------------------------------------------- scanner

    def _scan(self, text: str) -> None:
        table: Path_ = ()
        state = _ValueState()
        for number, line in enumerate(text.splitlines(), start=1):
            if state.busy:
                state.feed(line)
                continue
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            if stripped.startswith("[["):
                table = self._header(stripped[2:], "]]", number, array=True)
            elif stripped.startswith("["):
                table = self._header(stripped[1:], "]", number, array=False)
            else:
                keys, rest = _parse_key(stripped)
                if keys is None:
                    continue  # not a key line; tomllib will have said so if it matters
                for depth in range(1, len(keys) + 1):  # a.b = 1 also writes table a
                    self.lines.setdefault(table + tuple(keys[:depth]), number)
                state.feed(rest)

    def _header(self, text: str, close: str, number: int, array: bool) -> Path_:
        keys, rest = _parse_key(text, terminator=close)
        if keys is None:
            return ()
        path = self._resolve(keys[:-1]) + (keys[-1],)
        if array:
            index = self._arrays.get(path, -1) + 1
            self._arrays[path] = index
            path = path + (index,)
        self.lines.setdefault(path, number)
        return path

    def _resolve(self, keys: list[str]) -> Path_:
        """Dotted header keys, with the current index after every array of tables."""
        path: Path_ = ()
        for key in keys:
            path += (key,)
            if path in self._arrays:
                path += (self._arrays[path],)
        return path


def _parse_key(text: str, terminator: str = "=") -> tuple[list[str] | None, str]:
    """(dotted key parts, the text after the terminator) or (None, "")."""
    keys: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            return None, ""
        if text[i] in "\"'":
            quote = text[i]
            end = i + 1
            while end < n and text[end] != quote:
                end += 2 if quote == '"' and text[end] == "\\" else 1
            if end >= n:
                return None, ""
            raw = text[i + 1:end]
            keys.append(_unescape(raw) if quote == '"' else raw)
            i = end + 1
        else:
            m = _BARE_KEY.match(text, i)
            if not m:
                return None, ""
            keys.append(m.group())
            i = m.end()
        while i < n and text[i] in " \t":
            i += 1
        if text.startswith(terminator, i):
            return keys, text[i + len(terminator):]
        if i < n and text[i] == ".":
            i += 1
            continue
        return None, ""


def _unescape(raw: str) -> str:
    try:
        return tomllib.loads(f'k = "{raw}"')["k"]
    except tomllib.TOMLDecodeError:
        return raw


class _ValueState:
    """Tracks whether a value continues past its line: an open multi-line string
    or an open array (inline tables cannot span lines in TOML 1.0)."""

    def __init__(self):
        self.depth = 0
        self.multiline: str | None = None  # '"""' or "'''" while inside one

    @property
    def busy(self) -> bool:
        return self.depth > 0 or self.multiline is not None

    def feed(self, text: str) -> None:
        i, n = 0, len(text)
        while i < n:
            if self.multiline:
                end = text.find(self.multiline, i)
                while end != -1 and self.multiline == '"""' and _escaped(text, end):
                    end = text.find(self.multiline, end + 1)
                if end == -1:
                    return
                i = end + 3
                while i < n and text[i] == self.multiline[0]:  # up to two quotes may end the string
                    i += 1
                self.multiline = None
                continue
            c = text[i]
            if text.startswith(('"""', "'''"), i):
                self.multiline = text[i:i + 3]
                i += 3
            elif c in "\"'":
                i = _skip_string(text, i)
            elif c == "#":
                return
            elif c in "[{":
                self.depth += 1
                i += 1
            elif c in "]}":
                self.depth = max(self.depth - 1, 0)
                i += 1
            else:
                i += 1


def _escaped(text: str, pos: int) -> bool:
    backslashes = 0
    while pos - 1 - backslashes >= 0 and text[pos - 1 - backslashes] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


def _skip_string(text: str, i: int) -> int:
    quote, i = text[i], i + 1
    while i < len(text) and text[i] != quote:
        i += 2 if quote == '"' and text[i] == "\\" else 1
    return i + 1


# ============================================================== schema


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
        "bits": Field("int", "8: INT8 (the keys above); 4: INT4 weight-only MatMulNBits (the keys below)", 8,
                      choices=(8, 4)),
        "weight_method": Field("str", "INT4 weights: rtn, gptq (calibrated), awq, awq+gptq", "gptq",
                               choices=("rtn", "gptq", "awq", "awq+gptq")),
        "block_size": Field("int", "INT4 block along K", 128, choices=(16, 32, 64, 128, 256)),
        "symmetric": Field("bool", "INT4 without zero points", True),
        "lm_head": Field("bool", "INT4 also for the MatMul making a graph output (and a tied embedding)", True),
        "max_ppl_increase": Field("float", "INT4 budget: relative perplexity increase (models with logits)", 0.10,
                                  minimum=0),
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


# ============================================================== the parsed recipe


@dataclasses.dataclass(frozen=True)
class Step:
    kind: str
    params: Mapping[str, Any]  # every field of the step, defaults filled in
    index: int
    line: int | None
    name: str

    @property
    def spec(self) -> StepSpec:
        return STEPS[self.kind]


@dataclasses.dataclass(frozen=True)
class Recipe:
    steps: tuple[Step, ...]
    settings: Mapping[str, Any]  # top-level keys, defaults filled in
    source: str  # path or "<dict>", used in messages
    base_dir: Path  # relative paths are resolved against it
    text: str | None = None  # the TOML text, when read from one

    @property
    def provider(self) -> str:
        return self.settings["provider"]


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block for ever
            raise OptionError(f"{path}: the recipe is not a regular file")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OptionError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise OptionError(f"{path}: cannot read the recipe: {exc}") from None
    return parse_recipe(text, source=str(path), base_dir=path.resolve().parent)


def parse_recipe(text: str, source: str = "<recipe>", base_dir: str | Path = ".") -> Recipe:
    if path_suffix(source) in (".yaml", ".yml"):
        raise OptionError(f"{source}: YAML recipes are not supported", hint="write the recipe as TOML (docs/recipes.md)")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise OptionError(f"{source}: invalid TOML: {exc}", hint="docs/recipes.md describes the format") from None
    return validate(data, source=source, base_dir=base_dir, lines=KeyLines(text), text=text)


def path_suffix(source: str) -> str:
    return Path(source).suffix.lower()


def validate(data: Mapping[str, Any], *, source: str = "<dict>", base_dir: str | Path = ".",
             lines: KeyLines | None = None, text: str | None = None) -> Recipe:
    """Check a recipe document completely; the first problem raises OptionError
    (or DataError for missing data) naming the key and its line."""
    checker = _Checker(source, Path(base_dir), lines)
    settings = checker.table(data, TOP_FIELDS, ())
    raw_steps = data["steps"]
    if not isinstance(raw_steps, list) or not raw_steps or not all(isinstance(s, Mapping) for s in raw_steps):
        raise checker.error(("steps",), "must be a non-empty array of tables ([[steps]])")
    steps = tuple(checker.step(s, i) for i, s in enumerate(raw_steps))
    return Recipe(steps, MappingProxyType(settings), source, Path(base_dir), text)


class _Checker:
    def __init__(self, source: str, base_dir: Path, lines: KeyLines | None):
        self.source, self.base_dir, self.lines = source, base_dir, lines

    # ---------------------------------------------------------------- messages

    def where(self, path: Path_) -> str:
        line = self.lines.line_of(path) if self.lines else None
        return f"{self.source}:{line}" if line else self.source

    def error(self, path: Path_, message: str, cls=OptionError, hint: str | None = None):
        return cls(f"{self.where(path)}: {_dotted(path)}: {message}", hint=hint or "docs/recipes.md lists the keys")

    # ---------------------------------------------------------------- tables

    def table(self, data: Mapping[str, Any], fields: Mapping[str, Field], path: Path_,
              extra: Mapping[str, Field] = MappingProxyType({})) -> dict[str, Any]:
        known = {**fields, **extra}
        for key in data:
            if key not in known:
                raise self.error(path + (key,), f"unknown key{_context(path, data)}", hint=_known(known))
        out = {}
        for key, field in known.items():
            if key not in data:
                if field.required:
                    raise self.error(path + (key,), f"missing required key{_context(path, data)}")
                out[key] = field.default
                continue
            out[key] = self.value(data[key], field, path + (key,))
        return out

    def step(self, data: Mapping[str, Any], index: int) -> Step:
        path = ("steps", index)
        kind = data.get("step")
        if kind is None:
            raise self.error(path, "missing key 'step' (the step kind)", hint=f"step kinds: {', '.join(STEPS)}")
        if kind not in STEPS:
            raise self.error(path + ("step",), f"unknown step {kind!r}", hint=f"step kinds: {', '.join(STEPS)}")
        spec = STEPS[kind]
        params = self.table(data, spec.fields, path, extra=COMMON_FIELDS)
        self.feature(spec, path + ("step",))
        if kind == "optimize":
            self.passes(params, path)
        if kind == "check" and all(params[k] is None for k in ("min_cosine", "max_abs", "max_rel")):
            raise self.error(path, "a check step needs min_cosine, max_abs or max_rel")
        if kind == "prune":
            self.prune(params, path)
        line = self.lines.line_of(path) if self.lines else None
        label = params.pop("name") or kind
        del params["step"]
        return Step(kind, MappingProxyType(params), index, line, label)

    def prune(self, params: dict, path: Path_) -> None:
        if all(params[k] is None for k in ("target_flops", "ratio", "sparsity", "pattern")):
            raise self.error(path, "a prune step needs target_flops, ratio, sparsity or pattern")
        for a, b in (("target_flops", "ratio"), ("sparsity", "pattern")):
            if params[a] is not None and params[b] is not None:
                raise self.error(path + (b,), f"give either {a} or {b}, not both")
        if params["pattern"] is not None:
            from .passes.prune.sparsity import parse_pattern

            try:
                parse_pattern(params["pattern"])
            except OptionError as exc:
                raise self.error(path + ("pattern",), exc.message) from None
        if params["importance"] == "activation" and params["calibration"] is None:
            raise self.error(path + ("importance",), "activation importance needs calibration data")

    def feature(self, spec: StepSpec, path: Path_) -> None:
        if spec.feature is None:
            return
        missing = missing_feature(spec.feature)
        if missing:
            raise self.error(path, f"step {spec.kind!r} is not available in this build: {missing}",
                             hint="remove the step, or update onnxforge")

    def passes(self, params: dict, path: Path_) -> None:
        """Resolve every pass name now, so a typo fails before any work."""
        from .passes.registry import all_passes

        known = set(all_passes())  # option tables must name a pass this step can run
        for key in ("passes", "disable", "extra_passes"):
            for i, name in enumerate(params.get(key) or ()):
                try:
                    known.add(resolve_pass(name, self.base_dir, instantiate=False).name)
                except OptionError as exc:
                    raise self.error(path + (key,), f"item {i + 1}: {exc.message}", hint=exc.hint) from None
        table = all_passes()
        for name, settings in (params.get("options") or {}).items():
            if name not in known:
                raise self.error(path + ("options", name), "names no known pass", hint="`onnxforge passes` lists them")
            problem = table[name].option_problem(dict(settings or {})) if name in table else None
            if problem:
                raise self.error(path + ("options", name), problem)

    # ---------------------------------------------------------------- values

    def value(self, value: Any, field: Field, path: Path_) -> Any:
        check = _VALUE_CHECKS[field.kind]
        return check(self, value, field, path)

    def scalar(self, value: Any, field: Field, path: Path_) -> Any:
        expected = {"int": int, "float": (int, float), "bool": bool, "str": str}[field.kind]
        if isinstance(value, bool) and field.kind != "bool" or not isinstance(value, expected):
            raise self.error(path, f"expected {_a(field.kind)}, got {_describe(value)}")
        if field.kind == "float":
            value = float(value)
        if field.choices and value not in field.choices:
            raise self.error(path, f"{value!r} is not one of {', '.join(map(repr, field.choices))}")
        if field.minimum is not None and value < field.minimum:
            raise self.error(path, f"{value!r} is below the minimum {field.minimum:g}")
        if field.maximum is not None and value > field.maximum:
            raise self.error(path, f"{value!r} is above the maximum {field.maximum:g}")
        return value

    def str_list(self, value: Any, field: Field, path: Path_) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(path, f"expected an array of strings, got {_describe(value)}")
        return list(value)

    def shapes(self, value: Any, field: Field, path: Path_) -> dict[str, tuple[int, ...]]:
        if not isinstance(value, Mapping):
            raise self.error(path, f"expected a table of input name = [dims], got {_describe(value)}")
        out = {}
        for name, dims in value.items():
            ok = isinstance(dims, list) and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)
            if not ok:
                raise self.error(path + (name,), f"expected an array of positive integers, got {_describe(dims)}")
            out[name] = tuple(dims)
        return out

    def tables(self, value: Any, field: Field, path: Path_) -> dict[str, dict]:
        if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
            raise self.error(path, "expected a table of tables: { pass-name = { key = value } }")
        return {k: dict(v) for k, v in value.items()}

    def path(self, value: Any, field: Field, path: Path_) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(path, f"expected a path (string), got {_describe(value)}")
        full = self.base_dir / value
        if not full.exists():
            raise self.error(path, f"{value!r}: no such file or folder (looked in {full})", cls=DataError,
                             hint="paths are relative to the recipe's folder")
        if full.is_dir() and not any(p.suffix in (".npz", ".npy") for p in full.iterdir()):
            raise self.error(path, f"{value!r}: the folder holds no .npz or .npy files", cls=DataError)
        return str(full)

    def data(self, value: Any, field: Field, path: Path_) -> str:
        if field.random_ok and value == "random":
            return "random"
        return self.path(value, field, path)

    def steps(self, value: Any, field: Field, path: Path_) -> Any:
        return value  # checked one by one in ``step``


_VALUE_CHECKS: Mapping[str, Callable] = MappingProxyType({
    "int": _Checker.scalar, "float": _Checker.scalar, "bool": _Checker.scalar, "str": _Checker.scalar,
    "str_list": _Checker.str_list, "shapes": _Checker.shapes, "tables": _Checker.tables,
    "path": _Checker.path, "data": _Checker.data, "steps": _Checker.steps,
})


def _dotted(path: Path_) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part + 1}]"  # steps are counted from 1 for people
        else:
            out += ("." if out else "") + (part if _BARE_KEY.fullmatch(part) else f'"{part}"')
    return out or "recipe"


def _context(path: Path_, data: Mapping) -> str:
    if len(path) >= 2 and path[0] == "steps" and isinstance(data.get("step"), str):
        return f" for step {data['step']!r}"
    return ""


def _known(fields: Mapping[str, Field]) -> str:
    return "known keys: " + ", ".join(sorted(fields))


def _a(kind: str) -> str:
    return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}[kind]


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} ({text if len(text) <= 40 else text[:37] + '...'})"


# ============================================================== features and passes


def missing_feature(feature: str) -> str | None:
    """None when ``module:function`` exists in this build, else why not (imported lazily)."""
    module_name, _, attr = feature.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name and module_name.startswith(exc.name):
            return f"{module_name} does not exist yet"
        return f"importing {module_name} failed: {exc}"
    if not callable(getattr(module, attr, None)):
        return f"{module_name} has no {attr}()"
    return None


def resolve_pass(name: str, base_dir: Path, instantiate: bool = True):
    """A pass (class or instance) from a registered name, ``module:Class`` or
    ``file.py:Class`` (a file relative to ``base_dir``)."""
    from .passes.base import Pass
    from .passes.registry import resolve

    module_part, sep, attr = name.rpartition(":")
    if not sep or not module_part.endswith(".py"):
        instance = resolve(name)
        return instance if instantiate else type(instance)
    module = import_file(pass_file(base_dir, module_part))
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise OptionError(f"pass {name!r}: {attr} is not a subclass of onnxforge Pass in {module_part}")
    return cls() if instantiate else cls


def pass_file(base_dir: Path, relative: str) -> Path:
    """A recipe's ``file.py``: only from the recipe's folder (after resolving ``..``
    and symbolic links); code elsewhere must be an importable module."""
    base = Path(base_dir).resolve()
    path = (base / relative).resolve()
    if os.path.commonpath([str(base), str(path)]) != str(base):
        raise OptionError(f"pass file {relative!r} resolves outside the recipe's folder ({path})",
                          hint="put pass files beside the recipe, or install them and name them module:Class")
    return path


def user_code(recipe: "Recipe") -> list[dict]:
    """The user code a recipe runs: each ``file.py:Class`` (path and SHA-256) and ``module:Class`` (its file)."""
    import hashlib

    seen: dict[str, dict] = {}
    for step in recipe.steps:
        for key in ("passes", "disable", "extra_passes"):
            for name in step.params.get(key) or ():
                module_part, sep, _attr = name.rpartition(":")
                if not sep or name in seen or key == "disable":
                    continue
                if module_part.endswith(".py"):
                    path = pass_file(recipe.base_dir, module_part)
                    seen[name] = {"pass": name, "file": str(path),
                                  "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
                else:
                    module = sys.modules.get(module_part)
                    seen[name] = {"pass": name, "module": module_part, "file": getattr(module, "__file__", None)}
    return list(seen.values())


def import_file(path: Path):
    """Import a user's pass file once per process under a name derived from its
    resolved path (stable, so pass classes compare equal across recipes)."""
    import hashlib

    path = path.resolve()
    if not path.is_file():
        raise OptionError(f"{path}: no such pass file")
    module_name = f"onnxforge_user_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise OptionError(f"{path}: importing the pass file failed: {type(exc).__name__}: {exc}") from exc
    return module
