"""Execution-provider profiles (cpu, cuda, tensorrt): one module each.

``provider_fusions(name)`` tells the pass pipeline which fusions a provider
wants at -O3. The runtime issue extends each profile with its session-option
search space and session builder.
"""
from __future__ import annotations

import importlib

from onnxforge.errors import OptionError

PROVIDERS = ("cpu", "cuda", "tensorrt")


def profile_module(name: str):
    if name not in PROVIDERS:
        raise OptionError(f"unknown provider {name!r}", hint=f"choose one of {', '.join(PROVIDERS)}")
    return importlib.import_module(f"onnxforge.runtime.providers.{name}")


def provider_fusions(name: str) -> tuple[str, ...]:
    return tuple(getattr(profile_module(name), "FUSIONS", ()))
