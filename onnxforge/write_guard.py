"""Outputs never replace inputs, and land whole.

Every file a command writes goes through ``write_file`` (models: ``save``):
checked against what the run reads, written to a temporary file in the
target's folder and renamed into place; the temporary file is removed on
every exit path. What a run reads (the input model and its external data,
data files, the recipe and its pass files) is registered with ``protect``
inside a ``guarding_inputs()`` block (the CLI opens one per command).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import stat
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import ModelSaveError
from .model import Model

_RUN_INPUTS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("onnxforge_run_inputs", default=None)


@contextlib.contextmanager
def guarding_inputs() -> Iterator[None]:
    """Within this block, ``protect``-ed files are never overwritten (nested blocks share one set)."""
    if _RUN_INPUTS.get() is not None:
        yield
        return
    token = _RUN_INPUTS.set({})
    try:
        yield
    finally:
        _RUN_INPUTS.reset(token)


def protect(paths: Iterable[str | os.PathLike] | str | os.PathLike | None, what: str) -> None:
    """Register files this run reads (for a folder: the files in it) so no output replaces them."""
    registry = _RUN_INPUTS.get()
    if registry is None or paths is None:
        return
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = Path(path)
        children = []
        if path.is_dir():
            with contextlib.suppress(OSError):
                children = list(path.iterdir())
        for one in children or [path]:
            try:
                st = os.stat(one)  # follows links: the identity of what is really read
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                registry.setdefault((st.st_dev, st.st_ino), f"{what}: {one}")


def _protected_by(path: Path) -> str | None:
    registry = _RUN_INPUTS.get()
    if not registry:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return registry.get((st.st_dev, st.st_ino))


def check_output_path(path: str | os.PathLike) -> None:
    """Refuse a folder, a path whose folder does not exist, or a file this run reads
    (checked before any work, and again when writing)."""
    path = Path(path)
    if path.is_dir():
        raise ModelSaveError(f"{path}: is a folder; give a file name such as {path / 'model.onnx'}")
    if not path.parent.is_dir():
        raise ModelSaveError(f"{path.parent}: the output folder does not exist")
    what = _protected_by(path)
    if what is not None:
        raise ModelSaveError(f"{path}: refusing to overwrite a file this run reads ({what})",
                             hint="write the output to another path")


def check_output_paths(*paths: str | os.PathLike | None) -> None:
    """``check_output_path`` for each given path (None skipped); two outputs may not be one file."""
    seen: dict[str, str] = {}
    for path in paths:
        if path is None:
            continue
        check_output_path(path)
        real = os.path.realpath(path)
        if real in seen:
            raise ModelSaveError(f"{path}: given for two outputs (also as {seen[real]})",
                                 hint="give each output its own path")
        seen[real] = str(path)


def write_file(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write one output atomically: ``write(tmp)`` fills a temporary file in the
    target's folder, which then replaces ``path``; the temporary file never survives."""
    path = Path(path)
    check_output_path(path)
    tmp = _new_temp(path)
    try:
        write(tmp)
        check_output_path(path)  # the run may have read (and protected) it meanwhile
        os.replace(tmp, path)
    except OSError as exc:
        raise ModelSaveError(f"{path}: cannot write: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``write_file`` for text."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _new_temp(path: Path) -> Path:
    """An empty file beside ``path``, with the permissions a plain open() gives."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        except OSError as exc:
            raise ModelSaveError(f"{path.parent}: cannot write there: {exc.strerror}") from None
        return tmp
    raise ModelSaveError(f"{path.parent}: cannot create a temporary file there")


def _refuse_overwriting_inputs(model: Model, targets: list[Path]) -> None:
    sources = model.source_files
    for target in targets:
        if not os.path.lexists(target):
            continue
        if any(_samefile(source, target) for source in sources):
            raise ModelSaveError(
                f"{target}: refusing to overwrite the input model or its external data",
                hint="write the output to another path",
            )
        check_output_path(target)


def _samefile(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # a dangling link or a vanished source: compare the paths
        return os.path.realpath(a) == os.path.realpath(b)


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a folder; the renames are done either way
    finally:
        os.close(fd)
