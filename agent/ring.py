"""The preallocated ring the request thread copies into.

One buffer holds a small int64 header, one array per captured slot
(``[rows, *row_shape]``) and a per-call latency array. The buffer is either
process-local or a ``multiprocessing.shared_memory`` block, so the same layout
is drained by a summary thread or by a helper process.

Concurrency: request threads serialise on a lock in the serving process and
are the only writers of the *head* counters; the summary worker is the only
writer of the *tail* counters. Counters only grow; slot index = counter & mask.
A producer copies its rows first and publishes the new head last, so the
worker never reads a half-written row. (The shared-memory variant relies on
the stores becoming visible in program order, as x86-64 guarantees; on other
architectures the agent uses the summary thread.)
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory

import numpy as np

from agent.capture import Slot

# Header fields (int64 each). Heads, DROPPED and ERRORS are written by request
# threads under the session's lock; tails and SKIPPED only by the summary
# worker; CLOSED only by the session. One writer per field, so no cross-process lock.
ROWS_HEAD, ROWS_TAIL, CALLS_HEAD, CALLS_TAIL, DROPPED, ERRORS, CLOSED, SKIPPED = range(8)
# Values of CLOSED: the session asks the worker to stop, and with FLUSH_ALWAYS
# to send a last window even if no row came since the previous one (labels
# joined in the serving process still need a window to travel in).
OPEN, CLOSE, CLOSE_FLUSH_ALWAYS = 0, 1, 2
HEADER_FIELDS = 8
_ALIGN = 64


def shared_memory_is_safe() -> bool:
    """True where plain stores are seen by another process in program order."""
    return platform.machine().lower() in {"x86_64", "amd64"}


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


@dataclass(frozen=True)
class RingLayout:
    slots: tuple[Slot, ...]
    rows: int    # power of two
    calls: int   # power of two

    @classmethod
    def fit(cls, slots: list[Slot], max_rows: int, max_bytes: int) -> "RingLayout":
        """Largest power-of-two row count within both the row and byte budgets."""
        row_bytes = sum(s.row_bytes for s in slots) or 1
        rows = _pow2_floor(max(16, min(max_rows, max_bytes // row_bytes)))
        return cls(tuple(slots), rows, rows)

    def _offsets(self) -> tuple[list[int], int, int]:
        offset = HEADER_FIELDS * 8
        offsets = []
        for s in self.slots:
            offset = -(-offset // _ALIGN) * _ALIGN
            offsets.append(offset)
            offset += self.rows * s.row_bytes
        latency_offset = -(-offset // _ALIGN) * _ALIGN
        return offsets, latency_offset, latency_offset + self.calls * 8

    @property
    def nbytes(self) -> int:
        return self._offsets()[2]


class Ring:
    """Numpy views over one buffer laid out by a RingLayout."""

    def __init__(self, layout: RingLayout, buffer: memoryview | bytearray | None = None) -> None:
        self.layout = layout
        self._shm: shared_memory.SharedMemory | None = None
        self.buffer = buffer if buffer is not None else bytearray(layout.nbytes)
        offsets, lat_off, _ = layout._offsets()
        self.header = np.frombuffer(self.buffer, dtype=np.int64, count=HEADER_FIELDS)
        # memoryview item stores are ~2x cheaper than numpy's on the hot path
        self.hdr = memoryview(self.header).cast("B").cast("q")
        self.arrays = [
            np.frombuffer(self.buffer, dtype=s.dtype, count=layout.rows * int(np.prod(s.row_shape, dtype=np.int64)),
                          offset=off).reshape((layout.rows, *s.row_shape))
            for s, off in zip(layout.slots, offsets)
        ]
        self.latency = np.frombuffer(self.buffer, dtype=np.int64, count=layout.calls, offset=lat_off)
        self.lat = memoryview(self.latency)

    @classmethod
    def shared(cls, layout: RingLayout) -> "Ring":
        """A ring in a new shared-memory block (the creator unlinks it on close)."""
        shm = shared_memory.SharedMemory(create=True, size=layout.nbytes)
        ring = cls(layout, shm.buf)
        ring._shm = shm
        return ring

    @classmethod
    def attach(cls, layout: RingLayout, name: str) -> "Ring":
        shm = shared_memory.SharedMemory(name=name)
        # Python < 3.13 registers even an attached block with this process's
        # resource tracker, which would unlink it when this process exits:
        # only the creator may do that.
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        ring = cls(layout, shm.buf)
        ring._shm = shm
        return ring

    @property
    def shm_name(self) -> str | None:
        return self._shm.name if self._shm else None

    def release(self, unlink: bool = False) -> None:
        """Drop the views and the shared block (views must go before close)."""
        if self._shm is None:
            return
        self.header = self.latency = None  # type: ignore[assignment]
        self.arrays = []
        self.hdr.release()
        self.lat.release()
        shm, self._shm = self._shm, None
        shm.close()
        if unlink:
            shm.unlink()

    def rows_between(self, slot: int, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one slot by counter value; copies only on wrap."""
        arr, mask = self.arrays[slot], self.layout.rows - 1
        i, j = start & mask, stop & mask
        if stop - start <= 0:
            return arr[0:0]
        if i < j or j == 0:
            return arr[i:i + (stop - start)]
        return np.concatenate([arr[i:], arr[:j]])
