"""fuse-embed-layernorm: BERT-style embeddings + LayerNorm -> com.microsoft EmbedLayerNormalization."""
import numpy as np
import pytest
from fusion_support import fuse_and_compare, refusal_reasons

VOCAB, MAXPOS, HIDDEN = 20, 16, 8


def _floats(shape, seed):
    values = np.random.default_rng(seed).standard_normal(shape).round(4)
    return "{" + ", ".join(str(v) for v in values.reshape(-1)) + "}"


TABLES = f'''
    W = Constant <value = float[{VOCAB}, {HIDDEN}] {_floats((VOCAB, HIDDEN), 1)}> ()
    P = Constant <value = float[{MAXPOS}, {HIDDEN}] {_floats((MAXPOS, HIDDEN), 2)}> ()
    T = Constant <value = float[2, {HIDDEN}] {_floats((2, HIDDEN), 3)}> ()
    gamma = Constant <value = float[{HIDDEN}] {_floats(HIDDEN, 4)}> ()
    beta = Constant <value = float[{HIDDEN}] {_floats(HIDDEN, 5)}> ()
    posbuf = Constant <value = int64[1, {MAXPOS}] {{{", ".join(str(i) for i in range(MAXPOS))}}}> ()
    zero = Constant <value = int64[1] {{0}}> ()
    one = Constant <value = int64[1] {{1}}> ()
    one_scalar = Constant <value = int64 {{1}}> ()'''

# TorchScript's BERT: positions = posbuf[:, :S], S read from the ids' shape.
BERT = '<ir_version: 8, opset_import: ["" : 17]>' + f'''
g (int64[B, S] input_ids, int64[B, S] token_type_ids) => (float[B, S, {HIDDEN}] y) {{''' + TABLES + '''
    w = Gather (W, input_ids)
    shape = Shape (SHAPE_OF)
    s = Gather <axis = 0> (shape, one_scalar)
    s1 = Unsqueeze (s, zero)
    pos = Slice (posbuf, zero, s1, one, one)
    p = Gather (P, pos)
    t = Gather (T, token_type_ids)
    a = Add (w, t)
    e = Add (a, p)
    y = LayerNormalization <axis = -1, epsilon = 1e-12> (e, gamma, beta)
}'''


def _feeds(batch=2, seq=5, segments=True):
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64)}
    if segments:
        feeds["token_type_ids"] = rng.integers(0, 2, (batch, seq)).astype(np.int64)
    return feeds


def _bert(*replacements):
    """BERT with the sequence length read from input_ids, then ``(old, new)`` replacements."""
    text = BERT.replace("SHAPE_OF", "input_ids")
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    return text


IDS_AND_SEGMENTS = "int64[B, S] token_type_ids)"
OUTPUT = f"(float[B, S, {HIDDEN}] y)"


def _fuse(text, feeds):
    result, _, after, ctx = fuse_and_compare(text, "fuse-embed-layernorm", feeds, rtol=1e-4, atol=1e-5,
                                             checker=False)
    assert result.stats == {"embed-layernorm": 1}, [r.reason for r in ctx.refusals]
    assert after["EmbedLayerNormalization"] == 1 and after["LayerNormalization"] == 0 and after["Add"] == 0
    return after


@pytest.mark.parametrize("seq", [1, 5, 16])
def test_bert_embeddings_fuse(seq):
    after = _fuse(BERT.replace("SHAPE_OF", "input_ids"), _feeds(seq=seq))
    assert after["Gather"] == 1  # only the Gather of the sequence length from the shape


def test_distilbert_form_shape_of_the_gathered_words():
    """No segments; the sequence length is read from the gathered words' shape."""
    text = (BERT.replace("SHAPE_OF", "w").replace(", int64[B, S] token_type_ids", "")
            .replace("t = Gather (T, token_type_ids)\n", "").replace("a = Add (w, t)", "a = Identity (w)"))
    text = text.replace("a = Identity (w)\n    e = Add (a, p)", "e = Add (w, p)")
    _fuse(text, _feeds(segments=False))


def test_full_shape_of_the_gathered_words_is_kept():
    text = BERT.replace("SHAPE_OF", "w").replace(OUTPUT, f"(float[B, S, {HIDDEN}] y, int64[3] full)")
    text = text.replace("    y = Layer", "    full = Shape (w)\n    y = Layer")
    _fuse(text, _feeds())


