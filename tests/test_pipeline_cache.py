"""The step cache: reruns hit it; corrupt, foreign or tampered entries are ignored
with a warning and recomputed, never trusted; keys follow the inputs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pipeline_support import write_feeds

from onnxforge.cache import ENVELOPE, StepCache, data_digest, sha256_file
from onnxforge.demo_models import small_cnn
from onnxforge.pipeline import Pipeline

PRUNE = {"steps": [{"step": "optimize", "level": 2}, {"step": "prune", "ratio": 0.25}]}


def run(tmp_path: Path, cache: Path, name: str, recipe=PRUNE, base_dir=None):
    out = tmp_path / f"{name}.onnx"
    result = Pipeline.from_dict(recipe, base_dir=base_dir or tmp_path).run(small_cnn(), out, cache_dir=cache)
    step = result.report["steps"][-1]
    cache_warnings = [w for w in result.report["warnings"] if "cache" in w]
    return out.read_bytes(), step, cache_warnings


def only_entry(cache: Path, kind: str = "prune") -> Path:
    entries = [p for p in (cache / kind).iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
    return entries[0]


# ------------------------------------------------------------------ StepCache itself


def test_put_then_get_round_trips(tmp_path):
    cache = StepCache(tmp_path / "c")
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"\x00\x01weights")
    material = {"model": "abc", "params": {"x": 1}}
    key = cache.key_for("quantize", material)
    cache.put("quantize", key, material, {"score": 0.5}, {"model.onnx": blob})
    entry = cache.get("quantize", key)
    assert entry.payload == {"score": 0.5}
    assert entry.files["model.onnx"].read_bytes() == b"\x00\x01weights"
    assert cache.hits == [key]


def test_keys_follow_every_part_of_the_material():
    base = {"model": {"model.onnx": "a"}, "params": {"method": "minmax"}, "environment": {"onnxruntime": "1"}}
    keys = {StepCache.key_for("quantize", base), StepCache.key_for("prune", base)}
    for part, value in (("model", {"model.onnx": "b"}), ("params", {"method": "entropy"}),
                        ("environment", {"onnxruntime": "2"})):
        keys.add(StepCache.key_for("quantize", {**base, part: value}))
    assert len(keys) == 5


def test_data_digest_sees_content_and_names(tmp_path):
    write_feeds(tmp_path / "a", small_cnn(), count=2)
    first = data_digest(tmp_path / "a")
    (tmp_path / "a" / "0001.npz").rename(tmp_path / "a" / "0009.npz")
    renamed = data_digest(tmp_path / "a")
    (tmp_path / "a" / "0009.npz").write_bytes(b"other")
    assert len({first, renamed, data_digest(tmp_path / "a")}) == 3


def test_disabled_cache_reads_and_writes_nothing(tmp_path):
    cache = StepCache(tmp_path / "c", enabled=False)
    assert cache.put("tune", "k", {}, {"a": 1}) is None and cache.get("tune", "k") is None
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------ through the pipeline


def test_rerun_hits_the_cache_with_identical_bytes(tmp_path):
    cache = tmp_path / "cache"
    first, step1, _ = run(tmp_path, cache, "a")
    second, step2, warnings = run(tmp_path, cache, "b")
    assert (step1["cached"], step2["cached"]) == (False, True)
    assert step1["cache_key"] == step2["cache_key"]
    assert first == second and not warnings


def corrupt_model_file(entry: Path) -> None:
    path = entry / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate_envelope(entry: Path) -> None:
    text = (entry / ENVELOPE).read_text()
    (entry / ENVELOPE).write_text(text[: len(text) // 2])


def tamper_payload(entry: Path) -> None:
    envelope = json.loads((entry / ENVELOPE).read_text())
    envelope["payload"]["pruning"]["flops_after"] = 1
    (entry / ENVELOPE).write_text(json.dumps(envelope))


def other_schema(entry: Path) -> None:
    envelope = json.loads((entry / ENVELOPE).read_text())
    envelope["schema"] = 999
    (entry / ENVELOPE).write_text(json.dumps(envelope))


def delete_file(entry: Path) -> None:
    (entry / "model.onnx").unlink()


@pytest.mark.parametrize("damage, why", [
    (corrupt_model_file, "does not match its checksum"),
    (truncate_envelope, "unreadable entry.json"),
    (tamper_payload, "checksum does not match its contents"),
    (other_schema, "schema 999"),
    (delete_file, "is missing"),
])
def test_damaged_entry_is_ignored_with_a_warning_and_replaced(tmp_path, damage, why):
    cache = tmp_path / "cache"
    first, _, _ = run(tmp_path, cache, "a")
    damage(only_entry(cache))
    second, step, warnings = run(tmp_path, cache, "b")
    assert step["cached"] is False
    assert any("ignored" in w and why in w for w in warnings), warnings
    assert second == first
    third, step, warnings = run(tmp_path, cache, "c")  # the recomputed entry replaced the damaged one
    assert step["cached"] is True and not warnings and third == first


def test_foreign_entry_under_our_key_is_not_trusted(tmp_path):
    cache = tmp_path / "cache"
    first, step, _ = run(tmp_path, cache, "a")
    other = {"steps": [{"step": "optimize", "level": 2}, {"step": "prune", "ratio": 0.5}]}
    _, other_step, _ = run(tmp_path, cache, "x", recipe=other)
    ours, theirs = cache / "prune" / step["cache_key"], cache / "prune" / other_step["cache_key"]
    shutil.rmtree(ours)
    shutil.copytree(theirs, ours)  # a valid entry, but for other parameters
    second, again, warnings = run(tmp_path, cache, "b")
    assert again["cached"] is False and second == first
    assert any("belongs to another step or key" in w for w in warnings)


def test_changed_calibration_data_misses_the_cache(tmp_path):
    recipe = {"steps": [{"step": "prune", "ratio": 0.25, "importance": "activation", "calibration": "calib"}]}
    write_feeds(tmp_path / "calib", small_cnn(), count=2)
    cache = tmp_path / "cache"
    _, first, _ = run(tmp_path, cache, "a", recipe=recipe)
    _, same, _ = run(tmp_path, cache, "b", recipe=recipe)
    shutil.rmtree(tmp_path / "calib")
    write_feeds(tmp_path / "calib", small_cnn(), count=2, start_seed=50)
    _, changed, _ = run(tmp_path, cache, "c", recipe=recipe)
    assert (first["cached"], same["cached"], changed["cached"]) == (False, True, False)
    assert changed["cache_key"] != first["cache_key"]


def test_per_step_cache_off(tmp_path):
    recipe = {"steps": [{"step": "prune", "ratio": 0.25, "cache": False}]}
    cache = tmp_path / "cache"
    run(tmp_path, cache, "a", recipe=recipe)
    assert not (cache / "prune").exists()


def test_unwritable_cache_only_warns(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    first, step, warnings = run(tmp_path, blocker / "cache", "a")
    assert step["cached"] is False and any("cannot write the cache" in w for w in warnings)
    second, _, _ = run(tmp_path, tmp_path / "cache", "b")
    assert first == second


def test_cached_files_match_their_digests(tmp_path):
    cache = tmp_path / "cache"
    run(tmp_path, cache, "a")
    entry = only_entry(cache)
    envelope = json.loads((entry / ENVELOPE).read_text())
    assert envelope["schema"] == 1 and envelope["kind"] == "prune" and envelope["key"] == entry.name
    assert envelope["files"] == {name: sha256_file(entry / name) for name in envelope["files"]}
    assert set(envelope["material"]) == {"model", "params", "provider", "input_shapes", "seed", "environment"}
    assert "isa" in envelope["material"]["environment"] and "onnxruntime" in envelope["material"]["environment"]
