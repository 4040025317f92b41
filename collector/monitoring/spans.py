"""The current summary of each drift span, kept in memory so an evaluation costs the same for any span and fleet.

A span counts in whole buckets of ``bucket_width`` (60 s for spans of whole minutes, as the shipped
5 min and 1 h are): a span of S seconds holds every raw window and rollup row that ended in the last
ceil(S / width) buckets before the current one, or in the current one (or later: a clock ahead of
ours). So "the last hour" is the last 60 whole minutes plus the current minute so far.

``SpanCache`` keeps, per model version, one merged ``Partial`` per bucket (parsed sketches, never
protos), built once from its windows, and per span a sliding aggregate of its complete buckets (two
stacks: suffix merges of the older buckets, a running merge of the newer), so each new window is
merged once into its bucket (a late window also into the aggregates that already hold its bucket)
and an evaluation answers each span with a few merges.

Where a new window is merged: windows this collector stores are merged at ingest (``offer``), from
the sketches its validation parsed, once they are committed (after their ack, on the stream's
thread); the evaluation then lists only the ids (and end times) of the windows stored since its
high-water mark rowid (``cursor``) and reads and parses the bodies of those nobody offered: windows
another process stored (several collectors on one database), offers that came while the version
was not built, or that found no room. An offer at or below the cursor is ignored (the evaluation
read it already); one committed before a rollup pass counted since is not taken (the pass may have
deleted its window and handed the rowid out again). So the evaluation's cost no longer grows with
the traffic of its own collector, while ingest pays the merge (``benchmarks/ingest.py --offer``).
When no rollup pass ran since the last evaluation, nothing was deleted, so every offered window is
stored; if the windows stored since the cursor are as many as the offered ones, with the same sum
of rowids, they are those: one count replaces the listing (which grew with the fleet).

The store lists what rollup passes changed (``Store.span_snapshot``, from the ``rollup_passes`` table,
so passes another collector ran are listed too): a merge whose rows all lie
in one bucket changes nothing a span can see if the cache held them all; otherwise the buckets it
touched are read again (and the offers merged into them forgotten: read again with them, or later).
Buckets older than the longest span are dropped: ~5 MB of sketches per model version of 20
columns with the shipped spans, for 10 agents or 100 (``benchmarks/drift_eval_full.py``). The cache is memory only: the first evaluation of a
version after a start (or after its spans change, or a clock that went back) reads the whole span
from the store, at the cost of ``read_uncached``, which is also the oracle the tests compare with.
"""
from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from agent import sketches
from agent.sketches import joint
from collector.store.rollup import PerformanceTotals, WindowMerger
from collector.store.store import SpanSnapshot, Store
from protos import summary_pb2

log = logging.getLogger(__name__)

NS = 1_000_000_000
MAX_BUCKETS = 360  # per span: a longer span gets wider buckets, so memory stays bounded
# Offered windows remembered per version between two evaluations (an int each): ~1 h of 100
# agents' 10-s windows at 3 MB. Past it the version starts again from the store.
MAX_OFFERED = 50_000
# Offered windows waiting for a version busy in an evaluation (or another offer's merge): their
# parsed sketches, ~30 KB a window of 20 columns. Past it offers are not taken (the evaluation reads them).
MAX_PENDING = 1_000
_WIDTHS = (60, 10, 1)  # seconds, the widest that divides every span is taken
_NUMERIC = summary_pb2.ColumnSummary.NUMERIC

Sketch = sketches.NumericSketch | sketches.CategoricalSketch


def bucket_width(spans: Sequence[float]) -> int:
    """The bucket width (ns) for a policy's spans: 60, 10 or 1 s, the widest that divides them all
    (a span of 30 s is then counted in 10-s buckets), and at least the longest span / MAX_BUCKETS."""
    width = next((w for w in _WIDTHS if all(float(s) % w == 0 for s in spans)), 1)
    return max(width, math.ceil(max(spans) / MAX_BUCKETS)) * NS


