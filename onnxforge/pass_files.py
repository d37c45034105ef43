"""Code a recipe names: passes by registered name, ``module:Class`` or a ``file.py:Class``
beside the recipe (the one place pass names are resolved), and the features
(``module:function``) its steps need."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import OptionError

if TYPE_CHECKING:
    from .recipe import Recipe


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
