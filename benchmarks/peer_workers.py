"""The optimizers the peer benchmarks compare, each as one long-lived process fed (src, dst)
pairs on stdin: onnxforge (its CLI, ``optimize -O3``, its report beside the output as
``DST.report.json``) and onnxsim / onnxslim (in the peers' own virtualenv), so many models do
not pay an interpreter start each."""
from __future__ import annotations

import json
import os
import subprocess

TIMEOUT_S = 1800
# Replies are marked: a peer's own library may print to stdout (from C++ too, which Python's
# redirection does not catch), and those lines are not replies.
REPLY_MARK = "@@bench-reply "

PEER_WORKER = f"REPLY = {REPLY_MARK!r}\n" + r"""
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
        print(REPLY + json.dumps(""), flush=True)
    except BaseException as exc:
        print(REPLY + json.dumps((type(exc).__name__ + ": " + str(exc)).splitlines()[0][:200]), flush=True)
"""

FORGE_WORKER = f"REPLY = {REPLY_MARK!r}\n" + r"""
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
    print(REPLY + json.dumps("" if rc in (0, None) else (lines[-1] if lines else f"exit {rc}")[:200]), flush=True)
"""


class Worker:
    """One long-lived optimizer process fed (src, dst) pairs on stdin, one marked JSON reply line each
    (other lines it prints are skipped). A crash or a timeout restarts it and counts as that model's failure."""

    def __init__(self, command: list[str]):
        self.command = command
        self.proc = None
        self.pending = b""

    def optimize(self, src: str, dst: str, timeout: float = TIMEOUT_S) -> str:
        import select
        import time

        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL)
            self.pending = b""
        self.proc.stdin.write((json.dumps([src, dst]) + "\n").encode())
        self.proc.stdin.flush()
        deadline, printed = time.monotonic() + timeout, ""
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" not in self.pending:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    self.close()
                    return "timed out"
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    self.close()
                    return "worker crashed" + (f" (last printed: {printed[:160]})" if printed else "")
                self.pending += chunk
            raw, _, self.pending = self.pending.partition(b"\n")
            line = raw.decode(errors="replace")
            _, mark, body = line.rpartition(REPLY_MARK)
            if mark:
                reply = json.loads(body)
                return reply if reply or os.path.exists(dst) else "no output written"
            printed = line.strip() or printed

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
