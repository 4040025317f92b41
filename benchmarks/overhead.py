"""Hot-path overhead of MonitoredSession over bare onnxruntime, and summary-worker throughput.

    python benchmarks/overhead.py [--calls 20000] [--summarizer process|thread] [--json]

Method: for each model (20-feature logistic regression, 50-tree random forest)
and batch size (1, 64) a bare ``InferenceSession`` and a ``MonitoredSession``
on the same model bytes are called *alternately* in one process, so machine
noise hits both alike (and each goes first half the time). Each call is timed with ``perf_counter_ns``; we report
medians and p99 of both, the added microseconds (monitored - bare, at the
median and p99) and the ratio. Both sessions use one intra-op thread. The
summary worker is running (and busy) during the monitored calls: windows close
every 10,000 rows. The calls are paced (outside the timed spans) so the worker
keeps up and no row is dropped: a call that finds the ring full skips the copy
and only counts its rows, which is cheaper than monitoring them, so an unpaced
batch-64 run (57-75 % of rows dropped) flattered the figure. The rows dropped
and the time spent waiting are printed with each case.

Worker throughput: ``WindowBuilder.add_rows`` (the summary step itself) on
blocks of 8,192 rows x 20 float32 features, rows/s on one core.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import MonitoredSession, examples  # noqa: E402
from agent.capture import Reduce, Slot, FEATURE  # noqa: E402
from agent.sinks import InMemorySink  # noqa: E402
from agent.worker import BLOCK_ROWS, Identity, WindowBuilder  # noqa: E402


def options() -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return so


def overhead(model: bytes, batch: int, calls: int, summarizer: str) -> dict:
    bare = ort.InferenceSession(model, options(), providers=["CPUExecutionProvider"])
    mon = MonitoredSession(model, options(), providers=["CPUExecutionProvider"], sink=InMemorySink(),
                           window_seconds=None, window_rows=10_000, summarizer=summarizer)
    x = examples.tabular_data(n=batch * 64, seed=1)[0]
    feeds = [{"X": x[i:i + batch]} for i in range(0, len(x), batch)]
    clock = time.perf_counter_ns
    for f in feeds * 20:  # warm up both
        bare.run(None, f)
        mon.run(None, f)
    while mon.stats()["rows_summarised"] == 0:  # measure with the worker running, not starting
        mon.run(None, feeds[0])
        time.sleep(0.01)
    t_bare = np.empty(calls, np.int64)
    t_mon = np.empty(calls, np.int64)
    ring_rows = mon._ring.layout.rows  # type: ignore[union-attr]
    waited, dropped_before = 0.0, mon.stats()["dropped_rows"]  # the unpaced warm-up may drop some
    for i in range(calls):
        f = feeds[i % len(feeds)]
        # Paced (untimed) so the worker keeps up: a full ring makes a call skip the copy and count
        # its rows as dropped, which is cheaper than monitoring it and would flatter the figure.
        stats = mon.stats()
        if stats["rows_captured"] - stats["rows_summarised"] > ring_rows // 4:
            w0 = time.perf_counter()
            while (s := mon.stats())["rows_captured"] - s["rows_summarised"] > ring_rows // 8:
                time.sleep(0.001)
            waited += time.perf_counter() - w0
        first, second = (bare, mon) if i % 2 else (mon, bare)  # neither always runs first
        t0 = clock()
        first.run(None, f)
        t1 = clock()
        second.run(None, f)
        t2 = clock()
        if first is bare:
            t_bare[i], t_mon[i] = t1 - t0, t2 - t1
        else:
            t_mon[i], t_bare[i] = t1 - t0, t2 - t1
    mon.close()
    stats = mon.stats()
    b50, b99 = np.percentile(t_bare, [50, 99]) / 1e3
    m50, m99 = np.percentile(t_mon, [50, 99]) / 1e3
    return {"batch": batch, "bare_median_us": round(b50, 2), "bare_p99_us": round(b99, 2),
            "monitored_median_us": round(m50, 2), "monitored_p99_us": round(m99, 2),
            "added_median_us": round(m50 - b50, 2), "added_p99_us": round(m99 - b99, 2),
            "ratio_median": round(m50 / b50, 4),
            "rows_summarised": stats["rows_summarised"], "dropped_rows": stats["dropped_rows"] - dropped_before,
            "paced_wait_s": round(waited, 2)}


def worker_throughput(rows: int = 2_000_000, features: int = 20) -> dict:
    slot = Slot("X", FEATURE, Reduce.NUMERIC, np.dtype(np.float32), (features,),
                [f"X[{i}]" for i in range(features)])
    builder = WindowBuilder((slot,), Identity("bench", "run", "m", "1", ""))
    data = np.random.default_rng(0).standard_normal((BLOCK_ROWS * 8, features)).astype(np.float32)
    done, t0 = 0, time.perf_counter()
    while done < rows:
        for i in range(0, len(data), BLOCK_ROWS):
            builder.add_rows([data[i:i + BLOCK_ROWS]])
        done += len(data)
    elapsed = time.perf_counter() - t0
    return {"rows": done, "features": features, "block_rows": BLOCK_ROWS,
            "rows_per_s": round(done / elapsed)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--summarizer", default="process", choices=["process", "thread"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {"summarizer": args.summarizer, "models": {}}
    for name, build in (("logistic_regression_20", examples.logistic_regression),
                        ("random_forest_50", examples.random_forest)):
        model = build()
        results["models"][name] = [overhead(model, b, args.calls, args.summarizer) for b in (1, 64)]
    results["worker"] = worker_throughput()
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"summarizer: {args.summarizer}; {args.calls} alternating calls per case")
    print(f"{'model':24} {'batch':>5} {'bare p50':>9} {'mon p50':>9} {'added p50':>10} "
          f"{'bare p99':>9} {'mon p99':>9} {'added p99':>10} {'ratio':>7} {'dropped':>8} {'paced s':>8}")
    for name, rows in results["models"].items():
        for r in rows:
            print(f"{name:24} {r['batch']:>5} {r['bare_median_us']:>9.2f} {r['monitored_median_us']:>9.2f} "
                  f"{r['added_median_us']:>10.2f} {r['bare_p99_us']:>9.2f} {r['monitored_p99_us']:>9.2f} "
                  f"{r['added_p99_us']:>10.2f} {r['ratio_median']:>7.3f} {r['dropped_rows']:>8} {r['paced_wait_s']:>8}")
    w = results["worker"]
    print(f"summary worker: {w['rows_per_s']:,} rows/s ({w['features']} float32 features, blocks of {w['block_rows']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
