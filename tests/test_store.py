"""The store on both engines (a SQLite file, a PostgreSQL database): group commit, idempotency,
back-pressure, shutdown, schema, reads. WAL, synchronous and file-size tests are SQLite's own."""
from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import collector.store.migrations as schema_module
from agent.errors import FailedPrecondition, ResourceExhausted, Unavailable
from agent.sketches import NumericSketch
from collector.store import collectors
from collector.store.engine import StoreUnavailable, StoreValueError, open_engine
from collector.store.rollup import NS, RetentionPolicy
from collector.store.store import DUPLICATE, STORED, Store, WindowResult
from protos import collector_pb2, summary_pb2

T0 = 1_800_000_000 * NS - (1_800_000_000 * NS) % (86400 * NS)
_X = NumericSketch()
_X.update(np.random.default_rng(0).normal(size=20))
X_COLUMN = _X.to_proto("x", summary_pb2.ColumnSummary.FEATURE, "X")


def window(agent: str = "a", run: str = "r", seq: int = 0, *, version: str = "1", start: int = T0,
           seconds: int = 10, rows: int = 20, dropped: int = 0, errors: int = 0) -> summary_pb2.WindowSummary:
    w = summary_pb2.WindowSummary(
        agent_id=agent, run_id=run, seq=seq, model_name="m", model_version=version,
        start_unix_nano=start, end_unix_nano=start + seconds * NS, rows=rows, calls=2,
        dropped_rows=dropped, errors=errors)
    w.columns.append(X_COLUMN)
    return w


def count_rows(db: Path | str, table: str = "windows") -> int:
    """Through a connection of its own: sees only what is committed."""
    engine = open_engine(db)
    try:
        conn = engine.connect()
        try:
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        finally:
            conn.close()
    finally:
        engine.close()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """A SQLite file, for the tests about SQLite itself."""
    return tmp_path / "outrider.db"


@pytest.fixture
def db(db_url: str) -> str:
    """Either engine: a SQLite path, then a PostgreSQL URL."""
    return db_url


@pytest.fixture
def store(db: str):
    s = Store(db)
    yield s
    s.close()


class WriteLock:
    """Another connection keeping the writer from storing windows until released: SQLite's write lock
    (the writer's next BEGIN IMMEDIATE waits), on PostgreSQL a lock on the windows table (its next
    INSERT waits)."""

    def __init__(self, db: Path | str) -> None:
        self.engine = open_engine(db)
        self.conn = self.engine.connect()
        if self.conn.dialect.name == "sqlite":
            self.conn.execute("BEGIN IMMEDIATE")
        else:
            self.conn.execute("BEGIN")
            self.conn.execute("LOCK TABLE windows IN EXCLUSIVE MODE")

    def release(self) -> None:
        self.conn.execute("COMMIT")
        self.conn.close()
        self.engine.close()


def test_wal_and_every_migration_once(path: Path) -> None:
    Store(path).close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT id, name FROM migrations").fetchall() == \
            [(i, fn.__name__) for i, fn in enumerate(schema_module.MIGRATIONS, 1)]


def test_open_errors_surface_in_the_constructor(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="unable to open"):
        Store(tmp_path / "no-such-dir" / "x.db")
    with pytest.raises(ValueError, match="synchronous"):
        Store(tmp_path / "x.db", synchronous="SOMETIMES")


def test_acks_are_durable_by_default_and_normal_is_a_choice(path: Path) -> None:
    """FULL (2) fsyncs the WAL at every commit: an ack means on disk (tests/test_durability.py)."""
    with Store(path) as store:
        assert store.write(lambda db: db.execute("PRAGMA synchronous").fetchone()[0]) == 2  # FULL
    with Store(path, synchronous="normal") as store:
        assert store.write(lambda db: db.execute("PRAGMA synchronous").fetchone()[0]) == 1  # NORMAL


