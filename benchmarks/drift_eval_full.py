"""The whole drift evaluation from the database: read, merge and test, for fleets of 10 and 100 agents.

    python benchmarks/drift_eval_full.py [--agents 10,100] [--minutes 60] [--repeats 15] [--json]
                                         [--engine sqlite|postgresql|both] [--db postgresql://USER@HOST/DB]

``drift_eval.py`` times the statistics alone; this is what the collector's evaluation loop pays.
A real SQLite store (``collector.store.store.Store``, FULL synchronous) is filled through its ingest
path with ``--agents`` agents each sending a 10-s window for every 10 s of the last ``--minutes``
minutes (an hour of 10 agents: 3,600 windows). Each window is the agent's own ``WindowBuilder``
summary of 1,000 rows of 20 columns (17 numeric of several shapes, one small-integer, 2
categorical), drawn from a pool of 32 distinct windows, re-stamped per agent and time. The model
version has a 100,000-row reference profile built the same way.

Timed, ``DriftEvaluator.evaluate(record=False)`` with the shipped spans (5 min and 1 h), whose
spans' summaries are kept in memory between evaluations (``collector.monitoring.spans``):
- cold: the first evaluation of a fresh evaluator (a collector's first after a start: it reads
  and merges the whole hour), ``--cold-repeats`` times;
- idle: again at the same time, nothing new stored;
- steady: after 60 s more of windows from every agent (``--drift-interval 60`` as shipped), the
  clock 60 s on. The windows take the collector's ingest path: validated (which parses their
  sketches), stored, and offered to the span cache (``SpanCache.offer``), whose merge into the
  minute buckets ingest then pays, timed apart ("ingest extra": per step and per window);
  "steady, not offered": windows another collector stored (the evaluation reads them), steps
  alternating with the offered ones; "+ rollup 3600": offered, with the shipped rollup pass
  (raw windows kept 3,600 s) run first, which rolls windows of the hour's oldest minute into
  minute rows, so that minute is read again; "+ rollup 3660": raw windows kept a minute longer
  than the span, so the pass touches nothing the spans hold;
- flip: the hourly rebuild of the hour's suffix merges (``_Sliding._flip``), once per hour of
  evaluations, not in the steady figure.
Apart, the uncached path's parts as before: the database read of the hour's windows with their
bodies, their merge into one summary per span, and the tests (``drift.evaluate_spans``). Memory:
the serialised size of every sketch one model version's cache holds (buckets, suffix merges, running
merges), close to what the C++ sketches hold in memory. The load average is printed with the figures.

``--engine postgresql|both``: the same on PostgreSQL (``--db URL``, or a durable server of its own as
``benchmarks/ingest.py`` starts: fsync and synchronous_commit on, a fresh database per fleet); with
``both`` each fleet runs on SQLite then on PostgreSQL and the rows stand side by side. The timings are
this process's wall time: on PostgreSQL they include the server's work on the same machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # ingest: its PostgreSQL server

from agent import sketches  # noqa: E402
from agent.capture import Reduce, Slot  # noqa: E402
from agent.worker import BLOCK_ROWS, Identity, WindowBuilder  # noqa: E402
from collector.base.ingest import validate_window  # noqa: E402
from collector.monitoring import drift  # noqa: E402
from collector.monitoring.evaluation import DriftEvaluator, merge_spans  # noqa: E402
from collector.monitoring.spans import SpanCache, span_starts  # noqa: E402
from collector.store.rollup import RetentionPolicy  # noqa: E402
from collector.store.store import Store  # noqa: E402
from ingest import Postgres  # noqa: E402
from protos import summary_pb2  # noqa: E402

NS = 1_000_000_000
MODEL, VERSION = "fleet", "1"
FEATURE = summary_pb2.ColumnSummary.FEATURE
NUMERIC = [f"n{i}" for i in range(18)]
CATEGORICAL = ["colour", "plan"]
SLOTS = (Slot("X", FEATURE, Reduce.NUMERIC, np.dtype(np.float32), (len(NUMERIC),), NUMERIC),
         Slot("C", FEATURE, Reduce.CATEGORICAL, np.dtype("<U8"), (len(CATEGORICAL),), CATEGORICAL))


def rows(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    shapes = [rng.normal(0, 1, n), rng.lognormal(0, 1, n), rng.exponential(2, n), rng.uniform(0, 10, n),
              rng.poisson(3, n), rng.standard_t(3, n)]
    numeric = np.column_stack([shapes[i % len(shapes)] * (1 + i) for i in range(17)]
                              + [rng.integers(0, 5, n)]).astype(np.float32)
    categorical = np.column_stack([rng.choice(["red", "green", "blue", "black", "white"], n),
                                   rng.choice(["basic", "plus"], n, p=[0.7, 0.3])]).astype("<U8")
    return [numeric, categorical]


def summary(rng: np.random.Generator, n: int) -> summary_pb2.WindowSummary:
    builder = WindowBuilder(SLOTS, Identity("bench", "run", MODEL, VERSION, "ab" * 32))
    data = rows(rng, n)
    for i in range(0, n, BLOCK_ROWS):
        builder.add_rows([d[i:i + BLOCK_ROWS] for d in data])
    return builder.close(time.time_ns(), 0, 0)


class Fleet:
    """The agents' windows, stamped as they go: ``send(upto)`` stores every window ending by ``upto``."""

    def __init__(self, store: Store, agents: int, first_end: int) -> None:
        rng = np.random.default_rng(1)
        self.pool = [summary(rng, 1000) for _ in range(32)]
        self.store, self.agents, self.next_end, self.seq = store, agents, first_end, 0

    def send(self, upto: int, cache: SpanCache | None = None) -> tuple[int, float]:
        """(windows stored, seconds spent offering them to ``cache``). With a cache, each agent's
        windows go as a collector's stream takes them: validated, stored, then offered."""
        windows, count, offering = [], 0, 0.0

        def store(batch: list[summary_pb2.WindowSummary]) -> None:
            nonlocal offering
            parsed = [validate_window(w, now_ns=upto) for w in batch] if cache is not None else []
            rowids: list[int] = []
            generation = self.store.rollup_generation
            self.store.submit_windows(batch, rowids).result()
            if cache is not None:
                t0 = time.perf_counter()
                cache.offer(((r, w, p) for r, w, p in zip(rowids, batch, parsed) if r), generation)
                offering += time.perf_counter() - t0

        while self.next_end <= upto:
            for a in range(self.agents):
                w = summary_pb2.WindowSummary()
                w.CopyFrom(self.pool[(a * 7 + self.seq) % len(self.pool)])
                w.agent_id, w.run_id, w.seq = f"agent-{a}", "run-1", self.seq
                w.end_unix_nano, w.start_unix_nano = self.next_end, self.next_end - 10 * NS
                windows.append(w)
                if len(windows) == 500:
                    store(windows)
                    count, windows = count + len(windows), []
            self.seq += 1
            self.next_end += 10 * NS
        if windows:
            store(windows)
            count += len(windows)
        return count, offering


