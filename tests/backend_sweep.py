"""Differential sweep of onnxforge's commands over onnx's own backend tests, as a new user runs them.

Each case is a model with inputs and expected outputs: the node test cases the onnx wheel
builds (``onnx.backend.test.case.node.collect_testcases()``) and the model folders shipped in
``onnx/backend/test/data`` (``pytorch-converted``, ``pytorch-operator``, ``simple``, ``light``).
A case counts when onnxruntime runs the original on the case's own inputs and matches the
expected outputs; then one command runs (``--command``, default ``O3``: ``optimize M -o OUT
-O3``; ``O1``/``O2``; ``int8``: ``quantize --calib random``; ``fp16``: ``convert-fp16 --calib
random``; ``run``: ``run RECIPE`` with a one-step recipe, optimize at level 3), with no other
option, in a spawned worker with a time limit.

A command keeps the promise when it exits 0 and OUT, loaded from disk, runs at onnxruntime's
optimizations off (ORT_DISABLE_ALL) and at its default level (ORT_ENABLE_ALL, what users
run) with every output equal: for ``O*`` and ``run`` to the expected outputs with optimizations off and
to the original's at the default level (max relative error <= 1e-4, NaN equal to NaN,
integers, bools and strings exact); for ``int8``/``fp16`` with the same types and shapes at
both levels (values change by design: a float output's cosine to the expected one below
0.99 is reported as ``drift``). Or, for int8/fp16, it refuses in one ``error:`` line with
exit 2 or 3 (``refused``; optimize has no reason to refuse a model onnxruntime runs). Anything else fails: ``exit`` (another exit or no one-line reason),
``mismatch``, ``default-level`` (OUT fails at the default level only), ``timeout``, ``crash``.

``python tests/backend_sweep.py [--kind node|models|all] [--command O3,int8] [--sample N]
[--jobs 2] [--out F.md]`` prints one line per failing case and a summary per command.
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
MIN_COSINE = 0.99  # int8 / fp16: below it a float output is reported as drift
MODEL_KINDS = ("pytorch-converted", "pytorch-operator", "simple", "light")
# command label -> the CLI arguments after the model path (OUT appended as -o OUT).
COMMANDS = {
    "O1": ["optimize", "-O1"],
    "O2": ["optimize", "-O2"],
    "O3": ["optimize", "-O3"],
    "int8": ["quantize", "--calib", "random", "--no-latency"],
    "fp16": ["convert-fp16", "--calib", "random"],
    "run": ["run", "--no-cache", "--quiet"],  # the recipe RUN_RECIPE, written beside the model
}
LOSSY = ("int8", "fp16")
RUN_RECIPE = 'version = 1\nname = "sweep"\nprovider = "cpu"\n\n[[steps]]\nstep = "optimize"\nlevel = 3\n'
# A lossy command (int8, fp16) may refuse in one line or drift on made-up calibration
# data; optimize must give an equal model for every model onnxruntime runs.
LOSSY_PASSING = ("ok", "refused", "drift")


def keeps_promise(result: "Result") -> bool:
    return result.status == "ok" or (result.command in LOSSY and result.status in LOSSY_PASSING)


@dataclasses.dataclass
class Case:
    name: str
    kind: str
    model: onnx.ModelProto | None = None  # node cases
    sets: list | None = None  # node cases: [(inputs, expected outputs)]
    folder: str | None = None  # model folders (model.onnx + test_data_set_*)
    command: str = "O3"  # a key of COMMANDS


@dataclasses.dataclass
class Result:
    name: str
    status: str  # ok | refused | drift | skipped | exit | mismatch | default-level | timeout | crash
    detail: str = ""
    seconds: float = 0.0
    command: str = "O3"


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


def _walk(expected, got, leaf) -> bool:
    """Same structure (maps, sequences, None) with ``leaf(e, g)`` true on each pair of tensors."""
    expected = _ort_value(expected)
    if isinstance(expected, dict):
        return isinstance(got, dict) and expected.keys() == got.keys() and all(
            _walk(expected[k], got[k], leaf) for k in expected)
    if isinstance(expected, (list, tuple)):
        return isinstance(got, (list, tuple)) and len(expected) == len(got) and all(
            _walk(e, g, leaf) for e, g in zip(expected, got))
    if expected is None or got is None:
        return expected is None and got is None
    return leaf(np.asarray(expected), np.asarray(got))


def _same(expected, got) -> bool:
    return _walk(expected, got, _same_tensor)


def _same_tensor(e: np.ndarray, g: np.ndarray) -> bool:
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


def _ort_outputs(path_or_bytes, model: onnx.ModelProto, sets, default_level: bool = False):
    """Outputs per data set (a list), or why onnxruntime cannot load or run it (a str).
    ``default_level``: onnxruntime's default graph optimization level, else all off."""
    import onnxruntime as ort

    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        if not default_level:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(path_or_bytes, opts, providers=["CPUExecutionProvider"])
        return [sess.run(None, _feed(model, ins)) for ins, _outs in sets]
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _all_same(expected_sets, got_sets) -> bool:
    return all(len(g) == len(e) and all(_same(x, y) for x, y in zip(e, g)) for e, g in zip(expected_sets, got_sets))


