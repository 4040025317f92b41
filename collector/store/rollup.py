"""Rolling old windows up into coarser buckets, so the store stops growing.

Raw windows are kept for ``raw_seconds``, then merged into minute buckets;
minute buckets into hour buckets after ``minute_seconds``; hours into days
after ``hour_seconds``; days are deleted after ``day_seconds``. Counts (rows,
calls, dropped rows, errors, windows) are integers summed exactly at every
level; sketches are merged with ``agent.sketches``, so a day bucket answers
the same questions as the windows it came from, within the sketches' error.
A window's shadow comparison merges too; a bucket keeps one shadow version
(the latest seen, see ``collector.store.shadow_merge.ShadowMerger``).

``apply_retention`` runs on the store's writer thread, inside its transaction.
Each bucket is merged in a savepoint of its own: a bucket whose merge fails (a
row an older collector stored before ingest bounded every count, sums past
SQLite's int64, a body that does not deserialise) is rolled back alone, logged
once, counted (``buckets_skipped``) and tried again next pass, its rows left
where they are; every other bucket, of that model or any other, goes on.
Counts are summed as Python integers and checked against int64 before they are
written; every bucket merged and every day row deleted is reported as a ``RolledRows`` (which rows
left or changed, by end time), so the drift evaluator's memory of recent windows
(``collector.monitoring.spans``) can follow the store; a bucket's confusion matrix keeps at most ``MAX_CLASSES`` classes (the
rest are counted under ``OTHER_CLASS``), so merging windows that each name
different classes cannot grow it without bound.
"""
from __future__ import annotations

import itertools
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from collector.store.engine import Conn

from agent import sketches
from collector.base.ingest import Limits
from collector.store import samples
from collector.store.shadow_merge import ShadowMerger
from protos import summary_pb2

log = logging.getLogger(__name__)

NS = 1_000_000_000
MAX_INT64 = 2**63 - 1
MAX_CLASSES = Limits.max_classes  # of a merged confusion matrix; beyond, OTHER_CLASS
OTHER_CLASS = "<other>"
_MAX_LOGGED_FAILURES = 10_000  # failing buckets remembered (to log each once); beyond, each is logged again
LEVELS: dict[str, int] = {"minute": 60 * NS, "hour": 3600 * NS, "day": 86400 * NS}  # bucket widths
_NEXT = {"raw": "minute", "minute": "hour", "hour": "day"}
_CHUNK = 256  # rows read (and bodies held in memory) at a time while merging a bucket

Sketch = sketches.NumericSketch | sketches.CategoricalSketch


@dataclass(frozen=True)
class RetentionPolicy:
    """How long each level is kept before it is merged into the next (seconds)."""

    raw_seconds: int = 3660  # a minute past the drift span: rollups then never touch a span's minutes
    minute_seconds: int = 86400
    hour_seconds: int = 30 * 86400
    day_seconds: int = 400 * 86400  # then deleted
    sample_seconds: int = 7 * 86400  # agents' row samples (collector.store.samples) are deleted after this

    def __post_init__(self) -> None:
        for name in ("raw_seconds", "minute_seconds", "hour_seconds", "day_seconds", "sample_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RetentionPolicy.{name} must be positive")


@dataclass(frozen=True)
class RolledRows:
    """What one bucket's merge (or the day rows' deletion) changed for a model version: rows
    ending from ``first_end_ns`` to ``last_end_ns`` were deleted, and a rollup row ending in that
    range was written (unless ``removed``: rows deleted, nothing written). ``newest_raw_rowid``: the
    largest rowid of the raw windows merged (0: none), so a reader knows whether it had seen them."""

    model_name: str
    model_version: str
    first_end_ns: int
    last_end_ns: int
    newest_raw_rowid: int = 0
    removed: bool = False


class _Column:
    """One column being merged: its sketch and the role/source it was first seen with."""

    def __init__(self, msg: summary_pb2.ColumnSummary) -> None:
        self.name, self.role, self.source = msg.name, msg.role, msg.source
        self.sketch: Sketch = sketches.from_proto(msg)

    def add(self, msg: summary_pb2.ColumnSummary) -> None:
        self.sketch.merge(sketches.from_proto(msg))  # type: ignore[arg-type]  # same kind by key

    def to_proto(self) -> summary_pb2.ColumnSummary:
        return self.sketch.to_proto(self.name, self.role, self.source)


