"""The fleet benchmark (issue 20): the 8 shared models, 4 corpus models and one corrupt
model through benchmarks/fleet/fleet_cpu_int8.toml.

    nice -n 10 .venv/bin/python benchmarks/fleet/run.py [--work DIR] [--stages jobs2,rerun,alone,jobs1] [--redo S]

WORK/models: links to the models plus corrupt_model.onnx (random bytes); WORK/data/<model>:
../shared/data/<model>, or seeded feeds (8 calib, 4 val) where the shared data has none
(magika, yolov8n, the corpus models); the recipe is copied in. Then, each stage recorded in
WORK/stages/<stage>.json (a recorded stage is reused, so a long benchmark resumes):

- jobs2: `onnxforge run` the fleet with --jobs 2 on an empty cache (cache2), wall time;
- rerun: the same command again on cache2: every finished model must come from the run
  cache, byte-identical;
- alone: each good model (and the corrupt one) by itself, `onnxforge run` with the recipe's
  {model} filled in and --no-cache (nothing from the fleet's cache), 2 at a time: its output
  file must be byte-identical to the fleet's (model files are compared, never reports:
  latency figures are timings);
- jobs1: the fleet with --jobs 1 on another empty cache (cache1), wall time, bytes.

Every stage samples the 1-minute load average (the machine is shared). The package must not
change while this runs (the fleet's worker processes import it anew per model): run it on a
frozen copy, e.g. `git archive HEAD` unpacked with PYTHONPATH pointing at it (FLEET_SOURCE
names it in the results). Writes benchmarks/results/fleet.json, fleet.md, fleet_report.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
CORPUS = Path.home() / ".cache" / "onnxforge" / "corpus"
SHARED_MODELS = ["magika_v3_3", "minilm_l6_w8", "pplcnet_orientation", "ppocr_mobile_v2_cls", "ppocrv4_det",
                 "ppocrv4_rec", "silero_vad_v6", "yolov8n_320"]
# efficientnet_b0_hf is left out: onnxruntime's QDQ quantizer fails on it after -O3 ("Unable to get valid
# quantization scale ... when quantizing bias"), with or without this issue's calibration change
CORPUS_MODELS = ["mobilenet_v2_hf", "resnet50_hf", "whisper_tiny_encoder", "minilm_l6_real"]
PINNED = {"yolov8n_320": {"images": (1, 3, 320, 320)}, "magika_v3_3": {"bytes": (1, 2048)}}
ONNXFORGE = [str(Path(sys.executable).with_name("onnxforge"))]
STAGE_TIMEOUT = 3600  # seconds per onnxforge command (--stage-timeout): nothing here runs unbounded


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare(work: Path) -> list[str]:
    import numpy as np

    from onnxforge.io import load
    from onnxforge.verify_feeds import runnable_feeds

    (work / "models").mkdir(parents=True, exist_ok=True)
    (work / "data").mkdir(exist_ok=True)
    names = SHARED_MODELS + CORPUS_MODELS
    for name in names:
        source = (SHARED / "models" if name in SHARED_MODELS else CORPUS) / f"{name}.onnx"
        link = work / "models" / f"{name}.onnx"
        if not link.exists():
            link.symlink_to(source)
        data = work / "data" / name
        if data.exists():
            continue
        if (SHARED / "data" / name / "calib").is_dir():
            data.symlink_to(SHARED / "data" / name)
            continue
        model = load(source)
        for part, count, seed in (("calib", 8, 1), ("val", 4, 2)):
            (data / part).mkdir(parents=True)
            for i, feed in enumerate(runnable_feeds(model, PINNED.get(name, {}), count, seed)):
                np.savez(data / part / f"{i:04d}.npz", **feed)
    corrupt = work / "models" / "corrupt_model.onnx"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    if not (work / "data" / "corrupt_model").exists():  # its data exists: its error must be the model's
        (work / "data" / "corrupt_model").symlink_to(SHARED / "data" / "ppocr_mobile_v2_cls")
    shutil.copyfile(Path(__file__).with_name("fleet_cpu_int8.toml"), work / "recipe.toml")
    return names


class LoadSampler:
    """The machine's 1-minute load average every 30 s while a stage runs (the machine is shared)."""

    def __init__(self):
        import threading

        self.samples: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while True:
            self.samples.append(float(Path("/proc/loadavg").read_text().split()[0]))
            if self.stop.wait(30):
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def summary(self) -> dict:
        s = self.samples or [float("nan")]
        return {"mean_1min": round(sum(s) / len(s), 2), "max_1min": max(s), "samples": len(s)}


