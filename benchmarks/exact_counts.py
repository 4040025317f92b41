"""What the exact counts of few-valued numeric columns cost the summary worker.

    python -m benchmarks.exact_counts [--blocks 400] [--json]

Two ``WindowBuilder``s with the same slots are fed the same 8,192-row blocks of 20 float32 features
alternately (which goes first alternates too), and each ``add_rows`` is timed. One counts exact values
as shipped; in the other every numeric sketch starts overflowed, so its exact counting returns at once
(the worker as it was before exact counts, plus one attribute test per column and block). Cases:

- 20 continuous columns, one open window (each column stops counting at its first block);
- the same with a window closed after every block (every block is a first block: the worst case);
- 15 continuous columns and 5 small-integer codes (0-4), one open window (the codes are counted in
  every block: an equality scan per known value);
- the same with a window closed after every block.

Reported: rows/s of each side and their ratio (with / without), from the summed times of each side.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.capture import Reduce, Slot  # noqa: E402
from agent.worker import BLOCK_ROWS, Identity, WindowBuilder  # noqa: E402
from protos import summary_pb2  # noqa: E402

FEATURES = 20


def _builder() -> WindowBuilder:
    slot = Slot("X", summary_pb2.ColumnSummary.FEATURE, Reduce.NUMERIC, np.dtype(np.float32), (FEATURES,),
                [f"X[{i}]" for i in range(FEATURES)])
    return WindowBuilder((slot,), Identity("bench", "run", "m", "1", ""))


def _without_exact(builder: WindowBuilder) -> None:
    for sketch in builder.columns[0]:
        sketch.exact_overflow = True  # counting returns at once


def case(blocks: int, codes: int, close_every_block: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((BLOCK_ROWS * 8, FEATURES)).astype(np.float32)
    if codes:
        data[:, FEATURES - codes:] = rng.integers(0, 5, size=(len(data), codes))
    with_exact, without = _builder(), _builder()
    _without_exact(without)
    spent = {"with": 0, "without": 0}
    for i in range(blocks):
        block = data[(i % 8) * BLOCK_ROWS:(i % 8 + 1) * BLOCK_ROWS]
        order = [("with", with_exact), ("without", without)]
        for name, builder in order if i % 2 else order[::-1]:
            start = time.perf_counter_ns()
            builder.add_rows([block])
            spent[name] += time.perf_counter_ns() - start
            if close_every_block:
                builder.close(time.time_ns(), 0, 0)
                if name == "without":
                    _without_exact(builder)
    rows = blocks * BLOCK_ROWS
    rates = {name: rows / (ns / 1e9) for name, ns in spent.items()}
    return {"continuous": FEATURES - codes, "codes": codes, "window closed every block": close_every_block,
            "with_rows_per_s": round(rates["with"]), "without_rows_per_s": round(rates["without"]),
            "ratio": round(rates["with"] / rates["without"], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=400, help="blocks fed to each builder per case")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = [case(args.blocks, codes, close) for codes in (0, 5) for close in (False, True)]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{args.blocks} blocks of {BLOCK_ROWS} rows per side and case; load average {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} CPUs")
    print("| columns | window | with exact counts, rows/s | without, rows/s | ratio |")
    print("|---|---|---:|---:|---:|")
    for r in results:
        what = f"{r['continuous']} continuous" + (f" + {r['codes']} codes 0-4" if r["codes"] else "")
        window = "closed after every block" if r["window closed every block"] else "one open window"
        print(f"| {what} | {window} | {r['with_rows_per_s']:,} | {r['without_rows_per_s']:,} | {r['ratio']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