class WindowMerger:
    """Folds windows in one at a time, so a bucket of thousands of windows
    never has to be in memory at once. ``merge_windows`` is the one-shot form."""

    def __init__(self) -> None:
        self._head: summary_pb2.WindowSummary | None = None
        # Keyed by (name, kind): a column that changed kind mid-version is kept
        # as two columns rather than failing the rollup forever.
        self._columns: dict[tuple[str, int], _Column] = {}
        self._latency: _Column | None = None
        self._performance: PerformanceTotals | None = None
        self._shadow = ShadowMerger()

    def add(self, w: summary_pb2.WindowSummary) -> None:
        head = self._head
        if head is None:
            self._head = summary_pb2.WindowSummary(
                model_name=w.model_name, model_version=w.model_version, model_sha256=w.model_sha256,
                start_unix_nano=w.start_unix_nano, end_unix_nano=w.end_unix_nano,
                rows=w.rows, calls=w.calls, dropped_rows=w.dropped_rows, errors=w.errors,
            )
        else:
            for field in ("model_name", "model_version", "model_sha256"):
                if getattr(head, field) != getattr(w, field):
                    setattr(head, field, "")  # a mixed merge has no single identity
            head.start_unix_nano = min(head.start_unix_nano, w.start_unix_nano)
            head.end_unix_nano = max(head.end_unix_nano, w.end_unix_nano)
            head.rows += w.rows
            head.calls += w.calls
            head.dropped_rows += w.dropped_rows
            head.errors += w.errors
        for msg in w.columns:
            key = (msg.name, msg.kind)
            if key in self._columns:
                self._columns[key].add(msg)
            else:
                self._columns[key] = _Column(msg)
        if w.HasField("performance"):
            self._performance = self._performance or PerformanceTotals()
            self._performance.add(w.performance)
        if w.HasField("latency"):
            if self._latency is None:
                self._latency = _Column(w.latency)
            else:
                self._latency.add(w.latency)
        if w.HasField("shadow"):
            self._shadow.add(w.shadow, w.end_unix_nano)

    def result(self) -> summary_pb2.WindowSummary:
        if self._head is None:
            raise ValueError("no windows to merge")
        out = summary_pb2.WindowSummary()
        out.CopyFrom(self._head)
        if self._latency is not None:
            out.latency.CopyFrom(self._latency.to_proto())
        out.columns.extend(c.to_proto() for c in self._columns.values())
        if self._performance is not None:
            out.performance.CopyFrom(self._performance.to_proto())
        shadow = self._shadow.result()
        if shadow is not None:
            out.shadow.CopyFrom(shadow)
        return out


class PerformanceTotals:
    """Realised performance summed over windows: confusion counts by (true, predicted)
    class name (windows may know different classes), error sums added. At most
    ``max_classes`` classes are kept, first come first kept; labels of later ones are
    counted under ``OTHER_CLASS`` (which takes one of the places)."""

    def __init__(self, max_classes: int = MAX_CLASSES) -> None:
        self.labeled = self.unmatched = 0
        self.max_classes = max(max_classes, 2)
        self.classes: dict[str, None] = {}  # insertion-ordered set
        self.confusion: dict[tuple[str, str], int] = {}
        self.error_sum = self.abs_error_sum = self.sq_error_sum = 0.0

    def _class(self, name: str) -> str:
        if name in self.classes:
            return name
        if len(self.classes) < self.max_classes - (OTHER_CLASS not in self.classes):
            self.classes[name] = None
            return name
        self.classes[OTHER_CLASS] = None
        return OTHER_CLASS

    def add(self, p: summary_pb2.Performance) -> None:
        self.labeled += p.labeled
        self.unmatched += p.unmatched
        n = len(p.classes)
        if len(p.confusion) == n * n:
            names = [self._class(c) for c in p.classes]
            for i, true in enumerate(names):
                for j, pred in enumerate(names):
                    if p.confusion[i * n + j]:
                        key = (true, pred)
                        self.confusion[key] = self.confusion.get(key, 0) + p.confusion[i * n + j]
        self.error_sum += p.error_sum
        self.abs_error_sum += p.abs_error_sum
        self.sq_error_sum += p.sq_error_sum

    def to_proto(self) -> summary_pb2.Performance:
        classes = list(self.classes)
        return summary_pb2.Performance(
            labeled=self.labeled, unmatched=self.unmatched, classes=classes,
            confusion=[self.confusion.get((t, p), 0) for t in classes for p in classes],
            error_sum=self.error_sum, abs_error_sum=self.abs_error_sum, sq_error_sum=self.sq_error_sum)