def run_bounded(command: list[str], cwd: Path) -> tuple[int | None, str]:
    """(exit code, stderr); None when it ran past STAGE_TIMEOUT: then its whole process
    group (the fleet's worker processes too) is stopped, so nothing runs on."""
    import signal

    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        return proc.wait(timeout=STAGE_TIMEOUT), proc.stderr.read()
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        return None, proc.stderr.read()


def fleet(work: Path, out: str, cache: str, jobs: int) -> dict:
    """``onnxforge run`` on the fleet; the model stays frozen only if the package is (see --frozen)."""
    command = ONNXFORGE + ["run", str(work / "recipe.toml"), str(work / "models"), "-o", str(work / out),
                           "--jobs", str(jobs), "--cache-dir", str(work / cache), "--quiet"]
    started = time.perf_counter()
    with LoadSampler() as load:
        code, stderr = run_bounded(command, work)
    wall = time.perf_counter() - started
    report = json.loads((work / out / "fleet.json").read_text())  # as far as it got, when stopped
    return {"jobs": jobs, "command": " ".join(command[1:]), "exit_code": code, "wall_s": round(wall, 1),
            "finished": code is not None, "load": load.summary(), "stderr": stderr.strip().splitlines()[-3:],
            "report": report}


def alone(work: Path, name: str) -> dict:
    """The model by itself: the same recipe with {model} filled in, no cache at all (nothing from the fleet's)."""
    text = (work / "recipe.toml").read_text().replace("{model}", name)
    recipe = work / f"alone_{name}.toml"  # beside recipe.toml: its data paths are relative to its folder
    recipe.write_text(text)
    out = work / "alone" / f"{name}.onnx"
    command = ONNXFORGE + ["run", str(recipe), str(work / "models" / f"{name}.onnx"), "-o", str(out), "--no-cache", "--quiet"]
    started = time.perf_counter()
    code, stderr = run_bounded(command, work)
    return {"command": " ".join(command[1:]), "exit_code": code, "seconds": round(time.perf_counter() - started, 1),
            "sha256": sha(out) if out.exists() else None, "error": (stderr.strip().splitlines() or [None])[0]}


def alone_all(work: Path, names: list[str]) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    (work / "alone").mkdir(exist_ok=True)
    started = time.perf_counter()
    with LoadSampler() as load, ThreadPoolExecutor(2) as pool:  # their times do not matter: 2 at a time
        runs = dict(zip(names, pool.map(lambda n: alone(work, n), names)))
    return {"wall_s": round(time.perf_counter() - started, 1), "load": load.summary(), "models": runs}


