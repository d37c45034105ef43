"""Seeded mutants of the shared real-weight models, and an isolated harness that runs
``onnxforge optimize M -o OUT -O3`` on each one and judges the result.

A mutant is ``(model, kind, seed)``: the same triple always gives the same bytes. Byte
mutants change the file (bit flips, truncation, inserted/deleted bytes, zeroed ranges);
field mutants change one thing in the parsed ModelProto (a dim, a type, an op, a node, an
edge, an attribute, the IR version or opsets, a value_info, an initializer's data) and
serialize it again. Mutants are made in the worker, so the parent never holds them.

Each mutant runs isolated, in a spawned worker with a hard time limit (``sweep``). The
verdict (``Outcome.problems`` empty when it passed):

* exit 0: OUT exists, loads in onnxruntime and, when onnxruntime runs the mutant itself on
  seeded inputs, gives the same outputs on those inputs;
* exit 2 or 3: stderr is exactly one ``error:`` line, optionally followed by one ``hint:``
  line, and OUT does not exist;
* never exit 1, never a ``Traceback``, never a hang or a dead worker;
* the mutant's folder holds only the mutant (and OUT on exit 0) afterwards, and the
  temporary folder the worker points ``TMPDIR``/``tempfile.tempdir`` at is empty.

``python tests/mutants.py [--count N] [--jobs 2] [--only NAME]`` prints one line per
failing mutant and a summary by outcome.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

TIMEOUT_S = 60
RTOL, ATOL = 1e-3, 1e-5

# Smallest shared models first; the fuzzer spreads mutants over them.
MODELS = ("ppocr_mobile_v2_cls", "magika_v3_3", "silero_vad_v6")

BYTE_KINDS = ("bitflip", "bitflips", "truncate", "insert", "delete", "zero", "header")
FIELD_KINDS = (
    "input_dim", "input_elem_type", "init_dim", "init_data_type", "init_raw_length", "drop_initializer",
    "op_type", "op_domain", "delete_node", "duplicate_node", "drop_node_input", "dangling_input",
    "add_node_input", "drop_node_output", "rename_output", "attr_value", "attr_type", "drop_attr",
    "ir_version", "opset_version", "duplicate_opset", "drop_opset", "strip_value_info", "graph_output",
    "reverse_nodes", "cycle", "constant_value", "external_data",
    # Changes the checker accepts: the model stays valid, the passes see unusual graphs.
    "swap_op", "swap_inputs", "attr_in_range", "rewire", "names", "init_as_input", "unused", "metadata",
)

# Inputs each model runs on (name -> shape, dtype, value range); other inputs get generic ones.
KNOWN_FEEDS = {
    "x": ((1, 3, 48, 192), np.float32, None),
    "bytes": ((1, 2048), np.int32, (0, 257)),
    "input": ((1, 576), np.float32, None),
    "state": ((2, 1, 128), np.float32, None),
    "sr": ((), np.int64, (16000, 16001)),
}


@dataclasses.dataclass(frozen=True)
class Mutant:
    model: str
    kind: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.model}:{self.kind}:{self.seed}"


@dataclasses.dataclass
class Outcome:
    name: str
    status: str  # exit0 | exit2 | exit3 | exit<N> | timeout | crash
    detail: str = ""  # what the mutant changed; the error line
    problems: list = dataclasses.field(default_factory=list)
    compared: str = ""  # exit 0: "equal" | "not runnable: ..." (onnxruntime refuses the mutant itself)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- mutants


# How often each model is drawn after the coverage round: the If-heavy silero model takes
# ~5x as long per optimize as magika, ppocr ~2.5x.
MODEL_WEIGHTS = {"magika_v3_3": 0.65, "ppocr_mobile_v2_cls": 0.25, "silero_vad_v6": 0.1}
BYTE_SHARE = 0.7  # of the draws after the coverage round (most byte mutants are refused at load)


def mutants(count: int, seed: int = 0, models=MODELS) -> list[Mutant]:
    """``count`` mutants: first every kind on magika and on one of the other models (in turn),
    then seeded draws weighted by ``MODEL_WEIGHTS`` and ``BYTE_SHARE``."""
    rng = random.Random(seed)
    kinds = list(BYTE_KINDS + FIELD_KINDS)
    first = "magika_v3_3" if "magika_v3_3" in models else models[0]
    others = [m for m in models if m != first]
    plan = []
    for i, kind in enumerate(kinds):
        plan.append((first, kind))
        plan.append((others[(i + seed) % len(others)] if others else first, kind))
    out = []
    weights = [MODEL_WEIGHTS.get(m, 0.2) for m in models]
    for i in range(count):
        if i < len(plan):
            model, kind = plan[i]
        else:
            model = rng.choices(models, weights)[0]
            kind = rng.choice(BYTE_KINDS if rng.random() < BYTE_SHARE else FIELD_KINDS)
        out.append(Mutant(model, kind, rng.randrange(1 << 30)))
    return out


def make(mutant: Mutant, models_dir: Path) -> tuple[bytes, str]:
    """The mutant's bytes and a short description of what changed."""
    data = (Path(models_dir) / f"{mutant.model}.onnx").read_bytes()
    rng = random.Random(f"{mutant.model}:{mutant.kind}:{mutant.seed}")
    if mutant.kind in BYTE_KINDS:
        return _byte_mutant(data, mutant.kind, rng)
    model = onnx.ModelProto()
    model.ParseFromString(data)
    what = getattr(sys.modules[__name__], f"_m_{mutant.kind}")(model, rng)
    return model.SerializeToString(), what


