"""The agent's on-disk spool: closed windows wait here until the collector acks them.

One file per window, named ``{counter:020d}-{run_id}-{seq}.win`` so that
sorting the names gives arrival order, written atomically (temporary file,
fsync, rename, fsync of the directory): after a kill -9 a window is either
whole or absent. The spool is bounded: past ``max_bytes`` the oldest windows
are deleted and counted. The counts live in ``state.json`` (also replaced
atomically) so they survive restarts and reach the collector in SpoolStatus.

One process owns a spool directory at a time (an advisory lock file): two
senders draining the same files would double-count everything.
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import threading
from pathlib import Path

from agent.errors import FailedPrecondition
from protos import collector_pb2, summary_pb2

try:
    import fcntl
except ImportError:  # Windows: no advisory lock; one agent per spool is then the user's job
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 << 20
SUFFIX = ".win"
TMP_SUFFIX = ".tmp"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
COUNTERS = ("dropped_windows", "dropped_rows", "rejected_windows")


class SpoolBusy(FailedPrecondition):
    """Another live process holds this spool directory."""


class Spool:
    """A bounded, persistent FIFO of serialised ``WindowSummary`` messages; thread-safe.

    Keys are file names; ``pending`` returns them oldest first.
    """

    def __init__(self, directory: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be greater than 0, not {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_directory(self.directory)
        self._lock = threading.Lock()      # the index and counters; held briefly, never across a window write
        self._put_lock = threading.Lock()
        self._keys: list[str] = []            # sorted = arrival order
        self._sizes: dict[str, tuple[int, int]] = {}  # key -> (bytes, rows)
        self._bytes = 0
        self._counter = 0
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._load_state()
        self._recover()

    # --- the queue ----------------------------------------------------------------
    def put(self, window: summary_pb2.WindowSummary) -> bool:
        """Store one window; False if it could not be stored (it is then counted as dropped)."""
        data = window.SerializeToString()
        # One put at a time, so keys become visible in name order (a reader's cursor never skips one).
        with self._put_lock:
            with self._lock:
                if len(data) > self.max_bytes:  # would evict everything, itself included
                    log.error("window %s/%s (%d bytes) is larger than the whole spool (%d bytes); dropped",
                              window.run_id, window.seq, len(data), self.max_bytes)
                    self._count_dropped(1, window.rows)
                    return False
                key = f"{self._counter:020d}-{_safe(window.run_id)}-{window.seq}{SUFFIX}"
                self._counter += 1
            try:
                _write_atomically(self.directory / key, data)
                _fsync_directory(self.directory)
            except OSError as exc:
                log.error("cannot spool window %s/%s (%s); dropped", window.run_id, window.seq, exc)
                with self._lock:
                    self._count_dropped(1, window.rows)
                return False
            with self._lock:
                self._keys.append(key)
                self._sizes[key] = (len(data), window.rows)
                self._bytes += len(data)
                evicted = self._evict_oldest()
        if evicted:
            log.warning("spool over %d bytes: dropped the %d oldest window(s) (%d rows)",
                        self.max_bytes, *evicted)
        return True

    def pending(self, limit: int, after: str | None = None) -> list[tuple[str, summary_pb2.WindowSummary]]:
        """Up to ``limit`` stored windows, oldest first (only those whose key sorts after ``after``)."""
        with self._lock:
            start = 0 if after is None else bisect.bisect_right(self._keys, after)
            keys = self._keys[start:start + max(limit, 0)]
        out = []
        for key in keys:
            try:
                out.append((key, summary_pb2.WindowSummary.FromString((self.directory / key).read_bytes())))
            except FileNotFoundError:
                continue  # dropped or acked meanwhile
            except Exception as exc:  # damaged after it was written (disk, someone's editor)
                log.error("spooled window %s is unreadable (%s); dropped", key, exc)
                with self._lock:
                    if self._forget(key) is not None:
                        self._count_dropped(1, 0)
        return out

    def remove(self, key: str) -> None:
        """The collector has the window: delete it (a key already gone is fine)."""
        with self._lock:
            self._forget(key)

    def mark_rejected(self, key: str) -> None:
        """The collector refused the window for good: delete it and count it."""
        with self._lock:
            if self._forget(key) is not None:
                self._counts["rejected_windows"] += 1
                self._save_state()

    def status(self) -> collector_pb2.SpoolStatus:
        with self._lock:
            return collector_pb2.SpoolStatus(windows=len(self._keys), bytes=self._bytes, **self._counts)

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)

    def close(self) -> None:
        """Release the directory for another process (the files stay)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- internals (callers hold self._lock) ------------------------------------------
    def _forget(self, key: str) -> tuple[int, int] | None:
        entry = self._sizes.pop(key, None)
        if entry is None:
            return None
        del self._keys[bisect.bisect_left(self._keys, key)]
        self._bytes -= entry[0]
        try:
            os.unlink(self.directory / key)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot delete spooled window %s: %s", key, exc)
        return entry

    def _evict_oldest(self) -> tuple[int, int] | None:
        windows = rows = 0
        while self._bytes > self.max_bytes and self._keys:
            _, n = self._forget(self._keys[0])  # type: ignore[misc]
            windows += 1
            rows += n
        if not windows:
            return None
        self._count_dropped(windows, rows)
        return windows, rows

    def _count_dropped(self, windows: int, rows: int) -> None:
        self._counts["dropped_windows"] += windows
        self._counts["dropped_rows"] += rows
        self._save_state()

    def _save_state(self) -> None:
        try:
            _write_atomically(self.directory / STATE_FILE, json.dumps(self._counts).encode())
        except OSError as exc:  # the counts stay right in memory; only a restart would lose them
            log.error("cannot save spool counters in %s: %s", self.directory, exc)

    def _load_state(self) -> None:
        path = self.directory / STATE_FILE
        try:
            saved = json.loads(path.read_text())
            self._counts.update({k: int(saved.get(k, 0)) for k in COUNTERS})
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.error("spool counters in %s are unreadable (%s); starting them from 0", path, exc)

    def _recover(self) -> None:
        """Index what an earlier run left; remove (and count) what a crash left half-done or damaged."""
        damaged = []
        for path in self.directory.iterdir():
            name = path.name
            if name.endswith(TMP_SUFFIX):
                damaged.append((path, 0, "an unfinished write"))
            elif name.endswith(SUFFIX):
                try:
                    counter = int(name.split("-", 1)[0])
                    data = path.read_bytes()
                    window = summary_pb2.WindowSummary.FromString(data)
                    if name != f"{counter:020d}-{_safe(window.run_id)}-{window.seq}{SUFFIX}":
                        raise ValueError("contents do not match the file name")
                except Exception as exc:
                    damaged.append((path, 0, f"unreadable ({exc})"))
                    continue
                self._keys.append(name)
                self._sizes[name] = (len(data), window.rows)
                self._bytes += len(data)
                self._counter = max(self._counter, counter + 1)
        self._keys.sort()
        for path, rows, why in damaged:
            log.warning("spool %s: removing %s, %s; counted as a dropped window", self.directory, path.name, why)
            path.unlink(missing_ok=True)
        with self._lock:
            if damaged:
                self._count_dropped(len(damaged), 0)
            evicted = self._evict_oldest()  # max_bytes may be smaller than last time
        if evicted:
            log.warning("spool holds more than %d bytes: dropped the %d oldest window(s) (%d rows)",
                        self.max_bytes, *evicted)
        if self._keys:
            log.info("spool %s: %d window(s) (%d bytes) from an earlier run to send",
                     self.directory, len(self._keys), self._bytes)


def _safe(text: str) -> str:
    """A run id as it may appear in a file name (ours are hex; foreign ones get sanitised)."""
    return "".join(c if c.isalnum() or c in "._" else "_" for c in text) or "_"


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_directory(directory: Path) -> None:
    """Make the renames themselves durable (POSIX; a no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _lock_directory(directory: Path) -> int | None:
    if fcntl is None:
        return None
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise SpoolBusy(f"spool directory {directory} is in use by another process; "
                        "give each agent process its own spool directory") from None
    return fd
