"""The summary worker: drains the ring in blocks, updates sketches, closes windows.

All per-row statistics happen here, never on the request thread. The same
loop runs in a daemon thread of the serving process or in a helper process
attached to the ring's shared memory (``agent/summarizer.py`` starts either).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from agent import capture, sketches
from agent.capture import Reduce, Slot
from agent.sketches import joint
from agent.ring import (CALLS_HEAD, CALLS_TAIL, CLOSE_FLUSH_ALWAYS, CLOSED, DROPPED, ERRORS, ROWS_HEAD, ROWS_TAIL,
                        SKIPPED,
                        Ring)
from protos import summary_pb2

log = logging.getLogger(__name__)

BLOCK_ROWS = 8192
BURST_ROWS_PER_S = 500_000  # a sudden burst the ring must absorb between two wake-ups (Drainer.pause)
MAX_SAMPLE_ROWS = 10_000  # the collector rejects larger samples (collector.base.ingest.Limits.max_sample_rows)
_UNCHANGED = object()  # no projection waiting for the next window


@dataclass(frozen=True)
class WindowPolicy:
    """When a tumbling window closes: after ``seconds`` and/or after ``rows``."""

    seconds: float | None = 10.0
    rows: int | None = None
    # The worker sleeps between drains from poll_seconds (a busy ring) to max_poll_seconds (idle;
    # the default ring bounds it at 0.13 s, see BURST_ROWS_PER_S):
    # each wake-up costs a fixed ~0.1-0.5 ms whatever it finds, so waking every 2 ms to find a few
    # rows cost ~100x the summary itself. See Drainer.pause.
    poll_seconds: float = 0.002
    max_poll_seconds: float = 0.1
    sample_rows: int = 0  # size of each window's reservoir sample of rows; 0: no sample


@dataclass(frozen=True)
class Identity:
    """Who the windows are from: the idempotency key's first two parts and the model."""

    agent_id: str
    run_id: str
    model_name: str
    model_version: str
    model_sha256: str


