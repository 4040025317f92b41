"""The collector's store: agents, raw windows and their rollups, reference profiles -- in a SQLite
file or a PostgreSQL database (``collector.store.engine``); what follows is said of SQLite, where
it differs (PostgreSQL: a writer connection per collector, MVCC readers, the server's durability).

SQLite has one writer even in WAL mode, so one thread owns the write
connection and takes work from a queue (datasette's pattern); sharing a
connection between threads would only turn contention into "database is
locked". The writer drains up to ``batch_max`` queued tasks into one
``BEGIN IMMEDIATE`` transaction (group commit: one fsync for many windows),
each task inside its own savepoint so that one failing task fails alone.
Futures resolve only after COMMIT, which is what lets the collector ack a
window and the agent drop it from its spool.

Durability: an ack means the window is on disk. WAL with ``synchronous=FULL``
(the default) fsyncs the WAL at every commit, so a window survives a crash of
the OS, a power cut, or its file system going away, once it is acked; group
commit pays that one fsync for every window of the batch
(``benchmarks/ingest.py``). ``synchronous="NORMAL"`` (``collector serve
--synchronous normal``) syncs the WAL only at checkpoints: it survives a crash
of the process, kill -9 included, but a power cut may lose the last commits --
windows that were acked, which the agents will not resend
(``tests/test_durability.py`` shows both).

Readers open their own connection (one per calling thread) and never block the
writer.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple


from agent.errors import ResourceExhausted, Unavailable
from collector.base.ingest import Limits, clean_text, validate_spool
from collector.store import audit, samples
from collector.store.rollup import RetentionPolicy, RolledRows, apply_retention
from collector.store.dialect import NO_LIMIT, Dialect
from collector.store.engine import Conn, Engine, StoreValueError, open_engine
from collector.store.migrations import SPOOL_FIELDS as _SPOOL_FIELDS
from collector.store.migrations import migrate
from protos import collector_pb2, summary_pb2

log = logging.getLogger(__name__)

WINDOWS_LOCK = "windows"  # serialises window inserts across collectors (a no-op on SQLite's one writer)
STORED = collector_pb2.WindowAck.STORED
DUPLICATE = collector_pb2.WindowAck.DUPLICATE
_SYNCHRONOUS = ("NORMAL", "FULL", "EXTRA")
_RAW, _ROLLUP = 1, 0  # at the same end time, raw windows are listed before rollup rows
_MAX_INT64 = 2**63 - 1
_ROLLUP_PASSES_KEPT = 1000  # rollup passes remembered for span readers (collector.monitoring.spans); older: they rebuild


class WindowResult(NamedTuple):
    run_id: str
    seq: int
    result: int  # collector_pb2.WindowAck.STORED or DUPLICATE


# ------------------------------------------------------------ the store


@dataclass
class _Task:
    run: Callable[[Conn], Any]
    future: concurrent.futures.Future
    weight: int  # queue slots it holds: its windows, or 1
    windows: bool = False


_STOP = object()

_INSERT_WINDOW = (
    "INSERT INTO windows (agent_id, run_id, seq, model_name, model_version, start_ns, end_ns,"
    " rows, calls, dropped_rows, errors, body) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (agent_id, run_id, seq) DO NOTHING RETURNING rowid"
)
# Windows may arrive before (or without) a Hello: the run's row is created
# from the window, and a later Hello fills in the rest.
def _add_run_totals(d: Dialect) -> str:
    # Saturating: an agent run that sent 2**23 windows of the largest allowed counts must not
    # make every later window of the run fail with an integer overflow.
    return ("INSERT INTO agents (agent_id, run_id, model_name, model_version, model_sha256, started_ns,"
            " first_seen_ns, last_seen_ns, windows, rows, dropped_rows, errors, last_window_end_ns)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?)"
            " ON CONFLICT (agent_id, run_id) DO UPDATE SET windows = agents.windows + 1,"
            + ",".join(f" {c} = {d.saturating_add(f'agents.{c}', f'excluded.{c}')}"
                       for c in ("rows", "dropped_rows", "errors"))
            + f", last_window_end_ns = {d.greatest('agents.last_window_end_ns', 'excluded.last_window_end_ns')}")


def _window_row(w: summary_pb2.WindowSummary, body: bytes) -> tuple:
    return (w.agent_id, w.run_id, w.seq, w.model_name, w.model_version, w.start_unix_nano, w.end_unix_nano,
            w.rows, w.calls, w.dropped_rows, w.errors, body)


def _insert_windows(db: Conn, rows: list[tuple], sha: list[str], now_ns: int,
                    sampled: Sequence[tuple | None] = (), rowids: list[int] | None = None) -> list[WindowResult]:
    results = []
    add_run_totals = _add_run_totals(db.dialect)
    for row, model_sha256, sample in zip(rows, sha, sampled or [None] * len(rows)):
        # One statement per window: a row back (its rowid) tells a new window from a resend.
        inserted = db.execute(_INSERT_WINDOW, row).fetchone()
        stored = inserted is not None
        results.append(WindowResult(row[1], row[2], STORED if stored else DUPLICATE))
        if rowids is not None:
            rowids.append(inserted[0] if stored else 0)
        if stored:
            agent_id, run_id, _, name, version, start, end, nrows, _, dropped, errors, _ = row
            db.execute(add_run_totals, (agent_id, run_id, name, version, model_sha256, start, now_ns, now_ns,
                                              nrows, dropped, errors, end))
            if sample is not None:  # kept apart from the body, in the same transaction
                samples.insert(db, sample)
    return results


def _after(src: int, after: tuple[int, int, int] | None) -> tuple[str, list[int]]:
    """The condition for the rows of one side (raw or rollup) that sort after the key ``after``
    (end, src, id) in ``window_rows``' newest-first order."""
    if after is None:
        return "", []
    end, cursor_src, rowid = after
    if src < cursor_src:  # at the same end time this side comes after the cursor's
        return " AND end_ns <= ?", [end]
    if src > cursor_src:
        return " AND end_ns < ?", [end]
    return " AND (end_ns < ? OR (end_ns = ? AND rowid < ?))", [end, end, rowid]


