"""Where the summary worker runs: a thread, or a helper process over shared memory.

The helper process is a plain ``python -m agent.summary_process`` child (not
``multiprocessing``: spawn re-imports the user's ``__main__``, which breaks
scripts without a main guard, and fork does not mix with gRPC). It gets
length-prefixed frames on stdin: its configuration (pickled), then the
reference projection to start with, then each later one (a serialised
``summary_pb2.Projection``, empty for none), which it uses from its next window
on. It returns windows as length-prefixed frames on stdout. It stops when the
ring says CLOSED or its stdin closes (the serving process is gone, even after
SIGKILL). One thread of ours writes its stdin, so a helper that stops reading
(SIGSTOP) can hold up no one but that thread.

If the helper dies, the session keeps serving: a thread takes over the same
ring, the rows the helper had taken but not yet reported are counted as
dropped, and windows continue with the next sequence number.
"""
from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from agent.ring import CLOSE, CLOSE_FLUSH_ALWAYS, CLOSED, ROWS_TAIL, SKIPPED, Ring
from agent.sketches import joint
from agent.worker import Drainer, Identity, WindowBuilder, WindowPolicy
from protos import summary_pb2

log = logging.getLogger(__name__)

Export = Callable[[summary_pb2.WindowSummary], None]
FRAME_HEADER = 4  # little-endian length of each frame on the helper's stdin and stdout


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(FRAME_HEADER, "little") + body


def projection_bytes(projection: joint.Projection | None) -> bytes:
    return projection.to_proto().SerializeToString() if projection is not None else b""


class ThreadSummarizer:
    """The worker as a daemon thread of the serving process."""

    def __init__(self, ring: Ring, identity: Identity, policy: WindowPolicy, export: Export,
                 start_ns: int, *, seq: int = 0, dropped_seen: int = 0, errors_seen: int = 0,
                 projection: joint.Projection | None = None) -> None:
        builder = WindowBuilder(ring.layout.slots, identity, start_ns=start_ns, sample_rows=policy.sample_rows,
                                projection=projection)
        builder.seq = seq
        self._drainer = Drainer(ring, builder, policy, export, dropped_seen, errors_seen)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drainer.loop, args=(self._stop.is_set, self._stop.wait),
                                        name="outrider-summary", daemon=True)
        self._thread.start()

    def set_projection(self, projection: joint.Projection | None) -> None:
        """From the next window on (InvalidArgument if it reads columns the model does not have)."""
        self._drainer.builder.set_projection(projection)

    def close(self, timeout: float, flush_always: bool = False) -> None:
        if flush_always:
            self._drainer.ring.hdr[CLOSED] = CLOSE_FLUSH_ALWAYS
        self._stop.set()
        self._thread.join(timeout)


