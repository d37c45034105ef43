"""Model inputs: seeded synthetic feeds that respect dtypes and value ranges, and
real feeds from ``.npz`` / ``.npy`` files.

Synthetic integer inputs that index an embedding table (Gather on an initializer)
stay below the table's size, so token ids never fall outside the vocabulary;
``*mask*`` inputs are ones; other integers are small non-negative values.
"""
from __future__ import annotations

import logging
import os
import stat
import zlib
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import DataError, OptionError, first_line

DEFAULT_DIM = 1
DEFAULT_SEQUENCE = 16
UNNAMED_TRAILING_DIM = 256
IMAGE_SIDE = 224


def parse_shape_specs(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """``["x:1x3x224x224", "ids:1x128"]`` -> {"x": (1, 3, 224, 224), "ids": (1, 128)}.
    A scalar is written ``name:`` (empty shape)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        if not sep or not name:
            raise OptionError(f"--input-shape {spec!r}: expected NAME:DxDxD, e.g. input:1x3x224x224")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
        except ValueError:
            raise OptionError(f"--input-shape {spec!r}: dims must be integers separated by 'x'") from None
        if any(d <= 0 for d in shape):
            raise OptionError(f"--input-shape {spec!r}: dims must be positive")
        check_feed_size(name, shape)
        shapes[name] = shape
    return shapes


def parse_pin_specs(specs: list[str] | None) -> dict[str, tuple[float, ...] | None]:
    """``["sr", "mode=1", "w=0.5,1,2"]`` -> {"sr": None (its default), "mode": (1,), "w": (0.5, 1, 2)}."""
    pins: dict[str, tuple[float, ...] | None] = {}
    for spec in specs or []:
        name, sep, text = spec.partition("=")
        if not name:
            raise OptionError(f"--pin-input {spec!r}: expected NAME or NAME=VALUE[,VALUE...]")
        if not sep:
            pins[name] = None
            continue
        try:
            pins[name] = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise OptionError(f"--pin-input {spec!r}: values must be numbers separated by ','") from None
    return pins


def graph_of(model) -> gs.Graph:
    if isinstance(model, gs.Graph):
        return model
    if isinstance(model, onnx.ModelProto):
        return gs.import_onnx(model)
    return model.graph  # onnxforge Model


def resolve_shape(tensor: gs.Variable, pinned: Mapping[str, tuple[int, ...]] | None) -> tuple[int, ...]:
    if pinned and tensor.name in pinned:
        return tuple(pinned[tensor.name])
    shape = tensor.shape
    if shape is None:
        return ()
    dims = []
    for i, d in enumerate(shape):
        if isinstance(d, int) and d >= 0:
            dims.append(d)
        else:
            dims.append(default_dim(i, d, shape))
    return tuple(dims)


def default_dim(index: int, name, shape) -> int:
    """A value for a dynamic dim: batch-like 1, sequence-like a short length,
    image sides 224, an unnamed trailing dim (audio samples, features) 256."""
    lname = str(name or "").lower()
    if len(shape) == 4 and index >= 2:  # image-like NCHW: a size CNN strides divide
        return IMAGE_SIDE
    if any(k in lname for k in ("seq", "len", "token", "time", "frame")):
        return DEFAULT_SEQUENCE
    if index == 0 or "batch" in lname or index < len(shape) - 1:
        return DEFAULT_DIM
    return UNNAMED_TRAILING_DIM if not lname else DEFAULT_SEQUENCE


def index_bounds(graph: gs.Graph) -> dict[str, int]:
    """Graph input name -> exclusive upper bound, for inputs used as Gather indices
    into a constant table (embeddings, lookup tables)."""
    bounds: dict[str, int] = {}
    for inp in graph.inputs:
        for consumer in _consumers_through_casts(inp):
            if consumer.op == "Gather" and len(consumer.inputs) > 1 and consumer.inputs[0] is not None:
                table = consumer.inputs[0]
                axis = consumer.attrs.get("axis", 0)
                if table.shape is not None and isinstance(table.shape[axis], int):
                    size = int(table.shape[axis])
                    bounds[inp.name] = min(bounds.get(inp.name, size), size)
    return bounds


def _consumers_through_casts(tensor, depth: int = 3) -> Iterator[gs.Node]:
    for node in tensor.outputs:
        yield node
        if node.op in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Clip") and depth > 0:
            for out in node.outputs:
                yield from _consumers_through_casts(out, depth - 1)


def seeded_feeds(
    model, input_shapes: Mapping[str, tuple[int, ...]] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """One seeded feed dict for ``model`` (Model, ModelProto or gs.Graph)."""
    graph = graph_of(model)
    bounds = index_bounds(graph)
    feeds = {}
    for inp in graph.inputs:
        rng = np.random.default_rng([seed, zlib.crc32(inp.name.encode())])
        shape = resolve_shape(inp, input_shapes)
        dtype = np.dtype(inp.dtype) if inp.dtype is not None else np.dtype(np.float32)
        feeds[inp.name] = seeded_values(inp.name, shape, dtype, bounds.get(inp.name), rng)
    return feeds


def seeded_values(name: str, shape, dtype: np.dtype, bound: int | None, rng) -> np.ndarray:
    lname = name.lower()
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        if "mask" in lname:
            return np.ones(shape, dtype=dtype)
        if bound is not None:
            high = bound
        elif "type" in lname or "segment" in lname:
            high = 2
        elif lname in ("sr", "sample_rate", "sampling_rate"):
            return np.full(shape, 16000, dtype=dtype)
        else:
            high = 2
        return rng.integers(0, max(high, 1), size=shape).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        if "mask" in lname:
            return np.ones(shape, dtype=dtype)
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in ("U", "S", "O"):
        return np.array(["onnxforge"] * int(np.prod(shape)), dtype=object).reshape(shape)
    return np.zeros(shape, dtype=dtype)


MAX_FEED_ELEMENTS = 1 << 28  # per input: 1 GiB of float32; more is a typo, not a feed


def check_feed_size(name: str, shape, option: str = "--input-shape") -> None:
    """Refuse a feed shape whose element count no machine should be asked to allocate."""
    count = 1
    for d in shape:
        count *= int(d)
    if count > MAX_FEED_ELEMENTS:
        dims = "x".join(str(int(d)) for d in shape)
        raise OptionError(f"{option} {name}:{dims}: {count:,} elements per feed is more than the "
                          f"{MAX_FEED_ELEMENTS:,} onnxforge allows",
                          hint="give the shape one real input has, e.g. a batch of 1")


def data_files(path: str | os.PathLike, suffixes: tuple[str, ...] = (".npz", ".npy")) -> list[Path]:
    """The data files at ``path`` (a file, or a folder's files with these suffixes), sorted;
    each must be a regular file (a FIFO or device would block or never end)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file or folder") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        try:
            files = sorted(p for p in path.iterdir() if p.suffix in suffixes)
        except OSError as exc:
            raise DataError(f"{path}: cannot list the folder: {exc.strerror}") from None
    else:
        files = [path]
    for f in files:
        try:
            mode = os.stat(f).st_mode
        except OSError as exc:
            raise DataError(f"{f}: cannot read: {exc.strerror}") from None
        if not stat.S_ISREG(mode):
            raise DataError(f"{f}: is not a regular file", hint="data files must be plain .npz/.npy files")
    return files


def _read_npz(f: Path) -> dict:
    try:
        with np.load(f, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:
        raise DataError(f"{f}: not a readable .npz file ({first_line(exc)})") from None


def load_feeds(path: str | os.PathLike, input_names: list[str] | None = None, limit: int | None = None) -> list[dict]:
    """Feed dicts from a folder of ``.npz`` files (one feed dict each), one ``.npz``
    file, or ``.npy`` files named after the inputs (a single feed)."""
    path = Path(path)
    files = data_files(path)
    npz = [f for f in files if f.suffix == ".npz"]
    npy = [f for f in files if f.suffix == ".npy"]
    feeds: list[dict] = []
    if npz:
        feeds = [_read_npz(f) for f in (npz[:limit] if limit else npz)]
    elif npy:
        try:
            feeds.append({f.stem: np.load(f, allow_pickle=False) for f in npy})
        except Exception as exc:
            raise DataError(f"{path}: unreadable .npy file ({first_line(exc)})") from None
    if not feeds:
        raise DataError(f"{path}: holds no .npz or .npy files")
    if input_names is not None:
        for i, feed in enumerate(feeds):
            missing = [n for n in input_names if n not in feed]
            if missing:
                raise DataError(f"{path}: feed {i} lacks input(s) {', '.join(missing)}; it has {', '.join(feed)}")
    return feeds


def iter_feed_files(path: str | os.PathLike) -> Iterator[dict]:
    """Stream feed dicts one at a time (calibration over many files never holds them all)."""
    path = Path(path)
    files = data_files(path, (".npz",))
    if not files:
        raise DataError(f"{path}: holds no .npz files")
    for f in files:
        yield _read_npz(f)


def check_data(model, path: str | os.PathLike, option: str, limit: int | None = None) -> None:
    """Refuse (exit 2) data at ``path`` that does not fit ``model``'s inputs: a
    missing input, another dtype, another rank or a fixed dim that differs.
    Reads the feeds one file at a time, before any work."""
    graph = graph_of(model)
    expected = {t.name: t for t in graph.inputs}
    files = data_files(path)
    npz = [f for f in files if f.suffix == ".npz"]
    if not npz:
        return  # .npy folders are checked by load_feeds' name check
    known = list(dict.fromkeys([*expected, *getattr(model, "overridable_inputs", ())]))  # in the model's order
    ignored: dict[str, Path] = {}
    for f in npz[:limit] if limit else npz:
        feed = _read_npz(f)
        for name, tensor in expected.items():
            if name not in feed:
                raise DataError(f"{option} {f}: lacks input {name!r}; it has {', '.join(feed) or 'nothing'}")
            _check_array(f"{option} {f}", name, feed[name], tensor)
        for name in feed:
            if name not in known:
                ignored.setdefault(name, f)
    if ignored:  # a misspelt input with a default would otherwise go unnoticed
        first = next(iter(ignored.values()))
        logging.getLogger("onnxforge").warning(
            "warning: %s %s: ignoring %s, not input(s) of the model (its inputs: %s)", option, first,
            ", ".join(repr(n) for n in ignored), ", ".join(known))


def checked_feeds(model, path: str | os.PathLike, option: str = "--data", limit: int | None = None) -> list[dict]:
    """``load_feeds`` after ``check_data``: data that does not fit ``model``'s inputs (names,
    dtypes, ranks, fixed dims) is refused in one line naming the file and the input, before
    onnxruntime's own message could."""
    check_data(model, path, option, limit)
    return load_feeds(path, [t.name for t in graph_of(model).inputs], limit=limit)


def _check_array(where: str, name: str, value: np.ndarray, tensor) -> None:
    try:
        want = np.dtype(tensor.dtype) if tensor.dtype is not None else None
    except TypeError:
        want = None
    if want is not None and want != value.dtype and not (want.kind in "OUS" and value.dtype.kind in "OUS"):
        raise DataError(f"{where}: input {name!r} is {value.dtype}, the model takes {want}")
    shape = tensor.shape
    if shape is None:
        return
    if len(shape) != value.ndim:
        raise DataError(f"{where}: input {name!r} has shape {list(value.shape)}, the model takes rank "
                        f"{len(shape)} {list(shape)}")
    for d, v in zip(shape, value.shape):
        if isinstance(d, int) and d >= 0 and d != v:
            raise DataError(f"{where}: input {name!r} has shape {list(value.shape)}, the model takes {list(shape)}")
