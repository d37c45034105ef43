"""Second moments H = X^T X / n of MatMul inputs over calibration feeds, for GPTQ and AWQ.

X stacks the input rows (one per token: every leading dimension flattened) the MatMul sees over all
feeds; positions a feed's ``attention_mask`` marks 0 (padding) are left out when the activation's
leading dims are [batch, sequence] like the mask's. H is accumulated in float64, one feed at a time.

Memory stays bounded: the tensors are exposed as outputs of an onnxruntime session a group at a time,
the groups sized by ``calibrate._groups_under_budget`` (bytes of one feed's activations), the feeds
re-read per group (from the folder, one file at a time), so only one group's activations of one feed
and the [K, K] accumulators are held at once, whatever the model or data size.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import numpy as np
import onnx

from onnxforge.errors import DataError

from .calibrate import _groups_under_budget, session_with_outputs

MEMORY_BUDGET = 256 << 20


def collect_hessians(model: onnx.ModelProto, feeds: Callable[[], Iterable[Mapping[str, np.ndarray]]],
                     names: list[str], *, memory_budget: int = MEMORY_BUDGET,
                     log: Callable[[str], None] | None = None) -> tuple[dict[str, np.ndarray], int]:
    """({name: H [K, K] float64}, tokens seen per tensor). ``feeds()`` gives a fresh iterator each call."""
    first = next(iter(feeds()), None)
    if first is None:
        raise DataError("the calibration data holds no feeds")
    groups = _groups_under_budget(model, names, first, memory_budget)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for index, group in enumerate(groups):
        if log:
            log(f"int4: calibration group {index + 1}/{len(groups)} ({len(group)} MatMul inputs)")
        session = session_with_outputs(model, group)
        wanted = {i.name for i in session.get_inputs()}
        for feed in feeds():
            missing = wanted - set(feed)
            if missing:
                raise DataError(f"a calibration feed lacks input(s) {', '.join(sorted(missing))}")
            outputs = session.run(group, {k: v for k, v in feed.items() if k in wanted})
            mask = feed.get("attention_mask")
            for name, value in zip(group, outputs):
                rows = _rows(np.asarray(value), mask)
                acc = sums.setdefault(name, np.zeros((rows.shape[1], rows.shape[1])))
                rows = rows.astype(np.float32)
                acc += rows.T @ rows  # float32 products of one feed, summed in float64 across feeds
                counts[name] = counts.get(name, 0) + rows.shape[0]
            del outputs
        del session
    tokens = min(counts.values()) if counts else 0
    return {name: acc / max(counts[name], 1) for name, acc in sums.items()}, tokens


def _rows(value: np.ndarray, mask) -> np.ndarray:
    """The activation as [tokens, K], padded positions dropped."""
    if mask is not None and value.ndim == 3 and value.shape[:2] == np.shape(mask):
        return value[np.asarray(mask).astype(bool)]
    return value.reshape(-1, value.shape[-1])
