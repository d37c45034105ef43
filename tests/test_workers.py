"""onnxforge.workers: every item runs, a failing one is reported, order is restored."""
from __future__ import annotations

import sys

import pytest

from onnxforge.errors import DataError, OptionError
from onnxforge.workers import LocalWorkers, Workers, make_workers


def _square_or_fail(common, item):
    if item == 3:
        raise DataError("item 3 is bad\nsecond line")
    if item == 4:
        raise ZeroDivisionError("division by zero")
    return common * item * item


@pytest.mark.parametrize("workers", [Workers(), LocalWorkers(2, threads=True)], ids=["in-process", "threads"])
def test_failures_are_one_line_outcomes_and_the_rest_go_on(workers):
    outcomes = workers.gather(_square_or_fail, range(6), 10)
    assert [o.value for o in outcomes if o.ok] == [0, 10, 40, 250]
    assert outcomes[3].error == "item 3 is bad"
    assert outcomes[4].error == "ZeroDivisionError: division by zero"


def test_make_workers_and_bad_jobs():
    assert type(make_workers(1)) is Workers and make_workers(3).count == 3
    with pytest.raises(OptionError, match="at least 1"):
        LocalWorkers(0)


def test_ray_missing_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(OptionError, match="Ray is not installed"):
        make_workers(2, "auto")
