"""Where the summary worker runs: a thread, or a helper process over shared memory.

The helper process is a plain ``python -m agent.summary_process`` child (not
``multiprocessing``: spawn re-imports the user's ``__main__``, which breaks
scripts without a main guard, and fork does not mix with gRPC). It gets its
configuration pickled on stdin and returns windows as length-prefixed frames
on stdout. It stops when the ring says CLOSED or its stdin closes (the serving
process is gone, even after SIGKILL).

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
from agent.worker import Drainer, Identity, WindowBuilder, WindowPolicy
from protos import summary_pb2

log = logging.getLogger(__name__)

Export = Callable[[summary_pb2.WindowSummary], None]
FRAME_HEADER = 4  # little-endian length of each serialised window on the helper's stdout


class ThreadSummarizer:
    """The worker as a daemon thread of the serving process."""

    def __init__(self, ring: Ring, identity: Identity, policy: WindowPolicy, export: Export,
                 start_ns: int, *, seq: int = 0, dropped_seen: int = 0, errors_seen: int = 0) -> None:
        builder = WindowBuilder(ring.layout.slots, identity, start_ns=start_ns, sample_rows=policy.sample_rows)
        builder.seq = seq
        self._drainer = Drainer(ring, builder, policy, export, dropped_seen, errors_seen)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drainer.loop, args=(self._stop.is_set, self._stop.wait),
                                        name="outrider-summary", daemon=True)
        self._thread.start()

    def close(self, timeout: float, flush_always: bool = False) -> None:
        if flush_always:
            self._drainer.ring.hdr[CLOSED] = CLOSE_FLUSH_ALWAYS
        self._stop.set()
        self._thread.join(timeout)


class ProcessSummarizer:
    """The worker in a helper process; windows come back through a reader thread."""

    def __init__(self, ring: Ring, identity: Identity, policy: WindowPolicy, export: Export,
                 start_ns: int) -> None:
        self.ring, self.identity, self.policy, self.export = ring, identity, policy, export
        self._received = {"windows": 0, "rows": 0, "dropped": 0, "errors": 0}
        self._fallback: ThreadSummarizer | None = None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.summary_process"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_child_env(),
            # Its own process group: a terminal's Ctrl-C reaches the serving process, which stops
            # the helper in order; the helper also ignores SIGINT/SIGTERM sent to it directly.
            process_group=0,
        )
        config = (ring.layout, ring.shm_name, identity, policy, start_ns, os.getpid())
        try:
            self.proc.stdin.write(pickle.dumps(config))  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except OSError:
            pass  # the reader sees the helper gone and falls back to a thread
        self._reader = threading.Thread(target=self._read, name="outrider-windows", daemon=True)
        self._reader.start()

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
        self._fallback = ThreadSummarizer(self.ring, self.identity, self.policy, self.export, time.time_ns(),
                                          seq=r["windows"], dropped_seen=r["dropped"], errors_seen=r["errors"])

    def close(self, timeout: float, flush_always: bool = False) -> None:
        self.ring.hdr[CLOSED] = CLOSE_FLUSH_ALWAYS if flush_always else CLOSE
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
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


def _child_env() -> dict[str, str]:
    """The helper must import this very ``agent`` package, installed or not."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env
