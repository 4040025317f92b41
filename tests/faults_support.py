"""Real collector and agent processes for the delivery and fault tests, and the books they must balance.

Every scenario ends with the same equation, exact: the rows the agent served
equal the rows the collector stored, plus the rows counted as dropped on the
way — in the windows themselves (``dropped_rows``: the ring was full, or the
summary helper died with them) and in the agent's spool (``SpoolStatus``:
windows it could not keep, whose counts persist in the spool directory and so
grow over the agent's runs).
"""
from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from collections.abc import Iterator
from typing import IO, NamedTuple

import grpc
import numpy as np
import pytest

from protos import collector_pb2, collector_pb2_grpc
from protos import open_inference_pb2 as pb
from protos import open_inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
MODEL, VERSION = "m", "1"
READY_GUARD = 180  # seconds a started process gets to print its ready line (a model load, MLServer's start)


_started: list[subprocess.Popen] = []


def start(args: list[str], pattern: str, log: Path | None = None, *,
          ready_guard: float = READY_GUARD) -> tuple[subprocess.Popen, str]:
    """``python -m agent.cli ARGS`` from the checkout; returns once stdout matched ``pattern`` (its group 1),
    fails (the process killed) when no line did within ``ready_guard`` seconds. ``log``: where its stderr goes
    (default: the test's stderr)."""
    stderr: IO | None = open(log, "a") if log is not None else None
    try:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=stderr, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        if stderr is not None:
            stderr.close()  # the child has its own copy
    _started.append(proc)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:  # the whole of stdout, so that the child never blocks on a full pipe
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + ready_guard
    while True:
        try:  # bounded: a line that never matches fails the test, it does not hang the run
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            proc.kill()
            raise AssertionError(f"{args[:2]} printed no line matching {pattern!r} in {ready_guard:g} s; it printed "
                                 f"{seen[-5:]}") from None
        if line is None:
            raise AssertionError(f"{args[:2]} exited with {proc.wait()} before it was ready; it printed {seen[-5:]}")
        seen.append(line.rstrip())
        match = re.search(pattern, line)
        if match:
            return proc, match.group(1)


_test_started_at = [0]  # where the current test's processes begin in _started


@pytest.fixture(autouse=True)
def reap() -> Iterator[None]:
    """After each test (import this fixture into a test module): kill what it started and left running,
    so that a failed assertion leaves no collector or agent behind (a stopped one is continued first)."""
    _test_started_at[0] = len(_started)
    yield
    reap_processes()


def reap_processes() -> None:
    """Kill the processes the current test started (never those of other modules' fixtures)."""
    while len(_started) > _test_started_at[0]:
        proc = _started.pop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()


