"""The optimizers the peer benchmarks compare, each as one long-lived process fed (src, dst)
pairs on stdin: onnxforge (its CLI, ``optimize -O3``, its report beside the output as
``DST.report.json``) and onnxsim / onnxslim (in the peers'
own virtualenv), so many models do not pay an interpreter start each."""
from __future__ import annotations

import json
import os
import subprocess

TIMEOUT_S = 1800

PEER_WORKER = r"""
import json, sys, traceback, onnx
peer = sys.argv[1]
if peer == "onnxsim":
    import onnxsim
else:
    import onnxslim
for line in sys.stdin:
    src, dst = json.loads(line)
    try:
        model = onnx.load(src)
        if peer == "onnxsim":
            model, ok = onnxsim.simplify(model)
            if not ok:
                raise RuntimeError("onnxsim check failed")
        else:
            model = onnxslim.slim(model)
        onnx.save(model, dst, save_as_external_data=model.ByteSize() > 1.9e9)
        print(json.dumps(""), flush=True)
    except BaseException as exc:
        print(json.dumps((type(exc).__name__ + ": " + str(exc)).splitlines()[0][:200]), flush=True)
"""

FORGE_WORKER = r"""
import contextlib, io, json, sys
from onnxforge.cli import main
for line in sys.stdin:
    src, dst = json.loads(line)
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            rc = main(["optimize", src, "-o", dst, "-O3", "--report", dst + ".report.json"])
    except SystemExit as exc:
        rc = exc.code
    except BaseException as exc:
        rc, err = 99, io.StringIO(f"{type(exc).__name__}: {exc}")
    lines = [l for l in err.getvalue().strip().splitlines() if l.strip()]
    print(json.dumps("" if rc in (0, None) else (lines[-1] if lines else f"exit {rc}")[:200]), flush=True)
"""


class Worker:
    """One long-lived optimizer process fed (src, dst) pairs on stdin, one JSON reply line each.
    A crash or a timeout restarts it and counts as that model's failure."""

    def __init__(self, command: list[str]):
        self.command = command
        self.proc = None

    def optimize(self, src: str, dst: str, timeout: float = TIMEOUT_S) -> str:
        import select

        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.proc.stdin.write(json.dumps([src, dst]) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            return "timed out" if not ready else "worker crashed"
        reply = json.loads(line)
        return reply if reply or os.path.exists(dst) else "no output written"

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
