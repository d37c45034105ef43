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
build does not have. The format itself (keys, types, ranges) is recipe_schema.py,
where each key is written is recipe_lines.py, the passes and features a recipe
names are resolved in pass_files.py.

YAML is not supported: PyYAML is not a dependency, and TOML's comments, tables
and arrays of tables cover everything a recipe needs.
"""
from __future__ import annotations

import dataclasses
import os
import re
import stat
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

from .errors import DataError, OptionError
from .pass_files import missing_feature, resolve_pass
from .recipe_lines import KeyLines, Path_, tomllib
from .recipe_schema import COMMON_FIELDS, STEPS, TOP_FIELDS, Field, StepSpec

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")  # keys written without quotes


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

    def data_paths(self) -> dict[str, str]:
        """The step's feed folders given as paths, by key ("random" and unset left out)."""
        return {key: value for key, field in self.spec.fields.items()
                if field.kind in ("path", "data") and isinstance(value := self.params.get(key), str)
                and value != "random"}


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
    for step in steps:
        if settings["input_shapes"] and step.kind == "quantize" and step.params.get("bits") == "auto":
            # input_shapes pin the model before the first step; bits = "auto" times greedy generation,
            # which needs the dynamic sequence and cache dims (as --input-shape with --bits auto)
            raise checker.error(("steps", step.index, "bits"), 'bits = "auto" cannot run on a model pinned by '
                                "input_shapes", hint="drop input_shapes, or pin the shapes in a recipe run after this one")
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

    def choice(self, value: Any, field: Field, path: Path_) -> Any:
        """One of ``field.choices``, which may mix integers and strings (quantize ``bits``: 8, 4 or "auto")."""
        if isinstance(value, bool) or value not in field.choices:
            raise self.error(path, f"{_describe(value)} is not one of {', '.join(map(repr, field.choices))}")
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
    "choice": _Checker.choice,
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