def _spool_columns(spool: collector_pb2.SpoolStatus) -> dict[str, int]:
    return {f"spool_{f}": getattr(spool, f) for f in _SPOOL_FIELDS}


def _record_pass(db: Conn, rolled: list[RolledRows]) -> int:
    """Record one rollup pass in the pass's own transaction; its generation. Under a lock, so that
    collectors rolling up on one PostgreSQL number their passes in commit order."""
    db.lock("rollup_passes")
    generation = (db.execute("SELECT max(generation) FROM rollup_passes").fetchone()[0] or 0) + 1
    top = db.execute("SELECT max(rowid) FROM windows").fetchone()[0] or 0
    body = json.dumps([[r.model_name, r.model_version, r.first_end_ns, r.last_end_ns, r.newest_raw_rowid,
                        int(r.removed)] for r in rolled], separators=(",", ":")).encode()
    db.insert("rollup_passes", {"generation": generation, "windows_top_rowid": top, "body": body})
    db.execute("DELETE FROM rollup_passes WHERE generation <= ?", [generation - _ROLLUP_PASSES_KEPT])
    return generation


def _rolled_from_json(body: bytes) -> list[RolledRows]:
    return [RolledRows(name, version, first, last, newest, bool(removed))
            for name, version, first, last, newest, removed in json.loads(body)]


class RollupPass(NamedTuple):
    generation: int
    windows_top_rowid: int  # the largest rowid left in the windows table after the pass (0: empty)
    rolled: list[RolledRows]


