"""What a benchmark compares: variants (a model file with a deployment profile), made from
model paths and ``--profile`` arguments (``model.onnx@profile.json``, "auto": the profile
beside the model when there is one), labelled uniquely.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from onnxforge.errors import DataError, OptionError
from onnxforge.io import load_input
from onnxforge.runtime.profile import Profile, load_profile, profile_path_for, resolve_profile


@dataclass
class Variant:
    """One thing to benchmark: a model file run with a profile."""

    label: str
    path: Path
    profile: Profile
    profile_source: str = "default"


def unique_label(name: str, taken: set[str]) -> str:
    label, n = name, 2
    while label in taken:
        label = f"{name}#{n}"
        n += 1
    return label


def make_variants(models: Sequence, profiles: Sequence | None = None, provider: str = "cpu") -> list[Variant]:
    """Variants for model paths; ``profiles[i]`` (path, dict, Profile, "auto" or None) per model."""
    profiles = list(profiles) if profiles is not None else ["auto"] * len(models)
    if len(profiles) != len(models):
        raise OptionError("bench: give one profile per model (or none)")
    variants, taken = [], set()
    for model, prof in zip(models, profiles):
        path = Path(model)
        if not os.path.lexists(path):  # DataError: what callers of make_variants catch
            raise DataError(f"{path}: no such model file", hint="check that the path points to a complete .onnx file")
        load_input(path, "a benchmarked model")  # refuses what optimize refuses (exit 2), validates external data
        source = _profile_source(prof, path)
        name = path.stem if source in ("default", "beside", "given") else f"{path.stem}@{Path(source).stem}"
        label = unique_label(name, taken)
        taken.add(label)
        variants.append(Variant(label, path, resolve_profile(prof, path, provider), source))
    return variants


def _profile_source(prof, path: Path) -> str:
    if prof == "auto":
        return "beside" if profile_path_for(path).is_file() else "default"
    if prof is None:
        return "default"
    if isinstance(prof, (str, os.PathLike)):
        return str(prof)
    return "given"


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """``model.onnx@profile.json`` -> (model, profile); plain ``model.onnx`` -> (model, None)."""
    model, sep, prof = spec.rpartition("@")
    if sep and prof.endswith(".json") and model:
        return model, prof
    return spec, None


def load_profile_arg(arg: str | None):
    """CLI ``--profile``: None -> "auto", "none"/"default" -> None, else a loaded Profile path."""
    if arg is None or arg == "auto":
        return "auto"
    if arg.lower() in ("none", "default"):
        return None
    load_profile(arg)  # validate early: one clear error before anything runs
    return arg