def span_lengths(spans: Sequence[float], width: int) -> list[int]:
    """Complete buckets before the current one that each span holds."""
    return [max(1, math.ceil(round(s * NS) / width)) for s in spans]


def span_starts(now_ns: int, spans: Sequence[float]) -> list[int]:
    """The earliest end time (ns) a window may have to count in each span, at ``now_ns``."""
    width = bucket_width(spans)
    return [(now_ns // width - n) * width for n in span_lengths(spans, width)]


@dataclass
class Span:
    """One span's merged windows: ``summary`` has the counts, time range and performance (and
    the model's confidence column, for the label-free estimate); ``columns`` the merged sketches
    by column name; ``windows`` how many stored rows were merged (equal counts of two nested spans
    mean the same rows)."""

    summary: summary_pb2.WindowSummary
    columns: dict[str, Sketch]
    windows: int


class _Column:
    __slots__ = ("role", "source", "sketch")

    def __init__(self, role: int, source: str, sketch: Sketch) -> None:
        self.role, self.source, self.sketch = role, source, sketch


class Partial:
    """Windows merged: exact counts, time range, parsed column sketches (keyed by name and kind, as
    ``WindowMerger`` keys them) and realised performance. ``merge`` leaves its argument unchanged."""

    __slots__ = ("windows", "rows", "calls", "dropped_rows", "errors", "start", "end", "columns", "performance")

    def __init__(self) -> None:
        self.windows = self.rows = self.calls = self.dropped_rows = self.errors = 0
        self.start = self.end = 0  # meaningless while windows == 0
        self.columns: dict[tuple[str, int], _Column] = {}
        self.performance: PerformanceTotals | None = None

    def _span(self, windows: int, start: int, end: int) -> None:
        if self.windows == 0:
            self.start, self.end = start, end
        else:
            self.start, self.end = min(self.start, start), max(self.end, end)
        self.windows += windows

    def add(self, w: summary_pb2.WindowSummary, parsed: Sequence[Sketch] | None = None) -> None:
        """Merge one stored window (or rollup row) in, its sketches parsed from ``w`` unless
        ``parsed`` has them (one per ``w.columns``, in order; this Partial takes them over)."""
        self._span(1, w.start_unix_nano, w.end_unix_nano)
        self.rows += w.rows
        self.calls += w.calls
        self.dropped_rows += w.dropped_rows
        self.errors += w.errors
        for i, msg in enumerate(w.columns):
            sketch, key = sketches.from_proto(msg) if parsed is None else parsed[i], (msg.name, msg.kind)
            column = self.columns.get(key)
            if column is None:
                self.columns[key] = _Column(msg.role, msg.source, sketch)
            else:
                column.sketch.merge(sketch)  # type: ignore[arg-type]  # same kind by key
        if w.HasField("performance"):
            self.performance = self.performance or PerformanceTotals()
            self.performance.add(w.performance)

    def merge(self, other: Partial) -> None:
        if other.windows == 0:
            return
        self._span(other.windows, other.start, other.end)
        self.rows += other.rows
        self.calls += other.calls
        self.dropped_rows += other.dropped_rows
        self.errors += other.errors
        for key, theirs in other.columns.items():
            mine = self.columns.get(key)
            if mine is None:
                self.columns[key] = _Column(theirs.role, theirs.source, theirs.sketch.copy())
            else:
                mine.sketch.merge(theirs.sketch)  # type: ignore[arg-type]
        if other.performance is not None:
            self.performance = self.performance or PerformanceTotals()
            self.performance.add(other.performance.to_proto())

    def copy(self) -> Partial:
        out = Partial()
        out.merge(self)
        return out

    def span(self) -> Span:
        """This merge as a ``Span``; the sketches are handed over, so merge no more into it."""
        summary = summary_pb2.WindowSummary(start_unix_nano=self.start, end_unix_nano=self.end, rows=self.rows,
                                            calls=self.calls, dropped_rows=self.dropped_rows, errors=self.errors)
        if self.performance is not None:
            summary.performance.CopyFrom(self.performance.to_proto())
        confidence = self.columns.get((joint.CONFIDENCE, _NUMERIC))
        if confidence is not None:
            summary.columns.append(confidence.sketch.to_proto(joint.CONFIDENCE, confidence.role, confidence.source))
        return Span(summary, {name: c.sketch for (name, _), c in self.columns.items()}, self.windows)


class _Sliding:
    """One span's complete buckets [current - length, current) merged, with O(1) merges per step
    (two stacks): ``suffix[i]`` merges buckets ``front + i`` .. ``mid - 1`` (an empty bucket shares
    the next one's object), ``back`` merges ``mid`` .. ``end - 1``; ``end`` is the current bucket
    of the last answer. A flip rebuilds the suffixes when the span's start passes ``mid``."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.front = self.mid = self.end = self.lo = 0
        self.suffix: list[Partial | None] = []  # None: a suffix the span has left behind (freed)
        self.back = Partial()

    def _flip(self, buckets: dict[int, Partial], lo: int, current: int) -> None:
        self.front, self.mid, self.end, self.lo = lo, current, current, lo
        self.suffix, acc = [Partial()] * (current - lo), Partial()
        for b in range(current - 1, lo - 1, -1):
            bucket = buckets.get(b)
            if bucket is not None:
                acc = bucket.copy()
                acc.merge(self.suffix[b - lo + 1] if b + 1 < current else Partial())
            self.suffix[b - lo] = acc
        self.back = Partial()

    def answer(self, buckets: dict[int, Partial], current: int) -> Partial:
        """The span's merge at bucket ``current`` (not before the last answer's): its complete
        buckets from the stacks, then the current and any later buckets, merged afresh."""
        lo = current - self.length
        if not self.suffix or lo >= self.end:
            self._flip(buckets, lo, current)  # first answer, or the span moved past everything held
        for b in range(self.end, current):
            bucket = buckets.get(b)
            if bucket is not None:
                self.back.merge(bucket)
        self.end = current
        if lo >= self.mid:
            self._flip(buckets, lo, current)
        for i in range(max(0, self.lo - self.front), lo - self.front):
            self.suffix[i] = None
        self.lo = lo
        held = self.suffix[lo - self.front] if lo < self.mid else None
        out = held.copy() if held is not None else Partial()
        out.merge(self.back)
        for b in sorted(k for k in buckets if k >= current):
            out.merge(buckets[b])
        return out

    def late(self, bucket: int, part: Partial) -> None:
        """``part`` was just merged into ``bucket``, which the stacks may already hold."""
        if bucket >= self.end:
            return  # not complete at the last answer: taken from the bucket itself
        if bucket >= self.mid:
            self.back.merge(part)
            return
        held = bucket - self.front + 1  # the suffixes that start at or before it
        if held <= 0:
            return
        after = self.suffix[held] if bucket + 1 < self.mid else None
        unshared = after.copy() if after is not None and self.suffix[held - 1] is after else None
        seen: set[int] = set()
        for i in range(max(0, self.lo - self.front), held):
            if self.suffix[i] is after:  # an empty bucket shared its successor's merge: no longer
                self.suffix[i] = unshared  # type: ignore[assignment]
            target = self.suffix[i]
            if target is not None and id(target) not in seen:
                seen.add(id(target))
                target.merge(part)

    def replaced(self, buckets: dict[int, Partial], bucket: int) -> None:
        """``bucket`` was rebuilt from the store: rebuild what holds it."""
        if bucket >= self.end:
            return
        if bucket >= self.mid:
            self.back = Partial()
            for b in range(self.mid, self.end):
                if b in buckets:
                    self.back.merge(buckets[b])
            return
        for b in range(min(bucket, self.mid - 1), max(self.front, self.lo) - 1, -1):
            after = self.suffix[b - self.front + 1] if b + 1 < self.mid else Partial()
            if b in buckets:
                acc = buckets[b].copy()
                acc.merge(after)  # type: ignore[arg-type]  # a suffix at or after lo is held
                self.suffix[b - self.front] = acc
            else:
                self.suffix[b - self.front] = after


class _Version:
    """One model version's buckets and spans, as of the store's rowid ``cursor``."""

    def __init__(self, spans: tuple[float, ...]) -> None:
        self.spans, self.width = spans, bucket_width(spans)
        self.lengths = span_lengths(spans, self.width)
        self.buckets: dict[int, Partial] = {}
        self.sliding = [_Sliding(n) for n in self.lengths]
        self.cursor = self.generation = 0
        self.current = -1  # the current bucket of the last evaluation (-1: never built)
        # Windows above the cursor merged already, offered by ingest: rowid -> bucket.
        self.offered: dict[int, int] = {}
        self.windows_read = 0  # windows above the cursor read from the store (not offered)
        self.lock = threading.Lock()  # held to change the buckets: by an answer, or by merging offers
        # Offers waiting for the lock: (rowid, window, sketches, rollup generation before its commit).
        self.pending: list[tuple[int, summary_pb2.WindowSummary, Sequence[Sketch], int]] = []
        self.pending_lock = threading.Lock()

    def reset(self) -> None:
        """Forget everything: the next answer reads the whole span from the store."""
        self.current, self.buckets, self.offered = -1, {}, {}

    def merge_pending(self, store: Store) -> int:
        """Merge the waiting offers (the caller holds ``lock``); how many were taken."""
        with self.pending_lock:
            items, self.pending = self.pending, []
        # Read under the version's lock: a rollup pass counted after this is seen by an answer after
        # these merges, which reads again the buckets it changed. One counted since an offer's commit
        # may have deleted its window and handed its rowid out again: such offers are not taken.
        generation = store.rollup_generation
        return sum(self.offer(rowid, w, parsed) for rowid, w, parsed, gen in items if gen == generation)

    def offer(self, rowid: int, w: summary_pb2.WindowSummary, parsed: Sequence[Sketch]) -> bool:
        """Merge a window just stored with ``rowid`` into its bucket; False if not taken (the next
        answer reads it from the store, or needs it in no span)."""
        if self.current < 0 or rowid <= self.cursor:
            return False  # not built (the build will read it), or read from the store already
        if rowid in self.offered or len(self.offered) >= MAX_OFFERED:
            # A rowid handed out again (a rollup deleted the newest windows; their buckets are
            # rebuilt at the next answer, which this offer cannot wait for), or no evaluation
            # for a long while: start again from the store rather than guess or grow.
            self.reset()
            return False
        b = w.end_unix_nano // self.width
        if b < self.current - max(self.lengths):
            return False  # too old for any span: the answer skips it by its end time
        try:
            if all(b >= sliding.end for sliding in self.sliding):  # the usual case: only its bucket holds it
                self.buckets.setdefault(b, Partial()).add(w, parsed)
            else:
                part = Partial()
                part.add(w, parsed)
                self.buckets.setdefault(b, Partial()).merge(part)
                for sliding in self.sliding:
                    sliding.late(b, part)
        except BaseException:  # half merged: start again from the store
            self.reset()
            raise
        self.offered[rowid] = b
        return True

    def _bucket_rows(self, rows: Iterable[tuple[int, bytes]]) -> dict[int, Partial]:
        built: dict[int, Partial] = {}
        for end, body in rows:
            built.setdefault(end // self.width, Partial()).add(summary_pb2.WindowSummary.FromString(body))
        return built

    def _build(self, snap: SpanSnapshot, name: str, version: str, oldest: int) -> None:
        self.offered = {}  # merged into the buckets dropped here; those above top_rowid are read next time
        self.buckets = self._bucket_rows(snap.rows(name, version, oldest * self.width))
        self.sliding = [_Sliding(n) for n in self.lengths]
        self.cursor = snap.top_rowid

    def _catch_up(self, snap: SpanSnapshot, name: str, version: str, oldest: int) -> None:
        if not snap.passes:
            # Nothing deleted since the last snapshot: each window offered at or below the snapshot's top
            # is stored (above the cursor, as offers are); as many stored, with the same rowids' sum, are them.
            offered = [rowid for rowid in self.offered if rowid <= snap.top_rowid]
            if snap.window_count_after(name, version, self.cursor) == (len(offered), sum(offered)):
                self.cursor = snap.top_rowid
                self.offered = {r: b for r, b in self.offered.items() if r > self.cursor}
                return
        stale: set[int] = set()
        for rollup in snap.passes or ():
            for r in rollup.rolled:
                if (r.model_name, r.model_version) != (name, version):
                    continue
                first, last = r.first_end_ns // self.width, r.last_end_ns // self.width
                # Rows merged within one bucket leave it the same summary, if it held them all.
                if first != last or r.removed or r.newest_raw_rowid > self.cursor:
                    stale.update(range(max(first, oldest), last + 1))
            # Deleting the newest windows lets SQLite hand their rowids out again.
            self.cursor = min(self.cursor, rollup.windows_top_rowid)
        # An offered window of a bucket read again is in it if this snapshot holds it, else it is
        # read next time (its rowid is above top_rowid); one too old for any span is skipped anyway.
        # A window a rollup deleted while offered lies in a stale bucket, so a rowid handed out
        # again is never taken for it.
        self.offered = {r: b for r, b in self.offered.items() if b >= oldest and b not in stale}
        for b in sorted(stale):
            fresh = self._bucket_rows(snap.rows(name, version, b * self.width, (b + 1) * self.width - 1))
            if b in fresh:
                self.buckets[b] = fresh[b]
            else:
                self.buckets.pop(b, None)
            for sliding in self.sliding:
                sliding.replaced(self.buckets, b)
        unread = []
        for rowid, end in snap.window_ids_after(name, version, self.cursor):
            b = end // self.width
            if self.offered.pop(rowid, None) is None and b >= oldest and b not in stale:
                unread.append(rowid)  # not offered (stored by another process, or missed), new, in a span
        self.windows_read += len(unread)
        for _, end, body in snap.window_bodies(unread):
            b = end // self.width
            part = Partial()
            part.add(summary_pb2.WindowSummary.FromString(body))
            self.buckets.setdefault(b, Partial()).merge(part)
            for sliding in self.sliding:
                sliding.late(b, part)
        self.cursor = snap.top_rowid
        self.offered = {r: b for r, b in self.offered.items() if r > self.cursor}  # committed after the snapshot

    def answer(self, store: Store, name: str, version: str, now_ns: int) -> list[Span | None]:
        current = now_ns // self.width
        oldest = current - max(self.lengths)
        try:
            with store.span_snapshot(self.generation) as snap:
                if self.current < 0 or current < self.current or snap.passes is None:
                    self._build(snap, name, version, oldest)
                else:
                    self._catch_up(snap, name, version, oldest)
                self.generation = snap.generation
        except BaseException:  # e.g. a body that does not parse: half merged, so start again next time
            self.reset()
            raise
        self.current = current
        for b in [b for b in self.buckets if b < oldest]:
            del self.buckets[b]
        out = []
        for sliding in self.sliding:
            merged = sliding.answer(self.buckets, current)
            out.append(merged.span() if merged.windows else None)
        return out


class SpanCache:
    """Per model version, the spans' current summaries kept up to date (see the module's doc).
    Thread-safe: one evaluation of a version at a time."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._versions: dict[tuple[str, str], _Version] = {}
        self._lock = threading.Lock()
        # windows offered by ingest, and those of them merged then (the rest are read by an evaluation)
        self.counters = {"windows_offered": 0, "windows_merged_at_ingest": 0}

    def read(self, model_name: str, model_version: str, now_ns: int, spans: Sequence[float]) -> list[Span | None]:
        """One ``Span`` (or None: no window) per span (seconds, shortest first), as of ``now_ns``."""
        key, spans = (model_name, model_version), tuple(spans)
        with self._lock:
            cached = self._versions.get(key)
            if cached is None or cached.spans != spans:
                cached = self._versions[key] = _Version(spans)
        with cached.lock:
            self._merge_pending(cached)  # offers that waited for an evaluation or a build
            return cached.answer(self.store, model_name, model_version, now_ns)

    def wants(self, model_name: str, model_version: str) -> bool:
        """Whether windows of this version are worth offering (it is cached)."""
        return (model_name, model_version) in self._versions

    def offer(self, stored: Iterable[tuple[int, summary_pb2.WindowSummary, Sequence[Sketch]]],
              generation: int) -> None:
        """Windows this process has just committed (rowid, the window, its columns' sketches as
        ingest's validation parsed them), merged into their cached version's buckets so that the
        next evaluation only lists their ids. ``generation``: ``Store.rollup_generation`` read
        before they were submitted (a later rollup pass may have deleted them: not taken then).

        Never waits: when the version is busy (an evaluation, another thread's offers) they wait
        in its bounded ``pending`` list, merged by whichever holds the lock next. Not taken: a
        version not cached, a full pending list, a window too old for any span; the evaluation
        reads those from the store, as it does every window stored by another process. Counted
        in ``counters``."""
        by_version: dict[tuple[str, str], list] = {}
        for rowid, w, parsed in stored:
            by_version.setdefault((w.model_name, w.model_version), []).append((rowid, w, parsed, generation))
        for key, items in by_version.items():
            with self._lock:
                cached = self._versions.get(key)
                self.counters["windows_offered"] += len(items)
            if cached is None:
                continue
            with cached.pending_lock:
                if len(cached.pending) + len(items) > MAX_PENDING:
                    continue
                cached.pending.extend(items)
            # Whoever holds the lock merges what waits; looking again after releasing it catches
            # offers that came while this thread merged.
            while cached.pending and cached.lock.acquire(blocking=False):
                try:
                    self._merge_pending(cached)
                finally:
                    cached.lock.release()

    def _merge_pending(self, cached: _Version) -> None:
        try:
            taken = cached.merge_pending(self.store)
        except Exception:  # the version was reset: its next answer reads everything from the store
            log.exception("merging offered windows into the span cache failed; the evaluation reads them")
            return
        with self._lock:
            self.counters["windows_merged_at_ingest"] += taken

    def forget(self, keep: Iterable[tuple[str, str]]) -> None:
        """Drop the versions not in ``keep`` (those no longer evaluated)."""
        keep = set(keep)
        with self._lock:
            for key in [k for k in self._versions if k not in keep]:
                del self._versions[key]


