"""A seeded mutation fuzzer over the shared real-weight models: every mutant (a byte-level
or a field-level change, see tests/mutants.py) run through ``onnxforge optimize M -o OUT -O3``
in its own isolated worker exits 0 with an OUT that matches the mutant, or 2 (or 3) with one
``error:`` line and an optional ``hint:``; never 1, never a traceback, a hang or a dead
worker, and no file left behind (in the model's folder or the temp dir).

The default run sweeps ``DEFAULT_COUNT`` mutants once (two workers) and reports each as its
own test; ``-m slow`` adds a wider sweep with another seed.
"""
from __future__ import annotations

import os

import pytest

import mutants
from conftest import SHARED

DEFAULT_COUNT = 210
SLOW_COUNT = 600
JOBS = max(1, min(2, os.cpu_count() or 1))
MODELS_DIR = SHARED / "models"

# Mutants whose finding lies in code this test's authors may not change: name -> reason.
KNOWN = {}


def _available() -> str | None:
    missing = [m for m in mutants.MODELS if not (MODELS_DIR / f"{m}.onnx").exists()]
    return f"shared models not present in {MODELS_DIR}: {', '.join(missing)}" if missing else None


def _params(count: int, seed: int):
    out = []
    for m in mutants.mutants(count, seed):
        marks = [pytest.mark.xfail(reason=KNOWN[m.name], strict=True)] if m.name in KNOWN else []
        out.append(pytest.param(m, id=m.name, marks=marks))
    return out


_results: dict[tuple[int, int], dict] = {}


def _sweep(count: int, seed: int, base) -> dict:
    key = (count, seed)
    if key not in _results:
        why = _available()
        if why:
            pytest.skip(why)
        results = mutants.sweep(mutants.mutants(count, seed), MODELS_DIR, jobs=JOBS, base=base)
        _results[key] = {r.name: r for r in results}
    return _results[key]


def _check(result: mutants.Outcome) -> None:
    assert not result.problems, (
        f"{result.name} ({result.status}, {result.seconds:.1f} s): {result.detail}\n  " + "\n  ".join(result.problems))


@pytest.fixture(scope="module")
def default_sweep(tmp_path_factory):
    return _sweep(DEFAULT_COUNT, 0, tmp_path_factory.mktemp("mutants"))


@pytest.mark.parametrize("mutant", _params(DEFAULT_COUNT, 0))
def test_mutant(mutant, default_sweep):
    _check(default_sweep[mutant.name])


def test_sweep_covers_every_kind_and_outcome(default_sweep):
    assert len(default_sweep) >= 200
    made = {(name.split(":")[0], name.split(":")[1]) for name in default_sweep}
    kinds = mutants.BYTE_KINDS + mutants.FIELD_KINDS
    for kind in kinds:  # every kind on magika and on one of the others (tests/mutants.py: mutants())
        assert len({m for m, k in made if k == kind}) >= 2, kind
    assert {m for m, _ in made} == set(mutants.MODELS)
    statuses = {r.status for r in default_sweep.values()}
    assert {"exit0", "exit2"} <= statuses  # both kept models and refused ones, not one outcome only
    compared = [r for r in default_sweep.values() if r.compared == "equal"]
    assert len(compared) >= 20, "too few mutants came out runnable and compared"


def test_mutants_are_deterministic():
    if _available():
        pytest.skip(_available())
    a, b = mutants.mutants(40, 0), mutants.mutants(40, 0)
    assert a == b
    for m in a[:: 7]:
        assert mutants.make(m, MODELS_DIR) == mutants.make(m, MODELS_DIR)


@pytest.fixture(scope="module")
def slow_sweep(tmp_path_factory):
    return _sweep(SLOW_COUNT, 1, tmp_path_factory.mktemp("mutants-slow"))


@pytest.mark.slow
@pytest.mark.parametrize("mutant", _params(SLOW_COUNT, 1))
def test_mutant_wide(mutant, slow_sweep):
    _check(slow_sweep[mutant.name])


def test_nodes_without_names_are_fused_without_a_rollback(tmp_path, capsys):
    """Found by the fuzzer (``names``): fused nodes named after empty-named nodes clashed
    (two ``Conv_fused_Conv``), onnxruntime refused the result and every fusion rolled back."""
    import json

    import onnx

    from onnxforge.cli import main

    if _available():
        pytest.skip(_available())
    model = onnx.load(MODELS_DIR / "ppocr_mobile_v2_cls.onnx")
    for node in model.graph.node:
        node.name = ""
    src, out, rep = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(model, src)
    assert main(["optimize", str(src), "-o", str(out), "-O3", "--report", str(rep)]) == 0, capsys.readouterr().err
    report = json.loads(rep.read_text())
    assert report["rolled_back"] == []
    names = [n.name for n in onnx.load(out).graph.node if n.name]
    assert len(names) == len(set(names))