def exit_code(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """The process's exit code; one that hangs first prints its threads' stacks (SIGUSR1), then is killed."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2.0)
        proc.kill()
        raise AssertionError(f"{proc.args[3:5]} did not exit within {timeout:.0f} s; its stacks are on stderr")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM and an orderly exit (an agent flushes its last window and delivers what it can)."""
    proc.send_signal(signal.SIGTERM)
    assert exit_code(proc) == 0


def collector(db: Path, listen: str = "127.0.0.1:0", log: Path | None = None) -> tuple[subprocess.Popen, str]:
    return start(["collector", "serve", "--db", str(db), "--listen", listen], r"collector listening on (\S+)", log)


def agent(model: Path, collector_addr: str, spool: Path, agent_id: str = "a1",
          log: Path | None = None, window_seconds: float = 0.3) -> tuple[subprocess.Popen, str]:
    return start(["agent", "serve", "--model", str(model), "--model-name", MODEL, "--model-version", VERSION,
                  "--listen", "127.0.0.1:0", "--window-seconds", str(window_seconds), "--collector", collector_addr,
                  "--spool-dir", str(spool), "--agent-id", agent_id, "--summarizer", "process"],
                 rf"serving {MODEL} version {VERSION} on (\S+)", log)


def free_port() -> int:
    """A port nobody listens on now (for a collector started later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
                request = pb.ModelInferRequest(model_name=MODEL)
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

    def stop(self, agent_killed: bool = False) -> int:
        """Stop the clients; the rows served. Every request must have succeeded (unless the agent was killed)."""
        self._stop.set()
        for t in self._threads:
            t.join(60)
        assert agent_killed or not self.failures, f"inference failed: {self.failures[:1]}"
        return self.rows


def wait_until(predicate, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def call(address: str, method: str, request, timeout: float = 10.0, metadata: tuple = ()):
    """``metadata``: e.g. an operator's token for a collector with an auth file."""
    with grpc.insecure_channel(address) as channel:
        return getattr(collector_pb2_grpc.OpsServiceStub(channel), method)(request, timeout=timeout,
                                                                         metadata=metadata)


def status(address: str, metadata: tuple = ()) -> collector_pb2.StatusResponse:
    return call(address, "Status", collector_pb2.StatusRequest(), metadata=metadata)


def windows(address: str) -> list[collector_pb2.WindowInfo]:
    return list(call(address, "ListWindows", collector_pb2.ListWindowsRequest(model_name=MODEL, limit=10_000)).windows)


def stored_rows(address: str) -> int:
    try:
        return Books.of(address).stored
    except grpc.RpcError:
        return -1


def spool_files(spool: Path) -> list[Path]:
    return sorted(spool.glob("*.win"))


def damage(path: Path, how: str) -> None:
    """Damage a spool file the way disks and people do, leaving its header (HEADER_SIZE bytes) alone
    unless ``how`` says so."""
    from agent.spool import HEADER_SIZE

    data = bytearray(path.read_bytes())
    if how == "flip":  # a few bits of the body
        for i in range(HEADER_SIZE + 3, len(data), 997):
            data[i] ^= 0x10
    elif how == "truncate":  # cut inside the body
        del data[HEADER_SIZE + (len(data) - HEADER_SIZE) // 2:]
    elif how == "body garbage":
        data[HEADER_SIZE:] = os.urandom(len(data) - HEADER_SIZE)
    elif how == "header garbage":
        data[:HEADER_SIZE] = b"\x00" + b"\xff" * (HEADER_SIZE - 1)
    else:
        raise ValueError(how)
    path.write_bytes(bytes(data))


def children(pid: int) -> list[int]:
    """The pids of a process's children (Linux)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


class Books(NamedTuple):
    """Where every row served went, as the collector reports it."""

    stored: int          # rows in the stored windows
    window_dropped: int  # rows the windows say were dropped before summarising
    spool_dropped: int   # rows of windows the agents' spools lost
    spool_dropped_windows: int

    @classmethod
    def of(cls, address: str, model: str = MODEL, versions: tuple[str, ...] = (VERSION,),
           metadata: tuple = ()) -> Books:
        """The books of ``model``'s ``versions`` (a managed agent serves several in one run)."""
        reply = status(address, metadata)
        totals = [m for m in reply.models if m.model_name == model and m.model_version in versions]
        # A spool's counts persist across its agent's runs: each run reports the total so far.
        spools: dict[str, collector_pb2.SpoolStatus] = {}
        for a in reply.agents:
            counts = (a.spool.dropped_windows, a.spool.dropped_rows)
            if a.agent_id not in spools or counts > (spools[a.agent_id].dropped_windows,
                                                      spools[a.agent_id].dropped_rows):
                spools[a.agent_id] = a.spool
        return cls(stored=sum(m.rows for m in totals), window_dropped=sum(m.dropped_rows for m in totals),
                   spool_dropped=sum(s.dropped_rows for s in spools.values()),
                   spool_dropped_windows=sum(s.dropped_windows for s in spools.values()))

    @property
    def accounted(self) -> int:
        return self.stored + self.window_dropped + self.spool_dropped


def assert_balanced(address: str, served: int) -> Books:
    """Rows stored + rows counted as dropped == rows served, exactly."""
    books = Books.of(address)
    assert books.accounted == served, f"served {served} rows, but {books}"
    return books