def merge_since(windows: Sequence[summary_pb2.WindowSummary],
                starts: Sequence[int]) -> list[tuple[summary_pb2.WindowSummary | None, int]]:
    """(merged summary or None, windows merged) per span start (ns, latest first) of the windows that
    ended at or after it; ``windows`` newest first. Each window is parsed and merged once; a span with
    no more windows than the previous one gets the same summary object."""
    merger, out, i = WindowMerger(), [], 0
    for since in starts:
        before = i
        while i < len(windows) and windows[i].end_unix_nano >= since:
            merger.add(windows[i])
            i += 1
        out.append(out[-1] if out and i == before else ((merger.result() if i else None), i))
    return out


def read_uncached(store: Store, model_name: str, model_version: str, now_ns: int,
                  spans: Sequence[float]) -> list[Span | None]:
    """What ``SpanCache.read`` answers, from every window of the longest span read and merged now:
    a cold start's cost, and the oracle of the tests."""
    starts = span_starts(now_ns, spans)
    windows = [info.summary for _, info in store.window_rows(model_name, model_version, starts[-1], True)]
    out: list[Span | None] = []
    for summary, count in merge_since(windows, starts):
        out.append(None if summary is None else
                   Span(summary, {c.name: sketches.from_proto(c) for c in summary.columns}, count))
    return out