def test_concurrent_submitters_all_resolve_with_exact_counts(db: Path, store: Store) -> None:
    threads, batches, per_batch = 8, 40, 10

    def submit(t: int) -> list[Future]:
        return [store.submit_windows([window(f"agent{t}", "r", b * per_batch + i, rows=t + 1)
                                      for i in range(per_batch)]) for b in range(batches)]

    with ThreadPoolExecutor(threads) as pool:
        futures = [f for fs in pool.map(submit, range(threads)) for f in fs]
    results = [r for f in futures for r in f.result(timeout=60)]
    assert len(results) == threads * batches * per_batch
    assert all(r.result == STORED for r in results)
    assert count_rows(db) == len(results)
    counters = dict(store.counters)
    assert 1 <= counters.pop("group_commits") <= threads * batches
    assert counters == {"windows_stored": len(results), "windows_duplicate": 0, "rollup_buckets_skipped": 0}
    assert store.queue_depth() == 0
    by_agent = {a.agent_id: a for a in store.agents()}
    assert {a: (s.windows, s.rows) for a, s in by_agent.items()} == {
        f"agent{t}": (batches * per_batch, batches * per_batch * (t + 1)) for t in range(threads)}


def test_a_resend_is_duplicate_and_stored_once(db: Path, store: Store) -> None:
    first = store.submit_windows([window(seq=0), window(seq=1)]).result()
    assert first == [WindowResult("r", 0, STORED), WindowResult("r", 1, STORED)]
    again = store.submit_windows([window(seq=1), window(seq=2), window(seq=2)]).result()
    assert [r.result for r in again] == [DUPLICATE, STORED, DUPLICATE]
    assert count_rows(db) == 3
    assert store.counters == {"windows_stored": 3, "windows_duplicate": 2, "rollup_buckets_skipped": 0,
                              "group_commits": 2}
    assert store.agents()[0].windows == 3  # a resend does not count twice
    # Same seq under another run or agent is another window.
    assert [r.result for r in store.submit_windows([window(run="r2", seq=1), window("b", seq=1)]).result()] \
        == [STORED, STORED]


def test_ack_resolves_only_after_commit(db: Path, store: Store) -> None:
    seen: list[bool] = []
    engine = open_engine(db)

    def check(future: Future) -> None:
        # Runs the moment the future resolves; a fresh connection sees only committed rows.
        keys = [(r.run_id, r.seq) for r in future.result()]
        conn = engine.connect()
        try:
            seen.extend(conn.execute("SELECT 1 FROM windows WHERE run_id = ? AND seq = ?", k).fetchone()
                        is not None for k in keys)
        finally:
            conn.close()

    def submit(t: int) -> None:
        for seq in range(50):
            store.submit_windows([window(run=f"r{t}", seq=seq)]).add_done_callback(check)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(submit, range(4)))
    store.close()
    engine.close()
    assert len(seen) == 200 and all(seen)


def test_full_queue_raises_resource_exhausted(db: Path) -> None:
    store = Store(db, queue_max=10)
    lock = WriteLock(db)
    try:
        held = store.submit_windows([window(seq=i) for i in range(6)])
        queued = store.submit_windows([window(seq=i) for i in range(6, 10)])
        assert store.queue_depth() == 10
        with pytest.raises(ResourceExhausted, match="write queue full"):
            store.submit_windows([window(seq=10)])
    finally:
        lock.release()
    assert len(held.result(timeout=30)) == 6 and len(queued.result(timeout=30)) == 4
    assert store.submit_windows([window(seq=10)]).result()[0].result == STORED  # room again
    store.close()


def test_close_drains_the_queue_then_refuses(db: Path) -> None:
    store = Store(db, batch_max=3)
    lock = WriteLock(db)
    futures = [store.submit_windows([window(seq=b * 5 + i) for i in range(5)]) for b in range(20)]
    closer = threading.Thread(target=store.close)
    closer.start()
    lock.release()
    closer.join(timeout=60)
    assert all(f.done() for f in futures)
    assert sum(len(f.result()) for f in futures) == 100 == count_rows(db)
    with pytest.raises(Unavailable):
        store.submit_windows([window(seq=500)])
    with pytest.raises(Unavailable):
        store.agents()
    store.close()  # idempotent


def test_one_failing_write_does_not_fail_its_group(db: Path, store: Store) -> None:
    lock = WriteLock(db)  # queue all three, so they share one transaction
    good = store.submit_windows([window(seq=1)])
    bad = store.submit_windows([window(seq=2), window(seq=2**63)])  # beyond a 64-bit integer column
    good2 = store.submit_windows([window(seq=3)])
    lock.release()
    assert good.result()[0].result == STORED and good2.result()[0].result == STORED
    with pytest.raises(StoreValueError):
        bad.result()
    assert count_rows(db) == 2  # the bad batch left nothing behind, not even seq 2


