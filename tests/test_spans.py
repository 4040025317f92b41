"""The spans' summaries kept in memory (collector.monitoring.spans) against the oracle that reads every window again.

Every scenario stores windows in a real SQLite store, moves a clock, and after every step compares the
cache's answer (and a whole drift evaluation through it) with ``read_uncached``. Windows carry few rows,
so no KLL compacts (it keeps every value, in any merge order) and the statistics must agree exactly;
moments are float sums merged in another order, so they agree to rounding.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

from agent import sketches
from collector.base.ingest import validate_window
from collector.monitoring import alerts
from collector.monitoring import spans as spans_module
from collector.monitoring.drift import DriftConfig
from collector.monitoring.evaluation import DriftEvaluator
from collector.monitoring.spans import SpanCache, bucket_width, read_uncached, span_starts
from collector.store.rollup import RetentionPolicy
from collector.store.store import Store
from protos import summary_pb2

CS = summary_pb2.ColumnSummary
S = 1_000_000_000
T0 = 1_800_000_000 * S + 17 * S  # not on a minute: spans start on whole buckets anyway
CITIES = np.array(["paris", "lyon", "nice", "oslo"])


def window(rng: np.random.Generator, agent: str, seq: int, end_ns: int, rows: int, shift: float = 0.0,
           length_ns: int = 10 * S) -> summary_pb2.WindowSummary:
    x, z, city = sketches.NumericSketch(), sketches.NumericSketch(), sketches.CategoricalSketch()
    x.update(rng.normal(shift, 1.0, rows))
    z.update(rng.integers(0, 4, rows).astype(np.float64))
    city.update(rng.choice(CITIES, rows))
    right = int(rng.integers(0, rows + 1))
    return summary_pb2.WindowSummary(
        agent_id=agent, run_id="r", seq=seq, model_name="m", model_version="1", start_unix_nano=end_ns - length_ns,
        end_unix_nano=end_ns, rows=rows, calls=rows, dropped_rows=int(rng.integers(0, 2)), errors=0,
        columns=[x.to_proto("x", CS.FEATURE, "X"), z.to_proto("z", CS.FEATURE, "X"),
                 city.to_proto("city", CS.FEATURE, "c")],
        performance=summary_pb2.Performance(labeled=rows, classes=["0", "1"],
                                            confusion=[right, 0, rows - right, 0]))


def profile(rng: np.random.Generator, shift: float = 0.0, sha: str = "ab") -> summary_pb2.ReferenceProfile:
    big = window(rng, "ref", 0, T0, 5000, shift)
    return summary_pb2.ReferenceProfile(model_name="m", rows=5000, data_sha256=sha * 32, columns=big.columns)


def same_sketch(a, b) -> None:
    assert type(a) is type(b)
    assert (a.count, a.missing) == (b.count, b.missing)
    if isinstance(a, sketches.NumericSketch):
        assert a.infinite == b.infinite and a.exact_overflow == b.exact_overflow
        assert a.mean == pytest.approx(b.mean, rel=1e-9, abs=1e-12)
        assert a.m2 == pytest.approx(b.m2, rel=1e-9, abs=1e-9)
        assert (a.min, a.max) == (b.min, b.max) or (math.isnan(a.min) and math.isnan(b.min))
        for x, y in zip(a.sorted_view(), b.sorted_view()):
            np.testing.assert_array_equal(x, y)
        if a.exact_counts is not None:
            np.testing.assert_array_equal(a.exact_counts[0], b.exact_counts[0])
            np.testing.assert_array_equal(a.exact_counts[1], b.exact_counts[1])
    else:
        assert a.frequent_items() == b.frequent_items()
        assert a.distinct_estimate() == b.distinct_estimate()


def same_spans(got, want) -> None:
    assert [g is None for g in got] == [w is None for w in want]
    for g, w in zip(got, want):
        if g is None:
            continue
        for field in ("rows", "calls", "dropped_rows", "errors", "start_unix_nano", "end_unix_nano"):
            assert getattr(g.summary, field) == getattr(w.summary, field), field
        assert g.summary.performance == w.summary.performance
        assert sorted(g.columns) == sorted(w.columns)
        for name in g.columns:
            same_sketch(g.columns[name], w.columns[name])


def same_evaluation(got, want) -> None:
    for field in ("rows", "window_start_unix_nano", "window_end_unix_nano", "evaluated", "not_compared", "reason"):
        assert getattr(got, field) == getattr(want, field), field
    for field in ("accuracy", "mae"):
        assert getattr(got, field) == pytest.approx(getattr(want, field), nan_ok=True)
    assert [c.name for c in got.columns] == [c.name for c in want.columns]
    for g, w in zip(got.columns, want.columns):
        for f in g.DESCRIPTOR.fields:
            a, b = getattr(g, f.name), getattr(w, f.name)
            if isinstance(a, float):
                assert a == pytest.approx(b, rel=1e-9, abs=1e-12, nan_ok=True), (g.name, f.name)
            else:
                assert a == b, (g.name, f.name)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


class Uncached:
    """The oracle in SpanCache's place, for a whole DriftEvaluator."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def read(self, name, version, now, spans):
        return read_uncached(self.store, name, version, now, spans)

    def forget(self, keep) -> None:
        pass


