"""The summary worker: drains the ring in blocks, updates sketches, closes windows.

All per-row statistics happen here, never on the request thread. The same
loop runs in a daemon thread of the serving process or in a helper process
attached to the ring's shared memory (``agent/summarizer.py`` starts either).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from agent import sketches
from agent.capture import Reduce, Slot
from agent.ring import (CALLS_HEAD, CALLS_TAIL, CLOSE_FLUSH_ALWAYS, CLOSED, DROPPED, ERRORS, ROWS_HEAD, ROWS_TAIL,
                        SKIPPED,
                        Ring)
from protos import summary_pb2

log = logging.getLogger(__name__)

BLOCK_ROWS = 8192


@dataclass(frozen=True)
class WindowPolicy:
    """When a tumbling window closes: after ``seconds`` and/or after ``rows``."""

    seconds: float | None = 10.0
    rows: int | None = None
    poll_seconds: float = 0.002


@dataclass(frozen=True)
class Identity:
    """Who the windows are from: the idempotency key's first two parts and the model."""

    agent_id: str
    run_id: str
    model_name: str
    model_version: str
    model_sha256: str


class WindowBuilder:
    """Sketches of one open window; pure Python + numpy, no threads."""

    def __init__(self, slots: tuple[Slot, ...], identity: Identity, k: int = sketches.DEFAULT_K,
                 start_ns: int | None = None) -> None:
        self.slots, self.identity, self.k = slots, identity, k
        self.seq = 0
        self._reset(start_ns or time.time_ns())

    def _reset(self, start_ns: int) -> None:
        self.start_ns = start_ns
        self.rows = self.calls = 0
        self.latency = sketches.NumericSketch(self.k)
        self.columns: list[list] = []
        for s in self.slots:
            if s.reduce is Reduce.CATEGORICAL:
                self.columns.append([sketches.CategoricalSketch() for _ in s.columns])
            else:
                self.columns.append([sketches.NumericSketch(self.k) for _ in s.columns])

    def add_rows(self, blocks: list[np.ndarray]) -> None:
        """One block per slot, each with the same number of rows."""
        n = len(blocks[0]) if blocks else 0
        if n == 0:
            return
        for slot, cols, block in zip(self.slots, self.columns, blocks):
            if slot.reduce is Reduce.SAMPLE_STATS:
                flat = block.reshape(n, -1).astype(np.float64, copy=False)
                stats = np.empty((n, 3))
                stats[:, 0] = flat.mean(axis=1)
                stats[:, 1] = flat.std(axis=1)
                stats[:, 2] = np.sqrt(np.einsum("ij,ij->i", flat, flat))
                sketches.update_numeric_block(cols, stats)
            elif slot.reduce is Reduce.CATEGORICAL:
                block2 = block.reshape(n, -1)
                for j, sk in enumerate(cols):
                    sk.update(block2[:, j])
            else:
                sketches.update_numeric_block(cols, block.reshape(n, -1))
        self.rows += n

    def add_latencies(self, latency_ns: np.ndarray) -> None:
        if len(latency_ns):
            self.latency.update(latency_ns / 1e3)  # microseconds
            self.calls += len(latency_ns)

    def close(self, end_ns: int, dropped: int, errors: int) -> summary_pb2.WindowSummary:
        ident = self.identity
        window = summary_pb2.WindowSummary(
            agent_id=ident.agent_id, run_id=ident.run_id, seq=self.seq,
            model_name=ident.model_name, model_version=ident.model_version,
            model_sha256=ident.model_sha256, start_unix_nano=self.start_ns, end_unix_nano=end_ns,
            rows=self.rows, calls=self.calls, dropped_rows=dropped, errors=errors,
            latency=self.latency.to_proto("latency_us", summary_pb2.ColumnSummary.ROLE_UNSPECIFIED, ""),
        )
        for slot, cols in zip(self.slots, self.columns):
            for name, sk in zip(slot.columns, cols):
                window.columns.append(sk.to_proto(name, slot.role, slot.tensor))
        self.seq += 1
        self._reset(end_ns)
        return window


class Drainer:
    """Moves rows from the ring into WindowBuilders and emits closed windows."""

    def __init__(self, ring: Ring, builder: WindowBuilder, policy: WindowPolicy,
                 emit: Callable[[summary_pb2.WindowSummary], None],
                 dropped_seen: int = 0, errors_seen: int = 0) -> None:
        self.ring, self.builder, self.policy, self.emit = ring, builder, policy, emit
        # counts already reported by earlier windows (a worker taking over resumes from them)
        self._dropped_seen = dropped_seen
        self._errors_seen = errors_seen

    def drain(self) -> None:
        """Summarise everything published so far, closing windows on the row limit."""
        hdr, b = self.ring.hdr, self.builder
        calls_head, calls_tail = hdr[CALLS_HEAD], hdr[CALLS_TAIL]
        if calls_head > calls_tail:
            mask = self.ring.layout.calls - 1
            idx = np.arange(calls_tail, calls_head) & mask
            b.add_latencies(self.ring.latency[idx])
            hdr[CALLS_TAIL] = calls_head
        head = hdr[ROWS_HEAD]
        tail = hdr[ROWS_TAIL]
        while tail < head:
            stop = min(head, tail + BLOCK_ROWS)
            if self.policy.rows:
                stop = min(stop, tail + self.policy.rows - b.rows)
            b.add_rows([self.ring.rows_between(i, tail, stop) for i in range(len(b.slots))])
            tail = stop
            hdr[ROWS_TAIL] = tail  # frees ring space as soon as the block is read
            if self.policy.rows and b.rows >= self.policy.rows:
                self.close_window()

    def due(self, now_ns: int) -> bool:
        s = self.policy.seconds
        return bool(s) and now_ns - self.builder.start_ns >= s * 1e9

    def close_window(self, final: bool = False) -> None:
        hdr = self.ring.hdr
        dropped, errors = hdr[DROPPED] + hdr[SKIPPED], hdr[ERRORS]
        d, e = dropped - self._dropped_seen, errors - self._errors_seen
        b = self.builder
        if final and not (b.rows or b.calls or d or e) and hdr[CLOSED] != CLOSE_FLUSH_ALWAYS:
            return  # nothing happened since the last window: no empty trailer
        self._dropped_seen, self._errors_seen = dropped, errors
        self.emit(b.close(time.time_ns(), d, e))

    def loop(self, should_stop: Callable[[], bool], wait: Callable[[float], object]) -> None:
        """Drain until told to stop, then drain the rest and flush the last window."""
        while True:
            stopping = should_stop() or self.ring.hdr[CLOSED]
            try:
                self.drain()
                if self.due(time.time_ns()):
                    self.close_window()
            except Exception:  # never die silently: the rows count as dropped
                log.exception("summary worker step failed; skipping the pending rows")
                hdr = self.ring.hdr
                head = hdr[ROWS_HEAD]
                hdr[SKIPPED] += head - hdr[ROWS_TAIL]  # SKIPPED: the worker's own counter
                hdr[ROWS_TAIL] = head
            if stopping:
                self.close_window(final=True)
                return
            wait(self.policy.poll_seconds)