def _structure(data: bytes) -> list[tuple[int, int]]:
    """The byte ranges of the file outside the weights' payloads (raw_data of 32 bytes or more):
    most of a file is weights, where a flip gives a valid model with other numbers (which
    ``constant_value`` already covers); the fuzzer aims most byte changes at the structure."""
    model = onnx.ModelProto()
    model.ParseFromString(data)
    payloads = []
    for _, t in _initializers(model):
        raw = t.raw_data or (np.asarray(t.float_data, np.float32).tobytes() if len(t.float_data) >= 8 else b"")
        if len(raw) >= 32:  # float_data is packed: the same bytes as raw_data would be
            at = data.find(raw)
            if at >= 0:
                payloads.append((at, at + len(raw)))
    out, pos = [], 0
    for a, b in sorted(payloads):
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
    if pos < len(data):
        out.append((pos, len(data)))
    return out


def _byte_mutant(data: bytes, kind: str, rng: random.Random) -> tuple[bytes, str]:
    b = bytearray(data)
    n = len(b)
    ranges = _structure(data)
    sizes = [hi - lo for lo, hi in ranges]

    def pos() -> int:  # 85% in the structure, 15% anywhere
        if rng.random() < 0.15 or not ranges:
            return rng.randrange(n)
        lo, hi = rng.choices(ranges, sizes)[0]
        return rng.randrange(lo, hi)

    if kind == "bitflip":
        at = pos()
        b[at] ^= 1 << rng.randrange(8)
        return bytes(b), f"bit flip at {at}"
    if kind == "bitflips":
        ats = sorted(pos() for _ in range(rng.randint(2, 64)))
        for at in ats:
            b[at] ^= 1 << rng.randrange(8)
        return bytes(b), f"{len(ats)} bit flips from {ats[0]}"
    if kind == "truncate":
        at = rng.choice([0, 1, 2, rng.randrange(64), pos(), n - 1 - rng.randrange(64)])
        return bytes(b[:at]), f"truncated at {at}"
    if kind == "insert":
        at, k = pos(), rng.randint(1, 16)
        b[at:at] = bytes(rng.randrange(256) for _ in range(k))
        return bytes(b), f"{k} bytes inserted at {at}"
    if kind == "delete":
        at, k = pos(), rng.randint(1, 16)
        del b[at:at + k]
        return bytes(b), f"{k} bytes deleted at {at}"
    if kind == "zero":
        at, k = pos(), rng.choice([1, 4, 16, 256, 4096])
        b[at:at + k] = bytes(len(b[at:at + k]))
        return bytes(b), f"{k} bytes zeroed at {at}"
    if kind == "header":  # the first bytes carry ir_version, producer, the graph's tag and length
        at = rng.randrange(min(n, 48))
        b[at] = rng.randrange(256)
        return bytes(b), f"byte {at} of the header set to {b[at]}"
    raise ValueError(kind)


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _pick_graph(model, rng, need=lambda g: len(g.node) > 0):
    graphs = [g for g in _graphs(model.graph) if need(g)]
    return rng.choice(graphs) if graphs else model.graph


def _pick_node(model, rng, need=lambda n: True):
    nodes = [(g, i) for g in _graphs(model.graph) for i, n in enumerate(g.node) if need(n)]
    if not nodes:
        return model.graph, None
    return rng.choice(nodes)


def _initializers(model):
    """Initializers and Constant tensors (ppocr keeps its weights in Constant nodes)."""
    out = []
    for g in _graphs(model.graph):
        out += [(t.name, t) for t in g.initializer]
        for n in g.node:
            if n.op_type == "Constant":
                out += [(n.output[0] if n.output else n.name, a.t) for a in n.attribute if a.name == "value"]
    return out


_TYPES = [v for k, v in TensorProto.DataType.items()]


def _m_input_dim(model, rng):
    ins = [i for i in model.graph.input if i.type.tensor_type.HasField("shape")]
    if not ins:
        return "no shaped input"
    vi = rng.choice(ins)
    dims = vi.type.tensor_type.shape.dim
    choice = rng.randrange(5)
    if choice == 0 or not len(dims):
        dims.add().dim_value = rng.choice([1, 2, 7])
        return f"input {vi.name}: a dim added"
    at = rng.randrange(len(dims))
    if choice == 1:  # magika without its batch dim would broadcast to 2048 sequences: made-up inputs skip that
        del dims[at]
        return f"input {vi.name}: dim {at} removed"
    if choice == 2:
        dims[at].dim_param = rng.choice(["N", "", "?", "a b"])
        return f"input {vi.name}: dim {at} -> param {dims[at].dim_param!r}"
    dims[at].dim_value = rng.choice([0, 1, 2, 5, 1000, -3, 1 << 40])
    return f"input {vi.name}: dim {at} -> {dims[at].dim_value}"


