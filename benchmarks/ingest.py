"""Collector ingest: how many windows a second the store commits durably, on SQLite or PostgreSQL.

    python benchmarks/ingest.py [--windows 20000] [--threads 4] [--batch 64] [--inflight 4]
                                [--synchronous BOTH|NORMAL|FULL] [--rounds 2] [--cpu 0] [--path DIR] [--json]
                                [--engine sqlite|postgresql|both] [--db postgresql://USER@HOST/DB]

``--engine postgresql`` runs the same rounds against PostgreSQL: ``--db URL`` (its windows, agents,
rollups and samples are emptied before each round), or without ``--db`` a server of its own started
from the Debian binaries (``tests/pg_support.py``, a fresh database per round) made durable as
SQLite FULL is (``fsync``, ``synchronous_commit``, ``full_page_writes`` on). ``--engine both``
alternates SQLite (``--synchronous``, FULL by default then) and PostgreSQL rounds in one run. The
figures add CPU seconds per window of this process and, for a server it started, of the server's
processes (``/proc``); the baseline on PostgreSQL is bare psycopg inserting the same bytes.

The whole process runs on one CPU (``--cpu``, ``sched_setaffinity``; -1: no pinning).
With ``--synchronous BOTH`` (the default) it alternates rounds of NORMAL (fsync of
the WAL at checkpoints only: what an ack meant before) and FULL (fsync at every
group commit: an ack means on disk, the collector's default), ``--rounds`` of
each, in one run, so both see the same disk and the same machine load; each
mode's figures are the median of its rounds.

The store alone, no gRPC. One realistic window is built with agent.sketches:
20 numeric features, each a NumericSketch of 1,000 normal rows, plus a latency
sketch of 100 calls. Each of ``--threads`` submitters (think: agent streams)
copies it, sets its own agent_id and seq, and submits batches of ``--batch``
windows, keeping at most ``--inflight`` batches unacknowledged, as an
exporter does. A full write queue (ResourceExhausted) is retried after 1 ms.

Reported: windows/s and MB/s of serialised WindowSummary bytes from the first
submit to the last ack, the ack latency of each batch (submit call to its
future resolving, i.e. committed) at p50 and p99, and the group commits (with
FULL, one WAL fsync each): per second and windows per commit, which say what a
disk with slower fsyncs would cost.

Baseline, in the same run (before and after the store, averaged): bare
sqlite3 inserting the same bytes into a two-column table, one thread, 512
windows per transaction, same journal mode and synchronous setting. The
ratio store/bare says what the store's own work costs (indexes, agent
totals, savepoints, futures, serialising) on top of what the disk allows.

Then one retention pass rolls every window into its minute bucket (windows are
10 s apart per agent), timed: windows merged per second on the writer thread.

``--offer``: what the span cache costs ingest (``collector.monitoring.spans.SpanCache.offer``). FULL
only; rounds alternate "validated" (each submitter validates its windows as a collector's
stream does, ``collector.base.ingest.validate_window``, then stores them) and "validated + offered"
(the same, and once a batch is committed its windows' parsed sketches are merged into a cached
model version's minute buckets, on the submitter's thread, as a stream's handler thread does
after the ack). Windows are 10 s apart per agent within the last hour (they wrap), so every
offer is merged into a bucket the drift spans hold. Also printed: the offer alone per window,
on this thread, without the store.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.errors import ResourceExhausted  # noqa: E402
from agent.sketches import NumericSketch  # noqa: E402
from collector.base.ingest import validate_window  # noqa: E402
from collector.monitoring.spans import SpanCache  # noqa: E402
from collector.store.rollup import RetentionPolicy  # noqa: E402
from collector.store.store import Store  # noqa: E402
from protos import summary_pb2  # noqa: E402

FEATURES, ROWS, NS = 20, 1000, 1_000_000_000


def realistic_window() -> summary_pb2.WindowSummary:
    """Dated to end now (a collector refuses windows from its future)."""
    rng = np.random.default_rng(0)
    end = time.time_ns() // NS * NS
    w = summary_pb2.WindowSummary(model_name="fraud", model_version="3", model_sha256="ab" * 32,
                                  start_unix_nano=end - 10 * NS, end_unix_nano=end, rows=ROWS, calls=100)
    for j in range(FEATURES):
        sketch = NumericSketch()
        sketch.update(rng.normal(j, 1 + j / 10, ROWS).astype(np.float32))
        w.columns.append(sketch.to_proto(f"X[{j}]", summary_pb2.ColumnSummary.FEATURE, "X"))
    latency = NumericSketch()
    latency.update(rng.exponential(200.0, 100))
    w.latency.CopyFrom(latency.to_proto("latency_us", 0, ""))
    return w


WRAP = 360  # --offer: windows per agent within the last hour, then the times start again


def submitter(store: Store, template: summary_pb2.WindowSummary, agent: int, count: int, batch: int,
              inflight: int, latencies: list[int], retries: list[int], ingest: str = "",
              cache: SpanCache | None = None) -> None:
    pending: deque[tuple[Future, list, list, list, int]] = deque()

    def done(future: Future, windows: list, parsed: list, rowids: list, generation: int) -> None:
        future.result()
        if cache is not None:
            cache.offer(((r, w, p) for r, w, p in zip(rowids, windows, parsed) if r), generation)

    for first in range(0, count, batch):
        windows = []
        for seq in range(first, min(first + batch, count)):
            w = summary_pb2.WindowSummary()
            w.CopyFrom(template)
            w.agent_id, w.run_id, w.seq = f"agent-{agent}", "run-1", seq
            back = (count - seq) % WRAP if ingest else count - seq
            w.start_unix_nano -= back * 10 * NS  # 10 s tumbling windows, the last ending now
            w.end_unix_nano -= back * 10 * NS
            windows.append(w)
        parsed = [validate_window(w) for w in windows] if ingest else []
        while len(pending) >= inflight:
            done(*pending.popleft())
        rowids: list[int] = []
        generation = store.rollup_generation
        while True:
            t0 = time.perf_counter_ns()
            try:
                future = store.submit_windows(windows, rowids)
                break
            except ResourceExhausted:
                retries.append(1)
                time.sleep(0.001)
        future.add_done_callback(lambda f, t0=t0: latencies.append(time.perf_counter_ns() - t0))
        pending.append((future, windows, parsed, rowids, generation))
    for item in pending:
        done(*item)


def offer_alone(directory: str | None, windows: int = 2000) -> float:
    """Microseconds per window of ``SpanCache.offer`` alone (one window per call, each in the
    current minute of a cached version), on this thread."""
    template = summary_pb2.WindowSummary(agent_id="agent-0", run_id="run-1")
    template.MergeFrom(realistic_window())
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        store = Store(Path(tmp) / "offer.db")
        try:
            cache = SpanCache(store)
            cache.read(template.model_name, template.model_version, template.end_unix_nano, (300, 3600))
            parsed = [validate_window(template) for _ in range(windows)]
            start = time.perf_counter()
            for i, p in enumerate(parsed):
                cache.offer([(i + 1, template, p)], 0)
            elapsed = time.perf_counter() - start
            assert cache.counters["windows_merged_at_ingest"] == windows
        finally:
            store.close()
    return elapsed / windows * 1e6


def bare_sqlite(body: bytes, windows: int, synchronous: str, directory: str) -> float:
    """Windows/s of plain sqlite3 inserts of ``body``: what this disk and SQLite allow."""
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        conn = sqlite3.connect(Path(tmp) / "bare.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("CREATE TABLE w (seq INTEGER PRIMARY KEY, body BLOB NOT NULL)")
        start = time.perf_counter()
        for first in range(0, windows, 512):
            conn.execute("BEGIN IMMEDIATE")
            rows = ((i, body) for i in range(first, min(first + 512, windows)))
            conn.executemany("INSERT INTO w VALUES (?, ?)", rows)
            conn.execute("COMMIT")
        elapsed = time.perf_counter() - start
        conn.close()
    return windows / elapsed


class Postgres:
    """Where PostgreSQL rounds run: ``url`` (emptied before each round), or a server of our own."""

    def __init__(self, url: str | None) -> None:
        self.url, self.server = url, None
        if url is not None:
            from collector.store.engine import StoreError, describe, open_engine

            try:
                open_engine(url).close()
            except StoreError as exc:
                sys.exit(f"--db {describe(url)}: {exc}")
        else:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            import pg_support

            bindir, reason = pg_support.server_or_reason()
            if bindir is None:
                sys.exit(f"--engine postgresql: {reason}")
            durable = type("DurableServer", (pg_support.PostgresServer,), {"speed_options": ""})
            self.server = durable(bindir).start()  # fsync, synchronous_commit, full_page_writes on: as SQLite FULL

    def database(self) -> str:
        if self.server is not None:
            return self.server.create_database()
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            for table in ("windows", "agents", "rollups", "rollup_passes", "row_samples"):
                if conn.execute("SELECT to_regclass(%s)", [table]).fetchone()[0] is not None:
                    conn.execute(f"DELETE FROM {table}")
        return self.url

    def done(self, url: str) -> None:
        if self.server is not None:
            self.server.drop_database(url)

    def server_cpu_seconds(self) -> float | None:
        """CPU seconds so far of the server's live processes (None: not our server)."""
        if self.server is None:
            return None
        postmaster = int((self.server.data / "postmaster.pid").read_text().split()[0])
        total = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(entry.name) == postmaster or int(fields[1]) == postmaster:  # fields[1]: the parent's pid
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


