"""The hint after a missed INT4 budget names only what the run did not already try."""
from argparse import Namespace

from onnxforge.passes.quant.commands import _int4_hint


def _args(**kw):
    base = dict(weight_method="gptq", block_size=128, lm_head="int4", stages=1)
    return Namespace(**{**base, **kw})


def test_a_gptq_run_is_not_told_to_try_gptq():
    hint = _int4_hint(_args())
    assert "--weight-method gptq," not in hint and "--weight-method awq+gptq" in hint
    assert "--block-size 64" in hint and "--lm-head float" in hint and "--stages" in hint


def test_options_already_taken_are_left_out():
    hint = _int4_hint(_args(weight_method="rtn", block_size=32, lm_head="float"))
    assert hint == "try --weight-method gptq, --weight-method awq+gptq"
    hint = _int4_hint(_args(weight_method="awq+gptq", block_size=32, lm_head="float", stages=30))
    assert hint == "try --weight-method gptq"
