"""Drift engine: the cost of one evaluation as the rows behind the sketches grow.

    python benchmarks/drift_eval.py [--repeats 300] [--max-rows 10000000] [--json]

One model with 20 columns: 17 numeric (normal, lognormal, exponential,
uniform, Poisson) and 3 categorical (5 values, 2 values, a 500-value Zipf
column that overflows the frequent-items sketch). The reference is a
100,000-row profile (REFERENCE_K). The current sketches hold 10^3 .. 10^7
rows, built as the collector builds them: windows merged (1,000-row windows
up to 10^4 rows, 10,000-row windows beyond; a pool of 16 distinct windows per
column is merged round-robin, which gives a KLL of the same size and shape
as distinct windows would).

Only ``collector.monitoring.drift.evaluate`` is timed. Before every timed call the
current sketches are rebuilt from their serialised form (untimed), as after
a fresh merge, so each evaluation pays for reading their retained items.
Two reference cases: "warm" (the profile's sketches kept in memory between
evaluations, their sorted views cached) and "cold" (deserialised before each
call, so the evaluation also builds the reference's views). Sizes are timed
interleaved, in a shuffled order per round, so machine noise hits all alike.

Reported per size: median and p99 ms per evaluation, and the median's ratio
to the 10^3 case. The issue's target is <= 10 ms whatever the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import sketches  # noqa: E402
from collector.monitoring.drift import evaluate  # noqa: E402
from protos import summary_pb2  # noqa: E402

CS = summary_pb2.ColumnSummary
Sampler = Callable[[np.random.Generator, int], np.ndarray]
_ZIPF = 1.0 / np.arange(1, 501) ** 1.1
COLUMNS: dict[str, tuple[str, Sampler]] = {
    **{f"normal{i}": ("n", lambda r, n, i=i: r.normal(i, 1 + i / 4, n)) for i in range(10)},
    **{f"lognormal{s}": ("n", lambda r, n, s=s: r.lognormal(0, s, n)) for s in (0.5, 1.0, 1.5)},
    "exponential": ("n", lambda r, n: r.exponential(2.0, n)),
    "uniform": ("n", lambda r, n: r.uniform(0, 1, n)),
    "poisson": ("n", lambda r, n: r.poisson(3.0, n).astype(np.float64)),
    "age": ("n", lambda r, n: np.round(r.normal(40, 12, n))),
    "colour": ("c", lambda r, n: r.choice(np.array(list("ABCDE")), n, p=[0.3, 0.25, 0.2, 0.15, 0.1])),
    "member": ("c", lambda r, n: r.choice(np.array(["yes", "no"]), n, p=[0.8, 0.2])),
    "product": ("c", lambda r, n: r.choice(np.array([f"p{i}" for i in range(500)]), n, p=_ZIPF / _ZIPF.sum())),
}
Sketch = sketches.NumericSketch | sketches.CategoricalSketch


def build(kind: str, values: np.ndarray, k: int = sketches.DEFAULT_K) -> Sketch:
    sketch: Sketch = sketches.NumericSketch(k) if kind == "n" else sketches.CategoricalSketch()
    sketch.update(values)
    return sketch


def current_protos(rng: np.random.Generator, rows: int, pool: int = 16) -> dict[str, CS]:
    """Each column's current sketch for ``rows`` rows, merged from windows, serialised."""
    window_rows = 1000 if rows <= 10_000 else 10_000
    out = {}
    for name, (kind, sample) in COLUMNS.items():
        windows = [build(kind, sample(rng, window_rows)) for _ in range(min(pool, rows // window_rows))]
        merged: Sketch = sketches.NumericSketch() if kind == "n" else sketches.CategoricalSketch()
        for i in range(rows // window_rows):
            merged.merge(windows[i % len(windows)])  # type: ignore[arg-type]
        out[name] = merged.to_proto(name, CS.FEATURE, "X")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300, help="timed evaluations per size and case")
    parser.add_argument("--max-rows", type=int, default=10_000_000, help="largest current size (a power of 10)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    reference = {name: build(kind, sample(rng, 100_000), sketches.REFERENCE_K)
                 for name, (kind, sample) in COLUMNS.items()}
    reference_protos = {name: s.to_proto(name, CS.FEATURE, "X") for name, s in reference.items()}
    sizes = [10**e for e in range(3, 8) if 10**e <= args.max_rows]
    t0 = time.perf_counter()
    currents = {rows: current_protos(rng, rows) for rows in sizes}
    print(f"built sketches in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    times: dict[tuple[int, str], list[float]] = {(rows, case): [] for rows in sizes for case in ("warm", "cold")}
    flagged: dict[int, int] = {}
    evaluate(reference, {n: sketches.from_proto(m) for n, m in currents[sizes[0]].items()})  # imports, caches
    for _ in range(args.repeats):
        for rows in rng.permutation(sizes).tolist():
            for case in rng.permutation(["warm", "cold"]).tolist():
                current = {name: sketches.from_proto(msg) for name, msg in currents[rows].items()}
                ref = reference if case == "warm" else {n: sketches.from_proto(m) for n, m in reference_protos.items()}
                start = time.perf_counter_ns()
                result = evaluate(ref, current)
                times[(rows, case)].append((time.perf_counter_ns() - start) / 1e6)
                flagged[rows] = sum(col.drifted for col in result)

    figures = []
    base = {case: float(np.median(times[(sizes[0], case)])) for case in ("warm", "cold")}
    for rows in sizes:
        row: dict[str, float | int] = {"rows": rows, "flagged_columns": flagged[rows]}
        for case in ("warm", "cold"):
            ms = np.array(times[(rows, case)])
            row[f"{case}_median_ms"] = round(float(np.median(ms)), 3)
            row[f"{case}_p99_ms"] = round(float(np.percentile(ms, 99)), 3)
            row[f"{case}_ratio"] = round(float(np.median(ms)) / base[case], 3)
        figures.append(row)
    if args.json:
        print(json.dumps({"columns": len(COLUMNS), "repeats": args.repeats, "figures": figures}, indent=2))
        return 0
    print(f"one evaluation of {len(COLUMNS)} columns, {args.repeats} repeats per cell, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print("| current rows | warm ref p50 ms | warm p99 ms | ratio to 10^3 | cold ref p50 ms | cold p99 ms "
          "| ratio to 10^3 | columns flagged |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in figures:
        print(f"| {r['rows']:,} | {r['warm_median_ms']:.2f} | {r['warm_p99_ms']:.2f} | {r['warm_ratio']:.2f} "
              f"| {r['cold_median_ms']:.2f} | {r['cold_p99_ms']:.2f} | {r['cold_ratio']:.2f} | {r['flagged_columns']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
