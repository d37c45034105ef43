"""Remove channel classes from the graph: every site of the analysis loses the same positions.

Identity: with ids kept K, producer output channels, consumer input channels and
per-channel parameters restricted to K give exactly the unpruned network with the
removed channels' contributions set to zero (their activations are dropped, not
changed), so structure stays valid by construction and only the values change.
Preconditions: the analysis was made on this very graph and no blocked class is
removed (``apply_pruning`` raises if one is).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.errors import PassError

from .groups import ChannelAnalysis


def kept_positions(analysis: ChannelAnalysis, keep_root: dict[int, bool], ids: np.ndarray) -> np.ndarray:
    """Boolean mask over positions: True where the position's class stays."""
    return np.array([keep_root.get(analysis.uf.find(int(i)), True) for i in ids], dtype=bool)


def apply_pruning(graph: gs.Graph, analysis: ChannelAnalysis, removed: set[int]) -> dict[str, np.ndarray | None]:
    """Remove the classes (root ids) in ``removed`` from ``graph``, in place.

    ``graph`` is the analysed graph or a copy of it: sites are found by node name.
    Returns the consumers (sinks) whose input channels shrank: name -> mask of
    their kept output channels (None when all stay).
    """
    blocked = {int(r) for g in analysis.groups() for r in g.blocked}
    if removed & blocked:
        raise PassError(f"refusing to remove {len(removed & blocked)} blocked channel classes")
    keep_root = {int(r): False for r in removed}
    nodes = {n.name: n for n in graph.nodes}
    tensors = graph.tensors()
    shrunk_sinks: list[str] = []
    out_masks: dict[str, np.ndarray] = {}
    for site in analysis.sites:
        mask = kept_positions(analysis, keep_root, site.ids)
        if mask.all():
            continue
        local = dataclasses.replace(site, node=nodes[site.node.name])
        if "const" in site.extra:
            local.extra = dict(site.extra, const=tensors.get(site.extra["const"].name, site.extra["const"]))
        EDITS[site.kind](local, mask)
        if site.kind == "sink":
            shrunk_sinks.append(site.node.name)
        elif site.kind == "source" and site.index == 1:
            out_masks[site.node.name] = mask
    _forget_inner_shapes(graph)
    return {name: out_masks.get(name) for name in shrunk_sinks}


def _slice_input(site, mask: np.ndarray) -> None:
    node, i = site.node, site.index
    const = node.inputs[i]
    values = np.asarray(const.values)
    if values.shape[site.axis] != len(mask):
        raise PassError(f"{node.name}: input {i} has {values.shape[site.axis]} channels on axis {site.axis}, "
                        f"the analysis expected {len(mask)}")
    sliced = np.ascontiguousarray(np.compress(mask, values, axis=site.axis))
    node.inputs[i] = gs.Constant(f"{const.name}_pruned_{node.name}_{i}", sliced)


def _set_group(site, mask: np.ndarray) -> None:
    site.node.attrs["group"] = int(mask.sum())


def _set_entry(site, mask: np.ndarray) -> None:
    const = site.extra["const"]
    values = np.array(const.values).reshape(-1)
    values[site.axis] = int(mask.sum())
    replacement = gs.Constant(f"{const.name}_pruned_{site.node.name}", values.reshape(const.shape))
    _replace_input(site.node, const, replacement)


def _replace_input(node: gs.Node, old, new) -> None:
    for i, t in enumerate(node.inputs):
        if t is old:
            node.inputs[i] = new
            return
    shape_producer = node.inputs[1].inputs[0] if node.inputs[1].inputs else None  # Concat building a shape
    if shape_producer is not None:
        _replace_input(shape_producer, old, new)


def _set_slice(site, mask: np.ndarray) -> None:
    node = site.node
    lo, hi = site.extra["lo"], site.extra["hi"]
    new_lo, new_hi = int(mask[:lo].sum()), int(mask[:hi].sum())
    if "starts" in node.attrs:
        axes = node.attrs.get("axes", list(range(len(node.attrs["starts"]))))
        j = _axis_index(axes, site.axis, len(node.outputs[0].shape or []) or site.axis + 1)
        node.attrs["starts"][j], node.attrs["ends"][j] = new_lo, new_hi
        return
    axes = node.inputs[3].values.reshape(-1).tolist() if len(node.inputs) > 3 and node.inputs[3] is not None \
        and node.inputs[3].name else list(range(len(node.inputs[1].values.reshape(-1))))
    rank = max(site.axis + 1, max((abs(a) for a in axes), default=0))
    j = _axis_index(axes, site.axis, rank)
    for k, value in ((1, new_lo), (2, new_hi)):
        arr = np.array(node.inputs[k].values).reshape(-1)
        arr[j] = value
        node.inputs[k] = gs.Constant(f"{node.inputs[k].name}_pruned_{node.name}", arr.astype(node.inputs[k].dtype))


def _axis_index(axes, axis: int, rank: int) -> int:
    for j, a in enumerate(axes):
        if int(a) == axis or int(a) < 0 and int(a) + rank == axis:
            return j
    raise PassError(f"slice axis {axis} not found in {axes}")


def _set_split(site, mask: np.ndarray) -> None:
    node = site.node
    offsets = np.cumsum([0] + list(site.extra["sizes"]))
    sizes = np.array([int(mask[lo:hi].sum()) for lo, hi in zip(offsets[:-1], offsets[1:])], dtype=np.int64)
    if site.extra.get("opset", 13) < 13:
        node.attrs["split"] = sizes.tolist()
        return
    const = gs.Constant(f"{node.name}_split_pruned", sizes)
    if len(node.inputs) > 1:
        node.inputs[1] = const
    else:
        node.inputs.append(const)
    node.attrs.pop("num_outputs", None)


def _forget_inner_shapes(graph: gs.Graph) -> None:
    """Intermediate shapes are stale once channels are gone; exporters re-infer them."""
    keep = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in keep:
            tensor.shape = None
            tensor.dtype = None  # with no shape, a typed value_info would not pass the checker


EDITS = {
    "source": _slice_input,
    "sink": _slice_input,
    "param": _slice_input,
    "group": _set_group,
    "reshape": _set_entry,
    "slice": _set_slice,
    "split": _set_split,
}
