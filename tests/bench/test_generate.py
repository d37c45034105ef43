"""bench --generate on a tiny decoder with a KV cache (built in decoder_graphs): I/O discovery, the greedy
loop against per-row generation, the interleaved bench, CLI output and refusals."""
import json

import numpy as np
import onnx
import pytest

import decoder_graphs as dg
from onnxforge.bench.generate import (GenerateConfig, decoder_io, generate, left_padded, prompt_rows,
                                      run_generate_bench)
from onnxforge.bench.harness import make_variants
from onnxforge.cli import main
from onnxforge.context import PassContext
from onnxforge.errors import DataError
from onnxforge.model import Model
from onnxforge.passes.registry import resolve
from onnxforge.runtime.session import session


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decoders")
    original = dg.decoder(layers=2, vocab=64)
    model = Model.from_proto(original)
    assert resolve("fuse-gqa-rotary").run(model.graph, PassContext(model=model)).changed
    paths = {"plain": folder / "plain.onnx", "fused": folder / "fused.onnx"}
    onnx.save(original, paths["plain"])
    onnx.save(model.to_proto(), paths["fused"])
    return paths


def test_decoder_io_pairs_cache_names(decoders):
    io = decoder_io(session(decoders["plain"], None))
    assert (io.input_ids, io.attention_mask, io.position_ids, io.logits) == \
        ("input_ids", "attention_mask", "position_ids", "logits")
    assert [(s.past, s.present, s.heads, s.head_size) for s in io.cache] == [
        (f"past_key_values.{i}.{kv}", f"present.{i}.{kv}", 2, 8) for i in range(2) for kv in ("key", "value")]


def test_decoder_io_other_spellings(tmp_path):
    path = tmp_path / "past.onnx"
    onnx.save(dg.decoder(layers=1, past_name="past.{i}.{kv}"), path)
    assert [s.past for s in decoder_io(session(path, None)).cache] == ["past.0.key", "past.0.value"]


def test_left_padded_batch_generates_each_row_as_alone(decoders):
    """Row b of a left-padded batch gets the tokens it gets on its own: mask, positions and cache are fed right."""
    sess = session(decoders["plain"], None)
    io = decoder_io(sess)
    rows = prompt_rows(8, 2, 64, None, seed=3)
    assert [len(r) for r in rows] == [8, 6]
    ids, mask = left_padded(rows)
    assert mask[1, :2].tolist() == [0, 0]
    batched = generate(sess, io, ids, mask, 6)
    assert batched.tokens.shape == (2, 6) and len(batched.step_ms) == 5
    for b, row in enumerate(rows):
        alone = generate(sess, io, *left_padded([row]), 6)
        np.testing.assert_array_equal(batched.tokens[b], alone.tokens[0])
    assert not np.array_equal(batched.tokens[0], batched.tokens[1])


def test_prompt_from_data(tmp_path):
    np.savez(tmp_path / "0000.npz", input_ids=np.arange(10)[None], attention_mask=np.ones((1, 10), np.int64))
    assert prompt_rows(4, 1, None, str(tmp_path), 0)[0].tolist() == [0, 1, 2, 3]
    with pytest.raises(DataError, match="needs 12"):
        prompt_rows(12, 1, None, str(tmp_path), 0)


def test_bench_interleaves_and_compares_tokens(decoders):
    variants = make_variants([decoders["plain"], decoders["fused"]])
    result = run_generate_bench(variants, GenerateConfig(tokens=4, prompt_length=6, batch=2, rounds=3, threads=1))
    plain, fused = result.models
    assert len(plain.prefill_ms) == len(fused.step_ms) == 3
    assert plain.same_tokens and fused.same_tokens
    assert np.array(fused.tokens).shape == (2, 4)
    assert plain.prefill_ratio is None and fused.decode_ratio.rounds == 3
    assert fused.tokens_per_s(2) > 0 and result.config["prompt_shape"] == [2, 6]


def test_cli_writes_json(decoders, tmp_path, capsys):
    out = tmp_path / "gen.json"
    assert main(["bench", str(decoders["plain"]), str(decoders["fused"]), "--generate", "3", "--rounds", "2",
                 "--prompt-length", "5", "--threads", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [m["same_tokens"] for m in data["models"]] == [True, True]
    assert data["models"][1]["decode_ratio"]["rounds"] == 2
    assert "tokens/s" in capsys.readouterr().out


def test_cli_refuses_a_model_without_cache(tmp_path, capsys):
    """input_ids -> logits and nothing else: a decoder without past."""
    path = tmp_path / "nocache.onnx"
    proto = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["input_ids"], ["logits"])], "g",
        [onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["b", "s"])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.INT64, ["b", "s"])]),
        opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(proto, path)
    assert main(["bench", str(path), "--generate", "2"]) == 2
    assert "no past_key_values" in capsys.readouterr().err


def test_cli_refuses_per_run_options(decoders, capsys):
    assert main(["bench", str(decoders["plain"]), "--generate", "2", "--plot", "x.png"]) == 2
    assert "does not take --plot" in capsys.readouterr().err