def merge_windows(windows: Sequence[summary_pb2.WindowSummary]) -> summary_pb2.WindowSummary:
    """One summary of many windows: columns merged by name (latency too),
    counts summed exactly, time range = earliest start to latest end.
    agent_id/run_id/seq are empty: a merge belongs to no single agent run."""
    merger = WindowMerger()
    for w in windows:
        merger.add(w)
    return merger.result()


# ------------------------------------------------------------ in the store


def apply_retention(db: Conn, now_ns: int, policy: RetentionPolicy,
                    failed: set[tuple] | None = None, rolled: list[RolledRows] | None = None) -> dict[str, int]:
    """Run one retention pass inside the caller's (writer's) transaction.

    Returns how many rows of each level were merged upwards (``raw_merged``,
    ``minute_merged``, ``hour_merged``), how many day rows were deleted
    (``day_deleted``) and how many buckets failed to merge and were left as they
    were (``buckets_skipped``). Levels run in order, so one pass carries a late
    window as far up as its age allows. ``failed`` remembers the buckets already
    logged as failing (pass the same set every time: each is logged once). ``rolled``, if given,
    receives a ``RolledRows`` for every bucket merged and every model version whose day rows were deleted."""
    failed = set() if failed is None else failed
    rolled = [] if rolled is None else rolled
    ages = {"raw": policy.raw_seconds, "minute": policy.minute_seconds, "hour": policy.hour_seconds}
    counts = {"buckets_skipped": 0}
    for level in _NEXT:
        merged, skipped = _roll_level(db, level, now_ns - ages[level] * NS, failed, rolled)
        counts[f"{level}_merged"] = merged
        counts["buckets_skipped"] += skipped
    day_cutoff = now_ns - policy.day_seconds * NS
    rolled.extend(RolledRows(name, version, first, last, removed=True) for name, version, first, last in db.execute(
        "SELECT model_name, model_version, min(end_ns), max(end_ns) FROM rollups WHERE level = 'day'"
        " AND bucket_end_ns <= ? GROUP BY model_name, model_version", [day_cutoff]).fetchall())
    cursor = db.execute("DELETE FROM rollups WHERE level = 'day' AND bucket_end_ns <= ?", [day_cutoff])
    counts["day_deleted"] = cursor.rowcount
    samples.delete_older(db, now_ns - policy.sample_seconds * NS)  # agents' row samples past their retention
    return counts


def _roll_level(db: Conn, level: str, cutoff_ns: int, failed: set[tuple],
                rolled: list[RolledRows]) -> tuple[int, int]:
    """Merge every row of ``level`` that is old enough into its bucket of the next level;
    (rows merged, buckets skipped)."""
    width = LEVELS[_NEXT[level]]
    if level == "raw":
        sql = "SELECT rowid, model_name, model_version, start_ns FROM windows WHERE end_ns <= ?"
        params: list = [cutoff_ns]
    else:
        sql = ("SELECT rowid, model_name, model_version, bucket_start_ns FROM rollups"
               " WHERE level = ? AND bucket_end_ns <= ?")
        params = [level, cutoff_ns]
    # Only keys first: the bodies are read bucket by bucket, in chunks.
    buckets: dict[tuple[str, str, int], list[int]] = defaultdict(list)
    for rowid, name, version, start in db.execute(sql, params).fetchall():
        buckets[(name, version, start - start % width)].append(rowid)
    merged = skipped = 0
    for (name, version, bucket), rowids in buckets.items():
        db.execute("SAVEPOINT bucket")
        try:
            change = _merge_into_bucket(db, level, name, version, bucket, width, rowids)
        except Exception as exc:  # this bucket's rows stay as they are; the pass goes on
            if not db.in_transaction:
                raise  # the error ended the whole transaction (disk full, I/O): nothing to isolate
            db.execute("ROLLBACK TO SAVEPOINT bucket")
            skipped += 1
            _log_failure(failed, (level, name, version, bucket), len(rowids), exc)
        else:
            merged += len(rowids)
            failed.discard((level, name, version, bucket))
            rolled.append(change)
        finally:
            if db.in_transaction:
                db.execute("RELEASE SAVEPOINT bucket")
    return merged, skipped


