"""Collector ingest: how many windows a second the store commits durably, on SQLite or PostgreSQL.

    python benchmarks/ingest.py [--windows 20000] [--threads 4] [--batch 64] [--inflight 4]
                                [--synchronous BOTH|NORMAL|FULL] [--rounds 2] [--cpu 0] [--path DIR] [--json]
                                [--engine sqlite|postgresql|both] [--db postgresql://USER@HOST/DB]
                                [--serve [--streams 4]]

``--engine postgresql`` runs the same rounds against PostgreSQL: ``--db URL`` (its windows, agents,
rollups and samples are emptied before each round), or without ``--db`` a server of its own started
from the Debian binaries (``tests/pg_support.py``, a fresh database per round) made durable as
SQLite FULL is (``fsync``, ``synchronous_commit``, ``full_page_writes`` on). ``--engine both``
alternates SQLite (``--synchronous``, FULL by default then) and PostgreSQL rounds in one run. The
figures add CPU seconds per window of this process and, for a server it started, of the server's
processes (``/proc``); the baseline on PostgreSQL is bare psycopg inserting the same bytes.

``--serve``: end to end instead of the store alone. Real ``collector serve`` processes
(``--synchronous full``) take the windows over gRPC from ``--streams`` agents' streams played by this
process (``collector_grpc.agent_stream``): with ``--engine both`` rounds alternate SQLite with one
collector, PostgreSQL with one and PostgreSQL with two on one database (the streams split between
them). Reported per setup (median of its rounds): windows/s stored, ack latency, CPU microseconds per
window of each collector, of the PostgreSQL server's processes (the postmaster, its live children and
those it reaped; only a server this benchmark started) and of this process, bytes on disk per window
(the SQLite file; ``pg_total_relation_size('windows')``), and the windows refused (REJECTED) or never
acked, summed over the rounds. Nothing is pinned: every process shares the machine's CPUs.

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
import signal
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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # collector_grpc, for --serve

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
        """CPU seconds so far of the server's processes: the postmaster, its live children and those
        it has reaped (backends of closed connections). None: not our server."""
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
            if int(entry.name) == postmaster:  # its own, and its children's that have exited (reaped)
                total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
            elif int(fields[1]) == postmaster:  # fields[1]: the parent's pid; a live child
                total += int(fields[11]) + int(fields[12])
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


def _process_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (``/proc``), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


SERVE_SETUPS = ("sqlite", "postgresql", "postgresql x2")


def serve_round(setup: str, windows: int, streams: int, batch: int, inflight: int, directory: str | None,
                postgres: Postgres | None) -> dict:
    """One end-to-end round (``--serve``): real ``collector serve`` processes (one, or two on one
    PostgreSQL database, the streams split between them), ``streams`` agents' streams from this process
    over gRPC; every window validated, stored durably and acked after its commit."""
    from collector_grpc import agent_stream, start_collector

    count = 2 if setup.endswith("x2") else 1
    url = postgres.database() if setup.startswith("postgresql") else None
    size = len(realistic_window().SerializeToString()) + 20  # + agent and run ids
    with tempfile.TemporaryDirectory(dir=directory, prefix="outrider-serve-") as tmp:
        db = url or Path(tmp) / "ingest.db"
        fleet = [["--collector-id", f"bench-{i}"] if url else [] for i in range(count)]
        procs = [start_collector(db, "--synchronous", "full", "--log-level", "warning", *ids) for ids in fleet]
        try:
            latencies: list[float] = []
            results: dict[str, int] = {}
            per_stream = windows // streams
            threads = [threading.Thread(target=agent_stream, args=(procs[i % count][1], i, per_stream, batch,
                                                                    inflight, latencies, results))
                       for i in range(streams)]
            cpu0 = [_process_cpu_seconds(p.pid) for p, _ in procs]
            own0 = _cpu_seconds()
            server0 = postgres.server_cpu_seconds() if url else None
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - start
            collectors = [_process_cpu_seconds(p.pid) - c for (p, _), c in zip(procs, cpu0)]
            own = _cpu_seconds() - own0
            server = postgres.server_cpu_seconds() - server0 if server0 is not None else None
        finally:
            for proc, _ in procs:
                proc.send_signal(signal.SIGTERM)
            for proc, _ in procs:
                proc.wait(60)
        if url:
            import psycopg

            with psycopg.connect(url, autocommit=True) as conn:
                disk = conn.execute("SELECT pg_total_relation_size('windows')").fetchone()[0]
                in_db = conn.execute("SELECT count(*) FROM windows").fetchone()[0]
            postgres.done(url)
        else:
            disk = sum(p.stat().st_size for p in Path(tmp).glob("ingest.db*"))  # closed: the WAL checkpointed
            with sqlite3.connect(Path(tmp) / "ingest.db") as conn:
                in_db = conn.execute("SELECT count(*) FROM windows").fetchone()[0]
    sent = per_stream * streams
    stored = results.get("STORED", 0)
    lat = np.array(latencies) * 1e3
    per_window = {"collectors": sum(collectors), "postgresql": server or 0.0, "load generator": own}
    return {
        "setup": setup, "collectors": count, "streams": streams, "batch": batch, "inflight": inflight,
        "windows": sent, "stored": stored, "in_database": in_db,
        "refused": results.get("REJECTED", 0), "duplicates": results.get("DUPLICATE", 0),
        "unacked": sent - sum(results.values()), "window_bytes": size,
        "seconds": round(elapsed, 3), "windows_per_s": round(stored / elapsed),
        "ack_p50_ms": round(float(np.percentile(lat, 50)), 1), "ack_p99_ms": round(float(np.percentile(lat, 99)), 1),
        "collector_cpu_us_per_window": [round(c / stored * 1e6) for c in collectors],
        "server_cpu_us_per_window": round(server / stored * 1e6) if server is not None else None,
        "load_generator_cpu_us_per_window": round(own / stored * 1e6),
        "total_cpu_us_per_window": round(sum(per_window.values()) / stored * 1e6),
        "disk_bytes_per_window": round(disk / max(in_db, 1)),
    }


def serve_median(rounds: list[dict]) -> dict:
    """The median of each figure over one setup's rounds (per-collector CPU: the median of their sum, split
    as in the median round)."""
    out = dict(rounds[0])
    for key in ("seconds", "windows_per_s", "ack_p50_ms", "ack_p99_ms", "server_cpu_us_per_window",
                "load_generator_cpu_us_per_window", "total_cpu_us_per_window", "disk_bytes_per_window"):
        if out[key] is not None:
            out[key] = round(float(np.median([r[key] for r in rounds])), 1)
    ordered = sorted(rounds, key=lambda r: sum(r["collector_cpu_us_per_window"]))
    out["collector_cpu_us_per_window"] = ordered[(len(ordered) - 1) // 2]["collector_cpu_us_per_window"]
    for key in ("stored", "in_database", "refused", "duplicates", "unacked", "windows"):
        out[key] = sum(r[key] for r in rounds)  # every round's, so nothing lost hides in a median
    out["rounds"] = len(rounds)
    out["windows_per_s_each_round"] = [r["windows_per_s"] for r in rounds]
    return out


def serve_main(args: argparse.Namespace, load: tuple[float, ...]) -> None:
    """``--serve``: SQLite, PostgreSQL with one collector and PostgreSQL with two, rounds alternating."""
    setups = [s for s in SERVE_SETUPS if args.engine == "both" or s.startswith(args.engine)]
    postgres = Postgres(args.db) if args.engine != "sqlite" else None
    rounds: dict[str, list[dict]] = {s: [] for s in setups}
    try:
        for _ in range(args.rounds):
            for setup in setups:
                rounds[setup].append(serve_round(setup, args.windows, args.streams, args.batch, args.inflight,
                                                 args.path, postgres))
    finally:
        if postgres is not None:
            postgres.close()
    results = [serve_median(rounds[s]) for s in setups]
    load = [max(a, b) for a, b in zip(load, os.getloadavg())]
    conditions = {"cpus": sorted(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(), "load_average_max": load,
                  "postgresql": "ours (durable: fsync, synchronous_commit, full_page_writes on)" if args.db is None
                  else "--db (its settings)", "sqlite": "synchronous FULL, WAL"}
    if args.json:
        print(json.dumps({"results": results, "conditions": conditions}, indent=2))
        return
    r = results[0]
    print(f"{r['windows'] // r['rounds']:,} windows a round of {FEATURES} features x {ROWS:,} rows "
          f"({r['window_bytes']:,} bytes each) over {r['streams']} gRPC streams, batches of {r['batch']}, "
          f"{r['inflight']} in flight, into real 'collector serve' processes; median of {args.rounds} alternating "
          f"round(s); no pinning, CPUs {conditions['cpus']}; load average (1, 5, 15 min, the larger of start and end) "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'setup':>14} {'windows/s':>10} {'each round':>20} {'ack p50 ms':>11} {'ack p99 ms':>11}"
          f" {'collector(s) us/w':>18} {'postgres us/w':>14} {'loadgen us/w':>13} {'total us/w':>11}"
          f" {'disk B/w':>9} {'refused':>8} {'unacked':>8}")
    for r in results:
        each = "/".join(f"{n:,}" for n in r["windows_per_s_each_round"])
        coll = "+".join(str(c) for c in r["collector_cpu_us_per_window"])
        server = "-" if r["server_cpu_us_per_window"] is None else f"{r['server_cpu_us_per_window']:.0f}"
        print(f"{r['setup']:>14} {r['windows_per_s']:>10,.0f} {each:>20} {r['ack_p50_ms']:>11} {r['ack_p99_ms']:>11}"
              f" {coll:>18} {server:>14} {r['load_generator_cpu_us_per_window']:>13.0f}"
              f" {r['total_cpu_us_per_window']:>11.0f} {r['disk_bytes_per_window']:>9,.0f} {r['refused']:>8}"
              f" {r['unacked']:>8}")


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
    parser.add_argument("--serve", action="store_true",
                        help="end to end: real 'collector serve' processes over gRPC; with --engine both, rounds "
                             "of SQLite, PostgreSQL with one collector and PostgreSQL with two alternate")
    parser.add_argument("--streams", type=int, default=4, help="--serve: agents' gRPC streams (default 4)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.serve:
        if args.offer:
            parser.error("--serve and --offer measure different things: one at a time")
        if args.db and args.engine == "sqlite":
            args.engine = "postgresql"
        if args.streams < 1 or args.windows < args.streams:
            parser.error("--serve needs --streams >= 1 and --windows >= --streams")
        serve_main(args, os.getloadavg())  # no pinning: the collectors, PostgreSQL and this process share the CPUs
        return
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
