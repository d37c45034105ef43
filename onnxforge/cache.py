"""A cache of expensive pipeline steps (quantization with its calibration and
sensitivity search, pruning, tuning), so a rerun in CI skips them.

An entry is keyed by SHA-256 over: the step kind and its parameters, the
digest of the model the step starts from (model file + external data), the
digests of the data files it reads, and the environment that can change the
result (onnxforge, onnxruntime, onnx and numpy versions, CPU architecture and
ISA flags, provider). Any change gives a new key; nothing is ever invalidated
in place.

An entry is a folder ``<cache>/<kind>/<key>/`` holding ``entry.json`` and the
files it names. ``entry.json`` is an envelope: schema version, kind, key, the
key material, the payload, the SHA-256 of every file, and a checksum over all
of it. An entry is used only when the envelope parses, its schema is this
one's, its key is the one asked for and is what its material hashes to, its
checksum holds and every file's digest matches; anything else (a truncated
write, a foreign or tampered entry, another schema) is ignored with a warning
and recomputed. Writes go to a temporary folder renamed into place, so readers
never see half an entry. A cache that cannot be written costs only the reuse.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

log = logging.getLogger("onnxforge")

SCHEMA_VERSION = 1
ENVELOPE = "entry.json"
CHUNK = 1 << 20


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "onnxforge" / "steps"


# ------------------------------------------------------------------ digests


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(data: Any) -> str:
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def saved_model_files(path: str | os.PathLike) -> list[Path]:
    """A model written by ``onnxforge.io.save``: the file and its ``<name>.data`` if any."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


def saved_model_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a model written by ``onnxforge.io.save`` (``saved_model_files``)."""
    return sum(f.stat().st_size for f in saved_model_files(path))


def files_digest(files, base: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of each file, by its path relative to ``base``, sorted by that path."""
    base = Path(os.path.abspath(base))
    named = sorted((os.path.relpath(os.path.abspath(f), base), Path(f)) for f in files)
    return {name: sha256_file(f) for name, f in named}


def data_digest(path: str | os.PathLike) -> str:
    """SHA-256 over a data file, or over the names and digests of a folder's files."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    entries = sorted(p for p in path.rglob("*") if p.is_file())
    return sha256_json([[str(p.relative_to(path)), sha256_file(p)] for p in entries])


def environment_key(provider: str) -> dict[str, Any]:
    """What, besides the inputs, can change a step's result."""
    import platform

    import numpy as np
    import onnx
    import onnxruntime as ort

    from . import __version__

    key = {
        "onnxforge": __version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
        "numpy": np.__version__, "arch": platform.machine(), "provider": provider,
    }
    try:
        from .runtime.env import cpu_info
    except ImportError:  # the runtime package is optional in some builds
        key["isa"] = None
    else:
        key["isa"] = cpu_info()["isa"]
    return key


# ------------------------------------------------------------------ the cache


@dataclasses.dataclass
class CacheEntry:
    key: str
    payload: dict[str, Any]
    files: dict[str, Path]  # name -> path inside the entry folder