class SpanSnapshot:
    """One read snapshot of the windows and rollups tables, and the rollup passes committed in
    it that a reader which last looked at ``generation`` has not seen (None: too many to list).
    Made by ``Store.span_snapshot``; for ``collector.monitoring.spans``."""

    def __init__(self, db: Conn, generation: int, passes: list[RollupPass] | None, top_rowid: int) -> None:
        self._db, self.generation, self.passes, self.top_rowid = db, generation, passes, top_rowid

    def rows(self, model_name: str, model_version: str, first_end_ns: int,
             last_end_ns: int = _MAX_INT64) -> Iterator[tuple[int, bytes]]:
        """(end_ns, body) of every raw window and rollup row of the model version ending in
        [first_end_ns, last_end_ns], in no particular order."""
        for table in ("windows", "rollups"):
            yield from self._db.execute(
                f"SELECT end_ns, body FROM {table} WHERE model_name = ? AND model_version = ?"
                " AND end_ns BETWEEN ? AND ?", [model_name, model_version, first_end_ns, last_end_ns])

    def window_ids_after(self, model_name: str, model_version: str, rowid: int) -> list[tuple[int, int]]:
        """(rowid, end_ns) of the model version's raw windows stored with a rowid above ``rowid``.
        No body is read (a body lies in overflow pages, which SQLite reads only when asked for it);
        the reader asks ``window_bodies`` for those it has not merged already."""
        # Kept off the model's index (on SQLite a walk of every window the model has): a rowid
        # range reads only what was stored since.
        d = self._db.dialect
        return self._db.execute(
            f"SELECT rowid, end_ns FROM windows WHERE rowid > ? AND {d.unindexed('model_name')} = ?"
            f" AND {d.unindexed('model_version')} = ?", [rowid, model_name, model_version]).fetchall()

    def window_count_after(self, model_name: str, model_version: str, rowid: int) -> tuple[int, int]:
        """How many of the model version's raw windows have a rowid above ``rowid``, and their rowids' sum:
        ``window_ids_after`` in one row, for a reader that expects them all merged already."""
        d = self._db.dialect
        count, total = self._db.execute(
            f"SELECT count(*), sum(rowid) FROM windows WHERE rowid > ? AND {d.unindexed('model_name')} = ?"
            f" AND {d.unindexed('model_version')} = ?", [rowid, model_name, model_version]).fetchone()
        return int(count), int(total or 0)

    def window_bodies(self, rowids: Sequence[int]) -> Iterator[tuple[int, int, bytes]]:
        """(rowid, end_ns, body) of the raw windows ``rowids`` (those still stored)."""
        for i in range(0, len(rowids), 500):
            chunk = list(rowids[i:i + 500])
            yield from self._db.execute(
                f"SELECT rowid, end_ns, body FROM windows WHERE rowid IN ({','.join('?' * len(chunk))})", chunk)