def _m_input_elem_type(model, rng):
    vi = rng.choice(list(model.graph.input) + list(model.graph.output))
    vi.type.tensor_type.elem_type = rng.choice(_TYPES + [0, 99])
    return f"{vi.name}: elem_type -> {vi.type.tensor_type.elem_type}"


def _m_init_dim(model, rng):
    inits = _initializers(model)
    if not inits:
        return "no initializer"
    name, t = rng.choice(inits)
    choice = rng.randrange(4)
    if choice == 0 or not len(t.dims):
        t.dims.append(rng.choice([1, 2, 3]))
        return f"initializer {name}: a dim appended"
    at = rng.randrange(len(t.dims))
    if choice == 1:
        del t.dims[at]
        return f"initializer {name}: dim {at} removed"
    t.dims[at] = rng.choice([0, 1, t.dims[at] + 1, max(t.dims[at] - 1, 0), -1])
    return f"initializer {name}: dim {at} -> {t.dims[at]}"


def _m_init_data_type(model, rng):
    inits = _initializers(model)
    if not inits:
        return "no initializer"
    name, t = rng.choice(inits)
    t.data_type = rng.choice(_TYPES + [0, 99])
    return f"initializer {name}: data_type -> {t.data_type}"


def _m_init_raw_length(model, rng):
    inits = [(n, t) for n, t in _initializers(model) if t.raw_data]
    if not inits:
        return "no raw initializer"
    name, t = rng.choice(inits)
    k = rng.choice([-1, 1, -4, 4, -len(t.raw_data)])
    t.raw_data = t.raw_data[:k] if k < 0 else t.raw_data + bytes(k)
    return f"initializer {name}: raw_data {k:+d} bytes"


def _m_drop_initializer(model, rng):
    graph = _pick_graph(model, rng, lambda g: len(g.initializer) > 0)
    if not graph.initializer:
        node_graph, i = _pick_node(model, rng, lambda n: n.op_type == "Constant")
        if i is None:
            return "no initializer"
        name = node_graph.node[i].output[0]
        del node_graph.node[i]
        return f"Constant {name} removed"
    at = rng.randrange(len(graph.initializer))
    name = graph.initializer[at].name
    del graph.initializer[at]
    return f"initializer {name} removed"


_OPS = sorted({s.name for s in onnx.defs.get_all_schemas() if s.domain == ""})


def _m_op_type(model, rng):
    g, i = _pick_node(model, rng)
    if i is None:
        return "no node"
    old = g.node[i].op_type
    g.node[i].op_type = rng.choice(_OPS + ["NoSuchOp", ""])
    return f"node {g.node[i].name}: {old} -> {g.node[i].op_type}"


def _m_op_domain(model, rng):
    g, i = _pick_node(model, rng)
    if i is None:
        return "no node"
    g.node[i].domain = rng.choice(["com.microsoft", "ai.onnx.ml", "no.such.domain", "ai.onnx"])
    return f"node {g.node[i].name}: domain -> {g.node[i].domain}"


def _m_delete_node(model, rng):
    g, i = _pick_node(model, rng)
    if i is None:
        return "no node"
    name = g.node[i].name or g.node[i].op_type
    del g.node[i]
    return f"node {name} deleted"


def _m_duplicate_node(model, rng):
    g, i = _pick_node(model, rng)
    if i is None:
        return "no node"
    copy = onnx.NodeProto()
    copy.CopyFrom(g.node[i])
    g.node.insert(rng.randrange(len(g.node) + 1), copy)
    return f"node {copy.name or copy.op_type} duplicated"


def _m_drop_node_input(model, rng):
    g, i = _pick_node(model, rng, lambda n: len(n.input) > 0)
    if i is None:
        return "no node with inputs"
    node = g.node[i]
    at = rng.randrange(len(node.input))
    if rng.random() < 0.5:
        del node.input[at]
        return f"node {node.name}: input {at} removed"
    node.input[at] = ""
    return f"node {node.name}: input {at} emptied"


def _m_dangling_input(model, rng):
    g, i = _pick_node(model, rng, lambda n: len(n.input) > 0)
    if i is None:
        return "no node with inputs"
    node = g.node[i]
    at = rng.randrange(len(node.input))
    node.input[at] = node.input[at] + "_dangling"
    return f"node {node.name}: input {at} renamed to a tensor nobody makes"


def _m_add_node_input(model, rng):
    g, i = _pick_node(model, rng)
    if i is None:
        return "no node"
    node = g.node[i]
    source = rng.choice([v.name for v in model.graph.input] or [node.input[0] if node.input else "x"])
    node.input.append(source)
    return f"node {node.name}: extra input {source}"


def _m_drop_node_output(model, rng):
    g, i = _pick_node(model, rng, lambda n: len(n.output) > 0)
    if i is None:
        return "no node with outputs"
    node = g.node[i]
    at = rng.randrange(len(node.output))
    if rng.random() < 0.5:
        node.output[at] = ""
        return f"node {node.name}: output {at} emptied"
    del node.output[at]
    return f"node {node.name}: output {at} removed"


