"""Helpers for the pipeline tests: stage an example recipe in a temporary tree
whose data folders hold seeded feeds for a model the project builds."""
from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx

from onnxforge.inputs import seeded_feeds

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DATA_KEYS = ("calibration", "validation", "data")
FEEDS_PER_FOLDER = 6


def stage_example(name: str, tmp_path: Path, model: onnx.ModelProto) -> tuple[Path, Path]:
    """Copy ``examples/<name>`` (and the user pass file) to ``tmp/recipes/examples/``,
    fill every data folder it names with seeded feeds for ``model`` (the relative
    paths such as ../../shared/data/... then land inside tmp), and save the model.
    Returns (recipe path, model path)."""
    folder = tmp_path / "recipes" / "examples"
    folder.mkdir(parents=True)
    recipe = folder / name
    shutil.copyfile(EXAMPLES / name, recipe)
    shutil.copyfile(EXAMPLES / "my_passes.py", folder / "my_passes.py")
    document = tomllib.loads(recipe.read_text())
    for step in document["steps"]:
        for key in DATA_KEYS:
            value = step.get(key)
            if isinstance(value, str) and value != "random":
                write_feeds(folder / value, model, start_seed=100 if key == "validation" else 0)
    model_path = tmp_path / "model.onnx"
    onnx.save(model, model_path)
    return recipe, model_path


def write_feeds(folder: Path, model: onnx.ModelProto, count: int = FEEDS_PER_FOLDER, start_seed: int = 0) -> None:
    folder = folder.resolve()
    if folder.exists():
        return
    folder.mkdir(parents=True)
    for i in range(count):
        np.savez(folder / f"{i:04d}.npz", **seeded_feeds(model, seed=start_seed + i))


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def output_files(path: Path) -> dict[str, str]:
    """Digests of a written model and its data file, if any."""
    files = {path.name: sha256(path)}
    data = path.with_name(path.name + ".data")
    if data.exists():
        files[data.name] = sha256(data)
    return files