class StepCache:
    """``get(kind, key)`` / ``put(kind, key, material, payload, files)``.

    ``key_for(kind, material)`` hashes the key material. Disabled caches
    (``--no-cache``) miss every lookup and store nothing. ``warn`` receives
    one line per ignored entry or failed write.
    """

    def __init__(self, folder: str | os.PathLike | None = None, *, enabled: bool = True,
                 warn: Callable[[str], None] | None = None):
        self.folder = Path(folder) if folder is not None else default_cache_dir()
        self.enabled = enabled
        self._warn = warn or (lambda message: log.warning("warning: %s", message))
        self.hits: list[str] = []
        self.misses: list[str] = []

    @staticmethod
    def key_for(kind: str, material: Mapping[str, Any]) -> str:
        return sha256_json({"schema": SCHEMA_VERSION, "kind": kind, "material": material})

    def entry_dir(self, kind: str, key: str) -> Path:
        return self.folder / kind / key

    # ---------------------------------------------------------------- read

    def get(self, kind: str, key: str) -> CacheEntry | None:
        if not self.enabled:
            return None
        folder = self.entry_dir(kind, key)
        if not folder.exists():
            self.misses.append(key)
            return None
        problem, entry = self._read(folder, kind, key)
        if problem:
            self._warn(f"cache entry {folder} ignored: {problem}")
            self.misses.append(key)
            return None
        self.hits.append(key)
        return entry

    def _read(self, folder: Path, kind: str, key: str) -> tuple[str | None, CacheEntry | None]:
        try:
            envelope = json.loads((folder / ENVELOPE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return f"no {ENVELOPE}", None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"unreadable {ENVELOPE} ({type(exc).__name__})", None
        problem = _envelope_problem(envelope, kind, key)
        if problem:
            return problem, None
        files = {}
        for name, digest in envelope["files"].items():
            path = folder / name
            if Path(name).name != name or not path.is_file():
                return f"file {name!r} is missing", None
            if sha256_file(path) != digest:
                return f"file {name!r} does not match its checksum", None
            files[name] = path
        return None, CacheEntry(key, envelope["payload"], files)

    # ---------------------------------------------------------------- write

    def put(self, kind: str, key: str, material: Mapping[str, Any], payload: Mapping[str, Any],
            files: Mapping[str, str | os.PathLike] | None = None) -> CacheEntry | None:
        """Store an entry; files are copied in. Returns the stored entry, or None
        when the cache is disabled or cannot be written (a warning says why)."""
        if not self.enabled:
            return None
        target = self.entry_dir(kind, key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", dir=target.parent))
        except OSError as exc:
            self._warn(f"cannot write the cache in {self.folder}: {exc.strerror or exc}")
            return None
        try:
            digests = {}
            for name, source in (files or {}).items():
                shutil.copyfile(source, staging / name)
                digests[name] = sha256_file(staging / name)
            envelope = make_envelope(kind, key, material, payload, digests)
            (staging / ENVELOPE).write_text(json.dumps(envelope, indent=1, sort_keys=True, default=str) + "\n")
            self._replace(staging, target)
        except OSError as exc:
            self._warn(f"cannot write cache entry {target}: {exc.strerror or exc}")
            return None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return CacheEntry(key, json.loads(canonical_json(payload)), {n: target / n for n in digests})

    @staticmethod
    def _replace(staging: Path, target: Path) -> None:
        """Rename the staged entry into place; an existing (bad) entry is moved aside first."""
        if target.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".old.{target.name[:16]}.", dir=target.parent))
            os.replace(target, aside / "entry")
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.exists():  # lost a race with a concurrent writer: theirs is as good
                raise


def make_envelope(kind: str, key: str, material: Mapping[str, Any], payload: Mapping[str, Any],
                  files: Mapping[str, str]) -> dict[str, Any]:
    body = {"schema": SCHEMA_VERSION, "kind": kind, "key": key, "material": material,
            "payload": payload, "files": dict(files)}
    body = json.loads(canonical_json(body))  # what a reader will see: tuples as lists, paths as strings
    return {**body, "checksum": sha256_json(body)}


def _envelope_problem(envelope: Any, kind: str, key: str) -> str | None:
    if not isinstance(envelope, dict):
        return "the envelope is not a JSON object"
    if envelope.get("schema") != SCHEMA_VERSION:
        return f"schema {envelope.get('schema')!r}, expected {SCHEMA_VERSION}"
    missing = [k for k in ("kind", "key", "material", "payload", "files", "checksum") if k not in envelope]
    if missing:
        return f"the envelope lacks {', '.join(missing)}"
    if envelope["kind"] != kind or envelope["key"] != key:
        return "it belongs to another step or key"
    body = {k: v for k, v in envelope.items() if k != "checksum"}
    if sha256_json(body) != envelope["checksum"]:
        return "the checksum does not match its contents"
    if StepCache.key_for(kind, envelope["material"]) != key:
        return "its key material does not hash to its key"
    if not isinstance(envelope["files"], dict) or not isinstance(envelope["payload"], dict):
        return "malformed files or payload"
    return None
