"""All cleanup passes, in CLEANUP_PIPELINE order until nothing changes, on the shared real models."""

import numpy as np
import pytest

from cleanup_support import assert_valid, node_count, session
from conftest import SHARED, shared_model

from onnxforge.context import PassContext
from onnxforge.inputs import load_feeds, seeded_feeds
from onnxforge.io import load
from onnxforge.passes.registry import CLEANUP_PIPELINE, resolve

MODELS = [
    "magika_v3_3", "minilm_l6_w8", "pplcnet_orientation", "ppocr_mobile_v2_cls",
    "ppocrv4_det", "ppocrv4_rec", "silero_vad_v6", "yolov8n_320",
]
# Where a dynamic input has no realistic data, a size the model accepts.
SEEDED_SHAPES = {"yolov8n_320": {"images": (1, 3, 320, 320)}, "magika_v3_3": {"bytes": (2, 2048)}}


def run_cleanup(model, max_rounds: int = 10) -> int:
    passes = [resolve(name) for name in CLEANUP_PIPELINE]
    for rounds in range(1, max_rounds + 1):
        ctx = PassContext(model=model)
        if not any([p.run(model.graph, ctx).changed for p in passes]):
            return rounds
    raise AssertionError(f"cleanup did not settle in {max_rounds} rounds")


def feeds_for(name: str, model) -> dict:
    data = SHARED / "data" / name / "val"
    feed = load_feeds(data, limit=1)[0] if data.is_dir() else seeded_feeds(model, SEEDED_SHAPES.get(name), seed=0)
    if "sr" in feed:
        feed["sr"] = np.array(16000, dtype=np.int64)
    return feed


@pytest.mark.parametrize("name", MODELS)
def test_cleanup_keeps_outputs_and_shrinks(name):
    model = load(shared_model(name))
    original = model.to_proto()
    before = node_count(model)
    feed = feeds_for(name, model)
    run_cleanup(model)
    assert node_count(model) <= before
    proto = assert_valid(model)
    assert [o.name for o in proto.graph.output] == [o.name for o in original.graph.output]
    assert [i.name for i in proto.graph.input] == [i.name for i in original.graph.input]
    expected = session(original).run(None, feed)
    got = session(proto).run(None, feed)
    for e, g in zip(expected, got):
        assert e.shape == g.shape and e.dtype == g.dtype
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(e).max(initial=0))))