def check_sample_rows(value: int) -> int:
    """``value`` if it is a valid reservoir size (0 = off), else ValueError saying what is allowed."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= MAX_SAMPLE_ROWS:
        raise ValueError(f"sample_rows must be a whole number from 0 (no sample) to {MAX_SAMPLE_ROWS}, "
                         f"not {value!r}")
    return int(value)


class RowReservoir:
    """A uniform sample of at most ``size`` rows of one window (Algorithm R, one block at a time).

    Row ``i`` (0-based, counted over the window) replaces a random kept row
    with probability ``size / (i + 1)``; drawing ``j = floor(u * (i + 1))``
    for each row and keeping it at ``j`` when ``j < size`` is that rule, done
    for a whole block with numpy. Kept rows are copied out of the ring (which
    is reused) into preallocated arrays, so memory is bounded by ``size`` rows.
    The sample comes out in arrival order, one RowSample column per summary column.
    """

    def __init__(self, slots: tuple[Slot, ...], size: int, rng: np.random.Generator) -> None:
        self.slots, self.size, self.rng = slots, check_sample_rows(size), rng
        self.arrays = [np.empty((self.size, len(s.columns)), _sample_dtype(s)) for s in slots]
        self.arrival = np.empty(self.size, np.int64)  # which row of the window each kept row was
        self.seen = self.kept = 0

    def reset(self) -> None:
        self.seen = self.kept = 0

    def add(self, blocks: list[np.ndarray]) -> None:
        """One ``[n, columns]`` array per slot, the same ``n`` rows of each."""
        n = len(blocks[0])
        start, fill = self.seen, min(n, self.size - self.kept)
        if fill:  # the first ``size`` rows of a window are all kept
            self._put(blocks, np.arange(self.kept, self.kept + fill), np.arange(fill))
            self.kept += fill
        if fill < n:
            # u * (i + 1) for each row's position i in the window (floats: no integer pass over the block)
            draw = self.rng.random(n - fill)
            draw *= np.arange(start + fill + 1, start + n + 1, dtype=np.float64)
            hit = np.flatnonzero(draw < self.size)
            if len(hit):
                slot = draw[hit].astype(np.int64)
                # Two rows of one block may pick the same slot: the later one wins,
                # as in the row-at-a-time algorithm (numpy leaves repeated-index stores unordered).
                last = len(slot) - 1 - np.unique(slot[::-1], return_index=True)[1]
                self._put(blocks, slot[last], hit[last] + fill)
        self.seen += n

    def _put(self, blocks: list[np.ndarray], dest: np.ndarray, src: np.ndarray) -> None:
        for kept, block in zip(self.arrays, blocks):
            kept[dest] = block[src]
        self.arrival[dest] = self.seen + src

    def write(self, sample: summary_pb2.RowSample) -> None:
        """Fill ``sample`` (e.g. a window's, in place): rows in arrival order, one column per summary column."""
        order = np.argsort(self.arrival[:self.kept], kind="stable")
        sample.seen = self.seen
        for slot, kept in zip(self.slots, self.arrays):
            rows = kept[order]
            strings = rows.dtype.kind == "U"
            by_column = (rows if strings else rows.astype(np.float64)).T.tolist()
            for name, values in zip(slot.columns, by_column):
                column = sample.columns.add(name=name)
                (column.strings if strings else column.numbers).extend(values)


def _as_slice(indices: list[int]) -> slice | np.ndarray:
    """``indices`` as a slice when they are consecutive and ascending (a view, not a fancy-index copy)."""
    if indices == list(range(indices[0], indices[0] + len(indices))):
        return slice(indices[0], indices[0] + len(indices))
    return np.array(indices)


def _sample_dtype(slot: Slot) -> np.dtype:
    """How kept rows are held: strings as captured, per-sample statistics as float64, numbers as they came."""
    return np.dtype(np.float64) if slot.reduce is Reduce.SAMPLE_STATS else slot.dtype


class WindowBuilder:
    """Sketches of one open window; pure Python + numpy, no threads.

    With ``sample_rows`` the window also keeps a uniform sample of that many of
    its rows (every column, as a ``RowSample``); ``seed`` makes it repeatable.

    Derived columns (``agent.sketches.joint``): a classifier's windows have
    ``@confidence``; with a ``projection`` (a ``joint.Projection`` of a reference
    profile) they have ``@reconstruction_error`` too. ``set_projection`` (from
    any thread) changes the projection from the next window on."""

    def __init__(self, slots: tuple[Slot, ...], identity: Identity, k: int = sketches.DEFAULT_K,
                 start_ns: int | None = None, *, sample_rows: int = 0, seed: int | None = None,
                 projection: joint.Projection | None = None) -> None:
        self.slots, self.identity, self.k = slots, identity, k
        self.seq = 0
        sample_rows = check_sample_rows(sample_rows)
        self.reservoir = RowReservoir(slots, sample_rows, np.random.default_rng(seed)) if sample_rows else None
        taken = set(joint.DERIVED_COLUMNS) & {c for s in slots for c in s.columns}
        if taken:  # a model's own column by that name: the window must not carry two
            log.warning("the model has column(s) named %s; no derived columns are computed", sorted(taken))
        self._derive = not taken
        self._confidence = capture.confidence_slot(slots) if self._derive else None
        self._lock = threading.Lock()  # the projection waiting for the next window
        self._pending: object = _UNCHANGED
        self._projection = self._plan(projection)
        self._reset(start_ns or time.time_ns())

    def set_projection(self, projection: joint.Projection | None) -> None:
        """Use ``projection`` from the next window on (None: no reconstruction error). Raises
        InvalidArgument when it reads columns this model does not have, changing nothing."""
        planned = self._plan(projection)
        with self._lock:
            self._pending = planned

    def _plan(self, projection: joint.Projection | None) -> tuple[joint.Projection, list, int | None] | None:
        """The projection; per slot it reads, (slot, its columns, their places in the projection), as
        slices where they run in order; and the one slot it reads whole, in order, if so (the usual
        case: a single input, which then needs no gathering)."""
        if projection is None or not self._derive:
            return None
        sources = capture.projection_sources(self.slots, projection.columns)
        groups: dict[int, tuple[list[int], list[int]]] = {}
        for place, (slot, column) in enumerate(sources):
            columns, places = groups.setdefault(slot, ([], []))
            columns.append(column)
            places.append(place)
        (first, (columns, places)), *others = groups.items()
        whole = not others and columns == places == list(range(len(self.slots[first].columns)))
        return projection, [(slot, _as_slice(c), _as_slice(p)) for slot, (c, p) in groups.items()], \
            first if whole else None

    def _reset(self, start_ns: int) -> None:
        self.start_ns = start_ns
        self.rows = self.calls = 0
        if self.reservoir is not None:
            self.reservoir.reset()
        with self._lock:
            if self._pending is not _UNCHANGED:
                self._projection, self._pending = self._pending, _UNCHANGED  # type: ignore[assignment]
        self._errors = sketches.NumericSketch(self.k) if self._projection else None
        self._confidences = sketches.NumericSketch(self.k) if self._confidence is not None else None
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
        columns = []  # each slot's rows as [n, columns]: what the sketches and the sample see
        numeric = []  # (sketches, [n, columns]) of every numeric part, updated in one call (it has a fixed cost)
        for slot, cols, block in zip(self.slots, self.columns, blocks):
            if slot.reduce is Reduce.SAMPLE_STATS:
                flat = block.reshape(n, -1).astype(np.float64, copy=False)
                block2 = np.empty((n, 3))
                block2[:, 0] = flat.mean(axis=1)
                block2[:, 1] = flat.std(axis=1)
                block2[:, 2] = np.sqrt(np.einsum("ij,ij->i", flat, flat))
                numeric.append((cols, block2))
            elif slot.reduce is Reduce.CATEGORICAL:
                block2 = block.reshape(n, -1)
                for j, sk in enumerate(cols):
                    sk.update(block2[:, j])
            else:
                block2 = block.reshape(n, -1)
                numeric.append((cols, block2))
            columns.append(block2)
        if self._errors is not None:
            projection, groups, whole = self._projection  # type: ignore[misc]
            if whole is not None:
                x = columns[whole]
            else:
                x = np.empty((n, len(projection.columns)))
                for slot, cols, places in groups:
                    x[:, places] = columns[slot][:, cols]
            numeric.append(([self._errors], projection.errors(x).reshape(n, 1)))
        if self._confidences is not None:
            confidence = joint.confidence(columns[self._confidence])  # type: ignore[index]
            numeric.append(([self._confidences], confidence.reshape(n, 1)))
        sketches.update_numeric_blocks(numeric)
        if self.reservoir is not None:
            self.reservoir.add(columns)
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
        if self._errors is not None:
            fingerprint = self._projection[0].fingerprint  # type: ignore[index]
            window.columns.append(self._errors.to_proto(joint.RECONSTRUCTION_ERROR, capture.FEATURE, fingerprint))
        if self._confidences is not None:
            source = self.slots[self._confidence].tensor  # type: ignore[index]
            window.columns.append(self._confidences.to_proto(joint.CONFIDENCE, capture.PREDICTION, source))
        if self.reservoir is not None and self.reservoir.seen:  # absent when off or when no row came
            self.reservoir.write(window.sample)
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

    def pause(self, filled: int, seconds: float) -> float:
        """How long to sleep after a drain that found ``filled`` rows (or calls) published over the
        last ``seconds``: until the ring would be a quarter full at that rate, within the policy's
        bounds (and never past the open window's end). Rows beyond the ring are dropped, so the
        quarter leaves room for a burst 4x the rate just seen before the next wake-up."""
        p = self.policy
        # A burst after a quiet spell must fit too: the ring holds that long at BURST_ROWS_PER_S.
        pause = min(p.max_poll_seconds, self.ring.layout.rows / BURST_ROWS_PER_S)
        if filled > 0 and seconds > 0:
            pause = min(pause, self.ring.layout.rows / 4 / (filled / seconds))
        if p.seconds:
            pause = min(pause, self.builder.start_ns / 1e9 + p.seconds - time.time())
        return max(p.poll_seconds, pause)

    def loop(self, should_stop: Callable[[], bool], wait: Callable[[float], object]) -> None:
        """Drain until told to stop, then drain the rest and flush the last window."""
        hdr = self.ring.hdr
        last = time.monotonic()
        while True:
            stopping = should_stop() or hdr[CLOSED]
            now = time.monotonic()
            filled = max(hdr[ROWS_HEAD] - hdr[ROWS_TAIL], hdr[CALLS_HEAD] - hdr[CALLS_TAIL])
            seconds, last = now - last, now
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
            wait(self.pause(filled, seconds))
