"""The whole drift evaluation from the database: read, merge and test, for fleets of 10 and 100 agents.

    python benchmarks/drift_eval_full.py [--agents 10,100] [--minutes 60] [--repeats 15] [--json]

``drift_eval.py`` times the statistics alone; this is what the collector's evaluation loop pays.
A real SQLite store (``collector.store.Store``, FULL synchronous) is filled through its ingest
path with ``--agents`` agents each sending a 10-s window for every 10 s of the last ``--minutes``
minutes (an hour of 10 agents: 3,600 windows). Each window is the agent's own ``WindowBuilder``
summary of 1,000 rows of 20 columns (17 numeric of several shapes, one small-integer, 2
categorical), drawn from a pool of 32 distinct windows, re-stamped per agent and time. The model
version has a 100,000-row reference profile built the same way.

Timed, median and p90 of ``--repeats`` calls: ``DriftEvaluator.evaluate(record=False)`` (the
shipped spans, 5 min and 1 h), and apart, its three parts: the database read of the span's
windows with their bodies (``Store.windows``), their merge into one summary per span
(``merge_spans``) and the tests (``drift.evaluate_spans``). The evaluator reads at most
``evaluation.MAX_WINDOWS`` windows; when the span holds more, the oldest are left out, which the
table says.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import sketches  # noqa: E402
from agent.capture import Reduce, Slot  # noqa: E402
from agent.worker import BLOCK_ROWS, Identity, WindowBuilder  # noqa: E402
from collector import drift, evaluation  # noqa: E402
from collector.evaluation import DriftEvaluator, merge_spans  # noqa: E402
from collector.store import Store  # noqa: E402
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


def fill(store: Store, agents: int, minutes: int, now: int) -> int:
    rng = np.random.default_rng(1)
    pool = [summary(rng, 1000) for _ in range(32)]
    windows, count = [], 0
    for a in range(agents):
        for seq in range(minutes * 6):
            w = summary_pb2.WindowSummary()
            w.CopyFrom(pool[(a * 7 + seq) % len(pool)])
            w.agent_id, w.run_id, w.seq = f"agent-{a}", "run-1", seq
            w.end_unix_nano = now - (minutes * 6 - 1 - seq) * 10 * NS
            w.start_unix_nano = w.end_unix_nano - 10 * NS
            windows.append(w)
            if len(windows) == 500:
                store.submit_windows(windows).result()
                count, windows = count + len(windows), []
    if windows:
        store.submit_windows(windows).result()
        count += len(windows)
    return count


def timed(fn, repeats: int) -> tuple[float, float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), float(np.percentile(times, 90)), result


def measure(agents: int, minutes: int, repeats: int, directory: str) -> dict:
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        store = Store(Path(tmp) / "fleet.db")
        try:
            now = time.time_ns() // NS * NS
            stored = fill(store, agents, minutes, now)
            reference = summary(np.random.default_rng(2), 100_000)
            profile = summary_pb2.ReferenceProfile(model_name=MODEL, model_sha256="ab" * 32, data_sha256="cd" * 32,
                                                   rows=reference.rows, columns=reference.columns)
            store.attach_profile(MODEL, VERSION, profile, "bench", now)
            evaluator = DriftEvaluator(store, clock=lambda: now)
            evaluator.evaluate(MODEL, VERSION, record=False)  # the reference's parsed sketches are cached
            whole = timed(lambda: evaluator.evaluate(MODEL, VERSION, record=False), repeats)
            config = drift.DriftConfig()
            spans = config.spans()
            since = now - int(spans[-1] * 1e9)
            read = timed(lambda: store.windows(MODEL, VERSION, since_ns=since, limit=evaluation.MAX_WINDOWS,
                                               include_summaries=True), repeats)
            infos = read[2]
            merge = timed(lambda: merge_spans([i.summary for i in infos], now, spans), repeats)
            ref = {c.name: sketches.from_proto(c) for c in profile.columns}
            currents = [(span, {c.name: sketches.from_proto(c) for c in s.columns})
                        for span, s in zip(spans, merge[2]) if s is not None]
            tests = timed(lambda: drift.evaluate_spans(ref, currents, config), repeats)
            result = whole[2]
        finally:
            store.close()
    return {"agents": agents, "windows_stored": stored, "windows_read": len(infos),
            "left_out": stored - len(infos), "rows_compared": result.rows, "evaluated": result.evaluated,
            "whole_ms": whole[:2], "read_ms": read[:2], "merge_ms": merge[:2], "tests_ms": tests[:2]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", default="10,100", help="fleet sizes, comma-separated (default 10,100)")
    parser.add_argument("--minutes", type=int, default=60, help="minutes of 10-s windows per agent (default 60)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--path", default=None, help="directory for the databases (default: the system's temp)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = [measure(int(a), args.minutes, args.repeats, args.path) for a in args.agents.split(",")]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{args.minutes} min of 10-s windows per agent, 20 columns, {args.repeats} repeats; median / p90 ms")
    print(f"{'agents':>6} {'stored':>7} {'read':>6} {'left out':>8} {'whole':>15} {'db read':>15} {'merge':>15} "
          f"{'tests':>13}")
    for r in results:
        cells = [f"{r[k][0]:7.1f} /{r[k][1]:6.1f}" for k in ("whole_ms", "read_ms", "merge_ms")]
        print(f"{r['agents']:>6} {r['windows_stored']:>7} {r['windows_read']:>6} {r['left_out']:>8} "
              f"{cells[0]:>15} {cells[1]:>15} {cells[2]:>15} {r['tests_ms'][0]:6.1f} /{r['tests_ms'][1]:5.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
