"""INT8 table: onnxforge quantize vs onnxruntime quantize_static (QDQ, per-channel,
MinMax) on the same calibration data, latency vs the optimized float model.

    .venv/bin/python benchmarks/quant.py [MODEL ...] [--rounds 10] [--budget-seconds 120] \
        [--equalize cle|smooth|none] [--out benchmarks/results/quant.md] [--fresh]

Rows of models not named are kept from the previous results (quant.json next to
the table) unless --fresh; each row records the command that measured it.

Models are read from ../shared/models or ~/.cache/onnxforge/corpus; data from
../shared/data/<model>/{calib,val} (seeded "random" feeds where there is none,
marked as such: their accuracy means little). Latency: the bench harness, all
three models interleaved, 2 threads, ratio to the float baseline with a 95% CI.
Cosine: mean and min over the validation feeds, against the float baseline.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIRS = (ROOT.parent / "shared" / "models", Path.home() / ".cache" / "onnxforge" / "corpus")
DATA_DIR = ROOT.parent / "shared" / "data"
DEFAULT_MODELS = (
    "mobilenet_v2_hf", "efficientnet_b0_hf", "resnet50_hf", "ppocrv4_det", "ppocrv4_rec", "ppocr_mobile_v2_cls",
    "distilbert_base", "bert_base", "minilm_l6_w8", "silero_vad_v6",
)
SEQUENCE_SHAPES = {"input_ids": (1, 128), "attention_mask": (1, 128), "token_type_ids": (1, 128)}
# corpus models without data of their own that take another model's real inputs unchanged:
# model -> (data folder, {its input name: the folder's input name}). The BERT exports read
# bert-uncased WordPiece ids as all-MiniLM-L6-v2 does (same vocabulary, int64 [batch, sequence];
# distilbert has no token_type_ids); resnet50_hf reads 224x224 RGB normalized with the ImageNet
# mean/std, as the pplcnet_orientation pages are (make_inputs.py: imagenet(page, 224)).
BORROWED_DATA = {
    "bert_base": ("minilm_l6_real", {"input_ids": "input_ids", "attention_mask": "attention_mask",
                                     "token_type_ids": "token_type_ids"}),
    "distilbert_base": ("minilm_l6_real", {"input_ids": "input_ids", "attention_mask": "attention_mask"}),
    "resnet50_hf": ("pplcnet_orientation", {"pixel_values": "x"}),
}


def model_path(name: str) -> Path:
    for folder in MODEL_DIRS:
        path = folder / f"{name}.onnx"
        if path.exists():
            return path
    raise FileNotFoundError(name)


def feeds_for(name: str, proto: onnx.ModelProto):
    from onnxforge.inputs import load_feeds, seeded_feeds

    folder = DATA_DIR / name
    if folder.exists():
        return load_feeds(folder / "calib"), load_feeds(folder / "val")[:16], "real"
    if name in BORROWED_DATA and (DATA_DIR / BORROWED_DATA[name][0]).exists():
        source, names = BORROWED_DATA[name]
        pick = lambda feeds: [{mine: feed[theirs] for mine, theirs in names.items()} for feed in feeds]  # noqa: E731
        return (pick(load_feeds(DATA_DIR / source / "calib")), pick(load_feeds(DATA_DIR / source / "val"))[:16],
                f"real inputs of {source}")
    shapes = {k: v for k, v in SEQUENCE_SHAPES.items() if k in {i.name for i in proto.graph.input}}
    calib = [seeded_feeds(proto, shapes, seed=i) for i in range(16)]
    val = [seeded_feeds(proto, shapes, seed=100 + i) for i in range(8)]
    return calib, val, "seeded (random)"


def ort_quantize_static(proto: onnx.ModelProto, calib: list[dict], folder: Path) -> tuple[onnx.ModelProto | None, str]:
    """onnxruntime's recipe: QDQ, per-channel, MinMax, u8/s8, after opset 13 (it cannot emit
    per-channel DQ below 13)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    from onnxforge.passes.quant.prepare import raise_opset

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calib)

        def get_next(self):
            return next(self.items, None)

    src, dst = folder / "ort_in.onnx", folder / "ort_q.onnx"
    onnx.save(raise_opset(proto, 13), src)
    try:
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return onnx.load(str(dst)), "ok"
    except Exception as exc:  # noqa: BLE001 - the table records the peer's failure
        return None, f"failed: {str(exc).splitlines()[0][:120]}"


def cosines(reference, candidate) -> tuple[float, float]:
    from onnxforge.passes.quant.budget import cosine

    values = [cosine([r], [c]) for r, c in zip(reference, candidate)]
    return float(np.mean(values)), float(np.min(values))


