"""The summary worker's hot loop: the numeric columns of a block of rows into their ``NumericSketch``es.

Counts, NaN/inf tallies, moments (two passes in float64) and min/max for every column at once in numpy,
the KLLs compacted in numpy (``agent.sketches.kll``) and merged, the exact counts of few-valued columns.
``NumericSketch.update`` is one column of it, so a sketch updated either way is the same.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from agent.sketches.kll import COMPACT_ROWS, merge_compacted

if TYPE_CHECKING:
    from agent.sketches.numeric import NumericSketch

_F32_MAX = float(np.finfo(np.float32).max)


def _kll_input(values: np.ndarray) -> np.ndarray:
    """The values as the float32 the KLL stores. Wider floats are clipped first
    so that a finite 1e300 counts as finite in the KLL too, not as inf."""
    if values.dtype == np.float32:
        return values
    if values.dtype.kind == "f" and values.dtype.itemsize > 4:
        values = np.clip(values, -_F32_MAX, _F32_MAX)
    return values.astype(np.float32)


def _finite_moments(cols: np.ndarray) -> tuple[np.ndarray, ...]:
    """(mean, m2, min, max) of each row of a C-contiguous float64 [columns, rows]
    array, which is overwritten (no second buffer in the hot loop). Rows are
    reduced along the contiguous axis with numpy's pairwise sum, which gives
    the same bits for a row whether it is alone or one of many. Two passes,
    not sum of squares, so a large mean does not cancel away the variance.
    Beyond |x| ~ 1e154 (float64 input only) m2 overflows to inf, silently:
    a warning per block would flood the worker's log."""
    lows, highs = cols.min(axis=1), cols.max(axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        mean = cols.sum(axis=1) / cols.shape[1]
        wide = ~np.isfinite(mean)
        if wide.any():  # values near the float64 limit: their sum overflowed, their mean need not (the
            mean[wide] = (cols[wide] / cols.shape[1]).sum(axis=1)  # collector refuses a non-finite mean)
        np.subtract(cols, mean[:, None], out=cols)
        np.square(cols, out=cols)
    return mean, cols.sum(axis=1), lows, highs


def update_numeric_block(sketches: Sequence[NumericSketch], block: np.ndarray) -> None:
    """Update every column's sketch from a 2-D block [rows, len(sketches)]. Gives the same result
    as ``sketch.update(block[:, j])`` for each column (``update_numeric_blocks`` with one part)."""
    update_numeric_blocks([(sketches, block)])


def update_numeric_blocks(parts: Sequence[tuple[Sequence[NumericSketch], np.ndarray]]) -> None:
    """Update the sketches of several blocks of the same rows (a model's inputs, its outputs, the
    derived columns): each part is (sketches, its 2-D block [rows, len(sketches)]).

    This is the summary worker's hot loop. Counts, NaN/inf tallies, moments,
    min and max are computed for all columns of all parts at once with numpy; a
    column that is all finite (the usual case) needs no masking at all. Then
    the KLLs, which dominate the cost: a block of COMPACT_ROWS rows or more is
    compacted in numpy into one small KLL per column and merged
    (``kll.compacted``); a smaller one goes to the binding's vectorised update,
    sorted. One call for every part because each call has a fixed cost (~90 us
    at 8,192 rows): a classifier's two probabilities and its confidence cost
    more in calls of their own than its 20 features in one.
    """
    clean: list[tuple[Sequence[NumericSketch], np.ndarray, np.ndarray]] = []  # (sketches, block, all-finite columns)
    rows = None
    for sketches, block in parts:
        block = np.asarray(block)
        if block.ndim != 2 or block.shape[1] != len(sketches):
            raise ValueError(f"block shape {block.shape} does not match {len(sketches)} sketches")
        if block.dtype.kind not in "fiub":
            raise ValueError(f"numeric sketches take real numbers, got dtype {block.dtype}")
        if rows is None:
            rows = block.shape[0]
        elif block.shape[0] != rows:
            raise ValueError(f"blocks of {rows} and {block.shape[0]} rows: the parts must hold the same rows")
        if rows and (columns := _update_nonfinite(sketches, block)).size:
            clean.append((sketches, block, columns))
    if not clean:
        return
    # One transposed float64 copy of every all-finite column (moments overwrite it), [columns, rows],
    # a part at a time; the KLL's float32 values from it: a contiguous conversion costs a fraction of
    # a second strided copy.
    total = sum(columns.size for _, _, columns in clean)
    cols, cols_kll = np.empty((total, rows), np.float64), np.empty((total, rows), np.float32)
    at = 0
    for _, block, columns in clean:
        part = slice(at, at + columns.size)
        cols[part] = (block if columns.size == block.shape[1] else block[:, columns]).T
        cols_kll[part] = cols[part] if block.dtype == np.float32 else _kll_input(cols[part])
        at += columns.size
    means, m2s, lows, highs = _finite_moments(cols)
    flat = [(sketches[j], block, j) for sketches, block, columns in clean for j in columns.tolist()]
    klls = [sketch._kll for sketch, _, _ in flat]
    ks = {kll.k for kll in klls}
    if rows >= COMPACT_ROWS and len(ks) == 1:
        merge_compacted(klls, cols_kll, ks.pop())
    else:
        # Sorted first: the binding's level-0 compactions sort what they hold, and a sorted
        # input makes them ~2x cheaper (16 vs 36 ns a value) for ~2 ns of np.sort a value. KLL's
        # bound holds for any order of the stream (rank error over 40 streams: 0.0063 vs 0.0064).
        for kll, values in zip(klls, np.sort(cols_kll, axis=1)):
            kll.update(values)
    for (sketch, block, j), mean, m2, low, high in zip(flat, means.tolist(), m2s.tolist(), lows.tolist(),
                                                        highs.tolist()):
        sketch._absorb(rows, mean, m2, low, high)
        sketch.count += rows
        sketch._count_exact(block[:, j])


def _update_nonfinite(sketches: Sequence[NumericSketch], block: np.ndarray) -> np.ndarray:
    """Update the columns of ``block`` that hold NaN or inf, one at a time (masked); return the
    indices of the others, all finite, for the block update."""
    rows = block.shape[0]
    finite = np.isfinite(block) if block.dtype.kind == "f" else None
    if finite is None or finite.all():
        return np.arange(len(sketches))
    col_finite = finite.all(axis=0)
    nans = np.isnan(block).sum(axis=0)
    for j in np.flatnonzero(~col_finite):
        sketch, keep = sketches[j], finite[:, j]
        values = block[keep, j]
        if values.size:
            cols = np.array(values.reshape(1, -1), dtype=np.float64, order="C")
            sketch._absorb(values.size, *(float(s[0]) for s in _finite_moments(cols)))
            sketch._kll.update(_kll_input(values))
            sketch._count_exact(values)
        sketch.count += rows
        sketch.missing += int(nans[j])
        sketch.infinite += rows - int(nans[j]) - values.size
    return np.flatnonzero(col_finite)