def _m_rename_output(model, rng):
    """Two producers of one name (SSA broken), or a graph output nobody makes."""
    g, i = _pick_node(model, rng, lambda n: len(n.output) > 0)
    if i is None:
        return "no node with outputs"
    node = g.node[i]
    if rng.random() < 0.5 and len(g.node) > 1:
        other = rng.choice([n for n in g.node if n.output and n is not node] or [node])
        node.output[0] = other.output[0]
        return f"node {node.name}: output renamed to {other.output[0]} (two producers)"
    node.output[0] = node.output[0] + "_renamed"
    return f"node {node.name}: output renamed (its consumers dangle)"


def _m_attr_value(model, rng):
    g, i = _pick_node(model, rng, lambda n: any(a.type != onnx.AttributeProto.GRAPH for a in n.attribute))
    if i is None:
        return "no attribute"
    node = g.node[i]
    attr = rng.choice([a for a in node.attribute if a.type != onnx.AttributeProto.GRAPH])
    A = onnx.AttributeProto
    if attr.type == A.INT:
        attr.i = rng.choice([-1, 0, 2, 3, 99, -(1 << 40), 1 << 62])
    elif attr.type == A.FLOAT:
        attr.f = rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e30])
    elif attr.type == A.INTS:
        choice = rng.randrange(3)
        if choice == 0 or not len(attr.ints):
            attr.ints.append(rng.choice([0, 1, -1, 7]))
        elif choice == 1:
            del attr.ints[rng.randrange(len(attr.ints))]
        else:
            attr.ints[rng.randrange(len(attr.ints))] = rng.choice([0, -1, 5, 1 << 33])
    elif attr.type == A.STRING:
        attr.s = rng.choice([b"", b"nonsense", b"\xff\xfe"])
    elif attr.type == A.TENSOR:
        attr.t.dims.append(2)
    elif attr.type == A.FLOATS:
        attr.floats.append(float("nan"))
    else:
        attr.ClearField("type")
    return f"node {node.name}: attribute {attr.name} changed"


def _m_attr_type(model, rng):
    g, i = _pick_node(model, rng, lambda n: len(n.attribute) > 0)
    if i is None:
        return "no attribute"
    node = g.node[i]
    attr = rng.choice(list(node.attribute))
    choice = rng.randrange(4)
    if choice == 0:
        attr.type = rng.choice([t for t in range(1, 15) if t != attr.type])
        return f"node {node.name}: attribute {attr.name} type tag -> {attr.type}"
    if choice == 1:
        attr.ClearField("type")
        return f"node {node.name}: attribute {attr.name} type tag cleared"
    if choice == 2:
        name, attr.name = attr.name, rng.choice(["", "no_such_attr", attr.name.upper()])
        return f"node {node.name}: attribute {name} renamed {attr.name!r}"
    copy = node.attribute.add()
    copy.CopyFrom(attr)
    return f"node {node.name}: attribute {attr.name} duplicated"


def _m_drop_attr(model, rng):
    g, i = _pick_node(model, rng, lambda n: len(n.attribute) > 0)
    if i is None:
        return "no attribute"
    node = g.node[i]
    at = rng.randrange(len(node.attribute))
    name = node.attribute[at].name
    del node.attribute[at]
    return f"node {node.name}: attribute {name} removed"


def _m_ir_version(model, rng):
    model.ir_version = rng.choice([0, 1, 2, 3, 4, 6, 11, 12, 99, 1 << 40, -1])
    return f"ir_version -> {model.ir_version}"


def _m_opset_version(model, rng):
    op = rng.choice(list(model.opset_import))
    op.version = rng.choice([0, 1, 5, 7, 9, 13, 21, 22, 23, 24, 99, -1, 1 << 40])
    return f"opset {op.domain!r} -> {op.version}"


def _m_duplicate_opset(model, rng):
    op = rng.choice(list(model.opset_import))
    copy = model.opset_import.add()
    copy.CopyFrom(op)
    if rng.random() < 0.5:
        copy.version += rng.choice([-2, -1, 1, 3])
    return f"opset {op.domain!r} imported twice ({op.version}, {copy.version})"


def _m_drop_opset(model, rng):
    at = rng.randrange(len(model.opset_import))
    name = model.opset_import[at].domain
    del model.opset_import[at]
    return f"opset {name!r} import removed"


def _m_strip_value_info(model, rng):
    """Strip a type/shape, or add a wrong value_info for an intermediate tensor."""
    g, i = _pick_node(model, rng, lambda n: len(n.output) > 0)
    choice = rng.randrange(4)
    if choice == 0:
        vi = rng.choice(list(model.graph.input) + list(model.graph.output))
        vi.type.tensor_type.ClearField("shape")
        return f"{vi.name}: shape stripped"
    if choice == 1:
        vi = rng.choice(list(model.graph.input) + list(model.graph.output))
        vi.ClearField("type")
        return f"{vi.name}: type stripped"
    if i is None:
        return "no node"
    name = g.node[i].output[0]
    vi = g.value_info.add()
    vi.name = name
    if choice == 2:
        vi.type.tensor_type.elem_type = rng.choice([TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL])
        for d in rng.sample([1, 2, 3, 7], rng.randint(0, 3)):
            vi.type.tensor_type.shape.dim.add().dim_value = d
        return f"value_info {name}: a wrong type/shape"
    return f"value_info {name}: an empty entry"