def _log_failure(failed: set[tuple], key: tuple, rows: int, exc: Exception) -> None:
    if key in failed:
        return
    if len(failed) < _MAX_LOGGED_FAILURES:
        failed.add(key)
    level, name, version, bucket = key
    log.warning("rollup of %d %s row(s) of %s version %s into the %s bucket at %d failed; they stay %s rows and "
                "are tried again each pass (logged once): %s: %s", rows, level, name, version, _NEXT[level],
                bucket, level, type(exc).__name__, exc)


_TOTALS = ("rows", "calls", "dropped_rows", "errors")


def _checked_sum(totals: dict[str, int]) -> dict[str, int]:
    for key, value in totals.items():
        if not 0 <= value <= MAX_INT64:
            raise OverflowError(f"the bucket's {key} total {value} does not fit a signed 64-bit integer")
    return totals


def _merge_into_bucket(db: Conn, level: str, name: str, version: str, bucket: int, width: int,
                       rowids: list[int]) -> RolledRows:
    target = _NEXT[level]
    merger = WindowMerger()
    totals = dict.fromkeys(("windows", *_TOTALS), 0)
    existing = db.execute(
        "SELECT rowid, windows, rows, calls, dropped_rows, errors, end_ns, body FROM rollups"
        " WHERE model_name = ? AND model_version = ? AND level = ? AND bucket_start_ns = ?",
        [name, version, target, bucket],
    ).fetchone()
    sources: Iterable[tuple] = _source_rows(db, level, rowids)
    if existing is not None:
        sources = itertools.chain([existing[1:]], sources)
    ends = []
    for windows, *counts, end, body in sources:
        totals["windows"] += windows
        for key, value in zip(_TOTALS, counts):
            totals[key] += value
        ends.append(end)
        merger.add(summary_pb2.WindowSummary.FromString(body))
    merged = merger.result()
    _checked_sum(totals)
    row = {"windows": totals["windows"], **{k: totals[k] for k in _TOTALS},
           "start_ns": merged.start_unix_nano, "end_ns": merged.end_unix_nano,
           "body": merged.SerializeToString()}
    if existing is None:
        db.insert("rollups", {"model_name": name, "model_version": version, "level": target,
                              "bucket_start_ns": bucket, "bucket_end_ns": bucket + width, **row})
    else:
        db.update("rollups", {"rowid": existing[0]}, row)
    table = "windows" if level == "raw" else "rollups"
    for chunk in _chunks(rowids):
        db.execute(f"DELETE FROM {table} WHERE rowid IN ({','.join('?' * len(chunk))})", chunk)
    # The new row's end is the largest of its sources' ends, so the range covers it too.
    return RolledRows(name, version, min(ends), max(ends), max(rowids) if level == "raw" else 0)


def _source_rows(db: Conn, level: str, rowids: list[int]) -> Iterator[tuple]:
    """(windows, rows, calls, dropped_rows, errors, end_ns, body) of each source, a chunk at a time."""
    if level == "raw":
        sql = "SELECT 1, rows, calls, dropped_rows, errors, end_ns, body FROM windows WHERE rowid IN ({})"
    else:
        sql = "SELECT windows, rows, calls, dropped_rows, errors, end_ns, body FROM rollups WHERE rowid IN ({})"
    for chunk in _chunks(rowids):
        yield from db.execute(sql.format(",".join("?" * len(chunk))), chunk).fetchall()


def _chunks(items: list[int]) -> Iterator[list[int]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i:i + _CHUNK]
