"""Differential sweep of ``onnxforge optimize M -o OUT -O3`` over onnx's own backend tests.

Each case is a model with inputs and expected outputs: the node test cases the onnx wheel
builds (``onnx.backend.test.case.node.collect_testcases()``) and the model folders shipped in
``onnx/backend/test/data`` (``pytorch-converted``, ``pytorch-operator``, ``simple``, ``light``).
A case counts when onnxruntime runs the original on the case's own inputs and matches the
expected outputs; then the CLI runs with no other option, in a forked worker with a time
limit, and OUT, loaded from disk, must match the expected outputs too (max relative error
<= 1e-4, NaN equal to NaN, integers, bools and strings exact).

``python tests/backend_sweep.py [--kind node|models|all] [--sample N] [--jobs 2] [--out F.md]``
prints one line per failing case and a summary.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import io
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

TIMEOUT_S = 60
RTOL = 1e-4
MODEL_KINDS = ("pytorch-converted", "pytorch-operator", "simple", "light")


@dataclasses.dataclass
class Case:
    name: str
    kind: str
    model: onnx.ModelProto | None = None  # node cases
    sets: list | None = None  # node cases: [(inputs, expected outputs)]
    folder: str | None = None  # model folders (model.onnx + test_data_set_*)


@dataclasses.dataclass
class Result:
    name: str
    status: str  # ok | skipped | exit | mismatch | timeout | crash
    detail: str = ""
    seconds: float = 0.0


def node_cases() -> list[Case]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    return [Case(c.name, "node", model=c.model, sets=c.data_sets) for c in cases]


def model_cases(kinds=MODEL_KINDS) -> list[Case]:
    root = Path(onnx.__file__).parent / "backend" / "test" / "data"
    out = []
    for kind in kinds:
        for folder in sorted((root / kind).glob("*")):
            if (folder / "model.onnx").exists():
                out.append(Case(f"{kind}/{folder.name}", kind, folder=str(folder)))
    return out


def _read_value(path: str):
    """A tensor, sequence, map or optional from a test_data_set .pb file."""
    raw = Path(path).read_bytes()
    tensor = onnx.TensorProto()
    tensor.ParseFromString(raw)
    if tensor.dims or tensor.raw_data or tensor.data_type:
        return numpy_helper.to_array(tensor)
    for cls in (onnx.SequenceProto, onnx.OptionalProto, onnx.MapProto):
        msg = cls()
        try:
            msg.ParseFromString(raw)
        except Exception:
            continue
        if cls is onnx.SequenceProto and msg.elem_type:
            return numpy_helper.to_list(msg)
        if cls is onnx.OptionalProto and msg.elem_type:
            return numpy_helper.to_optional(msg)
        if cls is onnx.MapProto and msg.key_type:
            return numpy_helper.to_dict(msg)
    return numpy_helper.to_array(tensor)


def _folder_data(folder: str):
    model = onnx.load(os.path.join(folder, "model.onnx"))
    sets = []
    for ds in sorted(glob.glob(os.path.join(folder, "test_data_set_*"))):
        ins = [_read_value(p) for p in sorted(glob.glob(os.path.join(ds, "input_*.pb")), key=_pb_index)]
        outs = [_read_value(p) for p in sorted(glob.glob(os.path.join(ds, "output_*.pb")), key=_pb_index)]
        sets.append((ins, outs))
    return model, sets


def _pb_index(path: str) -> int:
    return int(Path(path).stem.split("_")[-1])


def _feed(model: onnx.ModelProto, inputs) -> dict:
    initializers = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers] or [i.name for i in model.graph.input]
    return {n: _ort_value(v) for n, v in zip(names, inputs)}


def _ort_value(value):
    """What onnxruntime's Python binding takes: arrays (not numpy scalars, not TensorProtos)."""
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, np.generic):
        return np.asarray(value)
    if isinstance(value, list):
        return [_ort_value(v) for v in value]
    return value


def _same(expected, got) -> bool:
    expected = _ort_value(expected)
    if isinstance(expected, dict):
        return isinstance(got, dict) and expected.keys() == got.keys() and all(_same(expected[k], got[k]) for k in expected)
    if isinstance(expected, (list, tuple)):
        return isinstance(got, (list, tuple)) and len(expected) == len(got) and all(_same(e, g) for e, g in zip(expected, got))
    if expected is None:
        return got is None
    if got is None:
        return False
    e, g = np.asarray(expected), np.asarray(got)
    if e.shape != g.shape:
        return False
    if e.dtype.kind in "fc" or g.dtype.kind in "fc":
        if e.dtype.kind not in "fc" or g.dtype.kind not in "fc":
            return False
        e64, g64 = e.astype(np.float64), g.astype(np.float64)
        nan = np.isnan(e64) | np.isnan(g64)
        if not np.array_equal(np.isnan(e64), np.isnan(g64)):
            return False
        e64, g64 = e64[~nan], g64[~nan]
        if not e64.size:
            return True
        inf = np.isinf(e64) | np.isinf(g64)
        if not np.array_equal(e64[inf], g64[inf]):
            return False
        e64, g64 = e64[~inf], g64[~inf]
        scale = float(np.max(np.abs(e64))) if e64.size else 0.0
        return bool(np.all(np.abs(e64 - g64) <= RTOL * scale + 1e-6))
    if e.dtype.kind in "OUS":
        return e.tolist() == g.tolist()
    return e.dtype == g.dtype and bool(np.array_equal(e, g))


