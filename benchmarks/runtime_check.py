"""Check `onnxforge tune` and `onnxforge bench` on the shared models.

    .venv/bin/python benchmarks/runtime_check.py --budget 20 --out benchmarks/results

1. raw vs re-saved copy (onnx.load + onnx.save) of two models through the
   bench CLI: an A/A test, the ratio's interval should include 1;
   writes resave_<model>.{md,json,png}.
2. `tune` on every shared model (CPU, --budget each), then an independent
   interleaved bench of the tuned profile against the defaults: the tuned
   profile must never be slower beyond noise. Writes profiles/<model>.profile.json
   and tune_vs_default.md.
Benches use fresh sessions every 3 rounds (--recreate-every 3) so session-level
effects (where a session's threads and buffers landed) average out.
Uses the shared validation feeds where they exist, seeded inputs otherwise.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx



def cli(args: list[str]) -> None:
    """Each command in a fresh process, as a user runs it: memory figures start clean."""
    code = "import sys; from onnxforge.cli import main; sys.exit(main(sys.argv[1:]))"
    subprocess.run([sys.executable, "-c", code, *args], check=True)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESAVE_MODELS = ("ppocr_mobile_v2_cls", "pplcnet_orientation")


def _data_args(name: str) -> list[str]:
    val = SHARED / "data" / name / "val"
    return ["--data", str(val)] if val.is_dir() else []


def resave_check(out: Path, rounds: int) -> list[str]:
    commands = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in RESAVE_MODELS:
            raw = SHARED / "models" / f"{name}.onnx"
            copy = Path(tmp) / f"{name}_resaved.onnx"
            onnx.save(onnx.load(raw), copy)
            args = ["bench", str(raw), str(copy), "--profile", "none", "--threads", "2", "--rounds", str(rounds),
                    "--recreate-every", "3", *_data_args(name), "--reference", str(raw),
                    "--markdown", str(out / f"resave_{name}.md"),
                    "--json", str(out / f"resave_{name}.json"), "--plot", str(out / f"resave_{name}.png")]
            commands.append("onnxforge " + " ".join(args))
            cli(args)
    return commands


def tune_check(out: Path, budget: float, rounds: int) -> list[dict]:
    profiles = out / "profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in sorted((SHARED / "models").glob("*.onnx")):
        name = model.stem
        profile = profiles / f"{name}.profile.json"
        bench_json = Path(tempfile.mkstemp(suffix=".json")[1])
        cli(["tune", str(model), "--budget", f"{budget}s", "-o", str(profile), *_data_args(name)])
        cli(["bench", str(model), f"{model}@{profile}", "--profile", "none", "--rounds", str(rounds),
             "--recreate-every", "3", *_data_args(name), "--json", str(bench_json)])
        tuned = json.loads(profile.read_text())
        bench = json.loads(bench_json.read_text())
        bench_json.unlink()
        rows.append(_row(name, budget, tuned, bench))
    return rows


def _row(name: str, budget: float, tuned: dict, bench: dict) -> dict:
    report = tuned["tuning"]
    accepted = [f"{t['dimension']}: {t['candidate']}" for t in report["trials"] if t["outcome"] == "accepted"]
    ratio = bench["models"][1]["ratio"]
    conf = report.get("confirmation") or {}
    return {
        "model": name, "budget_s": budget, "elapsed_s": report["elapsed_s"], "trials": len(report["trials"]),
        "kept_default": report["kept_default"], "changes": "; ".join(accepted) if not report["kept_default"] else "-",
        "confirmation": f"{conf['ratio']:.3f} [{conf['low']:.3f}, {conf['high']:.3f}]" if "ratio" in conf else "-",
        "default_p50_ms": bench["models"][0]["stats"]["p50"],
        "ratio": ratio["ratio"], "low": ratio["low"], "high": ratio["high"], "verdict": ratio["verdict"],
    }


def write_tune_table(rows: list[dict], path: Path, budget: float, rounds: int) -> None:
    lines = [
        f"Tuned (CPU, budget {budget:g} s each) vs default profile, independent interleaved bench, {rounds} rounds.",
        "",
        "| model | tune time s / budget | trials | kept | accepted changes | tune's own check | default p50 ms | "
        "tuned/default [95% CI] | verdict |",
        "|---|---:|---:|---|---|---|---:|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['elapsed_s']:.1f} / {r['budget_s']:g} | {r['trials']} | "
                     f"{'default' if r['kept_default'] else 'tuned'} | {r['changes']} | {r['confirmation']} | "
                     f"{r['default_p50_ms']:.3f} | {r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}] | {r['verdict']} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--skip-resave", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.skip_resave:
        for command in resave_check(out, args.rounds):
            print(command)
    rows = tune_check(out, args.budget, args.rounds)
    write_tune_table(rows, out / "tune_vs_default.md", args.budget, args.rounds)
    (out / "tune_vs_default.json").write_text(json.dumps(rows, indent=1) + "\n")
    print((out / "tune_vs_default.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