def migrations_applied(db: Path | str) -> list[tuple]:
    engine = open_engine(db)
    conn = engine.connect()
    try:
        return conn.execute("SELECT id, name, applied_at FROM migrations ORDER BY id").fetchall()
    finally:
        conn.close()
        engine.close()


def test_reopen_keeps_data_and_skips_applied_migrations(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = db
    with Store(path) as store:
        store.submit_windows([window(seq=0)]).result()
    applied = migrations_applied(path)

    def must_not_run(db) -> None:
        raise AssertionError("an applied migration ran twice")

    def add_notes(db) -> None:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")

    known = len(applied)
    monkeypatch.setattr(schema_module, "MIGRATIONS", [must_not_run] * known + [add_notes])
    with Store(path) as store:
        assert count_rows(path) == 1 and store.model_totals()[0].windows == 1
    rows = migrations_applied(path)
    assert rows[:known] == applied and rows[known][:2] == (known + 1, "add_notes")
    monkeypatch.setattr(schema_module, "MIGRATIONS", [must_not_run] * known)
    with pytest.raises(FailedPrecondition, match=f"migration {known + 1}"):
        Store(path)  # a newer collector's database


def test_agents_runs_restarts_and_spool(store: Store) -> None:
    def hello(agent: str, run: str, started: int) -> collector_pb2.Hello:
        return collector_pb2.Hello(agent_id=agent, run_id=run, host="h1", model_name="m", model_version="1",
                                   started_unix_nano=started, spool=collector_pb2.SpoolStatus(windows=7),
                                   inputs=[collector_pb2.TensorInfo(name="X", type="tensor(float)", shape=[-1, 20])])

    store.submit_windows([window("a", "r1", 0, start=T0 - 50 * NS)]).result()  # before its Hello
    store.record_hello(hello("a", "r1", T0 - 100 * NS), now_ns=T0)
    store.record_hello(hello("a", "r2", T0 + 100 * NS), now_ns=T0 + 100 * NS)
    store.record_hello(hello("a", "r3", T0 + 200 * NS), now_ns=T0 + 200 * NS)
    store.record_hello(hello("b", "x", T0 + 150 * NS), now_ns=T0 + 150 * NS)
    store.submit_windows([window("a", "r2", i, start=T0 + (110 + 10 * i) * NS, rows=5, dropped=1, errors=1)
                          for i in range(3)]).result()
    store.record_spool("a", "r3", collector_pb2.SpoolStatus(windows=2, bytes=300, dropped_windows=1,
                                                            dropped_rows=40, rejected_windows=3), T0 + 210 * NS)
    # The stream ends (collector.api.fleet, on the collector that held it; '' before any hello there)
    store.write(lambda db: collectors.stream_closed(db, "a", "r1", "", T0 + 90 * NS))
    store.write(lambda db: collectors.stream_closed(db, "nobody", "x", "", T0))  # ignored

    states = {(s.agent_id, s.run_id): s for s in store.agents()}
    assert {k: s.restarts for k, s in states.items()} == {("a", "r1"): 0, ("a", "r2"): 1, ("a", "r3"): 2,
                                                          ("b", "x"): 0}
    r1, r2, r3 = states["a", "r1"], states["a", "r2"], states["a", "r3"]
    assert (r1.connected, r1.last_seen_unix_nano, r1.connected_unix_nano) == (False, T0 + 90 * NS, T0)
    assert (r1.windows, r1.rows, r1.host) == (1, 20, "h1")  # the Hello kept the window's totals
    assert (r2.windows, r2.rows, r2.dropped_rows, r2.last_window_end_unix_nano) == (3, 15, 3, T0 + 140 * NS)
    assert r3.connected and r3.last_seen_unix_nano == T0 + 210 * NS
    assert r3.spool == collector_pb2.SpoolStatus(windows=2, bytes=300, dropped_windows=1, dropped_rows=40,
                                                 rejected_windows=3)
    assert r2.spool.windows == 7  # from its Hello


def test_model_totals_are_exact_across_rollups(store: Store) -> None:
    rng = np.random.default_rng(11)
    windows = [window(f"a{i % 4}", "r", i, version=str(i % 3), start=T0 + i * 30 * NS,
                      rows=int(rng.integers(0, 10_000)), dropped=int(rng.integers(0, 50)),
                      errors=int(rng.integers(0, 5))) for i in range(2000)]  # ~17 hours
    store.submit_windows(windows).result()
    expected = {}
    for v in "012":
        mine = [w for w in windows if w.model_version == v]
        expected[v] = (len(mine), sum(w.rows for w in mine), sum(w.dropped_rows for w in mine),
                       sum(w.errors for w in mine), max(w.end_unix_nano for w in mine))

    def totals() -> dict:
        return {t.model_version: (t.windows, t.rows, t.dropped_rows, t.errors, t.last_window_end_unix_nano)
                for t in store.model_totals()}

    assert totals() == expected
    policy = RetentionPolicy(raw_seconds=600, minute_seconds=3600, hour_seconds=6 * 3600)
    for hour in range(1, 48, 3):
        store.rollup(T0 + hour * 3600 * NS, policy)
        assert totals() == expected
    assert {w.level for w in store.windows("m", limit=10_000)} == {"day"}
    assert sum(a.windows for a in store.agents()) == 2000  # per-run totals are not touched by rollups


def test_windows_listing_since_limit_version_and_levels(store: Store) -> None:
    store.submit_windows([window("a", "r", i, version=str(i % 2), start=T0 + i * 10 * NS) for i in range(100)]
                         ).result()
    newest = store.windows("m", limit=5)
    assert [w.seq for w in newest] == [99, 98, 97, 96, 95] and {w.level for w in newest} == {"raw"}
    assert not newest[0].HasField("summary")
    since = store.windows("m", since_ns=T0 + 900 * NS)  # windows ending at or after
    assert [w.seq for w in since] == list(range(99, 88, -1))
    odd = store.windows("m", model_version="1", since_ns=T0 + 900 * NS)
    assert [w.seq for w in odd] == [99, 97, 95, 93, 91, 89]
    full = store.windows("m", limit=1, include_summaries=True)[0]
    assert full.summary.seq == 99 and full.summary.columns[0].name == "x"
    assert store.windows("other") == [] and len(store.windows("m", limit=0)) == 100

    store.rollup(T0 + 1200 * NS, RetentionPolicy(raw_seconds=600))  # windows ending by T0+600s roll up
    listed = store.windows("m", limit=1000, include_summaries=True)
    rolled = [w for w in listed if w.level == "minute"]
    assert [w.level for w in listed[:40]] == ["raw"] * 40
    assert len(listed) == 40 + len(rolled) and len(rolled) == 20  # 10 minutes x 2 versions
    assert [w.end_unix_nano for w in listed] == sorted((w.end_unix_nano for w in listed), reverse=True)
    assert rolled[0].agent_id == "" and rolled[0].summary.rows == rolled[0].rows == 60
    assert sum(w.rows for w in listed) == 100 * 20


def db_bytes(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA page_count").fetchone()[0] * conn.execute("PRAGMA page_size").fetchone()[0]


def test_file_stops_growing_once_retention_is_reached(path: Path) -> None:
    """Two agents, one window a minute each, rollups every minute, 3.5 simulated
    days against a retention of about 2 days: the file plateaus."""
    policy = RetentionPolicy(raw_seconds=120, minute_seconds=600, hour_seconds=7200, day_seconds=86400)
    horizon_step, steps = int(2.25 * 1440), int(3.5 * 1440)
    sizes, live = {}, []
    with Store(path) as store:
        for step in range(steps):
            start = T0 + step * 60 * NS
            store.submit_windows([window(a, "r", step, start=start, seconds=60) for a in ("a", "b")]).result()
            store.rollup(start + 60 * NS, policy)
            if step in (horizon_step, steps - 1) or step % 360 == 0:
                sizes[step] = db_bytes(path)
                live.append(count_rows(path) + count_rows(path, "rollups"))
        assert store.model_totals()[0].windows < 2 * 3 * 1440  # the oldest days are gone
    assert sizes[steps - 1] <= 1.2 * sizes[horizon_step]
    assert max(live[len(live) // 2:]) < 60  # rows in the database stay bounded