def _ort_run(path_or_bytes, model: onnx.ModelProto, sets) -> str | None:
    """None when onnxruntime runs every data set and matches; else why not."""
    import onnxruntime as ort

    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        sess = ort.InferenceSession(path_or_bytes, opts, providers=["CPUExecutionProvider"])
        for ins, outs in sets:
            got = sess.run(None, _feed(model, ins))
            if len(got) != len(outs) or not all(_same(e, g) for e, g in zip(outs, got)):
                return "outputs differ from the expected ones"
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return None


def run_case(case: Case, workdir: str) -> Result:
    """In the worker: ort baseline, then the CLI, then OUT from disk against the expected outputs."""
    t0 = time.perf_counter()
    model, sets = _folder_data(case.folder) if case.folder else (case.model, case.sets)
    src = Path(workdir) / "model.onnx"
    out = Path(workdir) / "out.onnx"
    if case.folder:
        src = Path(case.folder) / "model.onnx"
    else:
        onnx.save(model, src)
    why = _ort_run(str(src), model, sets)
    if why is not None:
        return Result(case.name, "skipped", f"onnxruntime: {why}")
    from onnxforge.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(["optimize", str(src), "-o", str(out), "-O3"])
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
    if rc != 0:
        return Result(case.name, "exit", f"exit {rc}: {_error_line(err.getvalue())}", time.perf_counter() - t0)
    why = _ort_run(str(out), model, sets)
    if why is not None:
        return Result(case.name, "mismatch", why, time.perf_counter() - t0)
    return Result(case.name, "ok", "", time.perf_counter() - t0)


def _error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    return (lines[0] if lines else (stderr.strip().splitlines() or [""])[-1])[:300]


def run_isolated_case(case: Case) -> Result:
    """One case in a worker of ``isolated.run``, in a fresh temporary folder."""
    with tempfile.TemporaryDirectory(prefix="onnxforge-sweep-") as tmp:
        return run_case(case, tmp)


def sweep(cases: list[Case], jobs: int = 2, timeout: float = TIMEOUT_S, on_result=None) -> list[Result]:
    """Each case isolated from the others and from this process (tests/isolated.py)."""
    import isolated

    def failed(case: Case, status: str, detail: str) -> Result:
        return Result(case.name, "crash" if status == "error" else status, detail)

    return isolated.run(cases, run_isolated_case, jobs=jobs, timeout=timeout, on_failure=failed, on_result=on_result)


def sample(cases: list[Case], n: int, seed: int = 0) -> list[Case]:
    if n >= len(cases):
        return cases
    return random.Random(seed).sample(cases, n)


def summarize(results: list[Result]) -> dict:
    counted = [r for r in results if r.status != "skipped"]
    ok = [r for r in counted if r.status == "ok"]
    return {"cases": len(results), "runnable": len(counted), "ok": len(ok),
            "rate": len(ok) / len(counted) if counted else 1.0,
            "failures": [r for r in counted if r.status != "ok"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="all", choices=["node", "models", "all"])
    ap.add_argument("--sample", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", help="comma-separated case names")
    ap.add_argument("--out", help="write the failures as a Markdown table here")
    args = ap.parse_args(argv)
    cases = []
    if args.kind in ("node", "all"):
        cases += node_cases()
    if args.kind in ("models", "all"):
        cases += model_cases()
    if args.only:
        keep = set(args.only.split(","))
        cases = [c for c in cases if c.name in keep]
    if args.sample:
        cases = sample(cases, args.sample)
    t0 = time.perf_counter()

    def show(r: Result) -> None:
        if r.status not in ("ok", "skipped"):
            print(f"{r.status:8s} {r.name}: {r.detail}", flush=True)

    results = sweep(cases, jobs=args.jobs, on_result=show)
    s = summarize(results)
    print(f"{s['ok']}/{s['runnable']} runnable cases ok ({100 * s['rate']:.2f}%), "
          f"{s['cases'] - s['runnable']} not run by onnxruntime itself, {time.perf_counter() - t0:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            f.write("| case | status | detail |\n|---|---|---|\n")
            for r in sorted(s["failures"], key=lambda r: r.name):
                f.write(f"| {r.name} | {r.status} | {r.detail.replace('|', '/')} |\n")
    return 0 if not s["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
