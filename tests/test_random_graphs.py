"""Seeded random graphs through -O3 with numeric verification in strict mode: any
pass that changes results fails the test (and names itself)."""
import os

import onnx
import pytest

from onnxforge import Model, optimize

from randgraph import random_model

COUNT = int(os.environ.get("ONNXFORGE_RANDOM_GRAPHS", "200"))


def test_generator_makes_valid_models():
    for seed in range(20):
        onnx.checker.check_model(random_model(seed), full_check=True)


@pytest.mark.parametrize("chunk", range(4))
def test_random_graphs_survive_O3(chunk):
    per_chunk = COUNT // 4
    failures = []
    for seed in range(chunk * per_chunk, (chunk + 1) * per_chunk):
        proto = random_model(seed)
        model, report = optimize(Model.from_proto(proto), level=3, verify="numeric", strict=True)
        assert report.verification["ok"], (seed, report.verification)
        if report.after["nodes"] > report.before["nodes"]:
            failures.append((seed, report.before["nodes"], report.after["nodes"]))
        onnx.checker.check_model(model.to_proto())
    assert not failures, f"graphs that grew: {failures}"
