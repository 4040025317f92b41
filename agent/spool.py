"""The agent's on-disk spool: closed windows wait here until the collector acks them.

One file per window, named ``{counter:020d}-{run_id}-{seq}.win`` so that
sorting the names gives arrival order, written atomically (temporary file,
fsync, rename, fsync of the directory): after a kill -9 a window is either
whole or absent. The spool is bounded: past ``max_bytes`` the oldest windows
are deleted and counted. The counts live in ``state.json`` (also replaced
atomically) so they survive restarts and reach the collector in SpoolStatus;
they are the spool's, so they keep growing over its agent's runs.

A file is a fixed header and the serialised window (``encode`` / ``decode``)::

    magic "\\0OWS" | format 1 | 3 bytes 0 | body length u64 | rows u64 | dropped rows u64
    | CRC-32 of the body u32 | CRC-32 of the header so far u32          (little-endian, 40 bytes)

Damage (a flipped bit, a truncated file, garbage) is detected when the spool
is opened and again when a file is read for sending; the file is removed and
counted as one dropped window with the rows its header says it held, so a
damaged file costs only itself. A file whose header is unreadable counts 0
rows. Files of the earlier format (the bare window, no header) are still read.
"Rows" here are the rows a window accounts for: those it summarised and those
it had counted as dropped before summarising, so that rows stored plus rows
counted as dropped anywhere always equals rows served.

Windows are sealed (``agent.checksum``) as they enter the spool, so the
collector can tell a window damaged after this point from a good one.

One process owns a spool directory at a time (an advisory lock file): two
senders draining the same files would double-count everything.
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import struct
import threading
import zlib
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from agent.checksum import seal
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

# A serialised protobuf message never starts with a zero byte (field number 0 does not exist),
# so the magic also tells a file of this format from one of the earlier, header-less format.
MAGIC = b"\0OWS"
FORMAT = 1
_HEAD = struct.Struct("<4sB3xQQQI")  # magic, format, body length, rows, dropped rows, body CRC
_HEADER_CRC = struct.Struct("<I")
HEADER_SIZE = _HEAD.size + _HEADER_CRC.size


class SpoolBusy(FailedPrecondition):
    """Another live process holds this spool directory."""


class DamagedFile(ValueError):
    """A spool file that does not hold the window it should; ``rows``: what its header says it held."""

    def __init__(self, reason: str, rows: int = 0) -> None:
        super().__init__(reason)
        self.rows = rows


def encode(window: summary_pb2.WindowSummary) -> bytes:
    """A spool file's contents: the header, then the window."""
    body = window.SerializeToString()
    head = _HEAD.pack(MAGIC, FORMAT, len(body), window.rows, window.dropped_rows, zlib.crc32(body))
    return head + _HEADER_CRC.pack(zlib.crc32(head)) + body


def decode(data: bytes) -> summary_pb2.WindowSummary:
    """The window in a spool file's contents (either format); DamagedFile if it is not intact."""
    if not data.startswith(MAGIC):  # the earlier format: the bare window, no way to count its rows
        try:
            return summary_pb2.WindowSummary.FromString(data)
        except Exception as exc:
            raise DamagedFile(f"unreadable ({exc})") from None
    length, accounted, body_crc = _header(data)
    body = memoryview(data)[HEADER_SIZE:]
    if len(body) != length:
        raise DamagedFile(f"its body is {len(body)} bytes, the header says {length}", accounted)
    if zlib.crc32(body) != body_crc:
        raise DamagedFile("its body is damaged (checksum mismatch)", accounted)
    try:
        return summary_pb2.WindowSummary.FromString(body)
    except Exception as exc:  # intact bytes that never were a window: a bug, or a foreign file
        raise DamagedFile(f"unparseable ({exc})", accounted) from None


def _header(data: bytes) -> tuple[int, int, int]:
    """(body length, rows accounted for, body CRC) from an intact header; DamagedFile if it is not."""
    if len(data) < HEADER_SIZE:
        raise DamagedFile(f"cut short inside its header ({len(data)} bytes)")
    head = data[:_HEAD.size]
    (header_crc,) = _HEADER_CRC.unpack_from(data, _HEAD.size)
    if zlib.crc32(head) != header_crc:
        raise DamagedFile("its header is damaged (checksum mismatch)")
    _, version, length, rows, dropped, body_crc = _HEAD.unpack(head)
    if version != FORMAT:
        raise DamagedFile(f"format {version} is not one this agent reads ({FORMAT})")
    return length, rows + dropped, body_crc


def _header_rows(path: Path) -> int:
    """The rows a (perhaps unfinished) file's header says its window held; 0 if it cannot say."""
    try:
        with open(path, "rb") as f:
            return _header(f.read(HEADER_SIZE))[1]
    except (OSError, DamagedFile):
        return 0


class _Entry(NamedTuple):
    size: int    # bytes on disk
    rows: int    # rows the window accounts for (summarised + counted as dropped)
    run_id: str
    model_name: str


