"""SIGTERM (``timeout``, schedulers, the fleet's per-model limit) ends a command the way
Ctrl-C does: no output, no temporary file beside it or in TMPDIR, exit 143, one line."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.termination import EXIT_CODE, stop_process

# Runs `onnxforge optimize` in this interpreter, sending itself SIGTERM from inside the
# first fsync of a file whose path contains WHERE (the verification copy in TMPDIR, or
# the output's temporary file beside it): the signal lands mid-write.
SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from onnxforge import io, cli

    where, fired = sys.argv[1], []
    real_sync = io._sync

    def sync(f):
        if not fired and where in os.path.realpath(f.name):
            fired.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        real_sync(f)

    io._sync = sync
    sys.exit(cli.main(sys.argv[2:]))
""")


def _model(path) -> None:
    w = numpy_helper.from_array(np.arange(64, dtype=np.float32).reshape(8, 8) / 64, "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)


def _leftovers(folder):
    # onnxruntime itself keeps a `.ses` file in TMPDIR (the same one across runs): not ours
    return sorted(p.name for p in folder.iterdir() if p.name != ".ses")


@pytest.mark.parametrize("where", ["tmp", "out"])
def test_sigterm_mid_write_leaves_nothing(tmp_path, where):
    for name in ("in", "out", "tmp"):
        (tmp_path / name).mkdir()
    _model(tmp_path / "in" / "model.onnx")
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / where), "optimize",
                           str(tmp_path / "in" / "model.onnx"), "-o", str(tmp_path / "out" / "model.onnx"),
                           "--external-data"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_CODE, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: terminated (SIGTERM)"
    assert _leftovers(tmp_path / "out") == []
    assert _leftovers(tmp_path / "tmp") == []
    assert _leftovers(tmp_path / "in") == ["model.onnx", "model.onnx.data"]


def test_stop_process_lets_the_child_clean_up_then_kills(tmp_path):
    marker = tmp_path / "cleaned"
    child = textwrap.dedent(f"""
        import signal, sys, time
        from onnxforge.termination import raising_on_sigterm
        with raising_on_sigterm():
            try:
                print("ready", flush=True)
                time.sleep(60)
            finally:
                open({str(marker)!r}, "w").close()
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    stop_process(proc, grace=30)
    assert marker.exists() and proc.returncode != 0
    proc.stdout.close()

    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
                                stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout.readline().strip() == "ready"
    started = time.monotonic()
    stop_process(stubborn, grace=0.5)
    assert stubborn.returncode == -signal.SIGKILL and time.monotonic() - started < 30
    stubborn.stdout.close()
