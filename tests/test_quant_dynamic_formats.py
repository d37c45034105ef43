"""Dynamic MatMul weight formats per CPU class (formats.dynamic_formats) and the choice among them
(quantize._first_format): fastest first, the first meeting the budget kept, else the best scored."""
from __future__ import annotations

import types

import numpy as np
import pytest
from onnx import numpy_helper

from onnxforge.passes.quant import budget, formats
from onnxforge.passes.quant.plan import _Plan
from onnxforge.passes.quant.quantize import _first_format, quantize
from onnxforge.runtime import cpuclass


def _choice(scores: dict[str, float], threshold: float = 0.99, max_evaluations: int = 10):
    """_first_format over fake formats 'fast' then 'exact' whose models are their labels."""
    built: list[str] = []

    def builder(label):
        def build(excluded):
            built.append(label)
            return label
        return build

    options = {label: (types.SimpleNamespace(as_dict=lambda label=label: {"weights": label}), builder(label))
               for label in scores}
    plan = _Plan(options["fast"][1], {}, {}, {}, [], format_options=options)
    report = types.SimpleNamespace(metric="cosine", format={}, notes=[])
    search = budget.SearchBudget.start(max_evaluations)
    model, score = _first_format(plan, lambda m: scores[m], threshold, report, lambda _m: None, search)
    return model, score, built, report, plan, search


def test_fastest_format_kept_when_it_meets_the_budget():
    model, score, built, report, plan, search = _choice({"fast": 0.995, "exact": 0.999})
    assert (model, score, built, search.used) == ("fast", 0.995, ["fast"], 1)  # the exact one is never built
    assert report.format == {"weights": "fast"} and plan.build([]) == "fast"
    assert "dynamic MatMul weights: fast" in report.notes[0]


def test_next_format_when_the_fastest_misses_the_budget():
    model, score, built, report, plan, _ = _choice({"fast": 0.95, "exact": 0.995})
    assert (model, score, built) == ("exact", 0.995, ["fast", "exact"])
    assert report.format == {"weights": "exact"} and plan.build([]) == "exact"  # the fallback builds the kept one


def test_best_scored_format_when_none_meets_the_budget():
    model, score, built, report, _, _ = _choice({"fast": 0.95, "exact": 0.93})
    assert (model, score, built, report.format) == ("fast", 0.95, ["fast", "exact"], {"weights": "fast"})


def test_no_second_format_past_the_evaluation_count():
    model, _, built, _, _, search = _choice({"fast": 0.95, "exact": 0.995}, max_evaluations=1)
    assert (model, built, search.used) == ("fast", ["fast"], 1)


@pytest.mark.parametrize("cls, expected", [("avx2", [("s8", True), ("u8", False)]),
                                           ("avx512-vnni", [("s8", False)])])
def test_formats_per_cpu_class(cls, expected):
    from test_quant import _transformer_block

    spec = formats.spec_for("cpu", _transformer_block(), "dynamic", cpu=cls)
    assert [(s.weight_type, s.reduce_range) for s in formats.dynamic_formats(spec).values()] == expected


def test_quantize_on_avx2_keeps_7_bit_weights_when_they_meet_the_budget(monkeypatch):
    from test_quant import _transformer_block, _transformer_feeds

    monkeypatch.setattr(cpuclass, "cpu_class", lambda cpuinfo=None: "avx2")
    model = _transformer_block()
    out, report = quantize(model, _transformer_feeds(), max_drop=0.5, measure_latency=False, log=lambda _m: None)
    assert report.budget_met and (report.format["weight_type"], report.format["reduce_range"]) == ("s8", True)
    stored = [numpy_helper.to_array(t) for t in out.to_proto().graph.initializer if t.name.endswith("_quantized")]
    assert stored and all(a.dtype == np.int8 and np.abs(a).max() <= 64 for a in stored)  # 7 bits: no saturation
    assert any(n.startswith("dynamic MatMul weights: s8 7-bit") for n in report.notes)