def test_dynamo_form_shape_slice():
    text = BERT.replace('''    shape = Shape (SHAPE_OF)
    s = Gather <axis = 0> (shape, one_scalar)
    s1 = Unsqueeze (s, zero)''', '''    s1 = Shape <start = 1, end = 2> (input_ids)''')
    _fuse(text, _feeds())


def test_position_ids_as_input_shaped_like_the_ids_fuse():
    """Explicit position ids (any values) computed from an input: passed to the op as they are."""
    text = _bert((IDS_AND_SEGMENTS, "int64[B, S] token_type_ids, int64[B, S] offsets)"),
                 ("p = Gather (P, pos)", "q = Abs (offsets)\n    p = Gather (P, q)"))
    feeds = _feeds()
    feeds["offsets"] = np.random.default_rng(1).integers(0, MAXPOS, (2, 5)).astype(np.int64)
    _fuse(text, feeds)


def test_refuses_when_no_indices_are_computed():
    text = _bert((IDS_AND_SEGMENTS, "int64[B, S] token_type_ids, int64[B, S] position_ids)"),
                 ("p = Gather (P, pos)", "p = Gather (P, position_ids)"))
    assert refusal_reasons(text, "fuse-embed-layernorm") == [
        "0 embeddings have computed indices (expected exactly one: the positions)"]


def test_sum_read_elsewhere_is_the_ops_embedding_sum_output():
    text = _bert((OUTPUT, f"(float[B, S, {HIDDEN}] y, float[B, S, {HIDDEN}] e)"))
    _fuse(text, _feeds())


def test_gpt2_form_reshaped_ids_and_range_positions():
    """ids viewed as [-1, S]; positions arange(S)[None] with S read from the gathered words."""
    text = '<ir_version: 8, opset_import: ["" : 17]>' + f'''
g (int64[B, S] input_ids) => (float[B, S, {HIDDEN}] y, float[B, S, {HIDDEN}] e) {{''' + TABLES + '''
    minus_one = Constant <value = int64[1] {-1}> ()
    zero_scalar = Constant <value = int64 {0}> ()
    shape = Shape (input_ids)
    s = Gather <axis = 0> (shape, one_scalar)
    s1 = Unsqueeze (s, zero)
    view = Concat <axis = 0> (minus_one, s1)
    ids = Reshape (input_ids, view)
    w = Gather (W, ids)
    wshape = Shape (w)
    sw = Gather <axis = 0> (wshape, one_scalar)
    r = Range (zero_scalar, sw, one_scalar)
    pos = Unsqueeze (r, zero)
    p = Gather (P, pos)
    e = Add (w, p)
    y = LayerNormalization <axis = -1, epsilon = 1e-5> (e, gamma, beta)
}'''
    _fuse(text, _feeds(segments=False))


def test_refuses_when_a_partial_sum_is_read_elsewhere():
    text = _bert((OUTPUT, f"(float[B, S, {HIDDEN}] y, float[B, S, {HIDDEN}] a)"))
    assert refusal_reasons(text, "fuse-embed-layernorm") == ["intermediate tensor a has other consumers"]


def test_refuses_a_non_constant_table():
    text = _bert((IDS_AND_SEGMENTS, f"int64[B, S] token_type_ids, float[2, {HIDDEN}] T2)"),
                 ("t = Gather (T, token_type_ids)", "t = Gather (T2, token_type_ids)"))
    assert refusal_reasons(text, "fuse-embed-layernorm") == [
        "an embedding is not a Gather on axis 0 of a constant 2-D table"]


def test_refuses_one_dimensional_positions():
    """Positions of shape (S,) broadcast differently from what the op accepts ((1, S) or like the ids)."""
    text = _bert(("pos = Slice (posbuf, zero, s1, one, one)",
                  "flat = Squeeze (posbuf, zero)\n    pos = Slice (flat, zero, s1, zero, one)"))
    reasons = refusal_reasons(text, "fuse-embed-layernorm")
    assert len(reasons) == 1 and reasons[0].startswith("position ids are neither shaped like the word ids nor (1, S)")


def test_refuses_a_non_constant_norm_scale():
    text = _bert((IDS_AND_SEGMENTS, f"int64[B, S] token_type_ids, float[{HIDDEN}] g2)"),
                 ("(e, gamma, beta)", "(e, g2, beta)"))
    assert refusal_reasons(text, "fuse-embed-layernorm") == ["norm scale/bias not constant"]