def _ort_run(path_or_bytes, model: onnx.ModelProto, sets) -> str | None:
    """None when onnxruntime (optimizations off) runs every data set and matches; else why not."""
    got = _ort_outputs(path_or_bytes, model, sets)
    if isinstance(got, str):
        return got
    return None if _all_same([outs for _ins, outs in sets], got) else "outputs differ from the expected ones"


def _same_kind(expected, got) -> bool:
    """Same structure, and for tensors the same shape and dtype (values may differ)."""
    return _walk(expected, got, lambda e, g: e.shape == g.shape and e.dtype == g.dtype)


def _worst_cosine(expected_sets, got_sets) -> float:
    """The lowest cosine between float tensor outputs (1.0 when there are none)."""
    worst = 1.0
    for e_outs, g_outs in zip(expected_sets, got_sets):
        for e, g in zip(e_outs, g_outs):
            e, g = _ort_value(e), g
            if not isinstance(e, np.ndarray) or not isinstance(g, np.ndarray) or e.dtype.kind not in "fc":
                continue
            # scaled to at most 1 so the products of huge finite values do not overflow
            a = np.nan_to_num(e.astype(np.float64).ravel())
            b = np.nan_to_num(g.astype(np.float64).ravel())
            a, b = a / (np.abs(a).max(initial=0.0) or 1.0), b / (np.abs(b).max(initial=0.0) or 1.0)
            na, nb = np.linalg.norm(a), np.linalg.norm(b)
            cos = 1.0 if na == 0 and nb == 0 else (0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb)))
            worst = min(worst, cos)
    return worst


def judge_output(command: str, src, out, model: onnx.ModelProto, sets) -> tuple[str, str]:
    """(status, detail) for OUT, written by ``command`` from SRC, at both optimization levels."""
    expected = [outs for _ins, outs in sets]
    off = _ort_outputs(str(out), model, sets)
    if isinstance(off, str):
        return "mismatch", f"optimizations off: {off}"
    original_default = _ort_outputs(str(src), model, sets, default_level=True)
    default = _ort_outputs(str(out), model, sets, default_level=True)
    if isinstance(default, str):
        if isinstance(original_default, str):  # onnxruntime's own limit: the original fails there too
            default = None
        else:
            return "default-level", default
    if command not in LOSSY:
        if not _all_same(expected, off):
            return "mismatch", "outputs differ from the expected ones (optimizations off)"
        if default is not None and not isinstance(original_default, str) and not _all_same(original_default, default):
            return "default-level", "outputs differ from the original's at the default level"
        return "ok", ""
    for got, label in ((off, "optimizations off"), (default, "default level")):
        if got is not None and not all(len(g) == len(e) and all(_same_kind(x, y) for x, y in zip(e, g))
                                       for e, g in zip(expected, got)):
            return ("mismatch" if label == "optimizations off" else "default-level"), f"{label}: output types or shapes differ"
    worst = min(_worst_cosine(expected, off), _worst_cosine(expected, default) if default is not None else 1.0)
    if worst < MIN_COSINE:
        return "drift", f"float output cosine {worst:.4f} < {MIN_COSINE}"
    return "ok", ""


