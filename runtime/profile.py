"""Deployment profiles: the provider order, session options and provider options
a model should run with, in one versioned JSON file saved beside the model
(``model.onnx`` -> ``model.profile.json``).

Loading validates everything: the schema tag and version, each provider name,
every session and provider option (names and values). A profile that names an
unknown option is refused with one line, never half-applied.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from onnxforge.errors import OptionError, ProviderError
from onnxforge.runtime.options import validate_session_options
from onnxforge.runtime.providers import PROVIDERS, profile_module

SCHEMA = "onnxforge.profile"
SCHEMA_VERSION = 1
TOP_LEVEL_KEYS = ("schema", "version", "providers", "session_options", "model", "tuning")


@dataclass
class ProviderEntry:
    name: str  # short name: cpu, cuda, tensorrt
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Profile:
    providers: list[ProviderEntry]
    session_options: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] | None = None  # what the profile was made for (file name)
    tuning: dict[str, Any] | None = None  # the tuning report, when tuned

    @property
    def primary(self) -> str:
        return self.providers[0].name

    def provider_options(self, name: str) -> dict[str, Any]:
        for entry in self.providers:
            if entry.name == name:
                return entry.options
        return {}

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "providers": [{"name": e.name, "options": dict(e.options)} for e in self.providers],
            "session_options": dict(self.session_options),
        }
        if self.model is not None:
            data["model"] = self.model
        if self.tuning is not None:
            data["tuning"] = self.tuning
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "profile") -> "Profile":
        _check_header(data, where)
        providers = _parse_providers(data.get("providers"), where)
        try:
            session_options = validate_session_options(data.get("session_options") or {})
        except OptionError as exc:
            raise OptionError(f"{where}: {exc.message}", hint=exc.hint) from None
        return cls(providers, session_options, data.get("model"), data.get("tuning"))

    def validated(self) -> "Profile":
        """A normalized copy; raises on any invalid name or value."""
        return Profile.from_dict(self.to_dict())


def _check_header(data, where: str) -> None:
    if not isinstance(data, Mapping):
        raise OptionError(f"{where}: expected a JSON object")
    if data.get("schema") != SCHEMA:
        raise OptionError(f"{where}: not an onnxforge profile (schema {data.get('schema')!r}, expected {SCHEMA!r})")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise OptionError(f"{where}: version must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise OptionError(f"{where}: profile version {version} is newer than this onnxforge reads ({SCHEMA_VERSION})",
                          hint="upgrade onnxforge or regenerate the profile with `onnxforge tune`")
    unknown = [k for k in data if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise OptionError(f"{where}: unknown key {unknown[0]!r}", hint=f"known keys: {', '.join(TOP_LEVEL_KEYS)}")


def provider_name(name: Any) -> str:
    """Short provider name from either form (``cuda`` or ``CUDAExecutionProvider``)."""
    if isinstance(name, str):
        lowered = name.lower().removesuffix("executionprovider")
        if lowered in PROVIDERS:
            return lowered
    raise ProviderError(f"unknown provider {name!r}", hint=f"choose one of {', '.join(PROVIDERS)}")


def _parse_providers(items, where: str) -> list[ProviderEntry]:
    if not isinstance(items, list) or not items:
        raise OptionError(f"{where}: 'providers' must be a non-empty list")
    entries: list[ProviderEntry] = []
    for item in items:
        if not isinstance(item, Mapping) or set(item) - {"name", "options"} or "name" not in item:
            raise OptionError(f"{where}: each provider is {{\"name\": ..., \"options\": {{...}}}}, got {item!r}")
        try:
            name = provider_name(item["name"])
        except ProviderError as exc:
            raise ProviderError(f"{where}: {exc.message}", hint=exc.hint) from None
        if any(e.name == name for e in entries):
            raise ProviderError(f"{where}: provider {name!r} listed twice")
        try:
            options = profile_module(name).validate_options(item.get("options") or {})
        except ProviderError as exc:
            raise ProviderError(f"{where}: {exc.message}", hint=exc.hint) from None
        entries.append(ProviderEntry(name, options))
    return entries


def default_profile(provider: str = "cpu", cache_dir: str | os.PathLike | None = None) -> Profile:
    """onnxruntime's defaults for ``provider``, with CPU as the fallback for GPU providers."""
    name = provider_name(provider)
    module = profile_module(name)
    entries = [ProviderEntry(name, module.default_options(cache_dir=cache_dir))]
    if name == "tensorrt":
        entries.append(ProviderEntry("cuda", profile_module("cuda").default_options()))
    if name != "cpu":
        entries.append(ProviderEntry("cpu", {}))
    return Profile(entries, module.default_session_options())


def profile_path_for(model_path: str | os.PathLike) -> Path:
    """``dir/model.onnx`` -> ``dir/model.profile.json``."""
    path = Path(model_path)
    return path.with_name(f"{path.stem}.profile.json")


def load_profile(path: str | os.PathLike) -> Profile:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise OptionError(f"{path}: no such profile file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OptionError(f"{path}: not a readable JSON profile ({exc})") from None
    return Profile.from_dict(data, where=str(path))


def save_profile(profile: Profile, path: str | os.PathLike) -> Path:
    """Validate, then write atomically (temporary file + rename)."""
    path = Path(path)
    text = json.dumps(profile.validated().to_dict(), indent=2, sort_keys=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def resolve_profile(profile, model_path: str | os.PathLike | None = None, provider: str = "cpu") -> Profile:
    """Turn what a caller passed as ``profile`` into a validated Profile.

    ``"auto"``: the profile saved beside the model if there is one, else the
    provider's defaults; ``None``: the provider's defaults; a path, a dict or a
    Profile: that profile.
    """
    if isinstance(profile, Profile):
        return profile.validated()
    if isinstance(profile, Mapping):
        return Profile.from_dict(profile)
    if profile == "auto":
        beside = profile_path_for(model_path) if model_path is not None else None
        if beside is not None and beside.is_file():
            return load_profile(beside)
        return default_profile(provider)
    if profile is None:
        return default_profile(provider)
    if isinstance(profile, (str, os.PathLike)):
        return load_profile(profile)
    raise OptionError(f"profile: expected a path, dict or Profile, got {type(profile).__name__}")
