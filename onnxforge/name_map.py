"""The ``onnxforge.name_map`` metadata entry: new tensor name -> the original tensor it stands for.

The passes record, as they rewrite, which original tensor each new tensor stands for
(``PassContext.name_map``); the pass manager stores the map in the result's metadata
(JSON, composed with the input's own map), and ``onnxforge debug`` reads it to match
fused tensors.
"""
from __future__ import annotations

import json

from .model import Model

NAME_MAP_KEY = "onnxforge.name_map"


def record_name_map(model: Model, name_map: dict[str, str]) -> None:
    """Store ``name_map`` (new tensor -> original tensor) in the model's metadata,
    composed with the map the input already carried and limited to tensors the
    graph still has, so it stays small."""
    props = model.meta.metadata_props
    old = read_name_map(model)
    present = {t for n in model.graph.nodes for t in (o.name for o in n.outputs)}
    merged = {k: old.get(v, v) for k, v in {**old, **name_map}.items() if k in present}
    merged = {k: v for k, v in merged.items() if k != v}
    kept = [p for p in props if p.key != NAME_MAP_KEY]
    if len(kept) != len(props):
        del props[:]
        props.extend(kept)
    if merged:
        props.add(key=NAME_MAP_KEY, value=json.dumps(merged, sort_keys=True, separators=(",", ":")))


def read_name_map(model: Model) -> dict[str, str]:
    """The ``onnxforge.name_map`` a model carries (new tensor -> original), {} if none."""
    for p in model.meta.metadata_props:
        if p.key == NAME_MAP_KEY:
            try:
                data = json.loads(p.value)
            except ValueError:
                return {}
            return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    return {}