def run_case(case: Case, workdir: str) -> Result:
    """In the worker: ort baseline, then the CLI, then OUT from disk at both optimization levels."""
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
        return Result(case.name, "skipped", f"onnxruntime: {why}", command=case.command)
    from onnxforge.cli import main

    verb, *options = COMMANDS[case.command]
    argv = [verb, str(src), "-o", str(out), *options]
    if verb == "run":
        recipe = Path(workdir) / "recipe.toml"
        recipe.write_text(RUN_RECIPE)
        argv = [verb, str(recipe), str(src), "-o", str(out), *options]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
    seconds = time.perf_counter() - t0
    if rc != 0:
        line = _error_line(err.getvalue())
        one_line = rc in (2, 3) and line.startswith("error:") and "Traceback" not in err.getvalue()
        return Result(case.name, "refused" if one_line else "exit", f"exit {rc}: {line}", seconds, case.command)
    status, detail = judge_output(case.command, src, out, model, sets)
    return Result(case.name, status, detail, time.perf_counter() - t0, case.command)


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
        return Result(case.name, "crash" if status == "error" else status, detail, command=case.command)

    return isolated.run(cases, run_isolated_case, jobs=jobs, timeout=timeout, on_failure=failed, on_result=on_result)


def sample(cases: list[Case], n: int, seed: int = 0) -> list[Case]:
    if n >= len(cases):
        return cases
    return random.Random(seed).sample(cases, n)


def with_commands(cases: list[Case], commands: list[str]) -> list[Case]:
    """Each case once per command."""
    return [dataclasses.replace(c, command=cmd) for cmd in commands for c in cases]


def summarize(results: list[Result]) -> dict:
    """``ok``: results keeping the promise (``keeps_promise``)."""
    counted = [r for r in results if r.status != "skipped"]
    ok = [r for r in counted if keeps_promise(r)]
    statuses: dict[str, int] = {}
    for r in counted:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    return {"cases": len(results), "runnable": len(counted), "ok": len(ok),
            "rate": len(ok) / len(counted) if counted else 1.0, "statuses": statuses,
            "failures": [r for r in counted if not keeps_promise(r)]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="all", choices=["node", "models", "all"])
    ap.add_argument("--sample", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", help="comma-separated case names")
    ap.add_argument("--command", default="O3", help=f"comma-separated, of {', '.join(COMMANDS)}")
    ap.add_argument("--timeout", type=float, default=TIMEOUT_S, help="CPU seconds per case and command")
    ap.add_argument("--out", help="write the summary and the failures as Markdown here")
    args = ap.parse_args(argv)
    commands = args.command.split(",")
    unknown = [c for c in commands if c not in COMMANDS]
    if unknown:
        ap.error(f"--command {unknown[0]}: choose from {', '.join(COMMANDS)}")
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
            print(f"{r.status:13s} {r.command:4s} {r.name}: {r.detail}", flush=True)

    results = sweep(with_commands(cases, commands), jobs=args.jobs, timeout=args.timeout, on_result=show)
    lines, failures = [], []
    for cmd in commands:
        s = summarize([r for r in results if r.command == cmd])
        failures += s["failures"]
        counts = ", ".join(f"{k} {v}" for k, v in sorted(s["statuses"].items()))
        lines.append(f"{cmd}: {s['ok']}/{s['runnable']} runnable cases keep the promise ({100 * s['rate']:.2f}%; "
                     f"{counts}), {s['cases'] - s['runnable']} not run by onnxruntime itself")
    print("\n".join(lines) + f"\n{time.perf_counter() - t0:.0f} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(f"- {ln}" for ln in lines) + "\n\n| command | case | status | detail |\n|---|---|---|---|\n")
            for r in sorted(results, key=lambda r: (r.command, r.name)):
                if r.status not in ("ok", "skipped"):
                    f.write(f"| {r.command} | {r.name} | {r.status} | {r.detail.replace('|', '/')} |\n")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