def _m_graph_output(model, rng):
    g = model.graph
    choice = rng.randrange(4)
    if choice == 0 and len(g.output) > 0:
        name = g.output[0].name
        del g.output[0]
        return f"graph output {name} removed"
    if choice == 1:
        copy = g.output.add()
        copy.CopyFrom(g.output[0])
        return f"graph output {copy.name} listed twice"
    if choice == 2:
        g.output[0].name = g.output[0].name + "_nobody"
        return "graph output renamed to a tensor nobody makes"
    vi = g.output.add()
    vi.CopyFrom(g.input[0])
    return f"graph input {vi.name} also a graph output"


def _m_reverse_nodes(model, rng):
    g = _pick_graph(model, rng, lambda g: len(g.node) > 1)
    nodes = list(g.node)
    if rng.random() < 0.5:
        nodes.reverse()
    else:
        rng.shuffle(nodes)
    del g.node[:]
    g.node.extend(nodes)
    return "nodes out of topological order"


def _m_cycle(model, rng):
    g = _pick_graph(model, rng, lambda g: len(g.node) > 2)
    nodes = [n for n in g.node if n.input and n.output]
    if len(nodes) < 2:
        return "no cycle possible"
    a = rng.randrange(len(nodes) - 1)
    b = rng.randrange(a + 1, len(nodes))
    nodes[a].input[0] = nodes[b].output[0]
    return f"cycle: {nodes[a].name} reads {nodes[b].output[0]}"


def _m_constant_value(model, rng):
    """A weight of NaN, inf or huge values (the file is valid; the numbers are not)."""
    inits = [(n, t) for n, t in _initializers(model) if t.data_type == TensorProto.FLOAT and t.raw_data]
    if not inits:
        return "no float initializer"
    name, t = rng.choice(inits)
    a = np.frombuffer(t.raw_data, dtype=np.float32).copy()
    value = rng.choice([np.nan, np.inf, -np.inf, 1e30, 0.0])
    a[rng.randrange(a.size)] = value
    t.raw_data = a.tobytes()
    return f"initializer {name}: one value -> {value}"


def _m_external_data(model, rng):
    inits = _initializers(model)
    if not inits:
        return "no initializer"
    name, t = rng.choice(inits)
    t.data_location = TensorProto.EXTERNAL
    where = rng.choice(["missing.bin", "../escape.bin", "/etc/passwd", "", "m.onnx"])
    del t.external_data[:]
    entry = t.external_data.add()
    entry.key, entry.value = "location", where
    if rng.random() < 0.5:
        e = t.external_data.add()
        e.key, e.value = "length", rng.choice(["-1", "abc", "99999999999"])
    return f"initializer {name}: external data at {where!r}"


_SAME_ARITY = [
    ["Relu", "Sigmoid", "Tanh", "Abs", "Neg", "Exp", "Identity", "Softplus", "Sqrt", "Erf", "HardSigmoid",
     "HardSwish", "Floor", "Sign", "Reciprocal", "Softsign", "Elu", "LeakyRelu"],
    ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"],
    ["MaxPool", "AveragePool", "LpPool"],
    ["GlobalAveragePool", "GlobalMaxPool"],
    ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2"],
    ["Equal", "Less", "Greater"],
    ["Softmax", "LogSoftmax", "Hardmax"],
    ["MatMul"],
]


def _m_swap_op(model, rng):
    """An op swapped for another of the same arity (Add -> Sub, Relu -> Sigmoid, ...)."""
    group_of = {op: g for g in _SAME_ARITY for op in g}
    g, i = _pick_node(model, rng, lambda n: n.op_type in group_of and len(group_of[n.op_type]) > 1 and not n.domain)
    if i is None:
        return "no swappable node"
    node = g.node[i]
    old = node.op_type
    node.op_type = rng.choice([op for op in group_of[old] if op != old])
    if node.op_type in ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Equal", "Less", "Greater") or rng.random() < 0.7:
        del node.attribute[:]  # the old op's attributes rarely fit the new one
    return f"node {node.name}: {old} -> {node.op_type}"


def _m_swap_inputs(model, rng):
    g, i = _pick_node(model, rng, lambda n: len([x for x in n.input if x]) >= 2)
    if i is None:
        return "no node with two inputs"
    node = g.node[i]
    a, b = rng.sample(range(len(node.input)), 2)
    node.input[a], node.input[b] = node.input[b], node.input[a]
    return f"node {node.name}: inputs {a} and {b} swapped"


