"""The made-up-input probe's safety net counts CPU time, not wall time: on a loaded
machine (wall time stretched) a run is not stopped early, so the inputs a model gets
do not depend on the load (a fleet benchmark's ppocrv4_rec failed at load 30 before)."""
from __future__ import annotations

import threading

import numpy as np
from onnx import TensorProto, helper

from onnxforge import verify_feeds


class Ticks:
    """A clock advancing ``step`` on every read."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class DoneAfter:
    """An event that is set after ``n`` waits."""

    def __init__(self, n: int):
        self.n = n

    def wait(self, _timeout) -> bool:
        self.n -= 1
        return self.n < 0


def run_watch(cpu_step: float, wall_step: float, polls: int) -> tuple[bool, int]:
    stops = []
    stopped = verify_feeds.watch(lambda: stops.append(1), DoneAfter(polls), 30.0, 900.0,
                                 cpu_clock=Ticks(cpu_step), wall_clock=Ticks(wall_step), poll=0)
    return stopped, len(stops)


def test_a_loaded_machine_does_not_stop_a_run():
    # 25 polls: 250 s of wall time (over the old 30 s wall limit) but 25 s of CPU time
    assert run_watch(cpu_step=1.0, wall_step=10.0, polls=25) == (False, 0)


def test_cpu_time_over_the_limit_stops_it_once():
    assert run_watch(cpu_step=2.0, wall_step=2.0, polls=1000) == (True, 1)


def test_the_wall_clock_cap_still_bounds_it():
    assert run_watch(cpu_step=0.0, wall_step=100.0, polls=1000) == (True, 1)


def test_bounded_run_returns_the_outputs_and_leaves_no_watcher():
    import onnxruntime as ort

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    before = threading.active_count()
    (y,) = verify_feeds._bounded_run(session, {"x": np.array([-1.0, 2.0], np.float32)})
    assert y.tolist() == [0.0, 2.0] and threading.active_count() == before