class IngestStore(Store):
    """A store whose ``submit_windows`` takes the collector's ingest path (``collector.api.streams``):
    each window validated (which parses its sketches), stored, then offered to ``cache`` with its
    rowid. ``ingest``: "read" offers nothing (windows stored by another process: the evaluation
    reads them); "offered" offers every window at once; "mixed" offers some at once, some only at
    the next store (often after an evaluation has read them: a late offer) and some never."""

    def __init__(self, path, clock: Clock, ingest: str) -> None:
        super().__init__(path)
        self.clock, self.ingest, self.cache = clock, ingest, None
        self.rng = np.random.default_rng(99)
        self.deferred: list = []

    def submit_windows(self, windows, rowids=None):
        parsed = [validate_window(w, now_ns=self.clock.now) for w in windows]
        ids: list[int] = []
        generation = self.rollup_generation
        future = super().submit_windows(windows, ids)
        future.result()
        if rowids is not None:
            rowids.extend(ids)
        stored = [(rowid, w, p) for rowid, w, p in zip(ids, windows, parsed) if rowid]
        if self.ingest != "read" and self.cache is not None:
            late, self.deferred = self.deferred, []
            now: list = []
            for item in stored:
                pick = 0 if self.ingest == "offered" else int(self.rng.integers(0, 3))
                (now, self.deferred, [])[pick].append(item)
            for offer, gen in late:
                self.cache.offer(offer, gen)
            self.cache.offer(now, generation)
            self.deferred = [(self.deferred, generation)] if self.deferred else []
        return future


@pytest.fixture(params=["read", "offered", "mixed"])
def world(request, db_url):
    clock = Clock()
    store = IngestStore(db_url, clock, request.param)
    cached = DriftEvaluator(store, clock=clock)
    store.cache = cached.spans
    oracle = DriftEvaluator(store, clock=clock)
    oracle.spans = Uncached(store)
    yield store, clock, cached, oracle
    store.close()


def configure(store: Store, **fields) -> DriftConfig:
    config = DriftConfig(min_rows=20, **fields)
    store.write(lambda db: alerts.set_config(db, "m", config, "test", 0))
    return config


def check(store: Store, clock: Clock, cached: DriftEvaluator, oracle: DriftEvaluator, config: DriftConfig):
    spans = config.spans()
    same_spans(cached.spans.read("m", "1", clock.now, spans), read_uncached(store, "m", "1", clock.now, spans))
    got, want = cached.evaluate("m", "1", record=False), oracle.evaluate("m", "1", record=False)
    same_evaluation(got, want)
    return got


def test_span_starts_are_whole_buckets_before_the_current_one():
    assert bucket_width((300, 3600)) == 60 * S and bucket_width((30, 600)) == 10 * S
    assert bucket_width((2.5,)) == S and bucket_width((86400 * 7,)) == 86400 * 7 // 360 * S
    now = 1_800_000_000 * S + 17 * S + 5  # 17 s into a minute
    assert span_starts(now, (300, 3600)) == [now - 17 * S - 5 - 300 * S, now - 17 * S - 5 - 3600 * S]
    assert span_starts(now, (30,)) == [now - 7 * S - 5 - 30 * S]


