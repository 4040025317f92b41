"""Crashes, with real processes and SIGKILL: the summary helper must neither outlive the
serving process nor take inference down with it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent import MonitoredSession, examples

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc and /dev/shm")

ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 20.0  # seconds; a hang guard, not a speed requirement
PROVIDERS = ["CPUExecutionProvider"]

# A serving process: traffic through a process-mode session, then it reports the
# helper's pid and the ring's shared-memory name and waits to be killed.
SERVING = """
import sys, time
from agent import MonitoredSession, examples
sess = MonitoredSession(examples.logistic_regression(), summarizer="process",
                        window_seconds=None, window_rows=100)
x = examples.tabular_data(n=250)[0]
for i in range(0, 250, 10):
    sess.run(None, {"X": x[i:i + 10]})
if sys.argv[1] == "summarising":
    sess.sink.wait_for(2, timeout=60)  # the helper is past start-up
print(sess._summarizer.proc.pid, sess._ring.shm_name, flush=True)
time.sleep(3600)
"""


def running(pid: int) -> bool:
    """False once the process has exited (a zombie counts: whoever inherited it may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(condition) -> bool:
    end = time.monotonic() + DEADLINE
    while not condition() and time.monotonic() < end:
        time.sleep(0.05)
    return condition()


@pytest.mark.parametrize("helper_state", ["starting", "summarising"])
def test_helper_exits_when_serving_process_is_killed(helper_state, tmp_path):
    with open(tmp_path / "stderr", "w") as stderr:
        serving = subprocess.Popen([sys.executable, "-c", SERVING, helper_state], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=stderr, text=True)
    line = serving.stdout.readline()
    serving.kill()  # SIGKILL: CLOSED is never set, nothing gets to clean up
    serving.wait()
    serving.stdout.close()
    assert line, (tmp_path / "stderr").read_text()
    pid, shm_name = int(line.split()[0]), line.split()[1]
    try:
        assert wait_until(lambda: not running(pid)), f"helper {pid} outlived its parent"
        # the dead process's resource tracker unlinks the block it leaked
        assert wait_until(lambda: not Path("/dev/shm", shm_name).exists())
    finally:
        if running(pid):
            os.kill(pid, signal.SIGKILL)


def test_inference_survives_a_killed_helper():
    model = examples.logistic_regression()
    bare = ort.InferenceSession(model, providers=PROVIDERS)
    batches = np.split(examples.tabular_data(n=5000, seed=2)[0], 500)
    sess = MonitoredSession(model, providers=PROVIDERS, summarizer="process",
                            window_seconds=None, window_rows=100, ring_rows=1024)
    helper, shm_name = sess._summarizer.proc, sess._ring.shm_name
    for x in batches[:25]:
        sess.run(None, {"X": x})
    # the helper has reported 2 windows and holds 50 rows in its open one
    assert wait_until(lambda: sess.stats()["rows_summarised"] == 250)

    helper.kill()
    helper.wait()
    for x in batches[25:]:
        label, proba = sess.run(None, {"X": x})
        want_label, want_proba = bare.run(None, {"X": x})
        np.testing.assert_array_equal(label, want_label)
        np.testing.assert_allclose(proba, want_proba, rtol=1e-6)
    sess.close()  # returns: nothing waits on the dead helper

    stats, windows = sess.stats(), sess.sink.windows
    assert stats["rows_summarised"] + stats["dropped_rows"] == 5000
    assert stats["dropped_rows"] >= 50  # at least the open window the helper took with it
    assert stats["errors"] == 0
    # every row is in some window, as summarised or as dropped, under unbroken sequence numbers
    assert sum(w.rows for w in windows) == stats["rows_summarised"]
    assert sum(w.dropped_rows for w in windows) == stats["dropped_rows"]
    assert [w.seq for w in windows] == list(range(len(windows)))
    assert not Path("/dev/shm", shm_name).exists()
