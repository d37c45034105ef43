"""Running a model on calibration feeds and reading intermediate tensors.

Intermediate tensors become extra graph outputs of a copy of the model, so the
values are exactly what the runtime computes (ORT basic optimisations only:
constant folding and identity removal never change values).
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import onnxruntime as ort

from onnxforge.output_diff import cosine

from .flops import to_proto


def session(model, extra_outputs: Iterable[str] = (), threads: int = 2) -> ort.InferenceSession:
    from onnxforge.passes.quant.proto_graph import with_outputs

    proto = with_outputs(to_proto(model), list(extra_outputs))
    del proto.graph.value_info[:]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def iter_outputs(model, feeds: Iterable[dict], names: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """For each feed dict, the values of ``names`` (intermediate or graph outputs)."""
    sess = session(model, names)
    input_names = {i.name for i in sess.get_inputs()}
    for feed in feeds:
        values = sess.run(names, {k: v for k, v in feed.items() if k in input_names})
        yield dict(zip(names, values))


def outputs(model, feeds: Iterable[dict]) -> list[list[np.ndarray]]:
    """Graph outputs for each feed dict."""
    sess = session(model)
    input_names = {i.name for i in sess.get_inputs()}
    return [sess.run(None, {k: v for k, v in feed.items() if k in input_names}) for feed in feeds]


def mean_cosine(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]]) -> float:
    """Mean over samples of the cosine of the first output (per sample, flattened)."""
    return float(np.mean([cosine(r[0], c[0]) for r, c in zip(reference, candidate)]))