def _m_attr_in_range(model, rng):
    """An attribute changed to another plausible value (axis, perm, epsilon, alpha, flags)."""
    A = onnx.AttributeProto
    g, i = _pick_node(model, rng, lambda n: any(a.type in (A.INT, A.FLOAT, A.INTS) for a in n.attribute))
    if i is None:
        return "no attribute"
    node = g.node[i]
    attr = rng.choice([a for a in node.attribute if a.type in (A.INT, A.FLOAT, A.INTS)])
    if attr.type == A.INT:
        attr.i = rng.choice([attr.i - 1, attr.i + 1, -attr.i, 0, 1, -1])
    elif attr.type == A.FLOAT:
        attr.f = rng.choice([attr.f * 2, attr.f / 2, 0.0, 1.0, -attr.f, 1e-12])
    elif len(attr.ints) > 1:
        values = list(attr.ints)
        if sorted(values) == list(range(len(values))):  # a permutation: another one
            rng.shuffle(values)
        else:
            values[rng.randrange(len(values))] = rng.choice([0, 1, 2, -1])
        attr.ints[:] = values
    elif len(attr.ints) == 1:
        attr.ints[0] = rng.choice([0, 1, -1, attr.ints[0] + 1])
    return f"node {node.name}: attribute {attr.name} -> {onnx.helper.get_attribute_value(attr)}"


def _m_rewire(model, rng):
    """A node input read from another tensor of the same graph (skips or repeats work)."""
    g = _pick_graph(model, rng, lambda g: len(g.node) > 2)
    produced = [o for n in g.node for o in n.output if o]
    consumers = [n for n in g.node if n.input and n.input[0]]
    if not consumers or not produced:
        return "nothing to rewire"
    node = rng.choice(consumers)
    at = list(g.node).index(node)
    earlier = [o for n in list(g.node)[:at] for o in n.output if o] + [v.name for v in g.input]
    if not earlier:
        return "nothing earlier"
    k = rng.randrange(len([x for x in node.input if x]) or 1)
    node.input[k] = rng.choice(earlier)
    return f"node {node.name}: input {k} -> {node.input[k]}"


def _m_names(model, rng):
    """Odd but legal names: empty or duplicate node names, tensors renamed everywhere."""
    choice = rng.randrange(3)
    if choice == 0:
        for g in _graphs(model.graph):
            for n in g.node:
                n.name = ""
        return "every node name emptied"
    if choice == 1:
        for g in _graphs(model.graph):
            for n in g.node:
                n.name = "same"
        return "every node named 'same'"
    new_name = rng.choice(["", " ", "a/b:0", "\u00e9t\u00e9", "x" * 300, "1", "onnx::Add_1"])
    g = model.graph
    old = rng.choice([o for n in g.node for o in n.output if o] or [g.input[0].name])
    if new_name == "":
        new_name = "renamed"
    for gg in _graphs(model.graph):
        for n in gg.node:
            n.input[:] = [new_name if x == old else x for x in n.input]
            n.output[:] = [new_name if x == old else x for x in n.output]
        for vi in list(gg.input) + list(gg.output) + list(gg.value_info):
            if vi.name == old:
                vi.name = new_name
        for t in gg.initializer:
            if t.name == old:
                t.name = new_name
    return f"tensor {old!r} renamed {new_name[:20]!r} everywhere"


def _m_init_as_input(model, rng):
    """An initializer also listed as a graph input (overridable), or a Constant made an initializer."""
    g = model.graph
    if g.initializer and rng.random() < 0.6:
        t = rng.choice(list(g.initializer))
        vi = onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        g.input.append(vi)
        return f"initializer {t.name} also a graph input"
    consts = [i for i, n in enumerate(g.node) if n.op_type == "Constant" and any(a.name == "value" for a in n.attribute)]
    if not consts:
        return "no Constant"
    i = rng.choice(consts)
    node = g.node[i]
    t = onnx.TensorProto()
    t.CopyFrom(next(a.t for a in node.attribute if a.name == "value"))
    t.name = node.output[0]
    del g.node[i]
    g.initializer.append(t)
    if model.ir_version < 4 or rng.random() < 0.5:
        g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return f"Constant {t.name} made an initializer"


def _m_unused(model, rng):
    g = model.graph
    choice = rng.randrange(3)
    if choice == 0:
        g.initializer.append(onnx.numpy_helper.from_array(np.ones((3, 2), np.float32), "unused_init"))
        return "an unused initializer"
    if choice == 1:
        g.input.append(onnx.helper.make_tensor_value_info("unused_input", TensorProto.FLOAT, [1, 2]))
        return "an unused graph input"
    g.node.append(onnx.helper.make_node("Relu", [g.input[0].name], ["unused_out"], name="unused_relu"))
    return "a node nobody reads"


def _m_metadata(model, rng):
    choice = rng.randrange(4)
    if choice == 0:
        for k in ("a", "a", "onnxforge", ""):
            p = model.metadata_props.add()
            p.key, p.value = k, "v" * rng.choice([0, 10, 100000])
        return "metadata_props with repeated and empty keys"
    if choice == 1:
        model.producer_name, model.producer_version = "\u2603" * 50, ""
        model.domain, model.model_version = "x" * 1000, -5
        return "odd producer, domain and model_version"
    if choice == 2:
        model.graph.doc_string = "d" * 100000
        model.graph.name = ""
        return "empty graph name and a long doc_string"
    f = model.functions.add()
    f.name, f.domain = "F", "local.fn"
    f.node.add().CopyFrom(onnx.helper.make_node("Relu", ["x"], ["y"]))
    f.input.append("x")
    f.output.append("y")
    f.opset_import.add().CopyFrom(onnx.helper.make_opsetid("", 17))
    return "an unused local function"


