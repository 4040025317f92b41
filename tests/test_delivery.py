"""Effectively-once delivery with real processes on loopback, and kill -9 of either side.

- The collector is SIGKILLed in the middle of a load and restarted: afterwards
  the rows stored for the model version equal the rows the agent served, and
  no inference request failed.
- An agent is SIGKILLed and restarted with the same spool: every window it had
  closed before the kill is stored exactly once; only its open window can be
  lost; the collector shows the restart.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos import collector_pb2, collector_pb2_grpc
from protos import open_inference_pb2 as pb
from protos import open_inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def start(args: list[str], pattern: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    for line in proc.stdout:
        match = re.search(pattern, line)
        if match:
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, match.group(1)
    raise AssertionError(f"{args[:2]} exited with {proc.wait()} before it was ready")


def exit_code(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """The process's exit code; one that hangs first prints its threads' stacks (SIGUSR1), then is killed."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2.0)
        proc.kill()
        raise AssertionError(f"{proc.args[3:5]} did not exit within {timeout:.0f} s; its stacks are on stderr")


def collector(db: Path, listen: str = "127.0.0.1:0") -> tuple[subprocess.Popen, str]:
    return start(["collector", "serve", "--db", str(db), "--listen", listen], r"collector listening on (\S+)")


def agent(model: Path, collector_addr: str, spool: Path, agent_id: str) -> tuple[subprocess.Popen, str]:
    return start(["agent", "serve", "--model", str(model), "--model-name", "m", "--model-version", "1",
                  "--listen", "127.0.0.1:0", "--window-seconds", "0.3", "--collector", collector_addr,
                  "--spool-dir", str(spool), "--agent-id", agent_id, "--summarizer", "process"],
                 r"serving m version 1 on (\S+)")


class Load:
    """OIP clients in threads; counts rows answered and requests that failed."""

    def __init__(self, address: str, threads: int = 2) -> None:
        self.rows = 0
        self.failures: list[Exception] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(address, i), daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, address: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not self._stop.is_set():
                n = int(rng.integers(1, 17))
                request = pb.ModelInferRequest(model_name="m")
                request.inputs.add(name="X", datatype="FP32", shape=[n, 20])
                request.raw_input_contents.append(rng.standard_normal((n, 20)).astype("<f4").tobytes())
                try:
                    stub.ModelInfer(request, timeout=30)
                except Exception as exc:  # reported by the test
                    self.failures.append(exc)
                    return
                with self._lock:
                    self.rows += n
                time.sleep(0.001)

    def stop(self) -> int:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        return self.rows


def ops(address: str) -> collector_pb2_grpc.OpsServiceStub:
    return collector_pb2_grpc.OpsServiceStub(grpc.insecure_channel(address))


def wait_until(predicate, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def stored_rows(address: str) -> int:
    try:
        models = ops(address).Status(collector_pb2.StatusRequest(), timeout=5).models
    except grpc.RpcError:
        return -1
    return sum(m.rows for m in models if m.model_name == "m" and m.model_version == "1")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    from agent import examples

    path = tmp_path / "m.onnx"
    path.write_bytes(examples.logistic_regression())
    return path


def test_collector_killed_mid_load_loses_and_duplicates_nothing(tmp_path: Path, model: Path):
    db = tmp_path / "c.db"
    col, address = collector(db)
    ag, agent_address = agent(model, address, tmp_path / "spool", "a1")
    load = Load(agent_address)
    wait_until(lambda: stored_rows(address) > 0, what="first windows stored")
    col.send_signal(signal.SIGKILL)
    col.wait()
    time.sleep(1.0)  # traffic goes on while the collector is down: windows pile up in the spool
    col, address2 = collector(db, listen=address)  # same address: the agent reconnects by itself
    assert address2 == address
    time.sleep(1.0)
    served = load.stop()
    ag.send_signal(signal.SIGTERM)  # flushes the open window into the spool and delivers it
    assert exit_code(ag) == 0
    assert not load.failures, f"inference failed: {load.failures[:1]}"
    # the agent exits only after its exporter had every window acked, i.e. committed
    assert stored_rows(address) == served
    col.send_signal(signal.SIGTERM)
    assert exit_code(col) == 0


def test_agent_killed_and_restarted_with_its_spool(tmp_path: Path, model: Path):
    db, spool = tmp_path / "c.db", tmp_path / "spool"
    col, address = collector(db)
    ag, agent_address = agent(model, address, spool, "a1")
    load = Load(agent_address)
    wait_until(lambda: stored_rows(address) > 0, what="first windows stored")
    ag.send_signal(signal.SIGKILL)
    ag.wait()
    served_before_kill = load.stop()
    first_run = {w.run_id for w in ops(address).ListWindows(
        collector_pb2.ListWindowsRequest(model_name="m", limit=10_000), timeout=5).windows}
    assert len(first_run) == 1
    (run1,) = first_run

    ag, agent_address = agent(model, address, spool, "a1")  # same spool: resends what was not acked

    def second_run_connected() -> bool:
        agents = ops(address).Status(collector_pb2.StatusRequest(), timeout=5).agents
        return any(a.agent_id == "a1" and a.run_id != run1 and a.connected for a in agents)

    wait_until(second_run_connected, what="the restarted agent's stream")  # then SIGTERM waits for its acks
    ag.send_signal(signal.SIGTERM)
    assert exit_code(ag) == 0
    windows = ops(address).ListWindows(collector_pb2.ListWindowsRequest(model_name="m", limit=10_000),
                                       timeout=5).windows
    run1_windows = sorted((w for w in windows if w.run_id == run1), key=lambda w: w.seq)
    seqs = [w.seq for w in run1_windows]
    assert seqs == list(range(len(seqs))), "every closed window stored exactly once, none missing"
    rows1 = sum(w.rows for w in run1_windows)
    assert 0 < rows1 <= served_before_kill  # only the open window (and the helper's) can be lost
    status = ops(address).Status(collector_pb2.StatusRequest(), timeout=5)
    runs = [a for a in status.agents if a.agent_id == "a1"]
    assert len(runs) == 2 and max(a.restarts for a in runs) >= 1
    col.send_signal(signal.SIGTERM)
    assert exit_code(col) == 0
