"""Rollups: merging windows keeps every count exactly and every sketch within its error."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.sketches import CategoricalSketch, NumericSketch, from_proto
from collector.store.engine import open_engine
from collector.store.rollup import NS, OTHER_CLASS, PerformanceTotals, RetentionPolicy, merge_windows
from collector.store.store import Store
from protos import summary_pb2

FEATURE = summary_pb2.ColumnSummary.FEATURE
T0 = 1_800_000_000 * NS - (1_800_000_000 * NS) % (86400 * NS)  # a UTC midnight
TOTALS = ("windows", "rows", "dropped_rows", "errors")


def make_window(rng: np.random.Generator, *, agent: str = "a", run: str = "r", seq: int = 0,
                version: str = "1", start: int = T0, seconds: int = 10, rows: int = 50,
                shift: float = 0.0) -> tuple[summary_pb2.WindowSummary, np.ndarray, list[str]]:
    """A window of ``rows`` rows: numeric ``x`` (with a NaN), categorical ``city``, latency.
    Also returns the raw values so tests can build the exact reference."""
    x = rng.normal(shift, 1.0, rows)
    x[0] = np.nan
    cities = [str(c) for c in rng.choice(["ams", "ber", "cph", "dub", ""], rows, p=[.4, .3, .15, .1, .05])]
    num, cat, lat = NumericSketch(), CategoricalSketch(), NumericSketch()
    num.update(x)
    cat.update(np.array(cities, dtype=object))
    lat.update(rng.exponential(100.0, 5))
    w = summary_pb2.WindowSummary(
        agent_id=agent, run_id=run, seq=seq, model_name="m", model_version=version, model_sha256="ab",
        start_unix_nano=start, end_unix_nano=start + seconds * NS, rows=rows, calls=5,
        dropped_rows=int(rng.integers(0, 3)), errors=int(rng.integers(0, 2)))
    w.latency.CopyFrom(lat.to_proto("latency_us", 0, ""))
    w.columns.extend([num.to_proto("x", FEATURE, "X"), cat.to_proto("city", FEATURE, "city")])
    return w, x, cities


def column(w: summary_pb2.WindowSummary, name: str):
    return from_proto(next(c for c in w.columns if c.name == name))


def assert_close_numeric(got: NumericSketch, want: NumericSketch) -> None:
    assert (got.count, got.missing, got.infinite) == (want.count, want.missing, want.infinite)
    assert got.mean == pytest.approx(want.mean, rel=1e-9, abs=1e-12)
    assert got.m2 == pytest.approx(want.m2, rel=1e-9)
    assert (got.min, got.max) == (want.min, want.max)
    qs = np.linspace(0.05, 0.95, 19)
    # Both are KLLs of the same values: their CDFs agree within the two rank errors.
    tol = got.rank_error() + want.rank_error()
    assert np.max(np.abs(want.cdf(got.quantiles(qs)) - qs)) <= tol


def test_merge_windows_sums_counts_and_merges_columns_by_name() -> None:
    rng = np.random.default_rng(1)
    parts = [make_window(rng, seq=i, start=T0 + i * 10 * NS, shift=i * 0.1) for i in range(30)]
    extra = NumericSketch()
    extra.update(np.array([1.0, 2.0]))
    parts[3][0].columns.append(extra.to_proto("only_here", FEATURE, "Y"))
    windows = [p[0] for p in parts]
    random.Random(2).shuffle(windows)  # order does not matter
    merged = merge_windows(windows)

    assert (merged.agent_id, merged.run_id, merged.seq) == ("", "", 0)
    assert (merged.model_name, merged.model_version, merged.model_sha256) == ("m", "1", "ab")
    assert merged.start_unix_nano == T0 and merged.end_unix_nano == T0 + 300 * NS
    for field in ("rows", "calls", "dropped_rows", "errors"):
        assert getattr(merged, field) == sum(getattr(w, field) for w in windows)
    assert [c.name for c in merged.columns][:2] in (["x", "city"], ["city", "x"])
    assert column(merged, "only_here").count == 2

    exact = NumericSketch()
    exact.update(np.concatenate([p[1] for p in parts]))
    assert_close_numeric(column(merged, "x"), exact)
    cities = [c for p in parts for c in p[2]]
    city = column(merged, "city")
    assert (city.count, city.missing) == (len(cities), cities.count(""))
    assert dict(city.frequent_items()) == {c: cities.count(c) for c in {"ams", "ber", "cph", "dub"}}
    assert from_proto(merged.latency).count == 5 * len(windows)


def test_merge_windows_blanks_identity_that_differs_and_needs_input() -> None:
    rng = np.random.default_rng(3)
    a, b = make_window(rng)[0], make_window(rng, version="2")[0]
    assert merge_windows([a, b]).model_version == ""
    with pytest.raises(ValueError):
        merge_windows([])


def test_retention_policy_rejects_nonpositive_ages() -> None:
    with pytest.raises(ValueError, match="raw_seconds"):
        RetentionPolicy(raw_seconds=0)


def totals(store: Store) -> dict[str, tuple]:
    return {t.model_version: tuple(getattr(t, f) for f in TOTALS) for t in store.model_totals()}


def sql(db: Path | str, statement: str, params: list | tuple = ()) -> list[tuple]:
    """One statement through a connection of its own (either engine), committed."""
    engine = open_engine(db)
    conn = engine.connect()
    try:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description is not None else []
    finally:
        conn.close()
        engine.close()


def stored_bodies(path: Path | str) -> list[tuple[str, summary_pb2.WindowSummary]]:
    rows = sql(path, "SELECT 'raw', body FROM windows UNION ALL SELECT level, body FROM rollups")
    return [(level, summary_pb2.WindowSummary.FromString(body)) for level, body in rows]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    spans=st.lists(st.tuples(st.integers(0, 3 * 86400), st.sampled_from(["1", "2"]), st.integers(0, 1000)),
                   min_size=1, max_size=40),
    steps=st.lists(st.integers(1, 2 * 86400), min_size=1, max_size=5),
)
def test_totals_survive_every_level(tmp_path_factory: pytest.TempPathFactory, db_url: str, spans: list,
                                    steps: list) -> None:
    """Windows at random times, rolled up at random moments: the exact totals never change."""
    fresh = db_url.startswith("postgresql://")  # one database for every example: emptied first
    path = db_url if fresh else tmp_path_factory.mktemp("db") / "s.db"
    policy = RetentionPolicy(raw_seconds=60, minute_seconds=3600, hour_seconds=2 * 86400, day_seconds=10 * 86400)
    template = make_window(np.random.default_rng(0))[0]
    with Store(path) as store:
        if fresh:
            store.write(lambda db: [db.execute(f"DELETE FROM {t}") for t in ("windows", "rollups", "agents")])
        windows = []
        for seq, (offset, version, rows) in enumerate(spans):
            w = summary_pb2.WindowSummary()
            w.CopyFrom(template)
            w.seq, w.model_version, w.rows = seq, version, rows
            w.start_unix_nano, w.end_unix_nano = T0 + offset * NS, T0 + (offset + 10) * NS
            windows.append(w)
        store.submit_windows(windows).result()
        before = totals(store)
        now = T0
        for step in steps:
            now += step * NS
            store.rollup(now, policy)
            assert totals(store) == before
        store.rollup(T0 + 6 * 86400 * NS, policy)
        assert totals(store) == before
        # Everything has reached the day level by now.
        assert {level for level, _ in stored_bodies(path)} == {"day"}


def test_rolled_up_sketches_equal_the_merge_of_all_sources(db_url: str) -> None:
    rng = np.random.default_rng(7)
    sources = [make_window(rng, agent=f"a{i % 3}", seq=i, start=T0 + i * 97 * NS, shift=(i % 50) / 25)
               for i in range(600)]  # ~16 hours of windows from three agents
    windows = [s[0] for s in sources]
    policy = RetentionPolicy(raw_seconds=60, minute_seconds=600, hour_seconds=3600, day_seconds=30 * 86400)
    store = Store(db_url)
    try:
        for i in range(0, len(windows), 50):
            store.submit_windows(windows[i:i + 50]).result()
        for hours in range(1, 30):  # hourly passes carry data through minute, hour and day buckets
            store.rollup(T0 + hours * 3600 * NS, policy)
        levels = [level for level, _ in stored_bodies(db_url)]
        assert set(levels) == {"day"} and len(levels) == 1
        (_, day), = stored_bodies(db_url)
    finally:
        store.close()
    flat = merge_windows(windows)
    for field in ("rows", "calls", "dropped_rows", "errors", "start_unix_nano", "end_unix_nano"):
        assert getattr(day, field) == getattr(flat, field)
    assert_close_numeric(column(day, "x"), column(flat, "x"))
    assert_close_numeric(from_proto(day.latency), from_proto(flat.latency))
    exact = NumericSketch()
    exact.update(np.concatenate([s[1] for s in sources]))
    assert_close_numeric(column(day, "x"), exact)
    got, want = column(day, "city"), column(flat, "city")
    assert (got.count, got.missing) == (want.count, want.missing)
    assert dict(got.frequent_items()) == dict(want.frequent_items())
    assert got.distinct_estimate() == pytest.approx(4, abs=0.5)


def test_late_window_merges_into_the_existing_bucket(db_url: str) -> None:
    rng = np.random.default_rng(5)
    policy = RetentionPolicy(raw_seconds=60)
    with Store(db_url) as store:
        store.submit_windows([make_window(rng, seq=0, start=T0)[0]]).result()
        assert store.rollup(T0 + 3600 * NS, policy)["raw_merged"] == 1
        late = make_window(rng, seq=1, start=T0 + 20 * NS)[0]  # same minute, arrives after its rollup
        store.submit_windows([late]).result()
        assert store.rollup(T0 + 3600 * NS, policy)["raw_merged"] == 1
        listed = store.windows("m", include_summaries=True)
        assert [(w.level, w.rows) for w in listed] == [("minute", 100)]
        assert column(listed[0].summary, "x").count == 100
        assert store.model_totals()[0].windows == 2


def test_day_buckets_are_deleted_after_day_seconds(db_url: str) -> None:
    rng = np.random.default_rng(6)
    policy = RetentionPolicy(raw_seconds=60, minute_seconds=60, hour_seconds=60, day_seconds=86400)
    with Store(db_url) as store:
        store.submit_windows([make_window(rng, seq=i, start=T0 + i * 3600 * NS)[0] for i in range(3)]).result()
        counts = store.rollup(T0 + 86400 * NS, policy)
        assert counts == {"raw_merged": 3, "minute_merged": 3, "hour_merged": 3, "day_deleted": 0,
                          "buckets_skipped": 0}
        assert store.rollup(T0 + 2 * 86400 * NS, policy)["day_deleted"] == 1
        assert store.model_totals() == [] and store.windows("m") == []


# ------------------------------------------------------------------ poisoned rows


def insert_raw(path: Path | str, w: summary_pb2.WindowSummary, body: bytes | None = None, **scalars) -> None:
    """A row put straight into the database, as an older collector (that checked less) could have stored it."""
    row = {**dict(rows=w.rows, calls=w.calls, dropped_rows=w.dropped_rows, errors=w.errors), **scalars}
    sql(path, "INSERT INTO windows (agent_id, run_id, seq, model_name, model_version, start_ns, end_ns,"
              " rows, calls, dropped_rows, errors, body) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        [w.agent_id, w.run_id, w.seq, w.model_name, w.model_version, w.start_unix_nano,
         w.end_unix_nano, row["rows"], row["calls"], row["dropped_rows"], row["errors"],
         w.SerializeToString() if body is None else body])


def poisoned(rng: np.random.Generator, model: str, seq: int, kind: str) -> tuple[summary_pb2.WindowSummary, dict]:
    w, _, _ = make_window(rng, agent="old", seq=seq, start=T0 + seq * 10 * NS)
    w.model_name = model
    scalars: dict = {}
    if kind == "labeled":  # issue 10: two of these made every later pass fail with "Value out of range"
        w.performance.labeled = 2**64 - 1
    elif kind == "categorical count":  # a frequent-items weight of 2**63, forged consistently
        cat = CategoricalSketch()
        cat.update(np.array(["a"], dtype=object))
        column = cat.to_proto("city", FEATURE, "city")
        column.count, column.missing = 2**63, 2**63 - 1
        del w.columns[:]
        w.columns.append(column)
    elif kind == "rows":  # the window table's own counts sum past int64
        scalars["rows"] = 2**62 + 1
    return w, scalars


@pytest.mark.parametrize("kind", ["labeled", "categorical count", "rows", "garbage body"])
def test_a_poisoned_bucket_is_skipped_and_never_stops_another_models_rollup(db_url: str, kind: str,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(11)
    path = db_url
    policy = RetentionPolicy(raw_seconds=60, minute_seconds=60, hour_seconds=60, day_seconds=86400)
    with Store(path) as store:
        good = [make_window(rng, seq=i, start=T0 + i * 10 * NS)[0] for i in range(6)]
        store.submit_windows(good).result()
        for seq in range(2):
            w, scalars = poisoned(rng, "poison", seq, kind)
            insert_raw(path, w, b"\xff\x00garbage" if kind == "garbage body" else None, **scalars)
        before = totals(store)
        with caplog.at_level("WARNING", logger="collector.store.rollup"):
            counts = store.rollup(T0 + 3 * 3600 * NS, policy)
            again = store.rollup(T0 + 4 * 3600 * NS, policy)
        assert counts["raw_merged"] == 6 and counts["buckets_skipped"] == 1
        assert again["buckets_skipped"] == 1 and store.counters["rollup_buckets_skipped"] == 2
        failures = [r for r in caplog.records if "poison" in r.getMessage()]
        assert len(failures) == 1, "logged once, not at every pass"
        assert "rollup of 2 raw row(s) of poison version 1" in failures[0].getMessage()
        levels = {(w.model_name, level) for level, w in stored_bodies(path)} if kind != "garbage body" else None
        if levels is not None:
            assert levels == {("m", "day"), ("poison", "raw")}  # the good model went all the way up
        assert sql(path, "SELECT count(*) FROM windows WHERE model_name = 'poison'") == [(2,)]
        if kind != "rows":
            assert totals(store) == before  # exact totals of both models are untouched
        # the good model's day bucket is still deleted in its time: retention goes on
        assert store.rollup(T0 + 2 * 86400 * NS, policy)["day_deleted"] == 1
        assert [t.model_name for t in store.model_totals()] == ["poison"]


def test_merged_confusion_matrices_keep_a_bounded_number_of_classes() -> None:
    totals_ = PerformanceTotals(max_classes=4)
    totals_.add(summary_pb2.Performance(labeled=3, classes=["a", "b"], confusion=[1, 1, 0, 1]))
    totals_.add(summary_pb2.Performance(labeled=4, classes=["c", "d", "e"], confusion=[1, 0, 0, 0, 1, 1, 0, 0, 1]))
    out = totals_.to_proto()
    assert list(out.classes) == ["a", "b", "c", OTHER_CLASS]
    assert sum(out.confusion) == out.labeled == 7
    matrix = np.array(out.confusion).reshape(4, 4)
    assert matrix[2, 2] == 1 and matrix[3, 3] == 3  # d->e and the diagonals of d and e are 'other'
