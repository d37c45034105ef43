"""Graph size after ``onnxforge optimize -O3`` against onnxsim and onnxslim, with outputs checked.

    .venv/bin/python benchmarks/simplify_vs_peers.py --peer-python ~/.cache/onnxforge/peers-venv/bin/python \
        [--set shared,corpus,backend,dir:FOLDER] [--only NAME ...] [--out benchmarks/results/simplify_vs_peers]
    .venv/bin/python benchmarks/simplify_vs_peers.py --latency benchmarks/results/simplify_vs_peers.json \
        --peer-python PY [--rounds 15] [--set dir:FOLDER --only NAME ...] [--out benchmarks/results/simplify_vs_peers_latency]
    .venv/bin/python benchmarks/simplify_vs_peers.py --merge A.json B.json ... --out OUT   (later rows win)

Models: every ``../shared/models/*.onnx``, the corpus in ``~/.cache/onnxforge/corpus`` (the 2 GB
llama is left out unless named with --only) and onnx's backend model folders ``simple``,
``pytorch-converted`` and ``pytorch-operator`` (where onnxruntime runs the original).

Per model: onnxforge as its CLI (``optimize M -o X -O3``, called in one long-lived worker
process so 150 models do not pay 150 interpreter starts), onnxsim (``onnxsim.simplify``) and
onnxslim (``onnxslim.slim``), default options, each in ``--peer-python`` (their own virtualenv).
Node counts include subgraphs. Each variant is run against the original on onnxruntime CPU (graph
optimizations off) at two sizes per dynamic dim (feed A and feed B below; backend folders use
their own test inputs, which have fixed shapes): ``rel`` is max |variant - original| / max
|original| over outputs and feeds (integer and bool outputs must be exact), ``equal`` means rel <= 1e-4.
``dynamic kept`` says every input/output dim that is symbolic in the original is still symbolic.
Where onnxforge has more nodes than the smaller peer, the per-op-type difference is listed.

``--latency`` reads a results JSON and, for each model where a peer had fewer nodes than onnxforge
in it (and each model named by ``--only``), times onnxforge against the peers interleaved (``onnxforge.bench.harness.compare_latency``,
2 intra-op threads, ORT_ENABLE_ALL, shuffled rounds, 95% t-interval on the geometric-mean ratio).
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

from peer_workers import FORGE_WORKER, PEER_WORKER, Worker
from simplify_vs_peers_table import RTOL, markdown, verdict

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CORPUS = Path.home() / ".cache" / "onnxforge" / "corpus"
BACKEND_KINDS = ("simple", "pytorch-converted", "pytorch-operator")
PEERS = ("onnxsim", "onnxslim")

# Sizes of dynamic dims, feed A then feed B, by dim name (or "input:axis" for unnamed dims).
# Linked dims (total = past + new tokens) and model-specific sizes are spelled out here.
SIZES: dict[str, tuple[dict, dict]] = {
    "silero_vad_v6": ({"input:0": 1, "input:1": 512, "state:1": 1}, {"input:0": 3, "input:1": 512, "state:1": 3}),
    "ppocrv4_rec": ({"x:0": 1, "x:2": 48, "x:3": 320}, {"x:0": 2, "x:2": 48, "x:3": 160}),
    "ppocr_mobile_v2_cls": ({"x:0": 1, "x:2": 48, "x:3": 192}, {"x:0": 2, "x:2": 48, "x:3": 96}),
    "ppocrv4_det": ({"x:0": 1, "x:2": 320, "x:3": 320}, {"x:0": 2, "x:2": 256, "x:3": 384}),
    "yolov8n_320": ({"batch": 1, "height": 320, "width": 320}, {"batch": 2, "height": 256, "width": 384}),
    "smollm2_135m_kv": ({"batch_size": 1, "sequence_length": 8, "past_sequence_length": 16,
                         "total_sequence_length": 24},
                        {"batch_size": 2, "sequence_length": 3, "past_sequence_length": 5,
                         "total_sequence_length": 8}),
    "whisper_tiny_encoder": ({"batch": 1}, {"batch": 2}),
}
SIZES["smollm2_135m_kv_dynamo"] = SIZES["smollm2_135m_kv"]


# ------------------------------------------------------------------ the models


def models(sets: list[str], only: list[str]) -> list[dict]:
    """The models of each set, in the order the sets are given."""
    found = []
    for which in sets:
        if which == "shared":
            found += [{"name": p.stem, "set": "shared", "path": str(p)} for p in sorted((SHARED / "models").glob("*.onnx"))]
        elif which == "corpus":
            found += [{"name": p.stem, "set": "corpus", "path": str(p)} for p in sorted(CORPUS.glob("*.onnx"))
                      if "llama" not in p.stem or p.stem in only]
        elif which.startswith("dir:"):  # models made elsewhere (benchmarks/nhwc_models.py)
            folder = Path(which[4:]).expanduser()
            found += [{"name": p.stem, "set": "dir", "path": str(p)} for p in sorted(folder.glob("*.onnx"))]
        elif which == "backend":
            root = Path(onnx.__file__).parent / "backend" / "test" / "data"
            for kind in BACKEND_KINDS:
                for folder in sorted((root / kind).glob("*")):
                    if (folder / "model.onnx").exists():
                        found.append({"name": f"{kind}/{folder.name}", "set": "backend",
                                      "path": str(folder / "model.onnx"), "folder": str(folder)})
    return [m for m in found if not only or m["name"] in only]


def op_histogram(path: str) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    pending = [onnx.load(path, load_external_data=False).graph]
    while pending:
        graph = pending.pop()
        for node in graph.node:
            counts[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    pending.append(attr.g)
                pending.extend(attr.graphs)
    return counts


def symbolic_dims(path: str) -> dict[str, list]:
    """Per graph input/output: the axes whose size is not a fixed number."""
    graph = onnx.load(path, load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    out = {}
    for info in list(graph.input) + list(graph.output):
        if info.name in inits or not info.type.HasField("tensor_type"):
            continue
        tt = info.type.tensor_type
        if tt.HasField("shape"):
            out[info.name] = [i for i, d in enumerate(tt.shape.dim) if not (d.HasField("dim_value") and d.dim_value > 0)]
    return out


# ------------------------------------------------------------------ feeds and equality


def feed_sets(spec: dict) -> list[dict]:
    """Feed A and feed B (two sizes per dynamic dim); a backend folder's own test inputs."""
    if spec["set"] == "backend":
        sys.path.insert(0, str(ROOT / "tests"))
        from backend_sweep import _feed, _folder_data

        model, sets = _folder_data(spec["folder"])
        return [_feed(model, ins) for ins, _ in sets[:2]]
    from onnxforge.inputs import seeded_feeds
    from onnxforge.io import load

    model = load(spec["path"])
    inputs = model.graph.inputs
    dynamic = any(d is None or not isinstance(d, int) or d <= 0 for t in inputs for d in (t.shape or []))
    named = SIZES.get(spec["name"])
    feeds = []
    for variant in (0, 1) if dynamic else (0,):
        shapes = {}
        for t in inputs:
            dims = []
            for axis, d in enumerate(t.shape or []):
                if isinstance(d, int) and d > 0:
                    dims.append(d)
                    continue
                key = d if isinstance(d, str) and d not in ("?", "") else f"{t.name}:{axis}"
                if named and key in named[variant]:
                    dims.append(named[variant][key])
                else:
                    dims.append(generic_size(axis, key, t.shape, variant))
            shapes[t.name] = tuple(dims)
        feeds.append(seeded_feeds(model, shapes, seed=variant))
    return feeds


