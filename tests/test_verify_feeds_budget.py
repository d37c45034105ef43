"""Made-up inputs stay within a memory budget: a decoder with a KV cache and dynamic dims, whose attention
grows with the square of a guessed cache length, is never run at sizes whose activations exceed it (the
runs are recorded, not made, so nothing large is allocated)."""
import numpy as np
import pytest

import decoder_graphs as dg
from onnxforge import verify_feeds as vf
from onnxforge.errors import DataError
from onnxforge.model import Model
from onnxforge.verify import session_for

HEADS = 32


def _recorded_runs(monkeypatch, runs_at=1):
    runs = []

    def fake_run(session, feed):
        runs.append({k: v.shape for k, v in feed.items()})
        if feed["input_ids"].shape[1] != runs_at:
            raise RuntimeError("made-up sizes refused")
        return session.run(None, feed)

    monkeypatch.setattr(vf, "_bounded_run", fake_run)
    return runs


def _scores_elements(shapes) -> int:
    """Elements of one layer's attention scores [B, heads, S, P + S] for these feed shapes."""
    batch, seq = shapes["input_ids"]
    past = shapes["past_key_values.0.key"][2]
    return batch * HEADS * seq * (past + seq)


def test_guessed_sizes_keep_a_decoders_attention_within_the_budget(monkeypatch):
    model = Model.from_proto(dg.decoder(layers=1, heads=HEADS, kv_heads=2, head_size=8, vocab=64))
    runs = _recorded_runs(monkeypatch)
    found = vf.find_inputs(model, lambda: session_for(model), {})
    assert found.feeds is not None and runs
    budget = vf.intermediate_budget()
    assert max(_scores_elements(r) for r in runs) <= budget  # the old ladder ran 16000: 1.6e10 elements
    assert max(r["input_ids"][1] for r in runs) < 16000


def test_pinned_shapes_win_over_the_budget(monkeypatch):
    model = Model.from_proto(dg.decoder(layers=1, heads=HEADS, kv_heads=2, head_size=8, vocab=64))
    runs = _recorded_runs(monkeypatch, runs_at=8)
    pinned = {"input_ids": (1, 8), "position_ids": (1, 8), "attention_mask": (1, 9),
              "past_key_values.0.key": (1, 2, 1, 8), "past_key_values.0.value": (1, 2, 1, 8)}
    found = vf.find_inputs(model, lambda: session_for(model), pinned)
    assert found.label == "seeded" and runs == [dict(pinned)]


def test_every_guess_over_the_budget_is_one_line_with_how_to_give_sizes(monkeypatch):
    model = Model.from_proto(dg.decoder(layers=1, heads=HEADS, kv_heads=2, head_size=8, vocab=64))
    runs = _recorded_runs(monkeypatch)
    monkeypatch.setattr(vf, "intermediate_budget", lambda: 10)
    with pytest.raises(DataError) as err:
        vf.runnable_feeds(model)
    assert runs == [] and "over the 10 allowed" in str(err.value) and "--input-shape" in str(err.value)


def test_unknown_dims_count_as_the_made_up_length_squared():
    """An attention mask built by Range from input shapes: onnx inference leaves its dims unknown."""
    light = vf._weightless(Model.from_proto(dg.decoder(layers=1, heads=HEADS, kv_heads=2, head_size=8, vocab=64)))

    def shapes(n):
        return {"input_ids": (1, n), "attention_mask": (1, n), "position_ids": (1, n),
                "past_key_values.0.key": (1, 2, n, 8), "past_key_values.0.value": (1, 2, n, 8)}

    small, large = (vf.intermediate_elements(light, shapes(n), n, 1) for n in (64, 4096))
    assert large / small >= (4096 / 64) ** 2 * 0.9
    assert large > HEADS * 4096 * 8192  # at least one layer's scores


def test_a_decoder_runs_on_an_empty_past_before_any_size_is_guessed(monkeypatch):
    """Mask [B, P+S] and cache [B, H, P, D]: equal made-up sizes mismatch; P = 0 fits at the seeded sizes."""
    proto = dg.decoder(layers=1, heads=HEADS, kv_heads=2, head_size=8, vocab=64)
    model = Model.from_proto(proto)
    found = vf.find_inputs(model, lambda: session_for(model), {})
    assert found.label == "an empty past" and found.tries <= 4
    feed = found.feeds[0]
    assert feed["past_key_values.0.key"].shape[2] == 0
    assert feed["attention_mask"].shape == feed["input_ids"].shape
    logits = found.reference[0][0]
    assert logits.shape == (*feed["input_ids"].shape, 64) and np.isfinite(logits).all()


def _dynamo_dims(proto, rename_inputs=False):
    """The decoder with dims named as torch.export names them (s0, s1...), and optionally cache
    inputs named without 'past' or 'cache' (found by their Concat into a present output)."""
    names = {"batch_size": "s0", "sequence_length": "s1", "total_sequence_length": "s1 + s2",
             "past_sequence_length": "s2"}
    for info in list(proto.graph.input) + list(proto.graph.output):
        for d in info.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = names[d.dim_param]
    if rename_inputs:
        for old in [i.name for i in proto.graph.input if i.name.startswith("past_key_values")]:
            new = old.replace("past_key_values", "kv_in")
            for node in proto.graph.node:
                node.input[:] = [new if n == old else n for n in node.input]
            next(i for i in proto.graph.input if i.name == old).name = new
    return proto


@pytest.mark.parametrize("rename_inputs", [False, True])
def test_a_decoder_whose_cache_dims_are_not_named_past_runs_on_an_empty_past(rename_inputs):
    """Dynamo exports name dims s0, s1...: the cache inputs (by name, or by their Concat into an
    output) get an empty past; equal made-up sizes would not run (mask P+S against S)."""
    proto = _dynamo_dims(dg.decoder(layers=1, heads=HEADS, kv_heads=2, head_size=8, vocab=64), rename_inputs)
    model = Model.from_proto(proto)
    found = vf.find_inputs(model, lambda: session_for(model), {})
    assert found.label == "an empty past" and found.tries <= 4, found.error
    caches = [n for n in found.feeds[0] if n.startswith(("kv_in", "past_key_values"))]
    assert len(caches) == 2 and all(found.feeds[0][n].shape[2] == 0 for n in caches)
    assert found.feeds[0]["attention_mask"].shape == found.feeds[0]["input_ids"].shape


def test_the_check_of_a_written_model_keeps_the_pinned_shapes(monkeypatch, tmp_path):
    from onnxforge.verify import written_equals

    proto = dg.decoder(layers=1, heads=HEADS, kv_heads=2, head_size=8, vocab=64)
    path = tmp_path / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    runs = _recorded_runs(monkeypatch, runs_at=8)
    pinned = {"input_ids": (1, 8), "position_ids": (1, 8), "attention_mask": (1, 9),
              "past_key_values.0.key": (1, 2, 1, 8), "past_key_values.0.value": (1, 2, 1, 8)}
    written_equals(Model.from_proto(proto), pinned=pinned)(path)
    assert runs == [dict(pinned)]