def bare_postgres(body: bytes, windows: int, url: str) -> float:
    """Windows/s of plain psycopg inserts of ``body``, 512 per transaction: what this server allows."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bare_w (seq BIGINT PRIMARY KEY, body BYTEA NOT NULL)")
        conn.execute("TRUNCATE bare_w")
        start = time.perf_counter()
        for first in range(0, windows, 512):
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany("INSERT INTO bare_w VALUES (%s, %s)",
                                [(i, body) for i in range(first, min(first + 512, windows))])
        elapsed = time.perf_counter() - start
        conn.execute("DROP TABLE bare_w")
    return windows / elapsed


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(windows: int, threads: int, batch: int, inflight: int, synchronous: str, directory: str,
        ingest: str = "", postgres: Postgres | None = None) -> dict:
    """One round; ``ingest``: "" (the store alone), "validated" or "validated + offered" (--offer);
    ``postgres``: on PostgreSQL, else SQLite."""
    template = realistic_window()
    size = template.ByteSize() + 40  # + the ids set per window
    latencies: list[int] = []
    retries: list[int] = []
    url = postgres.database() if postgres is not None else None
    body = template.SerializeToString()
    bare = bare_postgres(body, windows, url) if url else bare_sqlite(body, windows, synchronous, directory)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        store = Store(url or Path(tmp) / "ingest.db", synchronous=synchronous)
        cpu0 = _cpu_seconds()
        server0 = postgres.server_cpu_seconds() if postgres is not None else None
        cache = None
        if ingest.endswith("offered"):  # the version cached, as after the collector's first evaluation
            cache = SpanCache(store)
            # evaluated last at the hour's start: no window is late (each goes into its bucket only,
            # as windows arriving in time do; a late one is also merged into the spans holding it)
            cache.read(template.model_name, template.model_version, template.end_unix_nano - WRAP * 10 * NS,
                       (300, 3600))
        shares = [windows // threads + (t < windows % threads) for t in range(threads)]
        workers = [threading.Thread(target=submitter, args=(store, template, t, n, batch, inflight,
                                                            latencies, retries, ingest, cache))
                   for t, n in enumerate(shares)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - start
        cpu = _cpu_seconds() - cpu0
        server_cpu = postgres.server_cpu_seconds() - server0 if server0 is not None else None
        stored, commits = store.counters["windows_stored"], store.counters["group_commits"]
        merged_at_ingest = cache.counters["windows_merged_at_ingest"] if cache is not None else 0
        # Retention: every window is old enough to go into its minute bucket.
        t_rollup = time.perf_counter()
        merged = store.rollup(template.end_unix_nano + 7200 * NS, RetentionPolicy())["raw_merged"]
        rollup_s = time.perf_counter() - t_rollup
        if url:
            db_mb = store.read().execute("SELECT pg_database_size(current_database())").fetchone()[0] / 1e6
        store.close()
        if not url:
            db_mb = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 1e6
    bare = (bare + (bare_postgres(body, windows, url) if url else bare_sqlite(body, windows, synchronous, directory))) / 2
    if url:
        postgres.done(url)
    lat = np.array(latencies) / 1e6
    return {
        "windows": stored, "threads": threads, "batch": batch, "inflight": inflight, "synchronous": synchronous,
        "ingest": ingest or "store alone", "merged_at_ingest": merged_at_ingest,
        "engine": "postgresql" if url else "sqlite",
        "cpu_us_per_window": round(cpu / stored * 1e6),
        "server_cpu_us_per_window": round(server_cpu / stored * 1e6) if server_cpu is not None else None,
        "window_bytes": size, "seconds": round(elapsed, 3), "windows_per_s": round(stored / elapsed),
        "mb_per_s": round(stored * size / elapsed / 1e6, 1), "ack_p50_ms": round(float(np.percentile(lat, 50)), 2),
        "ack_p99_ms": round(float(np.percentile(lat, 99)), 2), "queue_full_retries": len(retries),
        "windows_per_commit": round(stored / commits), "commits_per_s": round(commits / elapsed),
        "db_mb": round(db_mb, 1), "bare_sqlite_windows_per_s": round(bare),
        "ratio_to_bare": round(stored / elapsed / bare, 3),
        "rollup_windows_per_s": round(merged / rollup_s),
    }


def median_of(rounds: list[dict]) -> dict:
    """Each numeric figure's median over the rounds of one mode (the other fields of the first)."""
    out = dict(rounds[0])
    for key, value in rounds[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("threads", "batch", "inflight", "windows",
                                                           "merged_at_ingest"):
            median = float(np.median([r[key] for r in rounds]))
            out[key] = round(median) if isinstance(value, int) else round(median, 3)
    out["rounds"] = len(rounds)
    out["windows_per_s_each_round"] = [r["windows_per_s"] for r in rounds]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--synchronous", default="BOTH", type=str.upper, choices=["BOTH", "NORMAL", "FULL"])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each mode, alternating")
    parser.add_argument("--cpu", type=int, default=0, help="the one CPU this process runs on (-1: any)")
    parser.add_argument("--path", default=None, help="directory for the database (default: the temp dir)")
    parser.add_argument("--offer", action="store_true",
                        help="FULL, alternating validated and validated + offered to the span cache")
    parser.add_argument("--engine", default="sqlite", choices=["sqlite", "postgresql", "both"],
                        help="both: SQLite and PostgreSQL rounds alternating in one run")
    parser.add_argument("--db", default=None, metavar="URL",
                        help="a PostgreSQL database for --engine postgresql/both (default: a server of its own)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.db and args.engine == "sqlite":
        args.engine = "postgresql"
    if args.engine != "sqlite" and args.offer:
        parser.error("--offer runs on SQLite only")
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    load = os.getloadavg()
    postgres = Postgres(args.db) if args.engine != "sqlite" else None
    if args.offer:
        modes = ["validated", "validated + offered"]
    elif args.engine == "postgresql":
        modes = ["postgresql"]
    else:
        sync = "FULL" if args.engine == "both" and args.synchronous == "BOTH" else args.synchronous
        modes = ["NORMAL", "FULL"] if sync == "BOTH" else [sync]
        modes += ["postgresql"] if args.engine == "both" else []
    rounds: dict[str, list[dict]] = {mode: [] for mode in modes}
    try:
        for _ in range(args.rounds):
            for mode in modes:
                sync, ingest = ("FULL", mode) if args.offer else (mode, "")
                on = postgres if mode == "postgresql" else None
                rounds[mode].append(run(args.windows, args.threads, args.batch, args.inflight,
                                        "FULL" if on else sync, args.path, ingest, on))
    finally:
        if postgres is not None:
            postgres.close()
    results = [median_of(rounds[mode]) for mode in modes]
    alone = offer_alone(args.path) if args.offer else None
    load = [max(a, b) for a, b in zip(load, os.getloadavg())]
    if args.json:
        print(json.dumps({"results": results, "offer_alone_us": alone, "load_average_max": load}, indent=2))
        return
    r = results[0]
    cpus = sorted(os.sched_getaffinity(0))
    print(f"{r['windows']:,} windows of {FEATURES} features x {ROWS:,} rows ({r['window_bytes']:,} bytes each), "
          f"{r['threads']} threads, batches of {r['batch']}, {r['inflight']} in flight, on CPU(s) {cpus}; "
          f"median of {args.rounds} alternating round(s) per mode; load average (1, 5, 15 min, the larger of "
          f"start and end) {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'mode':>19} {'windows/s':>10} {'each round':>20} {'MB/s':>7} {'ack p50 ms':>11} {'ack p99 ms':>11}"
          f" {'commits/s':>10} {'w/commit':>9} {'queue full':>11} {'db MB':>7} {'bare w/s':>16}"
          f" {'store/bare':>11} {'rollup w/s':>11} {'CPU us/w':>9} {'server us/w':>12}")
    for r in results:
        each = "/".join(f"{n:,}" for n in r["windows_per_s_each_round"])
        name = r["ingest"] if args.offer else ("postgresql" if r["engine"] == "postgresql" else r["synchronous"])
        print(f"{name:>19} {r['windows_per_s']:>10,} {each:>20} {r['mb_per_s']:>7} {r['ack_p50_ms']:>11} "
              f"{r['ack_p99_ms']:>11} {r['commits_per_s']:>10} {r['windows_per_commit']:>9} "
              f"{r['queue_full_retries']:>11} {r['db_mb']:>7} {r['bare_sqlite_windows_per_s']:>16,} "
              f"{r['ratio_to_bare']:>11} {r['rollup_windows_per_s']:>11,} {r['cpu_us_per_window']:>9}"
              f" {'-' if r['server_cpu_us_per_window'] is None else r['server_cpu_us_per_window']:>12}")
    if args.offer:
        before, after = (1e6 / r["windows_per_s"] for r in results)
        print(f"per window on one CPU: validated {before:.0f} us, validated + offered {after:.0f} us "
              f"(+{after - before:.0f} us; merged at ingest: {results[1]['merged_at_ingest']:,} of "
              f"{results[1]['windows']:,} in the median's first round); the offer alone on this thread: "
              f"{alone:.0f} us per window")
    elif len(results) == 2 and results[1]["engine"] == "sqlite":
        print(f"FULL / NORMAL: {results[1]['windows_per_s'] / results[0]['windows_per_s']:.2f}")


if __name__ == "__main__":
    main()