def bench_model(name: str, rounds: int, budget_seconds: float, method: str, equalize: str = "cle") -> dict:
    from onnxforge.bench.harness import compare_latency
    from onnxforge.passes.quant.budget import run_outputs
    from onnxforge.passes.quant.prepare import float_baseline
    from onnxforge.passes.quant.quantize import quantize

    proto = onnx.load(str(model_path(name)))
    calib, val, kind = feeds_for(name, proto)
    row: dict = {"model": name, "data": kind}
    started = time.monotonic()
    ours, report = quantize(proto, calib, val=val, method=method, budget_seconds=budget_seconds, measure_latency=False,
                            equalize=equalize)
    row["cos_before_fallback"] = report.score_before_fallback
    row["equalized"] = report.equalized
    row["onnxforge_seconds"] = round(time.monotonic() - started, 1)
    row["budget_met"] = report.budget_met
    row["float_nodes"] = len(report.float_nodes)
    row["int8_nodes"] = len(report.int8_nodes)
    row["notes"] = report.notes + report.warnings
    baseline = float_baseline(proto)
    reference = run_outputs(baseline, val)
    ours_proto = ours.to_proto()
    row["onnxforge_cos"] = cosines(reference, run_outputs(ours_proto, val))
    with tempfile.TemporaryDirectory(prefix="onnxforge-bench-quant-") as tmp:
        folder = Path(tmp)
        theirs, status = ort_quantize_static(proto, calib, folder)
        row["ort_status"] = status
        paths = [folder / "float.onnx", folder / "onnxforge.onnx"]
        onnx.save(baseline, paths[0])
        onnx.save(ours_proto, paths[1])
        if theirs is not None:
            try:
                row["ort_cos"] = cosines(reference, run_outputs(theirs, val))
                paths.append(folder / "ort_q.onnx")
            except Exception as exc:  # noqa: BLE001
                row["ort_status"] = f"does not run: {str(exc).splitlines()[0][:120]}"
        result = compare_latency([str(p) for p in paths], val[0], threads=2, rounds=rounds)
    row["float_ms"] = result.models[0].stats["p50"]
    row["onnxforge_ratio"] = _ratio(result.models[1].ratio)
    if len(result.models) > 2:
        row["ort_ratio"] = _ratio(result.models[2].ratio)
    return row


def _ratio(ratio) -> list[float]:
    return [round(ratio.ratio, 3), round(ratio.low, 3), round(ratio.high, 3)]


def markdown(rows: list[dict], command: str) -> str:
    commands = list(dict.fromkeys(r.get("command", command) for r in rows))
    lines = [
        "# INT8 on the CPU provider: onnxforge quantize vs onnxruntime quantize_static", "",
        *[f"Command [{i + 1}]: `{c}`" for i, c in enumerate(commands)], "",
        "Latency ratio = int8 / optimized float (onnxforge's float baseline), harness interleaved, 2 threads, "
        "geometric mean [95% CI]. Cosine = mean / min over validation feeds vs the float baseline; "
        "'before' = onnxforge's cosine before the budget returned layers to float (- where not recorded). "
        "Use: float where the int8 interval lies wholly above 1 (quantize() then returns the float model).", "",
        "| model | cmd | data | float ms | onnxforge ratio | onnxforge cos | before | float nodes | ORT ratio | ORT cos | use |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cmd = commands.index(r.get("command", command)) + 1
        if "error" in r:
            lines.append(f"| {r['model']} | {cmd} | error: {r['error']} | | | | | | | | |")
            continue
        before = r.get("cos_before_fallback")
        use = "float" if r["onnxforge_ratio"][1] > 1.0 else "int8"
        ours = r["onnxforge_ratio"]
        theirs = r.get("ort_ratio")
        ort_cos = r.get("ort_cos")
        lines.append(
            f"| {r['model']} | {cmd} | {r['data']} | {r['float_ms']:.2f} | {ours[0]:.3f} [{ours[1]:.3f}, {ours[2]:.3f}] | "
            f"{r['onnxforge_cos'][0]:.4f} / {r['onnxforge_cos'][1]:.4f} | "
            + (f"{before:.4f}" if before is not None else "-") + f" | {r['float_nodes']} | "
            + (f"{theirs[0]:.3f} [{theirs[1]:.3f}, {theirs[2]:.3f}]" if theirs else r["ort_status"]) + " | "
            + (f"{ort_cos[0]:.4f} / {ort_cos[1]:.4f}" if ort_cos else "-") + f" | {use} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(DEFAULT_MODELS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--budget-seconds", type=float, default=120.0)
    parser.add_argument("--method", default="auto")
    parser.add_argument("--equalize", default="cle", choices=("cle", "smooth", "none"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quant.md"))
    parser.add_argument("--fresh", action="store_true", help="drop the rows of models not run now")
    args = parser.parse_args(argv)
    command = "python benchmarks/quant.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [] if args.fresh else _previous(out)
    trailer = "" if args.fresh else _trailer(out)
    for name in args.models:
        print(f"== {name}", file=sys.stderr, flush=True)
        try:
            row = bench_model(name, args.rounds, args.budget_seconds, args.method, args.equalize)
        except Exception as exc:  # noqa: BLE001 - one model's failure is a row, not the end
            row = {"model": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        row["command"] = command
        rows = _replace(rows, row)
        out.write_text(markdown(rows, command) + trailer)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
        print(markdown([row], command).splitlines()[-1], file=sys.stderr, flush=True)
    return 0


def _previous(table: Path) -> list[dict]:
    """Earlier rows (rerun models are replaced in place when their new row comes); rows
    from before commands were recorded per row take the table's first command."""
    path = table.with_suffix(".json")
    if not path.exists():
        return []
    rows = json.loads(path.read_text())
    found = re.search(r"Command[^`]*`([^`]+)`", table.read_text()) if table.exists() else None
    for row in rows:
        row.setdefault("command", found.group(1) if found else "unknown")
    return rows


def _trailer(table: Path) -> str:
    """The hand-written notes after the table in ``table`` (kept across reruns)."""
    if not table.exists():
        return ""
    lines = table.read_text().splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if first is None:
        return ""
    end = first
    while end < len(lines) and lines[end].startswith("|"):
        end += 1  # the end of the results table; notes may hold tables of their own
    rest = "\n".join(lines[end:]).strip("\n")
    return "\n" + rest + "\n" if rest else ""


def _replace(rows: list[dict], row: dict) -> list[dict]:
    names = [r["model"] for r in rows]
    if row["model"] in names:
        return [row if r["model"] == row["model"] else r for r in rows]
    return rows + [row]


if __name__ == "__main__":
    raise SystemExit(main())
