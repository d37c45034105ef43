"""The pass manager: fixpoint, cap, verification, bisection, rollback, strict mode."""
import pytest
from onnx import parser

from onnxforge import Model, PassContext, PassManager, optimize
from onnxforge.errors import OptionError, PassError, VerificationError
from onnxforge.passes.base import Pass, PassResult

MODEL = parser.parse_model(
    """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 4] y) {
        a = Identity(x)
        b = Relu(a)
        y = Abs(b)
    }
    """
)


def _model() -> Model:
    return Model.from_proto(MODEL)


class DropIdentity(Pass):
    name = "test-drop-identity"

    def run(self, graph, ctx):
        n = 0
        for node in [x for x in graph.nodes if x.op == "Identity"]:
            src, dst = node.inputs[0], node.outputs[0]
            for consumer in list(dst.outputs):
                consumer.inputs[consumer.inputs.index(dst)] = src
            node.outputs.clear()
            n += 1
        graph.cleanup()
        return PassResult(n > 0, {"removed": n})


class BreakAbs(Pass):
    """Wrong on purpose: replaces Abs by Neg."""

    name = "test-break-abs"

    def run(self, graph, ctx):
        n = 0
        for node in graph.nodes:
            if node.op == "Abs":
                node.op = "Neg"
                n += 1
        return PassResult(n > 0, {"broken": n})


class NeverSettles(Pass):
    name = "test-never-settles"

    def run(self, graph, ctx):
        return PassResult(True, {"noop": 1})


class Crashes(Pass):
    name = "test-crashes"

    def run(self, graph, ctx):
        raise RuntimeError("boom")


def test_fixpoint_and_report():
    out, report = PassManager([DropIdentity()]).run(_model(), PassContext())
    assert [n.op for n in out.graph.nodes] == ["Relu", "Abs"]
    assert report.iterations == 2  # one that changes, one that confirms the fixpoint
    assert report.before["ops"]["Identity"] == 1 and "Identity" not in report.after["ops"]
    assert report.verification["ok"] and report.verification["mode"] == "numeric"
    rows = report.per_pass()
    assert rows[0]["pass"] == "test-drop-identity" and rows[0]["stats"] == {"removed": 1}


def test_cap_names_the_pass_that_keeps_changing():
    with pytest.raises(PassError, match="test-never-settles"):
        PassManager([NeverSettles()], max_iterations=3, verify="none").run(_model())


def test_failing_pass_is_bisected_and_rolled_back(tmp_path):
    out, report = PassManager([DropIdentity(), BreakAbs()], debug_dir=tmp_path).run(_model())
    ops = [n.op for n in out.graph.nodes]
    assert "Abs" in ops and "Neg" not in ops  # rolled back
    assert "Identity" not in ops  # the good pass still applied
    assert [r["pass"] for r in report.rolled_back] == ["test-break-abs"]
    assert (tmp_path / "before_test-break-abs.onnx").exists() and (tmp_path / "after_test-break-abs.onnx").exists()
    assert report.verification["ok"]


def test_strict_stops_with_verification_error(tmp_path):
    with pytest.raises(VerificationError, match="test-break-abs"):
        PassManager([DropIdentity(), BreakAbs()], strict=True, debug_dir=tmp_path).run(_model())


def test_crashing_pass_is_disabled_with_a_warning():
    out, report = PassManager([Crashes(), DropIdentity()]).run(_model())
    assert [r["pass"] for r in report.rolled_back] == ["test-crashes"]
    assert "raised RuntimeError: boom" in report.rolled_back[0]["reason"]
    assert [n.op for n in out.graph.nodes] == ["Relu", "Abs"]


def test_crashing_pass_in_strict_mode_raises_pass_error():
    with pytest.raises(PassError, match="test-crashes"):
        PassManager([Crashes()], strict=True).run(_model())


def test_structural_verification_catches_invalid_graph():
    class Dangling(Pass):
        name = "test-dangling"

        def run(self, graph, ctx):
            if any(n.op == "Relu" for n in graph.nodes):
                for n in graph.nodes:
                    if n.op == "Relu":
                        n.op = "NoSuchOp"
                return PassResult(True, {"x": 1})
            return PassResult(False)

    out, report = PassManager([Dangling()], verify="structural").run(_model())
    assert report.rolled_back and report.rolled_back[0]["pass"] == "test-dangling"
    assert any(n.op == "Relu" for n in out.graph.nodes)


def test_bad_verify_mode_is_an_option_error():
    with pytest.raises(OptionError):
        PassManager([], verify="maybe")


def test_input_shapes_pin_dims_and_reject_unknown_names():
    m = _model()
    PassManager([], verify="none").run(m, PassContext(input_shapes={"x": (2, 4)}))
    assert m.graph.inputs[0].shape == [2, 4]
    with pytest.raises(OptionError, match="does not have"):
        PassManager([], verify="none").run(_model(), PassContext(input_shapes={"nope": (1,)}))
    with pytest.raises(OptionError, match="fixed"):
        PassManager([], verify="none").run(_model(), PassContext(input_shapes={"x": (2, 5)}))


def test_user_pass_plugs_into_optimize():
    out, report = optimize(MODEL, passes=[], extra_passes=[DropIdentity()])
    assert "Identity" not in report.after["ops"]


def test_two_passes_with_one_name_are_an_error(monkeypatch):
    import types

    from onnxforge.passes import registry

    class Twin(Pass):
        name = "eliminate-identity"

        def run(self, graph, ctx):
            return PassResult(False)

    fake = types.ModuleType("fake_passes")
    fake.PASSES = (Twin,)
    monkeypatch.setitem(__import__("sys").modules, "fake_passes", fake)
    monkeypatch.setattr(registry, "PASS_MODULES", registry.PASS_MODULES + ("fake_passes",))
    with pytest.raises(registry.DuplicatePassError, match="eliminate-identity"):
        registry.all_passes()


def test_passes_lists_each_rule_with_its_file_and_line(capsys):
    from pathlib import Path

    from onnxforge.cli import main

    assert main(["passes"]) == 0
    rules = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("    rule ")]
    assert len(rules) > 20
    root = Path(__file__).resolve().parents[1]
    for _, name, where in rules:
        path, line = where.rsplit(":", 1)
        assert (root / path).is_file() and int(line) > 0, (name, where)