# ----------------------------------------------------------------------------- feeds and comparison


def _feeds(session, rng: np.random.Generator, zeros: bool = False) -> dict:
    feeds = {}
    types = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
             "tensor(uint8)": np.uint8, "tensor(int16)": np.int16, "tensor(uint16)": np.uint16,
             "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_}
    for arg in session.get_inputs():
        dtype = types.get(arg.type)
        if dtype is None:
            raise ValueError(f"input {arg.name}: type {arg.type}")
        known = KNOWN_FEEDS.get(arg.name)
        shape = arg.shape or []
        if known and len(known[0]) == len(shape):
            shape = [k if not isinstance(d, int) or d <= 0 else d for d, k in zip(shape, known[0])]
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in shape)
        if int(np.prod(shape, dtype=np.int64)) > 1 << 24:
            raise ValueError(f"input {arg.name}: shape {shape} too large")
        if np.dtype(dtype).kind == "f":
            value = rng.standard_normal(shape).astype(dtype)
        elif np.dtype(dtype).kind == "b":
            value = rng.random(shape) < 0.5
        else:
            lo, hi = known[2] if known and known[2] and np.dtype(known[1]).kind in "iu" else (0, 3)
            value = np.zeros(shape, dtype) if zeros else rng.integers(lo, hi, shape).astype(dtype)
        feeds[arg.name] = value
    return feeds