def _entry(size: int, window: summary_pb2.WindowSummary) -> _Entry:
    return _Entry(size, window.rows + window.dropped_rows, window.run_id, window.model_name)


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
        self._entries: dict[str, _Entry] = {}
        self._models: Counter[str] = Counter()  # model name -> windows waiting
        self._bytes = 0
        self._counter = 0
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._unsaved = False  # the counts changed but state.json could not be written (e.g. disk full)
        self._load_state()
        self._recover()

    # --- the queue ----------------------------------------------------------------
    def put(self, window: summary_pb2.WindowSummary) -> bool:
        """Seal (``agent.checksum.seal``, in place) and store one window; False if it could not be
        stored (it is then counted as dropped)."""
        data = encode(seal(window))
        # One put at a time, so keys become visible in name order (a reader's cursor never skips one).
        with self._put_lock:
            with self._lock:
                if len(data) > self.max_bytes:  # would evict everything, itself included
                    log.error("window %s/%s (%d bytes) is larger than the whole spool (%d bytes); dropped",
                              window.run_id, window.seq, len(data), self.max_bytes)
                    self._count_dropped(1, window.rows + window.dropped_rows)
                    return False
                key = f"{self._counter:020d}-{_safe(window.run_id)}-{window.seq}{SUFFIX}"
                self._counter += 1
            try:
                _write_atomically(self.directory / key, data)
                _fsync_directory(self.directory)
            except OSError as exc:
                log.error("cannot spool window %s/%s (%s); dropped", window.run_id, window.seq, exc)
                with self._lock:
                    self._count_dropped(1, window.rows + window.dropped_rows)
                return False
            with self._lock:
                self._add(key, _entry(len(data), window))
                evicted = self._evict_oldest()
        if evicted:
            log.warning("spool over %d bytes: dropped the %d oldest window(s) (%d rows)",
                        self.max_bytes, *evicted)
        return True

    def pending(self, limit: int, after: str | None = None) -> list[tuple[str, summary_pb2.WindowSummary]]:
        """Up to ``limit`` stored windows, oldest first (only those whose key sorts after ``after``).
        A file found damaged is removed and counted as a dropped window."""
        with self._lock:
            start = 0 if after is None else bisect.bisect_right(self._keys, after)
            keys = self._keys[start:start + max(limit, 0)]
        out = []
        for key in keys:
            try:
                out.append((key, decode((self.directory / key).read_bytes())))
            except FileNotFoundError:
                continue  # dropped or acked meanwhile
            except OSError as exc:  # e.g. out of file descriptors: not the file's fault, it is tried again later
                log.error("cannot read spooled window %s: %s; trying again at the next connection", key, exc)
            except DamagedFile as exc:  # damaged after it was written (disk, someone's editor)
                with self._lock:
                    entry = self._forget(key)
                    if entry is not None:  # its rows as known since it was written or recovered
                        log.error("spooled window %s is damaged: %s; removed, counted as a dropped window "
                                  "of %d rows", key, exc, entry.rows)
                        self._count_dropped(1, entry.rows)
        return out

    def remove(self, key: str) -> None:
        """The collector has the window: delete it (a key already gone is fine)."""
        with self._lock:
            self._forget(key)
            if self._unsaved:  # deleting may have made room for the counts
                self._save_state()

    def mark_rejected(self, key: str) -> None:
        """The collector refused the window for good: delete it and count it."""
        with self._lock:
            if self._forget(key) is not None:
                self._counts["rejected_windows"] += 1
                self._save_state()

    def models(self) -> list[str]:
        """The distinct model names of the windows waiting, sorted."""
        with self._lock:
            return sorted(self._models)

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
    def _add(self, key: str, entry: _Entry) -> None:
        self._keys.append(key)  # keys are made in increasing order: this keeps the list sorted
        self._entries[key] = entry
        self._models[entry.model_name] += 1
        self._bytes += entry.size

    def _forget(self, key: str) -> _Entry | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        del self._keys[bisect.bisect_left(self._keys, key)]
        self._bytes -= entry.size
        self._models[entry.model_name] -= 1
        if not self._models[entry.model_name]:
            del self._models[entry.model_name]
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
            entry = self._forget(self._keys[0])
            assert entry is not None
            windows += 1
            rows += entry.rows
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
        except OSError as exc:  # the counts stay right in memory and are saved again at the next chance
            if not self._unsaved:
                log.error("cannot save spool counters in %s: %s; retrying when windows leave the spool",
                          self.directory, exc)
            self._unsaved = True
        else:
            self._unsaved = False

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
        found: list[tuple[str, _Entry]] = []
        damaged: list[tuple[Path, int, str]] = []
        for path in self.directory.iterdir():
            name = path.name
            if name.endswith(SUFFIX + TMP_SUFFIX):  # killed before the rename: never spooled, never counted
                damaged.append((path, _header_rows(path), "an unfinished write"))
            elif name.endswith(TMP_SUFFIX):  # the counters' unfinished write: state.json is still whole
                path.unlink(missing_ok=True)
            elif name.endswith(SUFFIX):
                try:
                    data = path.read_bytes()
                    window = decode(data)
                    counter = int(name.split("-", 1)[0])
                    if name != f"{counter:020d}-{_safe(window.run_id)}-{window.seq}{SUFFIX}":
                        raise DamagedFile("its contents do not match its name",
                                          window.rows + window.dropped_rows)
                except (OSError, ValueError) as exc:  # DamagedFile, or a name that is not ours
                    damaged.append((path, getattr(exc, "rows", 0), str(exc)))
                    continue
                found.append((name, _entry(len(data), window)))
                self._counter = max(self._counter, counter + 1)
        with self._lock:
            for name, entry in sorted(found):
                self._add(name, entry)
            for path, rows, why in damaged:
                log.warning("spool %s: removing %s, %s; counted as a dropped window of %d rows",
                            self.directory, path.name, why, rows)
                path.unlink(missing_ok=True)
            if damaged:
                self._count_dropped(len(damaged), sum(rows for _, rows, _ in damaged))
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