def generic_size(axis: int, key: str, shape, variant: int) -> int:
    from onnxforge.inputs import default_dim

    base = default_dim(axis, key, shape)
    if base == 1:
        return (1, 2)[variant]
    if len(shape) == 4 and axis >= 2:
        return (base, 256)[variant]
    return (base, max(base // 2, 1) + 1)[variant]


def run(path: str, feeds: list[dict]) -> list:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return [session.run(None, feed) for feed in feeds]


def rel_error(expected, got) -> float:
    """max |got - expected| / max |expected| (inf on a shape, type or exact-value mismatch)."""
    if isinstance(expected, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            return float("inf")
        return max([rel_error(e, g) for e, g in zip(expected, got)] or [0.0])
    e, g = np.asarray(expected), np.asarray(got)
    if e.shape != g.shape:
        return float("inf")
    if e.dtype.kind not in "fc":
        return 0.0 if e.dtype == g.dtype and np.array_equal(e, g) else float("inf")
    e64, g64 = e.astype(np.float64), g.astype(np.float64)
    if not np.array_equal(np.isnan(e64), np.isnan(g64)):
        return float("inf")
    finite = np.isfinite(e64) & np.isfinite(g64)
    if not np.array_equal(e64[~finite], g64[~finite], equal_nan=True):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = max(float(np.max(np.abs(e64[finite]))), 1e-12)
    return float(np.max(np.abs(e64[finite] - g64[finite]))) / scale


# ------------------------------------------------------------------ one model


def bench_model(spec: dict, workers: dict[str, Worker], tmp: Path) -> dict:
    row: dict = {"model": spec["name"], "set": spec["set"], "nodes": {}, "rel": {}, "dynamic_kept": {}, "notes": []}
    paths = {"original": spec["path"]}
    safe = spec["name"].replace("/", "__")
    for label, worker in workers.items():
        out = tmp / f"{safe}.{label}.onnx"
        why = worker.optimize(spec["path"], str(out))
        if why:
            row["notes"].append(f"{label}: {why}")
        else:
            paths[label] = str(out)
        report = Path(f"{out}.report.json")
        if report.exists():  # a pass the verifier rolled back is part of the row's story
            row["notes"] += [f"{label}: pass {r['pass']} rolled back: {r['reason'][:200]}"
                             for r in json.loads(report.read_text()).get("rolled_back", [])]
    for label, path in paths.items():
        row["nodes"][label] = sum(op_histogram(path).values())
    try:
        feeds = feed_sets(spec)
        reference = run(spec["path"], feeds)
    except Exception as exc:
        row["notes"].append(f"original does not run: {str(exc).splitlines()[0][:160]}")
        reference = None
    row["feeds"] = len(feeds) if reference is not None else 0
    symbolic = symbolic_dims(spec["path"])
    for label, path in paths.items():
        if label == "original":
            continue
        kept = symbolic_dims(path)
        row["dynamic_kept"][label] = all(set(axes) <= set(kept.get(name, axes)) for name, axes in symbolic.items())
        if reference is None:
            continue
        try:
            got = run(path, feeds)
            row["rel"][label] = max(rel_error(r, g) for r, g in zip(reference, got))
        except Exception as exc:
            row["rel"][label] = float("inf")
            row["notes"].append(f"{label} does not run: {str(exc).splitlines()[0][:160]}")
    peers = [row["nodes"][p] for p in PEERS if p in row["nodes"] and row["rel"].get(p, 0) <= RTOL]
    row["best_peer"] = min(peers) if peers else None
    if "onnxforge" in paths and row["best_peer"] is not None and row["nodes"]["onnxforge"] > row["best_peer"]:
        best = min((p for p in PEERS if p in paths), key=lambda p: row["nodes"][p])
        ours, theirs = op_histogram(paths["onnxforge"]), op_histogram(paths[best])
        row["larger_than"] = best
        row["op_diff"] = {op: ours[op] - theirs[op] for op in sorted(set(ours) | set(theirs)) if ours[op] != theirs[op]}
    return row


# ------------------------------------------------------------------ publishing


def peer_versions(peer_python: str) -> dict:
    code = "import json, onnx, onnxruntime, onnxsim, onnxslim; print(json.dumps({m.__name__: m.__version__ " \
           "for m in (onnx, onnxruntime, onnxsim, onnxslim)}))"
    proc = subprocess.run([peer_python, "-c", code], capture_output=True, text=True, timeout=120)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def sizes_main(args, command: str) -> None:
    specs = models(args.set.split(","), args.only)
    workers = {"onnxforge": Worker([sys.executable, "-c", FORGE_WORKER])}
    workers.update({p: Worker([args.peer_python, "-c", PEER_WORKER, p]) for p in PEERS})
    rows = []
    versions = peer_versions(args.peer_python)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for spec in specs:
                rows.append(bench_model(spec, workers, Path(tmp)))
                for f in Path(tmp).glob("*"):
                    f.unlink()
                r = rows[-1]
                print(f"{r['model']}: {r['nodes']} rel={r['rel']} -> {verdict(r)}", flush=True)
                # Written after every model, so a long run stopped early keeps what it measured.
                args.out.with_suffix(".md").write_text(markdown(rows, command))
                args.out.with_suffix(".json").write_text(json.dumps(
                    {"command": command, "peers": versions, "rows": rows}, indent=1, default=str))
    finally:
        for worker in workers.values():
            worker.close()
    print(markdown(rows, command))


# ------------------------------------------------------------------ latency


def latency_main(args, command: str) -> None:
    from onnxforge.bench.harness import compare_latency
    from onnxforge.bench.stats import ratio_ci
    from onnxforge.runtime.env import environment

    before = json.loads(Path(args.latency).read_text())["rows"]
    wanted = [r["model"] for r in before if r.get("best_peer") is not None and "onnxforge" in r["nodes"]
              and r["nodes"]["onnxforge"] > r["best_peer"]]
    # --only adds models the JSON did not measure (e.g. --set dir:FOLDER's stand-ins for the models)
    wanted += [name for name in args.only if name not in wanted]
    specs = {m["name"]: m for m in models(sorted(set(args.set.split(",")) | {"shared", "corpus", "backend"}), wanted)}
    workers = {"onnxforge": Worker([sys.executable, "-c", FORGE_WORKER])}
    workers.update({p: Worker([args.peer_python, "-c", PEER_WORKER, p]) for p in PEERS})
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in wanted:
                spec = specs[name]
                paths = {}
                for label, worker in workers.items():
                    out = Path(tmp) / f"{name.replace('/', '__')}.{label}.onnx"
                    if not worker.optimize(spec["path"], str(out)):
                        paths[label] = str(out)
                feeds = feed_sets(spec)[:1]
                labels = [label for label in ("onnxforge", *PEERS) if label in paths]
                result = compare_latency([paths[label] for label in labels], feeds, threads=2, rounds=args.rounds)
                medians = dict(zip(labels, (m.round_medians_ms for m in result.models)))
                p50 = dict(zip(labels, (m.stats["p50"] for m in result.models)))
                row = {"model": name, "nodes": {label: sum(op_histogram(paths[label]).values()) for label in labels},
                       "p50_ms": p50, "forge_vs": {}}
                for peer in PEERS:
                    if peer in medians:
                        ci = ratio_ci(medians[peer], medians["onnxforge"])
                        row["forge_vs"][peer] = {"ratio": ci.ratio, "low": ci.low, "high": ci.high,
                                                 "verdict": ci.verdict, "rounds": ci.rounds}
                rows.append(row)
                print(row, flush=True)
                for f in Path(tmp).glob("*"):
                    f.unlink()
    finally:
        for worker in workers.values():
            worker.close()
    cpu = environment().get("cpu", {})
    isa = "+".join(cpu.get("isa", [])) or "unknown"
    vnni = "VNNI" if any("vnni" in flag for flag in cpu.get("isa", [])) else "no VNNI"
    lines = ["# CPU latency: onnxforge -O3 vs the peers, on models where a peer had fewer nodes", "",
             f"Command: `{command}`", "",
             f"CPU: {cpu.get('model', platform.machine())}, {cpu.get('logical_cores', '?')} cores, ISA {isa} ({vnni}).  Interleaved "
             f"(`onnxforge.bench.harness.compare_latency`), 2 intra-op threads, ORT_ENABLE_ALL, {args.rounds} shuffled "
             "rounds; ratio = onnxforge / peer (geometric mean of per-round median ratios, 95% t-interval; "
             "'slower'/'faster' only where the interval excludes 1). The machine is shared with other jobs.", "",
             "| model | nodes forge/sim/slim | forge p50 ms | forge / onnxsim | forge / onnxslim |", "|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for peer in PEERS:
            ci = r["forge_vs"].get(peer)
            cells.append("—" if ci is None else f"{ci['ratio']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}] {ci['verdict']}")
        nodes = "/".join(str(r["nodes"].get(label, "—")) for label in ("onnxforge", *PEERS))
        lines.append(f"| {r['model']} | {nodes} | {r['p50_ms'].get('onnxforge', 0):.3f} | {cells[0]} | {cells[1]} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    print("\n".join(lines))


def merge_main(args, command: str) -> None:
    """Rows of several result files in one table; a later file's row replaces an earlier
    one of the same model (a long run split over several bounded runs)."""
    rows: dict[str, dict] = {}
    commands, peers = [], {}
    for path in args.merge:
        data = json.loads(Path(path).read_text())
        commands.append(data["command"])
        peers = data.get("peers") or peers
        for row in data["rows"]:
            row.setdefault("source", data["command"])
            rows[row["model"]] = row
    order = {m["name"]: i for i, m in enumerate(models(["shared", "backend", "corpus"], []))}
    merged = sorted(rows.values(), key=lambda r: (order.get(r["model"], len(order)), r["model"]))
    text = markdown(merged, command).replace(f"Command: `{command}`", "Merged by `" + command + "` from (later replaces "
                                            "earlier, per model):\n" + "\n".join(f"- run {i + 1}: `{c}`" for i, c in enumerate(commands)))
    text += "\nRows per run:\n" + "\n".join(
        f"- run {i + 1}: " + ", ".join(r["model"] for r in merged if r["source"] == c) for i, c in enumerate(commands)) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "merged": commands, "peers": peers,
                                                         "rows": merged}, indent=1, default=str))
    print(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", default=str(Path.home() / ".cache/onnxforge/peers-venv/bin/python"))
    parser.add_argument("--set", default="shared,corpus,backend", help="comma list of shared, corpus, backend")
    parser.add_argument("--only", nargs="*", default=[], help="model names (backend ones as kind/folder)")
    parser.add_argument("--latency", help="results JSON: time the models where a peer had fewer nodes")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--merge", nargs="+", help="result JSONs to combine into one table (later ones win)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    command = "python benchmarks/simplify_vs_peers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    stem = "simplify_vs_peers_latency" if args.latency else "simplify_vs_peers"
    args.out = args.out or ROOT / "benchmarks" / "results" / stem
    (merge_main if args.merge else latency_main if args.latency else sizes_main)(args, command.strip())


if __name__ == "__main__":
    main()
