"""What ``quantize`` does to the model its search chose before returning it: the lists
of int8 and float nodes with reasons, the stale-weight check, the CPU class mark in the
metadata, and the slower-than-float decision (opt-in; a timing then decides the bytes)."""
from __future__ import annotations

import onnx

from .kernels import stale_float_weights
from .report import QuantReport


def marked_for(model: onnx.ModelProto, cpu: str, report: QuantReport) -> onnx.ModelProto:
    """``model`` with the CPU class its formats were chosen for in its metadata
    (runtime/cpuclass.py: bench, compare and run warn when it runs on another class)."""
    from onnxforge.runtime.cpuclass import METADATA_KEY, has_int8_dot

    report.quantized_for = cpu
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=METADATA_KEY, value=cpu)
    report.notes.append(f"quantized for CPU class {cpu} ({'int8 dot products' if has_int8_dot(cpu) else 'no int8 dot products'}),"
                        f" recorded as {METADATA_KEY} in the model's metadata")
    return model


def slower(report: QuantReport, baseline, final, keep_float: bool) -> onnx.ModelProto:
    """The model to return when int8 is measurably slower than float."""
    ratio = report.latency["ratio"]
    if not keep_float:
        report.warnings.append(
            f"the INT8 model is {ratio:.2f}x the float latency on this machine (95% interval above 1): "
            "use the float model (--keep-float-if-slower / keep_float_if_slower=True returns it)"
        )
        return final
    report.kept_float = True
    report.warnings.append(
        f"the INT8 model is {ratio:.2f}x the float latency on this machine (95% interval above 1): "
        "the float model was returned instead (a timing decided it: not reproducible; without --keep-float-if-slower "
        "/ keep_float_if_slower=True the INT8 one is returned)"
    )
    report.float_nodes.update({n: "INT8 model slower than float: float model kept" for n in report.int8_nodes})
    report.int8_nodes = []
    report.kernels = {}
    return baseline


def fill_nodes(report: QuantReport, baseline, final, plan, excluded: list[str]) -> None:
    producers = {o: n for n in final.graph.node for o in n.output}
    final_nodes = {n.name: n for n in final.graph.node}
    for name, why in plan.fixed_float.items():
        report.float_nodes[name] = why
    for name in excluded:
        report.float_nodes[name] = "returned to float by the accuracy budget (most sensitive)"
    for name, op in plan.candidates.items():
        if name in report.float_nodes:
            continue
        node = final_nodes.get(name)
        if node is None or node.op_type != op:
            report.int8_nodes.append(name)  # replaced by an integer op
        elif any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input):
            report.int8_nodes.append(name)
        else:
            report.float_nodes[name] = "no range or no quantizable input (left float by the QDQ placer)"


def check_clean(final: onnx.ModelProto, report: QuantReport) -> None:
    stale = stale_float_weights(final)
    if stale:
        report.warnings.append(f"{len(stale)} float initializers duplicate quantized weights: {', '.join(stale[:5])}")