def summary_md(result: dict) -> str:
    """benchmarks/results/fleet.md from fleet.json."""
    w = result["wall_s"]
    lines = [
        "# Fleet: 8 shared + 4 corpus models + 1 corrupt model, recipe benchmarks/fleet/fleet_cpu_int8.toml", "",
        f"`{result['command']}` on {result['machine']['host']} ({result['machine']['cpus']} cores, "
        f"{result['machine']['isa']}), onnxforge {result['source']}. {result['machine']['note']}", "",
        "Stages (each `onnxforge run` niced):", "",
        "| stage | command | wall (s) | exit | load avg (1 min) mean / max |", "|---|---|---|---|---|",
    ]
    for stage in STAGES:
        if stage in result["stages"]:
            st = result["stages"][stage]
            cmd = st.get("command") or "each good model alone, 2 at a time: onnxforge run alone_NAME.toml models/NAME.onnx -o alone/NAME.onnx --no-cache --quiet"
            code = "" if stage == "alone" else ("stopped" if st.get("exit_code") is None else st["exit_code"])
            lines.append(f"| {stage} | `{cmd}` | {st['wall_s']} | {code} | "
                         f"{st['load']['mean_1min']} / {st['load']['max_1min']} |")
    if "jobs1" in w and "jobs2" in w and result["stages"]["jobs1"].get("finished", True):
        lines += ["", f"`--jobs 2` / `--jobs 1` wall time: {w['jobs2']} / {w['jobs1']} s = {w['jobs2'] / w['jobs1']:.2f} "
                      "(one run each, on a shared machine: see the load column)."]
    elif "jobs1" in w:
        done = sum(1 for m in result["models"].values() if m.get("jobs1_status") not in (None, "pending"))
        lines += ["", f"`--jobs 1` was stopped at the stage limit after {w['jobs1']} s with {done} of "
                      f"{len(result['models'])} models done (`--jobs 2`: all in {w['jobs2']} s)."]
    c = result["checks"]
    jobs1 = f"{c['jobs1_same']} of {c['good']} identical between --jobs 1 and --jobs 2; " if "jobs1" in result["stages"] else ""
    lines += ["", f"Checks: {c['alone_same']} of {c['good']} good models byte-identical alone and in the fleet; "
                  f"{jobs1}rerun: "
                  f"{c['rerun_from_cache']} of {c['good']} restored from the run cache (fleet summary from_run_cache), "
                  f"{c['rerun_same']} byte-identical; fleet exit codes {result['exit_codes']}.",
              *([f"The corrupt model alone: exit {c['corrupt_alone']['exit_code']}, `{c['corrupt_alone']['error']}`."]
                if c.get("corrupt_alone") else []),
              "Compared: the output model files (SHA-256 of NAME.onnx), never the reports (latency figures are timings).", "",
              "| model | status | nodes | size (MB) | accuracy | latency ratio [95%] (measured on) | fleet time (s) | "
              "alone sha256 | alone = fleet | jobs1 = jobs2 | rerun cache | rerun bytes | error |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        nodes = f"{m['nodes_before']} -> {m['nodes_after']}" if m["nodes_after"] is not None else ""
        size = f"{m['bytes_before'] / 1e6:.2f} -> {m['bytes_after'] / 1e6:.2f}" if m["bytes_after"] is not None else ""
        acc = f"{m['accuracy']:.5f}" if m["accuracy"] is not None else ""
        lat = (f"{m['latency_ratio']:.3f} [{m['latency_low']:.3f}, {m['latency_high']:.3f}] ({m['latency_measured_on']})"
               if m["latency_ratio"] is not None else "")
        a = m.get("alone") or {}
        alone_sha = (a.get("sha256") or "")[:12] or (f"exit {a['exit_code']}" if a else "")
        fmt = lambda v: "" if v is None else v  # noqa: E731
        error = (m["error"] or "").replace("|", "\\|")
        lines.append(f"| {name} | {m['status']} | {nodes} | {size} | {acc} | {lat} | {m['seconds']} | {alone_sha} | "
                     f"{fmt(m.get('alone_same_bytes'))} | {fmt(m.get('jobs1_same_bytes_as_jobs2'))} | "
                     f"{fmt(m.get('rerun_cached'))} | {fmt(m.get('rerun_same_bytes'))} | {error} |")
    return "\n".join(lines) + "\n"


STAGES = ("jobs2", "rerun", "alone", "jobs1")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "onnxforge" / "fleet-bench"))
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="run these stages (jobs2, rerun, alone, jobs1); a stage already recorded in WORK/stages "
                             "is reused unless --redo names it; the results are written from every recorded stage")
    parser.add_argument("--redo", default="", help="stages to run again although recorded")
    parser.add_argument("--stage-timeout", type=float, default=STAGE_TIMEOUT,
                        help="seconds one onnxforge command may run; a fleet stopped there is recorded as unfinished")
    parser.add_argument("--summarize-only", action="store_true", help="rewrite results/fleet.md from results/fleet.json")
    args = parser.parse_args()
    results = ROOT / "benchmarks" / "results"
    if args.summarize_only:
        (results / "fleet.md").write_text(summary_md(json.loads((results / "fleet.json").read_text())))
        return 0
    globals()["STAGE_TIMEOUT"] = args.stage_timeout
    work = Path(args.work)
    names = prepare(work)
    stages_dir = work / "stages"
    stages_dir.mkdir(exist_ok=True)
    redo = set(filter(None, args.redo.split(",")))
    fresh = {"jobs2": ("out2", "cache2"), "jobs1": ("out1", "cache1"), "alone": ("alone",)}
    for stage in filter(None, args.stages.split(",")):
        record = stages_dir / f"{stage}.json"
        if record.exists() and stage not in redo:
            continue
        for old in fresh.get(stage, ()):  # a fleet starts on an empty cache; alone runs in a fresh folder
            shutil.rmtree(work / old, ignore_errors=True)
        if stage == "rerun":
            before = {n: sha(work / "out2" / f"{n}.onnx") for n in names if (work / "out2" / f"{n}.onnx").exists()}
            done = fleet(work, "out2", "cache2", 2)
            done["sha_before"] = before
            done["sha_after"] = {n: sha(work / "out2" / f"{n}.onnx") for n in before}
        elif stage == "alone":
            rows = {r["name"]: r for r in json.loads((stages_dir / "jobs2.json").read_text())["report"]["models"]}
            done = alone_all(work, [n for n in names if rows[n]["status"] == "ok"] + ["corrupt_model"])
        else:
            jobs = int(stage[-1])
            done = fleet(work, f"out{jobs}", f"cache{jobs}", jobs)
        record.write_text(json.dumps(done, indent=1) + "\n")
        print(stage, done["wall_s"], "s", "exit", done.get("exit_code"), done["load"], flush=True)
    stages = {s: json.loads((stages_dir / f"{s}.json").read_text()) for s in STAGES if (stages_dir / f"{s}.json").exists()}
    result = collect(stages, names)
    results.mkdir(parents=True, exist_ok=True)
    (results / "fleet.json").write_text(json.dumps(result, indent=1) + "\n")
    shutil.copyfile(work / "out2" / "fleet.md", results / "fleet_report.md")
    (results / "fleet.md").write_text(summary_md(result))
    print(json.dumps({k: result[k] for k in ("wall_s", "exit_codes", "checks")}))
    return 0


