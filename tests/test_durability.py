"""An ack means on disk: the collector's file system loses power after windows were acked.

A real collector process keeps its database on an ext4 file system in a
loop-mounted image; a real agent process serves traffic and streams windows to
it. Once windows have been acked, the file system is shut down the way a power
cut leaves it (``EXT4_IOC_SHUTDOWN`` with ``EXT4_GOING_FLAGS_NOLOGFLUSH``:
everything not fsynced is lost), the collector is killed with SIGKILL, the file
system is unmounted and mounted again, and a new collector starts on the same
database. The agent delivers what it still holds and stops: the rows stored
(plus the rows counted as dropped) equal the rows served, exactly.

With ``synchronous=FULL`` (the default) this holds. With NORMAL it fails
(windows acked since the last journal commit are gone, and the agent had
already dropped them): run ``OUTRIDER_TEST_SYNCHRONOUS=normal pytest
tests/test_durability.py`` to see issue 10's item 4.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

from faults_support import start  # a real process, up once it prints its ready line (bounded wait)
from protos import collector_pb2, collector_pb2_grpc
from protos import open_inference_pb2 as oip
from protos import open_inference_pb2_grpc as oip_grpc

ROOT = Path(__file__).resolve().parents[1]
SYNCHRONOUS = os.environ.get("OUTRIDER_TEST_SYNCHRONOUS", "full")
EXT4_IOC_SHUTDOWN = 0x8004587D
EXT4_GOING_FLAGS_NOLOGFLUSH = 2
HANG_GUARD = 120.0  # seconds: waiting loops give up after this (a hang guard, not a speed requirement)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="ext4 and loop devices: Linux")]


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _mount(image: Path, mountpoint: Path) -> None:
    done = _run("mount", "-t", "ext4", "-o", "loop", str(image), str(mountpoint))
    if done.returncode:
        raise RuntimeError(done.stderr.strip() or f"mount exited with {done.returncode}")


def _unmount(image: Path, mountpoint: Path) -> None:
    """Unmount (lazily if something still holds it) and detach every loop device of ``image``."""
    if os.path.ismount(mountpoint) and _run("umount", str(mountpoint)).returncode:
        _run("umount", "-l", str(mountpoint))
    for line in _run("losetup", "-j", str(image)).stdout.splitlines():
        _run("losetup", "-d", line.split(":", 1)[0])


@contextmanager
def ext4_image(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(image, mountpoint) of a fresh 128 MB ext4 file system, mounted; skips when this machine cannot."""
    if os.geteuid() != 0:
        pytest.skip("mounting a loop device needs root")
    missing = [tool for tool in ("truncate", "mkfs.ext4", "mount", "umount", "losetup") if not shutil.which(tool)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    image, mountpoint = tmp_path / "ext4.img", tmp_path / "mnt"
    mountpoint.mkdir()
    made = _run("truncate", "-s", "128M", str(image))
    made = made if made.returncode else _run("mkfs.ext4", "-q", "-F", str(image))
    if made.returncode:
        pytest.skip(f"cannot make an ext4 image here: {made.stderr.strip()}")
    try:
        _mount(image, mountpoint)
    except RuntimeError as exc:
        pytest.skip(f"cannot mount a loop device here: {exc}")
    try:
        yield image, mountpoint
    finally:
        _unmount(image, mountpoint)


def lose_power(mountpoint: Path) -> None:
    """The file system stops at once; what was not fsynced never reaches the disk."""
    fd = os.open(mountpoint, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
    finally:
        os.close(fd)


# ------------------------------------------------------------------ real processes


def collector(db: Path, listen: str = "127.0.0.1:0") -> tuple[subprocess.Popen, str]:
    return start(["collector", "serve", "--db", str(db), "--listen", listen, "--synchronous", SYNCHRONOUS,
                  "--log-level", "warning"], r"collector listening on (\S+)")


def agent(model: Path, collector_address: str, spool: Path) -> tuple[subprocess.Popen, str]:
    return start(["agent", "serve", "--model", str(model), "--model-name", "m", "--model-version", "1",
                  "--listen", "127.0.0.1:0", "--window-seconds", "0.2", "--collector", collector_address,
                  "--spool-dir", str(spool), "--agent-id", "a1", "--summarizer", "thread", "--log-level", "warning"],
                 r"serving m version 1 on (\S+)")


class Load:
    """One OIP client thread; counts the rows answered."""

    def __init__(self, address: str) -> None:
        self.rows = 0
        self.failures: list[Exception] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(address,), daemon=True)
        self._thread.start()

    def _run(self, address: str) -> None:
        rng = np.random.default_rng(0)
        with grpc.insecure_channel(address) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            while not self._stop.is_set():
                n = int(rng.integers(1, 9))
                request = oip.ModelInferRequest(model_name="m")
                request.inputs.add(name="X", datatype="FP32", shape=[n, 20])
                request.raw_input_contents.append(rng.standard_normal((n, 20)).astype("<f4").tobytes())
                try:
                    stub.ModelInfer(request, timeout=30)
                except grpc.RpcError as exc:
                    self.failures.append(exc)
                    return
                self.rows += n
                time.sleep(0.002)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(HANG_GUARD)
        return self.rows


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def totals(address: str) -> tuple[int, int]:
    """(rows, dropped rows) the collector has stored for m version 1; (-1, -1) when it does not answer."""
    try:
        with grpc.insecure_channel(address) as channel:
            status = collector_pb2_grpc.OpsServiceStub(channel).Status(collector_pb2.StatusRequest(), timeout=5)
    except grpc.RpcError:
        return -1, -1
    models = [m for m in status.models if (m.model_name, m.model_version) == ("m", "1")]
    return sum(m.rows for m in models), sum(m.dropped_rows for m in models)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(HANG_GUARD)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{proc.args[3:5]} did not stop within {HANG_GUARD:.0f} s") from None


@pytest.fixture
def model(tmp_path: Path) -> Path:
    from agent import examples

    path = tmp_path / "m.onnx"
    path.write_bytes(examples.logistic_regression())
    return path


def test_acked_windows_survive_the_file_system_losing_power(tmp_path: Path, model: Path) -> None:
    processes: list[subprocess.Popen] = []
    with ext4_image(tmp_path) as (image, mountpoint):
        try:
            db = mountpoint / "collector.db"
            col, address = collector(db)
            processes.append(col)
            os.sync()  # the collector has been running a while: its schema is on disk
            ag, agent_address = agent(model, address, tmp_path / "spool")  # the spool is on another disk
            processes.append(ag)
            load = Load(agent_address)

            wait_until(lambda: totals(address)[0] >= 2000, "2,000 rows acked")
            acked = totals(address)[0]
            wait_until(lambda: totals(address)[0] > acked, "one more window acked")
            lose_power(mountpoint)  # right after an ack: NORMAL has not fsynced it
            stop(col, signal.SIGKILL)
            _unmount(image, mountpoint)  # the power comes back
            _mount(image, mountpoint)

            col, again = collector(db, listen=address)  # same address: the agent reconnects by itself
            processes.append(col)
            assert again == address
            time.sleep(0.5)  # traffic goes on a little after the restart
            served = load.stop()
            assert stop(ag) == 0  # SIGTERM: flushes its open window and waits for every ack
            assert not load.failures, f"inference failed: {load.failures[:1]}"

            rows, dropped = totals(address)
            assert rows + dropped == served, (f"{served - rows - dropped} of {served} rows served are lost "
                                              f"(synchronous={SYNCHRONOUS}; {dropped} counted as dropped)")
            assert stop(col) == 0
        finally:
            for proc in processes:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