def timed(fn, repeats: int) -> tuple[float, float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), float(np.percentile(times, 90)), result


def held_mb(evaluator: DriftEvaluator) -> float:
    """Serialised size of every sketch one version's cache holds (buckets, suffixes, running merges)."""
    version = next(iter(evaluator.spans._versions.values()))
    partials = {id(p): p for p in version.buckets.values()}
    for sliding in version.sliding:
        partials.update({id(p): p for p in (*sliding.suffix, sliding.back) if p is not None})
    size = sum(len(c.sketch.to_proto("c", 0, "").SerializeToString()) for p in partials.values()
               for c in p.columns.values())
    return size / 2**20


def measure(agents: int, minutes: int, repeats: int, cold_repeats: int, directory: str,
            postgres: Postgres | None = None) -> dict:
    """One fleet's figures; ``postgres``: the store on a fresh PostgreSQL database of it, else a SQLite file."""
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        url = postgres.database() if postgres is not None else None
        store = Store(url or Path(tmp) / "fleet.db")
        try:
            clock = [time.time_ns() // NS * NS]
            fleet = Fleet(store, agents, clock[0] - (minutes * 6 - 1) * 10 * NS)
            stored, _ = fleet.send(clock[0])
            reference = summary(np.random.default_rng(2), 100_000)
            profile = summary_pb2.ReferenceProfile(model_name=MODEL, model_sha256="ab" * 32, data_sha256="cd" * 32,
                                                   rows=reference.rows, columns=reference.columns)
            store.attach_profile(MODEL, VERSION, profile, "bench", clock[0])

            def fresh() -> DriftEvaluator:
                return DriftEvaluator(store, clock=lambda: clock[0])

            warm = fresh()
            warm._reference(MODEL, VERSION, profile)  # the reference's parsed sketches stay cached
            evaluators = []

            def cold_once():
                e = fresh()
                e._references = warm._references
                evaluators.append(e)
                return e.evaluate(MODEL, VERSION, record=False)

            cold = timed(cold_once, cold_repeats)
            evaluator = evaluators[-1]
            del evaluators[:-1]
            idle = timed(lambda: evaluator.evaluate(MODEL, VERSION, record=False), repeats)

            offers: list[tuple[int, float]] = []  # (windows, seconds offering them) per offered step

            def steady_once(raw_seconds: int = 0, offered: bool = True):
                clock[0] += 60 * NS
                sent, offering = fleet.send(clock[0], evaluator.spans if offered else None)
                if offered:
                    offers.append((sent, offering))
                if raw_seconds:
                    store.rollup(clock[0], RetentionPolicy(raw_seconds=raw_seconds))
                t0 = time.perf_counter()
                result = evaluator.evaluate(MODEL, VERSION, record=False)
                return (time.perf_counter() - t0) * 1e3, result

            steady, not_offered = [], []
            for _ in range(repeats):  # alternating: the machine's load falls on both alike
                steady.append(steady_once()[0])
                not_offered.append(steady_once(offered=False)[0])
            rolled = [steady_once(3600)[0] for _ in range(repeats)]
            # Raw windows kept a minute longer than the span: the pass never touches the span's buckets.
            rolled_later = [steady_once(3660)[0] for _ in range(repeats)]
            version = next(iter(evaluator.spans._versions.values()))
            merged_at_ingest = evaluator.spans.counters["windows_merged_at_ingest"]
            offered_total = evaluator.spans.counters["windows_offered"]
            result = evaluator.evaluate(MODEL, VERSION, record=False)
            hour = version.sliding[-1]
            current = clock[0] // version.width
            flip = timed(lambda: hour._flip(version.buckets, current - hour.length, current), min(repeats, 5))
            memory = held_mb(evaluator)
            # The uncached path's parts, over the hour now in the store.
            config = drift.DriftConfig()
            spans = config.spans()
            since = span_starts(clock[0], spans)[-1]
            read = timed(lambda: store.windows(MODEL, VERSION, since_ns=since, limit=10**9, include_summaries=True),
                         min(repeats, 3))
            infos = read[2]
            merge = timed(lambda: merge_spans([i.summary for i in infos], clock[0], spans), min(repeats, 3))
            ref = {c.name: sketches.from_proto(c) for c in profile.columns}
            times = []
            for _ in range(repeats):  # fresh current sketches each time, as every evaluation has (none cached)
                currents = [(span, {c.name: sketches.from_proto(c) for c in s.columns})
                            for span, s in zip(spans, merge[2]) if s is not None]
                t0 = time.perf_counter()
                drift.evaluate_spans(ref, currents, config)
                times.append((time.perf_counter() - t0) * 1e3)
            tests = (statistics.median(times), float(np.percentile(times, 90)))
        finally:
            store.close()
            if url:
                postgres.done(url)
    return {"engine": "postgresql" if url else "sqlite", "agents": agents, "windows_stored": stored,
            "windows_in_hour": len(infos),
            "rows_compared": result.rows, "evaluated": result.evaluated,
            "cold_ms": cold[:2], "idle_ms": idle[:2],
            "steady_ms": (statistics.median(steady), float(np.percentile(steady, 90))),
            "steady_not_offered_ms": (statistics.median(not_offered), float(np.percentile(not_offered, 90))),
            "ingest_extra_ms_per_step": (statistics.median(t * 1e3 for _, t in offers),
                                         float(np.percentile([t * 1e3 for _, t in offers], 90))),
            "ingest_extra_us_per_window": sum(t for _, t in offers) / sum(n for n, _ in offers) * 1e6,
            "windows_offered": offered_total, "windows_merged_at_ingest": merged_at_ingest,
            "steady_rollup_ms": (statistics.median(rolled), float(np.percentile(rolled, 90))),
            "steady_rollup_3660_ms": (statistics.median(rolled_later), float(np.percentile(rolled_later, 90))),
            "new_windows_per_step": agents * 6, "flip_ms": flip[:2],
            "read_ms": read[:2], "merge_ms": merge[:2], "tests_ms": tests[:2],
            "cache_sketches_mb": memory}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", default="10,100", help="fleet sizes, comma-separated (default 10,100)")
    parser.add_argument("--minutes", type=int, default=60, help="minutes of 10-s windows per agent (default 60)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cold-repeats", type=int, default=3, help="cold evaluations timed (default 3)")
    parser.add_argument("--path", default=None, help="directory for the databases (default: the system's temp)")
    parser.add_argument("--engine", default="sqlite", choices=["sqlite", "postgresql", "both"],
                        help="the store's engine; both: each fleet on SQLite then on PostgreSQL, side by side")
    parser.add_argument("--db", default=None, metavar="URL",
                        help="a PostgreSQL database for --engine postgresql/both (emptied first; default: a durable "
                             "server of its own, a fresh database per fleet)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.db and args.engine == "sqlite":
        args.engine = "postgresql"
    load = os.getloadavg()
    postgres = Postgres(args.db) if args.engine != "sqlite" else None
    engines = {"sqlite": [None], "postgresql": [postgres], "both": [None, postgres]}[args.engine]
    try:
        results = [measure(int(a), args.minutes, args.repeats, args.cold_repeats, args.path, on)
                   for a in args.agents.split(",") for on in engines]
    finally:
        if postgres is not None:
            postgres.close()
    load = [max(a, b) for a, b in zip(load, os.getloadavg())]
    if args.json:
        print(json.dumps({"load_average_max": load, "results": results}, indent=2))
        return 0
    print(f"{args.minutes} min of 10-s windows per agent, 20 columns, {args.repeats} repeats "
          f"({args.cold_repeats} cold); median / p90 ms; one process, load average (1, 5, 15 min, the larger of "
          f"start and end) {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    cell = "{:8.1f} /{:7.1f}"
    print(f"{'engine':>10} {'agents':>6} {'in hour':>7} {'cold':>17} {'idle':>17} {'steady (new)':>23} "
          f"{'not offered':>17} "
          f"{'+ rollup 3600':>17} {'+ rollup 3660':>17} {'hourly flip':>17}")
    for r in results:
        steady = cell.format(*r["steady_ms"]) + f" ({r['new_windows_per_step']:>4})"
        print(f"{r['engine']:>10} {r['agents']:>6} {r['windows_in_hour']:>7} {cell.format(*r['cold_ms']):>17} "
              f"{cell.format(*r['idle_ms']):>17} {steady:>23} {cell.format(*r['steady_not_offered_ms']):>17} "
              f"{cell.format(*r['steady_rollup_ms']):>17} "
              f"{cell.format(*r['steady_rollup_3660_ms']):>17} {cell.format(*r['flip_ms']):>17}")
    print("what ingest pays extra for it (the offers' merges, on the storing thread):")
    print(f"{'engine':>10} {'agents':>6} {'per step ms':>17} {'per window us':>13} {'merged at ingest':>22}")
    for r in results:
        merged = f"{r['windows_merged_at_ingest']:,} of {r['windows_offered']:,}"
        print(f"{r['engine']:>10} {r['agents']:>6} {cell.format(*r['ingest_extra_ms_per_step']):>17} "
              f"{r['ingest_extra_us_per_window']:>13.0f} {merged:>22}")
    print("uncached parts over the hour (what a cold evaluation pays), and memory of one model version's cache:")
    print(f"{'engine':>10} {'agents':>6} {'db read':>17} {'merge':>17} {'tests':>17} {'sketches MB':>11}")
    for r in results:
        print(f"{r['engine']:>10} {r['agents']:>6} {cell.format(*r['read_ms']):>17} {cell.format(*r['merge_ms']):>17} "
              f"{cell.format(*r['tests_ms']):>17} {r['cache_sketches_mb']:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