def collect(stages: dict, names: list[str]) -> dict:
    rows = {r["name"]: r for r in stages["jobs2"]["report"]["models"]}
    rows1 = {r["name"]: r for r in stages["jobs1"]["report"]["models"]} if "jobs1" in stages else {}
    rerun = stages.get("rerun")
    rerun_rows = {r["name"]: r for r in rerun["report"]["models"]} if rerun else {}
    alone_runs = stages["alone"]["models"] if "alone" in stages else {}
    result = {
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "isa": "AVX2, no AVX-512/VNNI (onnxforge env)",
                    "note": "The machine is shared by ~6 agents: the load column says how busy it was; wall times "
                            "are one run each."},
        "command": "nice -n 10 .venv/bin/python benchmarks/fleet/run.py " + " ".join(sys.argv[1:]),
        "source": os.environ.get("FLEET_SOURCE", "this checkout"),
        "wall_s": {k: v["wall_s"] for k, v in stages.items()},
        "load": {k: v["load"] for k, v in stages.items()},
        "exit_codes": {k: v.get("exit_code") for k, v in stages.items() if k != "alone"},
        "stages": {k: {x: v.get(x) for x in ("command", "wall_s", "exit_code", "finished", "load")} for k, v in stages.items()},
        "models": {},
    }
    for name in names + ["corrupt_model"]:
        row = rows[name]
        entry = {k: row.get(k) for k in ("status", "error", "nodes_before", "nodes_after", "bytes_before", "bytes_after",
                                         "accuracy", "accuracy_source", "latency_ratio", "latency_low", "latency_high",
                                         "latency_measured_on", "seconds", "cached", "output_sha256")}
        ok = row["status"] == "ok"
        if rows1:
            entry["jobs1_status"] = rows1[name]["status"]
            entry["jobs1_same_bytes_as_jobs2"] = (rows1[name].get("output_sha256") == row.get("output_sha256")
                                                  if ok and rows1[name]["status"] == "ok" else None)
        if rerun:
            entry["rerun_cached"] = rerun_rows[name]["cached"]
            entry["rerun_same_bytes"] = (rerun["sha_before"].get(name) == rerun["sha_after"].get(name)
                                         == row.get("output_sha256")) if ok else None
        if name in alone_runs:
            a = alone_runs[name]
            entry["alone"] = a
            entry["alone_same_bytes"] = (a["sha256"] == row.get("output_sha256")) if ok else None
        result["models"][name] = entry
    good = [m for m in result["models"].values() if m["status"] == "ok"]
    result["checks"] = {
        "good": len(good), "failed": len(result["models"]) - len(good),
        "alone_same": sum(1 for m in good if m.get("alone_same_bytes")),
        "jobs1_same": sum(1 for m in good if m.get("jobs1_same_bytes_as_jobs2")),
        "rerun_from_cache": (rerun["report"]["summary"]["from_run_cache"] if rerun else None),
        "rerun_same": sum(1 for m in good if m.get("rerun_same_bytes")),
        "corrupt_alone": {k: alone_runs["corrupt_model"][k] for k in ("exit_code", "error")} if "corrupt_model" in alone_runs else None,
    }
    return result


if __name__ == "__main__":
    sys.exit(main())