def _session(data, optimize: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.intra_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _close(ref, got) -> bool:
    if isinstance(ref, (list, tuple)):
        return isinstance(got, (list, tuple)) and len(ref) == len(got) and all(_close(r, g) for r, g in zip(ref, got))
    if isinstance(ref, dict):
        return isinstance(got, dict) and ref.keys() == got.keys() and all(_close(ref[k], got[k]) for k in ref)
    r, g = np.asarray(ref), np.asarray(got)
    if r.shape != g.shape:
        return False
    if r.dtype.kind not in "fc":
        return r.dtype == g.dtype and r.tolist() == g.tolist()
    if g.dtype.kind not in "fc":
        return False
    r, g = r.astype(np.float64), g.astype(np.float64)
    if not np.array_equal(np.isnan(r), np.isnan(g)):
        return False
    finite = np.isfinite(r) & np.isfinite(g)
    if not np.array_equal(r[~finite & ~np.isnan(r)], g[~finite & ~np.isnan(g)]):
        return False
    r, g = r[finite], g[finite]
    if not r.size:
        return True
    scale = float(np.max(np.abs(r)))
    return bool(np.max(np.abs(r - g)) <= ATOL + RTOL * scale)


def compare(src: Path, out: Path) -> tuple[str, str | None]:
    """(how it was compared, a problem or None): OUT against the mutant on seeded inputs."""
    # Some mutants load only without onnxruntime's graph optimizations (its constant folding
    # runs shape inference that a swapped Reshape fails): OUT is judged with the same options.
    sess = reason = None
    for optimize in (True, False):
        try:
            sess = _session(str(src), optimize)
            break
        except Exception as exc:
            reason = f"not runnable: {type(exc).__name__}"
    if sess is None:
        try:
            _session(str(out), False)
        except Exception as exc2:
            return reason, f"OUT does not load in onnxruntime: {_first(exc2)}"
        return reason, None
    ref = feeds = None
    for attempt in range(2):
        try:
            feeds = _feeds(sess, np.random.default_rng(0), zeros=attempt == 1)
            ref = sess.run(None, feeds)
            break
        except Exception as exc:
            ref, why = None, f"not runnable: {type(exc).__name__}"
    try:
        got_sess = _session(str(out), optimize)
    except Exception as exc:
        return "", f"OUT does not load in onnxruntime: {_first(exc)}"
    if ref is None:
        return why, None
    try:
        got = got_sess.run(None, feeds)
    except Exception as exc:
        return "", f"OUT fails on inputs the mutant runs on: {_first(exc)}"
    names = [o.name for o in sess.get_outputs()]
    got_names = [o.name for o in got_sess.get_outputs()]
    if names != got_names:
        return "", f"outputs {names} became {got_names}"
    bad = [n for n, r, g in zip(names, ref, got) if not _close(r, g)]
    if bad:
        return "", f"outputs differ from the mutant's: {bad}"
    return "equal", None


def _first(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


# ----------------------------------------------------------------------------- the worker


def judge(rc: int, stderr: str, folder: Path, src: Path, out: Path, tmp: Path) -> list[str]:
    """Problems with one CLI run (empty: it kept the promise)."""
    problems = []
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if "Traceback" in stderr:
        problems.append("a traceback on stderr")
    if rc not in (0, 2, 3):
        problems.append(f"exit {rc}")
    if rc in (2, 3):
        if not (1 <= len(lines) <= 2 and lines[0].startswith("error: ")
                and (len(lines) == 1 or lines[1].startswith("hint: "))):
            problems.append(f"exit {rc} with stderr {lines[:4]!r} (want one error: line and an optional hint:)")
    left = sorted(p.name for p in folder.iterdir() if p not in (src, out))
    if left:
        problems.append(f"left in the model's folder: {left}")
    if rc != 0 and out.exists():
        problems.append(f"exit {rc} but OUT exists")
    if rc == 0 and not out.exists():
        problems.append("exit 0 but no OUT")
    # .ses is onnxruntime's own telemetry session file (its import writes it in $TMPDIR), not a file of ours.
    left_tmp = sorted(p.name for p in tmp.iterdir() if p.name != ".ses")
    if left_tmp:
        problems.append(f"left in the temp dir: {left_tmp}")
    return problems


def run_mutant(mutant: Mutant, models_dir: Path, work: Path) -> Outcome:
    t0 = time.perf_counter()
    folder, tmp = work / "case", work / "tmp"
    folder.mkdir()
    tmp.mkdir()
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = str(tmp)
    data, what = make(mutant, models_dir)
    src, out = folder / "m.onnx", folder / "out.onnx"
    src.write_bytes(data)
    del data
    from onnxforge.cli import main

    err = io.StringIO()
    # onnxruntime's and onnx's C++ code write to fd 2 directly: catch those lines too.
    with tempfile.TemporaryFile(dir=work) as fd_err:
        saved = os.dup(2)
        os.dup2(fd_err.fileno(), 2)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    rc = main(["optimize", str(src), "-o", str(out), "-O3"])
                except SystemExit as exc:
                    rc = exc.code if isinstance(exc.code, int) else 1
                except BaseException as exc:  # escaped main(): a finding
                    import traceback

                    err.write(traceback.format_exc())
                    rc = 1
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        fd_err.seek(0)
        stderr = err.getvalue() + fd_err.read().decode("utf-8", "replace")
    problems = judge(rc, stderr, folder, src, out, tmp)
    error = next((ln for ln in stderr.splitlines() if ln.startswith("error:")), "")
    if not error and stderr.strip():
        error = stderr.strip().splitlines()[-1]
    outcome = Outcome(mutant.name, f"exit{rc}", f"{what}; {error[:300]}" if error else what, problems)
    if rc == 0 and out.exists():
        outcome.compared, problem = compare(src, out)
        if problem:
            outcome.problems.append(problem)
    outcome.seconds = time.perf_counter() - t0
    return outcome


def run_isolated_mutant(task) -> Outcome:
    """One mutant in a worker of ``isolated.run``, in a fresh folder removed after."""
    mutant, models_dir, base = task
    saved_env, saved_dir = os.environ.get("TMPDIR"), tempfile.tempdir
    work = Path(tempfile.mkdtemp(prefix="mutant-", dir=base))
    try:
        return run_mutant(mutant, Path(models_dir), work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        # run_mutant points the temp dir into ``work``: the worker's next task starts afresh.
        tempfile.tempdir = saved_dir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env


def sweep(items: list[Mutant], models_dir: Path, jobs: int = 2, timeout: float = TIMEOUT_S,
          on_result=None, base=None) -> list[Outcome]:
    """Each mutant isolated from the others and from this process (tests/isolated.py), a
    hang or a crash costs that mutant only. Each works in a fresh folder under ``base``
    (default: the temp dir)."""
    import isolated

    def failed(task, status: str, detail: str) -> Outcome:
        status = "crash" if status == "error" else status
        return Outcome(task[0].name, status, detail, [f"{status}: {detail}"],
                       seconds=timeout if status == "timeout" else 0.0)

    tasks = [(m, str(models_dir), str(base) if base else None) for m in items]
    return isolated.run(tasks, run_isolated_mutant, jobs=jobs, timeout=timeout, on_failure=failed,
                        on_result=on_result)


def summary(results: list[Outcome]) -> dict:
    counts: dict[str, int] = {}
    for r in results:
        key = r.status
        if r.status == "exit0":
            key += " (compared)" if r.compared == "equal" else " (mutant not runnable)"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def main(argv=None) -> int:
    from conftest import SHARED

    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=240)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", help="comma-separated mutant names (model:kind:seed)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    items = mutants(args.count, args.seed)
    if args.only:
        items = [Mutant(m, k, int(s)) for m, k, s in (n.split(":") for n in args.only.split(","))]
    t0 = time.perf_counter()

    def show(r: Outcome) -> None:
        if r.problems or args.verbose:
            print(f"{r.status:7s} {r.seconds:5.1f}s {r.name}: {r.detail} {'| ' + '; '.join(r.problems) if r.problems else ''}"
                  f"{' [' + r.compared + ']' if r.compared else ''}", flush=True)

    results = sweep(items, SHARED / "models", jobs=args.jobs, on_result=show)
    bad = [r for r in results if r.problems]
    print(f"{len(results)} mutants, {len(bad)} with problems, {time.perf_counter() - t0:.0f} s: {summary(results)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
