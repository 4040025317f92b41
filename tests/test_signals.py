"""A server stops in order on SIGTERM whichever of its threads the kernel hands the signal to.

A process-directed signal may land on any thread that does not block it; the
kernel picks another thread than the main one now and then (seen in CI, under
load). Python runs its handler only in the main thread, once that thread runs
bytecode again, so a main thread blocked for good on a lock ignored the
signal. Here the signal is sent to a gRPC thread on purpose (tgkill), which
made the old servers hang every time.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_delivery import ROOT, exit_code, start

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tgkill and /proc are Linux's")
SYS_TGKILL = {"x86_64": 234, "aarch64": 131}.get(os.uname().machine)


def other_thread(pid: int) -> int:
    """A thread of ``pid`` that is not its main thread (its id is the pid)."""
    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    assert tids, "the server has no thread but its main one"
    return tids[-1]


def tgkill(pid: int, tid: int, sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_TGKILL, pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


@pytest.mark.skipif(SYS_TGKILL is None, reason="tgkill's syscall number is known here for x86_64 and aarch64")
@pytest.mark.parametrize("server", ["collector", "agent"])
def test_sigterm_to_any_thread_stops_the_server(server: str, tmp_path: Path, lr_model: Path):
    if server == "collector":
        proc, _ = start(["collector", "serve", "--db", str(tmp_path / "c.db"), "--listen", "127.0.0.1:0"],
                        r"collector listening on (\S+)")
    else:
        proc, _ = start(["agent", "serve", "--model", str(lr_model), "--listen", "127.0.0.1:0",
                         "--summarizer", "thread"], r"serving \S+ version \S+ on (\S+)")
    time.sleep(1.0)  # the main thread deep in its wait
    tgkill(proc.pid, other_thread(proc.pid), signal.SIGTERM)
    assert exit_code(proc) == 0


def test_ctrl_c_on_the_process_group_stops_the_agent_in_order(tmp_path: Path, lr_model: Path):
    """A terminal's Ctrl-C (or systemd stopping a unit) signals every process of the group: the
    summary helper must not die of it before the agent has closed its last window."""
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "serve", "--model", str(lr_model),
                             "--listen", "127.0.0.1:0", "--summarizer", "process"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    for line in proc.stdout:
        if "serving" in line:
            break
    time.sleep(1.0)  # the helper process is up
    children = [int(t) for t in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    helpers = [c for c in children if b"agent.summary_process" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert helpers, "the agent started no summary process"
    os.killpg(proc.pid, signal.SIGINT)  # every process of the group, as a terminal does
    os.kill(helpers[0], signal.SIGTERM)  # and a SIGTERM to the helper itself, as a control-group kill
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the agent did not stop on SIGINT") from None
    assert proc.returncode == 0, stderr
    assert "summary process exited" not in stderr and "Traceback" not in stderr, stderr
