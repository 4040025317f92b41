"""What the derived columns cost the summary worker: ``@reconstruction_error`` and ``@confidence``.

``WindowBuilder.add_rows`` (the whole summary step) on blocks of 8,192 rows, with
and without the derived column, the two builders fed the same blocks
**alternately** in one process and each step timed, so the machine's noise hits
both sides. The request path is not involved: both columns are computed by the
summary worker from rows already in the ring.

    .venv/bin/python benchmarks/joint_cost.py [--rows 1000000] [--json]

Cases: 20 float32 features with and without the projection (fitted on data
whose features 10 and 11 are correlated 0.9, the default variance share:
18 of 20 components); 100 features (64 components, the cap); a classifier's
slots (20 features, a label, two probabilities) with and without ``@confidence``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.capture import FEATURE, PREDICTION, Reduce, Slot  # noqa: E402
from agent.sketches import joint  # noqa: E402
from agent.worker import BLOCK_ROWS, Identity, WindowBuilder  # noqa: E402

IDENTITY = Identity("bench", "run", "m", "1", "")


def features(d: int, n: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, d))
    x[:, 11] = 0.9 * x[:, 10] + np.sqrt(1 - 0.81) * x[:, 11]
    return x.astype(np.float32)


def feature_slot(d: int) -> Slot:
    return Slot("X", FEATURE, Reduce.NUMERIC, np.dtype(np.float32), (d,), [f"X[{i}]" for i in range(d)])


def compare(base: WindowBuilder, other: WindowBuilder, blocks: list[list[np.ndarray]], rows: int) -> dict:
    """Rows/s of each builder, fed the same blocks alternately (each goes first half the time)."""
    spent = {"base": 0.0, "other": 0.0}
    done = step = 0
    while done < rows:
        for block in blocks:
            order = (("base", base), ("other", other)) if step % 2 == 0 else (("other", other), ("base", base))
            for name, builder in order:
                t0 = time.perf_counter()
                builder.add_rows(block)
                spent[name] += time.perf_counter() - t0
            done += len(block[0])
            step += 1
    base_rate, other_rate = done / spent["base"], done / spent["other"]
    return {"rows": done, "without_rows_per_s": round(base_rate), "with_rows_per_s": round(other_rate),
            "ratio": round(other_rate / base_rate, 3),
            "added_us_per_1000_rows": round((1 / other_rate - 1 / base_rate) * 1e9, 1)}


def projection_case(d: int, rows: int) -> dict:
    rng = np.random.default_rng(0)
    projection, _ = joint.fit_projection(features(d, 50_000, rng), [f"X[{i}]" for i in range(d)])
    data = features(d, BLOCK_ROWS * 8, rng)
    blocks = [[data[i:i + BLOCK_ROWS]] for i in range(0, len(data), BLOCK_ROWS)]
    slots = (feature_slot(d),)
    result = compare(WindowBuilder(slots, IDENTITY), WindowBuilder(slots, IDENTITY, projection=projection),
                     blocks, rows)
    return {"case": f"{d} features, projection of {len(projection.basis)} components", **result}


def confidence_case(rows: int) -> dict:
    rng = np.random.default_rng(1)
    slots = (feature_slot(20), Slot("label", PREDICTION, Reduce.CATEGORICAL, np.dtype(np.int64), (), ["label"], True),
             Slot("probabilities", PREDICTION, Reduce.NUMERIC, np.dtype(np.float32), (2,),
                  ["probabilities[0]", "probabilities[1]"], True))
    x = features(20, BLOCK_ROWS * 8, rng)
    p1 = (1 / (1 + np.exp(-x[:, 0]))).astype(np.float32)
    blocks = [[x[i:i + BLOCK_ROWS], (p1[i:i + BLOCK_ROWS] > 0.5).astype(np.int64),
               np.stack([1 - p1[i:i + BLOCK_ROWS], p1[i:i + BLOCK_ROWS]], axis=1)]
              for i in range(0, len(x), BLOCK_ROWS)]
    base = WindowBuilder(slots, IDENTITY)
    base._confidence = None  # the same builder as before @confidence existed
    base._reset(time.time_ns())
    return {"case": "classifier: 20 features, label, 2 probabilities; @confidence",
            **compare(base, WindowBuilder(slots, IDENTITY), blocks, rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per case, each side")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = [projection_case(20, args.rows), projection_case(100, args.rows // 4), confidence_case(args.rows)]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'case':62} {'without rows/s':>15} {'with rows/s':>12} {'ratio':>6} {'µs / 1000 rows':>15}")
    for r in results:
        print(f"{r['case']:62} {r['without_rows_per_s']:>15,} {r['with_rows_per_s']:>12,} {r['ratio']:>6.3f} "
              f"{r['added_us_per_1000_rows']:>15}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
