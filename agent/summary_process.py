"""The summary helper process: ``python -m agent.summary_process`` (started by ``agent.summarizer``).

Reads its configuration (pickled) from stdin, attaches the ring's shared
memory, drains it, and writes each closed window to stdout as a 4-byte
little-endian length and the serialised ``WindowSummary``. Stops when the ring
is CLOSED or stdin reaches end of file (the serving process closed it or died);
SIGINT and SIGTERM are ignored (SIGKILL is not).
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading

from agent.ring import Ring
from agent.summarizer import FRAME_HEADER
from agent.worker import Drainer, WindowBuilder
from protos import summary_pb2


def main() -> int:
    # The serving process decides when this helper ends (it closes our stdin, or dies). A Ctrl-C
    # or a SIGTERM sent to the whole process group (a terminal; systemd stopping a unit) must not
    # end it first: its open window would be lost and the agent would fall back to a thread.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="outrider-summary: %(levelname)s %(message)s")
    stdin_fd = sys.stdin.fileno()
    with os.fdopen(os.dup(stdin_fd), "rb", buffering=0) as config:
        layout, shm_name, identity, policy, start_ns, parent = pickle.load(config)
    # Frames get a private copy of stdout; anything else printing goes to stderr.
    frames = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    stop = threading.Event()

    def watch_stdin() -> None:
        # Raw reads until EOF (the serving process closed the pipe or died). Not
        # sys.stdin: a daemon thread inside its buffered reader aborts shutdown.
        while os.read(stdin_fd, 4096):
            pass
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()

    def should_stop() -> bool:
        # stdin may stay open after the serving process died if it forked
        # children that inherited the pipe; being re-parented tells us too.
        return stop.is_set() or os.getppid() != parent

    def emit(window: summary_pb2.WindowSummary) -> None:
        data = window.SerializeToString()
        frames.write(len(data).to_bytes(FRAME_HEADER, "little") + data)
        frames.flush()

    try:
        ring = Ring.attach(layout, shm_name)
    except FileNotFoundError:
        return 0  # the serving process died before we attached, and its block went with it
    try:
        builder = WindowBuilder(layout.slots, identity, start_ns=start_ns, sample_rows=policy.sample_rows)
        Drainer(ring, builder, policy, emit).loop(should_stop, stop.wait)
    except BrokenPipeError:
        return 0  # the serving process is gone: nobody to report to
    finally:
        ring.release()
        frames.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