class Store:
    """The collector's database. Thread-safe; every write goes through the writer thread."""

    def __init__(self, path: str | os.PathLike, *, batch_max: int = 512, queue_max: int = 20_000,
                 synchronous: str = "FULL") -> None:
        """``path``: a SQLite file, or a ``postgresql://`` URL (``collector.store.engine``)."""
        if synchronous.upper() not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {_SYNCHRONOUS}, got {synchronous!r}")
        if batch_max < 1 or queue_max < 1:
            raise ValueError("batch_max and queue_max must be positive")
        self.engine: Engine = open_engine(path, synchronous=synchronous)
        self.path = os.fspath(path)  # the SQLite file (artifacts live beside it), or the URL
        self._batch_max = batch_max
        self._queue_max = queue_max
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._depth = 0  # windows (and other tasks) queued or being written
        self._closed = False
        self._local = threading.local()
        self._readers: list[Conn] = []
        self.counters: dict[str, int] = {"windows_stored": 0, "windows_duplicate": 0, "rollup_buckets_skipped": 0,
                                         "group_commits": 0}
        self._failed_buckets: set[tuple] = set()  # rollup buckets already logged as failing (collector.store.rollup)
        # The newest rollup pass known here (the passes themselves are in the database: rollup_passes);
        # the lock makes it move only after the pass's commit (collector.monitoring.spans' offers).
        self._rollup_lock = threading.Lock()
        self._rollup_generation = 0
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._writer = threading.Thread(target=self._write_loop, args=(ready,), name="outrider-store-writer",
                                        daemon=True)
        self._writer.start()
        ready.result()  # schema errors surface here, in the constructor

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # -------------------------------------------------------- writes

    def submit_windows(self, windows: Sequence[summary_pb2.WindowSummary],
                       rowids: list[int] | None = None) -> concurrent.futures.Future:
        """Queue windows for the next group commit. The future gives one
        WindowResult per window, in order, once they are committed: only then
        may the agent forget them. A full queue raises ResourceExhausted at
        once (back-pressure: the agent keeps its spool and retries later).
        Callbacks on the future run on the writer thread: keep them short.
        ``rowids``, if given, is filled with each window's rowid (0: a duplicate) before the
        future resolves (for ``collector.monitoring.spans.SpanCache.offer``)."""
        bodies = [samples.split(w) for w in windows]  # serialise here, in the caller's thread; samples apart
        rows = [_window_row(w, body) for w, (body, _) in zip(windows, bodies)]
        sampled = [sample for _, sample in bodies]
        sha = [w.model_sha256 for w in windows]
        now_ns = time.time_ns()  # first_seen of a run that sent windows before its Hello
        task = _Task(lambda db: _insert_windows(db, rows, sha, now_ns, sampled, rowids), concurrent.futures.Future(),
                     weight=len(rows), windows=True)
        if not rows:
            task.future.set_result([])
        else:
            self._enqueue(task, may_refuse=True)
        return task.future

    def record_hello(self, hello: collector_pb2.Hello, now_ns: int) -> None:
        """Create or refresh the run's row and mark it connected; returns after commit."""
        schema = json.dumps({side: [{"name": t.name, "type": t.type, "shape": list(t.shape)}
                                    for t in getattr(hello, side)] for side in ("inputs", "outputs")})
        fields = {
            "host": hello.host, "model_name": hello.model_name, "model_version": hello.model_version,
            "model_sha256": hello.model_sha256, "schema": schema, "agent_version": hello.agent_version,
            "onnxruntime_version": hello.onnxruntime_version,
            "last_seen_ns": now_ns, "connected": 1, "connected_ns": now_ns,
        }
        if hello.started_unix_nano:  # else keep the first window's start as the run's start
            fields["started_ns"] = hello.started_unix_nano
        if hello.HasField("spool"):
            fields.update(_spool_columns(hello.spool))
        if hello.HasField("spool"):
            validate_spool(hello.spool, "hello spool")
        if hello.managed:  # what it serves now; the collector's commands follow (collector.lifecycle.rollout)
            state = hello.model_state
            fields.update(managed=1, model_error="" if state.ok else clean_text(state.error, Limits.max_error_chars),
                          shadow_version=state.shadow_version, shadow_share=state.shadow_share)
        self._update_agent(hello.agent_id, hello.run_id, now_ns, fields)

    def record_spool(self, agent_id: str, run_id: str, spool: collector_pb2.SpoolStatus, now_ns: int) -> None:
        """Store the agent's latest spool status; returns after commit. InvalidArgument (changing
        nothing) for counts that do not fit the table's signed 64-bit integers."""
        validate_spool(spool)
        self._update_agent(agent_id, run_id, now_ns, {**_spool_columns(spool), "last_seen_ns": now_ns})

    def _update_agent(self, agent_id: str, run_id: str, now_ns: int, fields: dict[str, Any]) -> None:
        def run(db: Conn) -> None:
            db.insert("agents", {"agent_id": agent_id, "run_id": run_id, "first_seen_ns": now_ns}, ignore=True)
            db.update("agents", {"agent_id": agent_id, "run_id": run_id}, fields)

        self.write(run)

    def rollup(self, now_ns: int, policy: RetentionPolicy) -> dict[str, int]:
        """Apply the retention policy as of ``now_ns``, on the writer thread
        (it writes), in one transaction; returns the counts per level. Buckets whose merge
        failed are left as they were and counted (``rollup_buckets_skipped``; see collector.store.rollup).
        A pass that changed rows is recorded in ``rollup_passes`` in the same transaction, so span
        readers of every collector on the database see it exactly when they see its changes."""
        def run(db: Conn) -> tuple[dict[str, int], int]:
            rolled: list[RolledRows] = []
            counts = apply_retention(db, now_ns, policy, self._failed_buckets, rolled)
            return counts, _record_pass(db, rolled) if rolled else 0

        with self._rollup_lock:  # offers read rollup_generation: it moves only once the pass is committed
            counts, generation = self.write(run)
            self._rollup_generation = max(self._rollup_generation, generation)
        self.counters["rollup_buckets_skipped"] += counts.get("buckets_skipped", 0)
        return counts

    @property
    def rollup_generation(self) -> int:
        """The newest rollup pass this store knows of: its own, or one a span snapshot read from the
        database (another collector's). For ``collector.monitoring.spans``: an offer made before
        a pass it has not seen is not taken."""
        return self._rollup_generation

    @contextlib.contextmanager
    def span_snapshot(self, since_generation: int) -> Iterator[SpanSnapshot]:
        """A read snapshot with the rollup passes after ``since_generation`` that it holds (see
        ``SpanSnapshot``), read from ``rollup_passes`` inside the snapshot: whichever collector ran
        them, a pass is listed exactly when its changes are seen. Held until the block ends."""
        db = self.read()
        with db.snapshot():
            top = db.execute("SELECT max(rowid) FROM windows").fetchone()[0] or 0
            newest = db.execute("SELECT max(generation) FROM rollup_passes").fetchone()[0] or 0
            passes: list[RollupPass] | None = [
                RollupPass(generation, windows_top, _rolled_from_json(body)) for generation, windows_top, body
                in db.execute("SELECT generation, windows_top_rowid, body FROM rollup_passes WHERE generation > ?"
                              " ORDER BY generation", [since_generation])]
            oldest = passes[0].generation if passes else newest + 1
            if oldest > since_generation + 1 or since_generation > newest:
                passes = None  # forgotten (or another database): the reader starts again from the tables
            with self._rollup_lock:
                self._rollup_generation = max(self._rollup_generation, newest)
            yield SpanSnapshot(db, newest, passes, top)

    def attach_profile(self, model_name: str, model_version: str, profile: summary_pb2.ReferenceProfile,
                       actor: str, now_ns: int) -> bool:
        """Store ``profile`` as the reference of the model version, replacing any
        earlier one; True if one was replaced. Returns after commit."""
        row = {"model_name": model_name, "model_version": model_version, "body": profile.SerializeToString(),
               "data_sha256": profile.data_sha256, "rows": profile.rows, "attached_ns": now_ns,
               "attached_by": actor}

        def run(db: Conn) -> bool:
            previous = db.execute("SELECT data_sha256, rows FROM profiles WHERE model_name = ? AND model_version = ?",
                                  [model_name, model_version]).fetchone()
            db.upsert("profiles", row, key=["model_name", "model_version"])
            audit.append(db, actor, "profile.attach", f"model/{model_name}/{model_version}", model_name=model_name,
                         before={"data_sha256": previous[0], "rows": previous[1]} if previous else None,
                         after={"data_sha256": profile.data_sha256, "rows": profile.rows}, now_ns=now_ns)
            return previous is not None

        return self.write(run)

    def write(self, fn: Callable[[Conn], Any]) -> Any:
        """Run ``fn`` on the writer and wait for its commit; its result is returned.
        Control tasks are few and small, so they are never refused for a full queue."""
        return self.submit(fn).result()

    def submit(self, fn: Callable[[Conn], Any]) -> concurrent.futures.Future:
        """``write`` without the wait: the future resolves after the commit. For
        callers that must not block (the auth interceptor); they bound how many
        they leave queued. Callbacks on the future run on the writer thread."""
        task = _Task(fn, concurrent.futures.Future(), weight=1)
        self._enqueue(task, may_refuse=False)
        return task.future

    def _enqueue(self, task: _Task, *, may_refuse: bool) -> None:
        with self._lock:
            if self._closed:
                raise Unavailable("store is closed")
            # Strict: a batch larger than queue_max is always refused (keep
            # Limits.max_windows_per_batch below it).
            if may_refuse and self._depth + task.weight > self._queue_max:
                raise ResourceExhausted(
                    f"write queue full ({self._depth} windows waiting, limit {self._queue_max}); retry later")
            self._depth += task.weight
            self._queue.put(task)

    def queue_depth(self) -> int:
        """Windows (and other writes) queued or being written, not yet committed."""
        return self._depth

    # -------------------------------------------------------- the writer

    def _write_loop(self, ready: concurrent.futures.Future) -> None:
        db = None
        try:
            db = self.engine.writer()
            migrate(db)
        except BaseException as exc:  # e.g. no such directory, a newer schema: raised by the constructor
            if db is not None:
                db.close()
            self.engine.close()
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            stop = False
            while not stop:
                batch = [self._queue.get()]
                while len(batch) < self._batch_max and not self._queue.empty():
                    batch.append(self._queue.get())
                if batch[-1] is _STOP:
                    stop = True
                    batch.pop()
                if batch:
                    self._commit(db, batch)
        except BaseException:  # a bug: do not leave callers waiting forever
            log.exception("store writer failed")
            with self._lock:
                self._closed = True
            while not self._queue.empty():
                task = self._queue.get()
                if task is not _STOP and task.future.set_running_or_notify_cancel():
                    task.future.set_exception(Unavailable("store writer failed"))
        finally:
            db.close()

    def _commit(self, db: Conn, batch: list[_Task]) -> None:
        live = [t for t in batch if t.future.set_running_or_notify_cancel()]
        outcomes: list[tuple[_Task, Any, bool]] = []
        try:
            with db.transaction():
                if any(task.windows for task in live):
                    # Several collectors on one PostgreSQL: window rowids are handed out at insert and
                    # must become visible in that order, or a span reader whose cursor passed a rowid
                    # still being committed elsewhere would never read that window
                    # (collector.monitoring.spans). Taken first, before any task's audit lock: one order.
                    db.lock(WINDOWS_LOCK)
                for task in live:
                    db.execute("SAVEPOINT task")
                    try:
                        outcomes.append((task, task.run(db), True))
                    except Exception as exc:
                        if not db.in_transaction:
                            raise  # the error ended the whole transaction: all fail below
                        db.execute("ROLLBACK TO SAVEPOINT task")
                        outcomes.append((task, exc, False))
                    db.execute("RELEASE SAVEPOINT task")
        except Exception as exc:  # BEGIN or COMMIT failed (disk full, I/O error): nothing is stored
            log.exception("store commit failed")
            outcomes = [(t, Unavailable(f"store write failed: {exc}"), False) for t in live]
        else:
            self.counters["group_commits"] += 1  # with synchronous=FULL: one WAL fsync each
        with self._lock:
            self._depth -= sum(t.weight for t in batch)
        for task, value, ok in outcomes:
            if ok and task.windows:
                stored = sum(r.result == STORED for r in value)
                self.counters["windows_stored"] += stored
                self.counters["windows_duplicate"] += len(value) - stored
            if ok:
                task.future.set_result(value)
            else:
                task.future.set_exception(value)

    # -------------------------------------------------------- reads

    def read(self) -> Conn:
        """This thread's read-only connection (readers never block the writer: SQLite's WAL,
        PostgreSQL's MVCC). One per reading thread, kept: the gRPC and web thread pools bound them."""
        if self._closed:
            raise Unavailable("store is closed")
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self.engine.connect_reader()
            with self._lock:
                self._readers.append(db)
        return db

    def agents(self) -> list[collector_pb2.AgentState]:
        """Every agent run, oldest run first per agent; ``restarts`` counts the
        same agent's earlier runs. Totals count every window ever stored for
        the run (kept on the run's row, so rollups do not change them)."""
        return sorted((state for _, state in self.agent_rows()), key=lambda a: (a.agent_id, a.restarts))

    def agent_rows(self) -> Iterator[tuple[tuple[int, int], collector_pb2.AgentState]]:
        """``agents`` read lazily and most relevant first: each agent's latest run, then earlier runs,
        each group by last contact, newest first; so a caller that stops early (a reply budget) leaves
        out the oldest runs. Runs are never deleted, so this list only grows."""
        rows = self.read().query(
            "SELECT *, count(*) OVER (PARTITION BY agent_id ORDER BY started_ns, first_seen_ns, run_id"
            " ROWS UNBOUNDED PRECEDING) - 1 AS restarts, row_number() OVER (PARTITION BY agent_id"
            " ORDER BY started_ns DESC, first_seen_ns DESC, run_id DESC) = 1 AS latest"
            " FROM agents ORDER BY latest DESC, last_seen_ns DESC, agent_id, run_id")
        for r in rows:
            yield (r["latest"], r["last_seen_ns"]), collector_pb2.AgentState(
                agent_id=r["agent_id"], run_id=r["run_id"], host=r["host"], model_name=r["model_name"],
                model_version=r["model_version"], connected=bool(r["connected"]),
                connected_unix_nano=r["connected_ns"], last_seen_unix_nano=r["last_seen_ns"],
                last_window_end_unix_nano=r["last_window_end_ns"], windows=r["windows"], rows=r["rows"],
                dropped_rows=r["dropped_rows"], restarts=r["restarts"],
                spool=collector_pb2.SpoolStatus(**{f: r[f"spool_{f}"] for f in _SPOOL_FIELDS}),
                managed=bool(r["managed"]), desired_version=r["desired_version"], model_error=r["model_error"],
                shadow_version=r["shadow_version"], shadow_share=r["shadow_share"],
                collector_id=r["collector_id"] or "",
            )

    def model_totals(self) -> list[collector_pb2.ModelVersionTotals]:
        """Exact totals per model version over everything still stored: raw
        windows plus rollups (rollups keep exact counts; only day buckets past
        ``day_seconds`` leave the totals)."""
        sql = ("SELECT model_name, model_version, sum(n) AS windows, sum(rows) AS rows,"
               " sum(dropped_rows) AS dropped_rows, sum(errors) AS errors, max(end_ns) AS end_ns FROM ("
               " SELECT model_name, model_version, 1 AS n, rows, dropped_rows, errors, end_ns FROM windows UNION ALL"
               " SELECT model_name, model_version, windows, rows, dropped_rows, errors, end_ns FROM rollups"
               ") AS stored GROUP BY model_name, model_version ORDER BY model_name, model_version")
        try:
            rows = list(self.read().query(sql))
        except StoreValueError:  # SQLite's sum() past 64 bits (PostgreSQL sums into NUMERIC)
            # Only windows stored before ingest bounded counts can sum past int64: the totals
            # of those versions show the largest int64 rather than failing every Status call.
            log.warning("model totals overflow a 64-bit integer; showing them saturated")
            rows = [{k: min(int(v), _MAX_INT64) if isinstance(v, float) else v for k, v in r.items()}
                    for r in self.read().query(sql.replace("sum(", "total("))]  # SQLite only
        return [collector_pb2.ModelVersionTotals(
            model_name=r["model_name"], model_version=r["model_version"], windows=r["windows"], rows=r["rows"],
            dropped_rows=r["dropped_rows"], errors=r["errors"], last_window_end_unix_nano=r["end_ns"],
        ) for r in rows]

    def windows(self, model_name: str, model_version: str = "", since_ns: int = 0, limit: int = 1000,
                include_summaries: bool = False) -> list[collector_pb2.WindowInfo]:
        """Raw windows and rollup rows of a model (all versions if
        ``model_version`` is empty) ending at or after ``since_ns``, newest first."""
        limit = limit if limit > 0 else 1000
        rows = self.window_rows(model_name, model_version, since_ns, include_summaries, limit=limit)
        try:
            return [info for _, info in itertools.islice(rows, limit)]
        finally:
            rows.close()

    def window_rows(self, model_name: str, model_version: str = "", since_ns: int = 0,
                    include_summaries: bool = False, *, after: tuple[int, int, int] | None = None,
                    limit: int | None = None) -> Iterator[tuple[tuple[int, int, int], collector_pb2.WindowInfo]]:
        """``windows`` read lazily, as (sort key, WindowInfo) pairs: newest first by (end, raw before
        rollup, row id), a total order, so ``after`` (the key of the last one a caller has) continues
        exactly behind it. ``limit`` only bounds what SQLite reads ahead. One read snapshot for the
        listing and its bodies, held until the generator is exhausted or closed."""
        where = "model_name = ? AND end_ns >= ?" + (" AND model_version = ?" if model_version else "")
        params = [model_name, since_ns, *([model_version] if model_version else [])]
        scalars = "rowid AS id, model_name, model_version, start_ns, end_ns, rows, calls, dropped_rows, errors"
        ahead = NO_LIMIT if limit is None else limit + 1
        raw_after, raw_params = _after(_RAW, after)
        rollup_after, rollup_params = _after(_ROLLUP, after)
        # Each side is limited on its own (walking its covering index) before the merge;
        # bodies are read afterwards, only for the rows returned.
        db = self.read()
        with db.snapshot():
            rows = db.query(
                f"SELECT * FROM (SELECT 'raw' AS level, {_RAW} AS src, agent_id, run_id, seq, {scalars} FROM windows"
                f" WHERE {where}{raw_after} ORDER BY end_ns DESC, rowid DESC LIMIT ?) AS raw"
                f" UNION ALL SELECT * FROM (SELECT level, {_ROLLUP}, '', '', 0, {scalars} FROM rollups"
                f" WHERE {where}{rollup_after} ORDER BY end_ns DESC, rowid DESC LIMIT ?) AS rolled"
                " ORDER BY end_ns DESC, src DESC, id DESC LIMIT ?",
                [*params, *raw_params, ahead, *params, *rollup_params, ahead, ahead])
            for r in rows:
                yield (r["end_ns"], r["src"], r["id"]), self._window_info(db, r, include_summaries)

    @staticmethod
    def _window_info(db: Conn, r: dict[str, Any], include_summary: bool) -> collector_pb2.WindowInfo:
        info = collector_pb2.WindowInfo(
            agent_id=r["agent_id"], run_id=r["run_id"], seq=r["seq"], model_name=r["model_name"],
            model_version=r["model_version"], start_unix_nano=r["start_ns"], end_unix_nano=r["end_ns"],
            rows=r["rows"], calls=r["calls"], dropped_rows=r["dropped_rows"], errors=r["errors"], level=r["level"])
        if include_summary:
            table = "windows" if r["level"] == "raw" else "rollups"
            body = db.execute(f"SELECT body FROM {table} WHERE rowid = ?", [r["id"]]).fetchone()[0]
            info.summary.ParseFromString(body)
        return info

    def profile(self, model_name: str, model_version: str) -> summary_pb2.ReferenceProfile | None:
        """The model version's reference profile, or None if none is attached."""
        row = self.read().execute("SELECT body FROM profiles WHERE model_name = ? AND model_version = ?",
                                     [model_name, model_version]).fetchone()
        return summary_pb2.ReferenceProfile.FromString(row[0]) if row else None

    def profiles(self) -> list[tuple[str, str]]:
        """(model_name, model_version) of every attached profile, in order."""
        return [tuple(r) for r in self.read().execute(
            "SELECT model_name, model_version FROM profiles ORDER BY model_name, model_version")]

    # -------------------------------------------------------- shutdown

    def close(self, timeout: float = 30) -> None:
        """Refuse new work, let the writer commit everything queued, stop it,
        close every connection. Idempotent."""
        with self._lock:
            already, self._closed = self._closed, True
            if not already:
                self._queue.put(_STOP)  # after every accepted task: FIFO
        self._writer.join(timeout)
        if self._writer.is_alive():
            log.warning("store writer still busy after %.0f s; %d writes not committed", timeout, self._depth)
        with self._lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()
        self.engine.close()