def test_late_windows_and_agents_joining_and_leaving_match_the_uncached_evaluation(world):
    store, clock, cached, oracle = world
    rng = np.random.default_rng(1)
    store.attach_profile("m", "1", profile(rng), "test", T0)
    config = configure(store, span_seconds=300, short_span_seconds=60)
    seqs: dict[str, int] = {}
    evaluated = 0
    for step in range(40):
        agents = [f"a{i}" for i in range(step // 8, step // 8 + 3)]  # every 8 steps one leaves, one joins
        batch = []
        for agent in agents:
            seqs[agent] = seqs.get(agent, 0) + 1
            late = rng.random() < 0.3  # into a bucket that is complete already, some into the suffixes
            end = clock.now - (int(rng.integers(60, 290)) * S if late else int(rng.integers(0, 20)) * S)
            batch.append(window(rng, agent, seqs[agent], end, int(rng.integers(1, 4)), shift=step / 20))
        if step % 9 != 4:  # now and then nothing arrives
            store.submit_windows(batch).result()
        clock.now += int(rng.choice([7, 13, 30, 61])) * S
        evaluated += check(store, clock, cached, oracle, config).evaluated
    assert evaluated > 10  # the evaluations compared statistics, not only "too few rows"
    version, counters = cached.spans._versions[("m", "1")], cached.spans.counters
    if store.ingest == "offered":  # every window after the first evaluation merged at ingest, none read
        assert version.windows_read == 0 and counters["windows_merged_at_ingest"] > 50
    elif store.ingest == "read":
        assert version.windows_read > 50 and counters["windows_offered"] == 0
    else:
        assert version.windows_read > 10 and counters["windows_merged_at_ingest"] > 10


def test_rollups_inside_the_span_are_neither_counted_twice_nor_lost(world):
    """Raw windows kept 120 s, so the rollup pass rolls windows of the 300-s span into minute rows
    (their merge straddles two buckets), late windows land in rolled minutes, and the newest rowid
    is deleted (so SQLite hands it out again)."""
    store, clock, cached, oracle = world
    rng = np.random.default_rng(2)
    store.attach_profile("m", "1", profile(rng), "test", T0)
    config = configure(store, span_seconds=300, short_span_seconds=60)
    policy = RetentionPolicy(raw_seconds=120)
    seq = 0
    for step in range(45):
        batch = []
        for agent in ("a", "b"):
            seq += 1
            back = int(rng.integers(100, 280)) * S if rng.random() < 0.25 else int(rng.integers(0, 15)) * S
            batch.append(window(rng, agent, seq, clock.now - back, int(rng.integers(1, 3))))
        if step % 11 == 5:  # an old window alone, then a rollup that deletes it: the newest rowid goes
            batch = [window(rng, "late", seq, clock.now - 200 * S, 2)]
        store.submit_windows(batch).result()
        if step % 2 == 0:
            check(store, clock, cached, oracle, config)  # sometimes two rollups between evaluations
        clock.now += int(rng.choice([10, 20, 45])) * S
        assert store.rollup(clock.now, policy) is not None
        check(store, clock, cached, oracle, config)
    rolled = store.read().execute("SELECT count(*) FROM rollups WHERE end_ns >= ?", [clock.now - 300 * S])
    assert rolled.fetchone()[0] > 0  # rollup rows were inside the span


def test_an_idle_hour_rolls_every_window_and_new_rowids_start_again(world):
    store, clock, cached, oracle = world
    rng = np.random.default_rng(3)
    store.attach_profile("m", "1", profile(rng), "test", T0)
    config = configure(store, span_seconds=3600, short_span_seconds=300)
    policy = RetentionPolicy(raw_seconds=600)
    for i in range(30):
        store.submit_windows([window(rng, "a", i, clock.now - i * 10 * S, 2)]).result()
    check(store, clock, cached, oracle, config)
    clock.now += 700 * S
    for start in (30, 40):
        store.rollup(clock.now, policy)  # every raw window goes: the table is empty, rowids restart at 1
        assert store.read().execute("SELECT count(*) FROM windows").fetchone()[0] == 0
        for i in range(start, start + 10):  # rowids the cache has seen already (the first time round)
            store.submit_windows([window(rng, "a", i, clock.now - (i - start) * S, 3)]).result()
        check(store, clock, cached, oracle, config)
        clock.now += 700 * S


def test_span_boundaries_move_with_time_across_gaps_and_config_changes(world):
    store, clock, cached, oracle = world
    rng = np.random.default_rng(4)
    store.attach_profile("m", "1", profile(rng), "test", T0)
    config = configure(store, span_seconds=300, short_span_seconds=60)
    for step, gap in enumerate([0, 1, 59, 60, 61, 299, 300, 301, 0, 900, 5, 3600, 17]):
        clock.now += gap * S
        store.submit_windows([window(rng, "a", step * 3 + j, clock.now - j * 20 * S, 3) for j in range(3)]).result()
        check(store, clock, cached, oracle, config)
        if step == 6:  # 10-s buckets now (a span of 30 s), then back
            config = configure(store, span_seconds=120, short_span_seconds=30)
        if step == 9:
            config = configure(store, span_seconds=300, short_span_seconds=60)
    store.submit_windows([window(rng, "a", 100, clock.now + 90 * S, 3)]).result()  # an agent's clock ahead
    check(store, clock, cached, oracle, config)
    clock.now += 120 * S
    check(store, clock, cached, oracle, config)
    clock.now -= 400 * S  # a clock that went back: the cache starts again
    check(store, clock, cached, oracle, config)


def test_a_reattached_profile_and_a_restart_give_the_uncached_evaluation(world):
    store, clock, cached, oracle = world
    rng = np.random.default_rng(5)
    store.attach_profile("m", "1", profile(rng), "test", T0)
    config = configure(store, span_seconds=300, short_span_seconds=60)
    for i in range(20):
        store.submit_windows([window(rng, "a", i, clock.now - i * 15 * S, 3, shift=1.0)]).result()
    before = check(store, clock, cached, oracle, config)
    store.attach_profile("m", "1", profile(rng, shift=1.0, sha="cd"), "test", T0)  # the shifted data is the reference
    after = check(store, clock, cached, oracle, config)
    assert [c.drifted for c in before.columns] != [c.drifted for c in after.columns]
    restarted = DriftEvaluator(store, clock=clock)  # memory only: built again from the store
    same_evaluation(restarted.evaluate("m", "1", record=False), oracle.evaluate("m", "1", record=False))


def test_memory_holds_only_the_longest_span_and_forgotten_versions_go(world):
    store, clock, cached, oracle = world
    rng = np.random.default_rng(6)
    cache = SpanCache(store)
    for step in range(50):
        store.submit_windows([window(rng, "a", step, clock.now, 1)]).result()
        cache.read("m", "1", clock.now, (60, 300))
        clock.now += 30 * S
    version = cache._versions[("m", "1")]
    assert len(version.buckets) <= 5 + 1  # the 5 complete buckets of the longest span, and the current one
    assert all(len(s.suffix) <= s.length for s in version.sliding)
    cache.forget([("m", "2")])
    assert not cache._versions


def test_a_sketch_copy_is_independent_of_its_original():
    rng = np.random.default_rng(7)
    a = window(rng, "a", 0, T0, 50)
    b = window(rng, "a", 1, T0, 50)
    for i in range(3):
        original = sketches.from_proto(a.columns[i])
        copy = original.copy()
        copy.merge(sketches.from_proto(b.columns[i]))
        again = sketches.from_proto(a.columns[i])
        assert original.to_proto("c", 0, "") == again.to_proto("c", 0, "")  # untouched by the copy's merge
        assert copy.count == 100 and original.count == 50


@pytest.mark.parametrize("world", ["read"], indirect=True)
def test_a_body_that_does_not_parse_fails_the_evaluation_and_leaves_no_half_merged_state(world):
    store, clock, cached, oracle = world
    rng = np.random.default_rng(8)
    store.attach_profile("m", "1", profile(rng), "test", T0)
    config = configure(store, span_seconds=300, short_span_seconds=60)
    store.submit_windows([window(rng, "a", i, clock.now - i * 10 * S, 3) for i in range(10)]).result()
    check(store, clock, cached, oracle, config)
    store.submit_windows([window(rng, "b", i, clock.now - i * 10 * S, 3) for i in range(10)]).result()
    bad = store.read().execute("SELECT rowid FROM windows WHERE agent_id = 'b' AND seq = 5").fetchone()[0]  # a middle one
    store.write(lambda db: db.execute("UPDATE windows SET body = ? WHERE rowid = ?", [b"\x0a\xff", bad]))
    with pytest.raises(Exception):
        cached.evaluate("m", "1", record=False)  # some of agent b's windows were merged before it failed
    store.write(lambda db: db.execute("DELETE FROM windows WHERE rowid = ?", [bad]))
    check(store, clock, cached, oracle, config)


@pytest.mark.parametrize("world", ["offered"], indirect=True)
def test_an_offer_after_its_window_was_read_and_one_before_the_evaluation_are_each_counted_once(world):
    store, clock, cached, oracle = world
    rng = np.random.default_rng(9)
    store.attach_profile("m", "1", profile(rng), "test", T0)
    config = configure(store, span_seconds=300, short_span_seconds=60)
    store.submit_windows([window(rng, "a", i, clock.now - i * 10 * S, 3) for i in range(10)]).result()
    check(store, clock, cached, oracle, config)
    store.ingest = "read"  # stored, then read by an evaluation before ingest offers them
    ids: list[int] = []
    late = [window(rng, "b", i, clock.now - i * 10 * S, 3) for i in range(10)]
    store.submit_windows(late, ids).result()
    clock.now += 5 * S
    check(store, clock, cached, oracle, config)
    cached.spans.offer(((rowid, w, validate_window(w, now_ns=clock.now)) for rowid, w in zip(ids, late)),
                       store.rollup_generation)
    assert cached.spans.counters["windows_merged_at_ingest"] == 0  # at or below the high-water mark
    check(store, clock, cached, oracle, config)
    version = cached.spans._versions[("m", "1")]
    read = version.windows_read
    store.ingest = "offered"
    store.submit_windows([window(rng, "c", i, clock.now - i * 7 * S, 3) for i in range(10)]).result()
    check(store, clock, cached, oracle, config)
    assert version.windows_read == read and not version.offered  # listed by id, skipped, forgotten


@pytest.mark.parametrize("world", ["offered"], indirect=True)
def test_windows_all_offered_since_the_last_evaluation_are_counted_not_listed(world, monkeypatch):
    from collector.store.store import SpanSnapshot

    store, clock, cached, oracle = world
    rng = np.random.default_rng(13)
    store.attach_profile("m", "1", profile(rng), "test", T0)
    config = configure(store, span_seconds=300, short_span_seconds=60)
    store.submit_windows([window(rng, "a", i, clock.now - i * 10 * S, 3) for i in range(6)]).result()
    check(store, clock, cached, oracle, config)  # built
    listed: list = []
    listing = SpanSnapshot.window_ids_after
    monkeypatch.setattr(SpanSnapshot, "window_ids_after", lambda snap, *a: listed.append(a) or listing(snap, *a))
    version = cached.spans._versions[("m", "1")]
    for step in range(3):
        store.submit_windows([window(rng, "b", 10 * step + i, clock.now - i * 5 * S, 3) for i in range(4)]).result()
        clock.now += 7 * S
        check(store, clock, cached, oracle, config)
    assert listed == [] and version.windows_read == 0 and not version.offered  # merged at ingest, counted
    store.ingest = "read"  # one window stored by another process among offered ones: the count differs
    store.submit_windows([window(rng, "z", 0, clock.now - 2 * S, 3)]).result()
    store.ingest = "offered"
    store.submit_windows([window(rng, "b", 99, clock.now - S, 3)]).result()
    check(store, clock, cached, oracle, config)  # the oracle's answer: the unoffered window was read
    assert len(listed) == 1 and version.windows_read == 1


@pytest.mark.parametrize("world", ["offered"], indirect=True)
def test_offers_past_the_bound_between_evaluations_start_the_version_again(world, monkeypatch):
    store, clock, cached, oracle = world
    monkeypatch.setattr(spans_module, "MAX_OFFERED", 5)
    rng = np.random.default_rng(10)
    store.attach_profile("m", "1", profile(rng), "test", T0)
    config = configure(store, span_seconds=300, short_span_seconds=60)
    store.submit_windows([window(rng, "a", i, clock.now - i * 10 * S, 3) for i in range(5)]).result()
    check(store, clock, cached, oracle, config)
    version = cached.spans._versions[("m", "1")]
    store.submit_windows([window(rng, "b", i, clock.now - i * 10 * S, 3) for i in range(5)]).result()
    assert len(version.offered) == 5 and version.current >= 0
    store.submit_windows([window(rng, "c", 0, clock.now, 3)]).result()
    assert not version.offered and version.current < 0  # forgotten: the next evaluation reads the span
    store.submit_windows([window(rng, "c", 1, clock.now, 3)]).result()  # not built: not taken
    check(store, clock, cached, oracle, config)


def test_offers_racing_evaluations_from_many_threads_match_the_uncached_evaluation(db_url):
    """Stream threads offer while an evaluation thread answers (``OFFER_WAIT`` may pass: then the
    evaluation reads those windows); afterwards the cache holds every window exactly once."""
    import threading

    clock = Clock()
    store = IngestStore(db_url, clock, "offered")
    try:
        cache = store.cache = SpanCache(store)
        cache.read("m", "1", clock.now, (60, 300))
        stop = threading.Event()

        def agent(name: str) -> None:
            rng = np.random.default_rng(abs(hash(name)) % 2**32)
            for seq in range(25):  # 100 values in all: no KLL compacts, so any merge order agrees
                store.submit_windows([window(rng, name, seq, clock.now - int(rng.integers(0, 200)) * S, 1)])

        def evaluations() -> None:
            while not stop.is_set():
                cache.read("m", "1", clock.now, (60, 300))

        evaluator = threading.Thread(target=evaluations)
        evaluator.start()
        agents = [threading.Thread(target=agent, args=(f"a{i}",)) for i in range(4)]
        for t in agents:
            t.start()
        for t in agents:
            t.join(timeout=120)
        stop.set()
        evaluator.join(timeout=120)
        assert cache.counters["windows_offered"] == 100 and cache.counters["windows_merged_at_ingest"] > 0
        same_spans(cache.read("m", "1", clock.now, (60, 300)), read_uncached(store, "m", "1", clock.now, (60, 300)))
    finally:
        store.close()


@pytest.mark.parametrize("world", ["offered"], indirect=True)
def test_offers_to_a_busy_version_wait_bounded_and_the_next_evaluation_merges_them(world, monkeypatch):
    store, clock, cached, oracle = world
    monkeypatch.setattr(spans_module, "MAX_PENDING", 6)
    rng = np.random.default_rng(11)
    store.attach_profile("m", "1", profile(rng), "test", T0)
    config = configure(store, span_seconds=300, short_span_seconds=60)
    store.submit_windows([window(rng, "a", i, clock.now - i * 10 * S, 3) for i in range(5)]).result()
    check(store, clock, cached, oracle, config)
    version = cached.spans._versions[("m", "1")]
    with version.lock:  # as during an evaluation: the offers neither wait nor merge
        store.submit_windows([window(rng, "b", i, clock.now - i * 10 * S, 3) for i in range(4)]).result()
        store.submit_windows([window(rng, "c", i, clock.now - i * 10 * S, 3) for i in range(4)]).result()
    assert len(version.pending) == 4 and cached.spans.counters["windows_merged_at_ingest"] == 0  # c: no room
    read = version.windows_read
    check(store, clock, cached, oracle, config)
    assert cached.spans.counters["windows_merged_at_ingest"] == 4 and version.windows_read == read + 4
    assert not version.pending


@pytest.mark.parametrize("world", ["offered"], indirect=True)
def test_an_offer_that_fails_to_merge_is_logged_and_the_version_is_read_again(world, caplog):
    store, clock, cached, oracle = world
    rng = np.random.default_rng(12)
    store.attach_profile("m", "1", profile(rng), "test", T0)
    config = configure(store, span_seconds=300, short_span_seconds=60)
    store.submit_windows([window(rng, "a", i, clock.now - i * 10 * S, 3) for i in range(5)]).result()
    check(store, clock, cached, oracle, config)
    store.ingest = "read"
    ids: list[int] = []
    w = window(rng, "b", 0, clock.now, 3)
    store.submit_windows([w], ids).result()
    wrong = [sketches.CategoricalSketch(), sketches.NumericSketch(), sketches.NumericSketch()]  # x is numeric
    cached.spans.offer([(ids[0], w, wrong)], store.rollup_generation)  # raises nothing
    assert "span cache failed" in caplog.text and cached.spans._versions[("m", "1")].current < 0
    check(store, clock, cached, oracle, config)


def test_rollups_on_another_collector_are_neither_counted_twice_nor_lost(postgres_url):
    """Two stores on one PostgreSQL database, as two collectors: one stores windows and rolls them up
    (it holds the rollup lease), the other evaluates from its span cache. The passes it reads from
    ``rollup_passes`` tell it which buckets to read again: its spans equal a read of the tables."""
    clock = Clock()
    writer, evaluator = Store(postgres_url), Store(postgres_url)
    try:
        rng = np.random.default_rng(4)
        writer.attach_profile("m", "1", profile(rng), "test", T0)
        config = configure(writer, span_seconds=300, short_span_seconds=60)
        cached, oracle = DriftEvaluator(evaluator, clock=clock), DriftEvaluator(evaluator, clock=clock)
        oracle.spans = Uncached(evaluator)
        policy, seq = RetentionPolicy(raw_seconds=120), 0
        for step in range(40):
            batch = []
            for agent in ("a", "b"):
                seq += 1
                back = int(rng.integers(100, 280)) * S if rng.random() < 0.25 else int(rng.integers(0, 15)) * S
                batch.append(window(rng, agent, seq, clock.now - back, int(rng.integers(1, 3))))
            writer.submit_windows(batch).result()
            if step % 3 == 0:
                check(evaluator, clock, cached, oracle, config)  # sometimes several passes in between
            clock.now += int(rng.choice([10, 20, 45])) * S
            writer.rollup(clock.now, policy)
            check(evaluator, clock, cached, oracle, config)
        assert evaluator.rollup_generation == writer.rollup_generation > 10  # every pass seen, none of its own
        version = cached.spans._versions[("m", "1")]
        assert version.windows_read > 20  # read from the tables: stored by the other collector
        rolled = evaluator.read().execute("SELECT count(*) FROM rollups WHERE end_ns >= ?", [clock.now - 300 * S])
        assert rolled.fetchone()[0] > 0  # rollup rows were inside the span
    finally:
        writer.close()
        evaluator.close()


def test_a_window_committed_late_by_another_collector_is_still_read(postgres_url):
    """Window rowids are handed out at insert: a collector whose commit is slow holds a rowid below
    those another collector commits meanwhile. Window inserts take turns across collectors (the
    store's ``WINDOWS_LOCK``), so the other collector's windows wait for that commit, and a span
    reader whose cursor passes them cannot have skipped the slow one's window for good."""
    import psycopg

    from collector.store.store import WINDOWS_LOCK

    clock = Clock()
    fast, evaluator = Store(postgres_url), Store(postgres_url)
    slow = psycopg.connect(postgres_url, autocommit=True)  # another collector, in the middle of its commit
    try:
        rng = np.random.default_rng(9)
        fast.attach_profile("m", "1", profile(rng), "test", T0)
        config = configure(fast, span_seconds=300, short_span_seconds=60)
        cached, oracle = DriftEvaluator(evaluator, clock=clock), DriftEvaluator(evaluator, clock=clock)
        oracle.spans = Uncached(evaluator)
        fast.submit_windows([window(rng, "a", 0, clock.now - 5 * S, 3)]).result()
        check(evaluator, clock, cached, oracle, config)  # the cache is built
        late = window(rng, "b", 0, clock.now - 4 * S, 2)
        slow.execute("BEGIN")
        slow.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [WINDOWS_LOCK])
        slow.execute("INSERT INTO windows (agent_id, run_id, seq, model_name, model_version, start_ns, end_ns,"
                     " rows, calls, dropped_rows, errors, body) VALUES (%s, %s, %s, 'm', '1', %s, %s, %s, 1, 0, 0, %s)",
                     [late.agent_id, late.run_id, late.seq, late.start_unix_nano, late.end_unix_nano, late.rows,
                      late.SerializeToString()])
        pending = fast.submit_windows([window(rng, "a", 1, clock.now - 3 * S, 4)])
        with psycopg.connect(postgres_url, autocommit=True) as watch:  # it waits its turn (or, unserialised, commits)
            deadline = time.monotonic() + 60  # a hang guard
            while not pending.done() and not watch.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database()").fetchone()[0]:
                assert time.monotonic() < deadline, "the second collector's windows neither waited nor committed"
                time.sleep(0.05)
        check(evaluator, clock, cached, oracle, config)  # the reader's cursor moves to what is committed
        slow.execute("COMMIT")
        pending.result()
        check(evaluator, clock, cached, oracle, config)  # both are read: the late one was not skipped
        assert sum(r for (r,) in evaluator.read().execute("SELECT rows FROM windows")) == 9
    finally:
        slow.close()
        fast.close()
        evaluator.close()
