"""The summary helper process: ``python -m agent.summary_process`` (started by ``agent.summarizer``).

Reads frames (a 4-byte little-endian length, then the body) from stdin: its
configuration (pickled), the reference projection to start with, and later
projections, each used from the next window on (``agent.summarizer``). Attaches
the ring's shared memory, drains it, and writes each closed window to stdout
as a frame holding the serialised ``WindowSummary``. Stops when the ring is
CLOSED or stdin reaches end of file (the serving process closed it or died);
SIGINT and SIGTERM are ignored (SIGKILL is not).
"""
from __future__ import annotations

import signal

if __name__ == "__main__":
    # The helper itself: ignore them (why: main) before the imports below, which take a second or more on a
    # loaded machine; a SIGTERM to the process group in that time would end the helper.
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, signal.SIG_IGN)

import logging  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

from agent.ring import Ring  # noqa: E402
from agent.sketches import joint  # noqa: E402
from agent.summarizer import FRAME_HEADER  # noqa: E402
from agent.worker import Drainer, WindowBuilder  # noqa: E402
from protos import summary_pb2  # noqa: E402

log = logging.getLogger("agent.summary_process")


def read_frame(fd: int) -> bytes | None:
    """One frame's body from ``fd`` (raw reads: no buffered reader for a daemon thread to sit in);
    None at end of file."""
    header = _read_exactly(fd, FRAME_HEADER)
    if header is None:
        return None
    return _read_exactly(fd, int.from_bytes(header, "little"))


def _read_exactly(fd: int, size: int) -> bytes | None:
    parts, left = [], size
    while left:
        part = os.read(fd, min(left, 1 << 20))
        if not part:
            return None
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def projection_from(body: bytes) -> joint.Projection | None:
    return joint.Projection.from_proto(summary_pb2.Projection.FromString(body)) if body else None


def main() -> int:
    # The serving process decides when this helper ends (it closes our stdin, or dies). A Ctrl-C
    # or a SIGTERM sent to the whole process group (a terminal; systemd stopping a unit) must not
    # end it first: its open window would be lost and the agent would fall back to a thread. Both
    # are ignored at the top of this module, before its imports.
    logging.basicConfig(level=logging.WARNING, format="outrider-summary: %(levelname)s %(message)s")
    stdin_fd = sys.stdin.fileno()
    config, first = read_frame(stdin_fd), read_frame(stdin_fd)
    if config is None or first is None:
        return 0  # the serving process died before it told us what to do
    layout, shm_name, identity, policy, start_ns, parent = pickle.loads(config)
    projection = projection_from(first)
    # Frames get a private copy of stdout; anything else printing goes to stderr.
    frames = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    stop = threading.Event()
    sent: list[bytes] = []  # projections read, not yet handed to the builder (by the draining thread)

    def watch_stdin() -> None:
        # Frames until EOF (the serving process closed the pipe or died). Not
        # sys.stdin: a daemon thread inside its buffered reader aborts shutdown.
        # It holds no sketch: a daemon thread still reading at exit would keep the
        # builder alive through interpreter shutdown (nanobind then lists every
        # DataSketches object as leaked on stderr).
        while (body := read_frame(stdin_fd)) is not None:
            sent.append(body)
        stop.set()

    def should_stop() -> bool:
        while sent:  # the draining thread owns the builder: projections are installed here
            try:
                builder.set_projection(projection_from(sent.pop(0)))
            except Exception:  # the serving process checked it; never end the helper over one
                log.exception("cannot use the reference projection sent")
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
        builder = WindowBuilder(layout.slots, identity, start_ns=start_ns, sample_rows=policy.sample_rows,
                                projection=projection)
        threading.Thread(target=watch_stdin, daemon=True).start()
        Drainer(ring, builder, policy, emit).loop(should_stop, stop.wait)
    except BrokenPipeError:
        return 0  # the serving process is gone: nobody to report to
    finally:
        ring.release()
        frames.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