class ProcessSummarizer:
    """The worker in a helper process; windows come back through a reader thread."""

    def __init__(self, ring: Ring, identity: Identity, policy: WindowPolicy, export: Export,
                 start_ns: int, *, projection: joint.Projection | None = None) -> None:
        self.ring, self.identity, self.policy, self.export = ring, identity, policy, export
        self._received = {"windows": 0, "rows": 0, "dropped": 0, "errors": 0}
        self._fallback: ThreadSummarizer | None = None
        # The projection (the helper's, and a fallback thread's), and frames for the stdin writer.
        self._lock = threading.Condition()
        self.projection = projection
        config = (ring.layout, ring.shm_name, identity, policy, start_ns, os.getpid())
        self._frames: list[bytes] = [frame(pickle.dumps(config)), frame(projection_bytes(projection))]
        self._stdin_done = False
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.summary_process"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_child_env(),
            # Its own process group: a terminal's Ctrl-C reaches the serving process, which stops
            # the helper in order; the helper also ignores SIGINT/SIGTERM sent to it directly.
            process_group=0,
        )
        self._writer = threading.Thread(target=self._write, name="outrider-summary-stdin", daemon=True)
        self._writer.start()
        self._reader = threading.Thread(target=self._read, name="outrider-windows", daemon=True)
        self._reader.start()

    def set_projection(self, projection: joint.Projection | None) -> None:
        """The helper (or the thread that replaced it) uses ``projection`` from its next window on.
        Checked here first: InvalidArgument if it reads columns the model does not have."""
        from agent import capture

        if projection is not None:
            capture.projection_sources(self.ring.layout.slots, projection.columns)
        with self._lock:
            self.projection = projection
            fallback = self._fallback
            if fallback is None:
                self._frames.append(frame(projection_bytes(projection)))
                self._lock.notify_all()
        if fallback is not None:
            fallback.set_projection(projection)

    def _write(self) -> None:
        """The helper's stdin: every frame in order, then its end (at close)."""
        stdin = self.proc.stdin
        try:
            while True:
                with self._lock:
                    self._lock.wait_for(lambda: self._frames or self._stdin_done)
                    frames, self._frames = self._frames, []
                    done = self._stdin_done
                for data in frames:
                    stdin.write(data)  # type: ignore[union-attr]
                stdin.flush()  # type: ignore[union-attr]
                if done and not frames:
                    break
        except (OSError, ValueError):
            pass  # the helper is gone: the reader falls back to a thread
        finally:
            try:
                stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass

    def _read(self) -> None:
        out = self.proc.stdout
        try:
            while True:
                header = out.read(FRAME_HEADER)  # type: ignore[union-attr]
                if len(header) < FRAME_HEADER:
                    break
                size = int.from_bytes(header, "little")
                body = out.read(size)  # type: ignore[union-attr]
                if len(body) < size:
                    break  # the helper died mid-frame: that window is lost with it
                window = summary_pb2.WindowSummary.FromString(body)
                r = self._received
                r["windows"] += 1
                r["rows"] += window.rows
                r["dropped"] += window.dropped_rows
                r["errors"] += window.errors
                self.export(window)
        except Exception:
            log.exception("unreadable window from the summary process")
            self.proc.kill()
        finally:
            self.proc.wait()
            out.close()  # type: ignore[union-attr]  # the pipe's file object, else it waits for the GC
            if self.proc.returncode != 0:
                self._take_over()

    def _take_over(self) -> None:
        """The helper died: count what it held, and summarise the ring in a thread from here on."""
        r, hdr = self._received, self.ring.hdr
        lost = hdr[ROWS_TAIL] - r["rows"]  # taken from the ring but never reported in a window
        hdr[SKIPPED] += lost
        log.error("summary process exited with code %s; %d rows of its open window are counted as dropped; "
                  "summarising in a thread from now on", self.proc.returncode, lost)
        with self._lock:  # a projection set from now on goes to the thread
            self._fallback = ThreadSummarizer(self.ring, self.identity, self.policy, self.export, time.time_ns(),
                                              seq=r["windows"], dropped_seen=r["dropped"], errors_seen=r["errors"],
                                              projection=self.projection)

    def close(self, timeout: float, flush_always: bool = False) -> None:
        self.ring.hdr[CLOSED] = CLOSE_FLUSH_ALWAYS if flush_always else CLOSE
        with self._lock:  # the writer ends the helper's stdin once the frames before are written
            self._stdin_done = True
            self._lock.notify_all()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("summary process did not stop in %.0f s; killing it", timeout)
            self.proc.kill()
        # A helper that died (even during close) was replaced by a thread in
        # the reader; closing that thread summarises what is left in the ring.
        self._reader.join(timeout)
        if self._fallback:
            self._fallback.close(timeout, flush_always)


# glibc's malloc for the helper (an operator's own settings win). By default it may hand each of a
# block's numpy temporaries (a 20-column block of 8,192 rows makes ~1.3 MB ones) to mmap and trim
# them back at free: in the helper's process ~700 page faults a block, which measured 2.4x the CPU
# of summarising it. Fixed thresholds keep them in the heap; the heap holds at most its own peak.
HELPER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}


def _child_env() -> dict[str, str]:
    """The helper must import this very ``agent`` package, installed or not."""
    env = {**HELPER_MALLOC, **os.environ}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env
