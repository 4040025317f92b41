"""Numeric columns: ``NumericSketch`` and the summary worker's block update.

Counts, NaN/inf tallies, moments (Chan's merge), min, max, an Apache
DataSketches KLL of the finite values and, while a column has at most
MAX_EXACT_VALUES distinct finite values, their exact counts (integer codes,
flags, small counts: the drift engine judges such a column by its
frequencies). Every field merges associatively and commutatively (up to float
rounding, and up to the KLL's randomised compaction for quantiles), so
windows from any agents combine in any order.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import datasketches as ds
import numpy as np

from agent.errors import InvalidArgument
from agent.sketches.kll import COMPACT_ROWS, check_kll, items_and_weights, merge_compacted
from protos import summary_pb2

DEFAULT_K = 200  # KLL k for agent windows: ~1.3% rank error, a few KB saturated
REFERENCE_K = 800  # reference profiles are built once and compared often: buy accuracy
# Exact counts are kept while a column has at most this many distinct finite values (sticky
# overflow beyond). The drift engine judges a column by its frequencies when the reference has
# at most 20 (collector.monitoring.drift.DISCRETE_MAX_VALUES); the room above that lets traffic bring a
# dozen new values and still be counted exactly.
MAX_EXACT_VALUES = 32
# A block's first values are probed before the whole block is counted: a continuous column shows
# more than MAX_EXACT_VALUES distinct values among its first few, and stops being tracked for
# ~10 us instead of a sort of the whole block.
_EXACT_PROBE = 4 * MAX_EXACT_VALUES
# Up to this many known values, counting each by an equality scan beats a binary search per value.
_EQUALITY_SCAN = 8
_NO_VALUES = np.empty(0, np.float64)
_NO_COUNTS = np.empty(0, np.int64)
_NO_VALUES.flags.writeable = _NO_COUNTS.flags.writeable = False  # shared by every empty sketch

_F32_MAX = float(np.finfo(np.float32).max)
# What the C++ deserialisers raise on malformed bytes (std exceptions as mapped by nanobind).
_DESERIALIZE_ERRORS = (ValueError, IndexError, RuntimeError, MemoryError, OverflowError)
_T = TypeVar("_T")


def _deserialize(fn: Callable[[bytes], _T], data: bytes, what: str) -> _T:
    """Shared with categorical.py: one way to turn C++ parse errors into InvalidArgument."""
    try:
        return fn(data)
    except _DESERIALIZE_ERRORS as exc:
        raise InvalidArgument(f"corrupt {what} sketch: {exc}") from exc


def _kll_input(values: np.ndarray) -> np.ndarray:
    """The values as the float32 the KLL stores. Wider floats are clipped first
    so that a finite 1e300 counts as finite in the KLL too, not as inf."""
    if values.dtype == np.float32:
        return values
    if values.dtype.kind == "f" and values.dtype.itemsize > 4:
        values = np.clip(values, -_F32_MAX, _F32_MAX)
    return values.astype(np.float32)


class NumericSketch:
    """One numeric column: count, missing (NaN), infinite (±inf), moments (mean,
    m2 via Chan's parallel merge), min, max over finite values, an Apache
    DataSketches ``kll_floats_sketch`` of the finite values, and the exact
    count of each finite value while there are at most MAX_EXACT_VALUES
    distinct ones (``exact_counts``).

    Moments are float64 over the values as given (float64 inputs keep their
    precision); the KLL stores float32, which is plenty for quantiles. With no
    finite values ``min``/``max`` read as NaN; internally they are +inf/-inf so
    that merging is a plain min()/max() with no special case.
    """

    def __init__(self, k: int = DEFAULT_K) -> None:
        self.count = 0
        self.missing = 0
        self.infinite = 0
        self.mean = 0.0
        self.m2 = 0.0
        self._min = math.inf
        self._max = -math.inf
        self._kll = ds.kll_floats_sketch(k)
        self._view: tuple[ds.kll_floats_sketch, int, np.ndarray, np.ndarray] | None = None
        self._edges: dict[int, np.ndarray] = {}  # bin_edges, valid with _view
        # Exact counts: distinct finite values ascending (float64) and their counts, until
        # ``exact_overflow`` (then both stay empty for good).
        self._exact_values, self._exact_counts = _NO_VALUES, _NO_COUNTS
        self.exact_overflow = False

    @property
    def k(self) -> int:
        return self._kll.k

    @property
    def finite_count(self) -> int:
        return self.count - self.missing - self.infinite

    @property
    def min(self) -> float:
        return self._min if self.finite_count else math.nan

    @property
    def max(self) -> float:
        return self._max if self.finite_count else math.nan

    @property
    def exact_counts(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(values ascending, counts) of the finite values, exact, while the column has had at
        most MAX_EXACT_VALUES distinct ones here and in everything merged in; None after that
        (or when unknown: a window from an agent that predates exact counts). Read-only arrays."""
        if self.exact_overflow:
            return None
        return self._exact_values, self._exact_counts

    def _overflow(self) -> None:
        self.exact_overflow = True
        self._exact_values, self._exact_counts = _NO_VALUES, _NO_COUNTS

    def _set_exact(self, values: np.ndarray, counts: np.ndarray) -> None:
        values.flags.writeable = counts.flags.writeable = False  # handed out by exact_counts
        self._exact_values, self._exact_counts = values, counts

    def _count_exact(self, values: np.ndarray) -> None:
        """Add a 1-D array of finite values (any real dtype) to the exact counts.

        The hot loop of a discrete column compares a contiguous float64 copy of the
        block with each of the few known values (or, past _EQUALITY_SCAN of them,
        searches them and bincounts); only values not seen before are sorted (np.unique)."""
        if self.exact_overflow or values.size == 0:
            return
        known, counts = self._exact_values, self._exact_counts
        if known.size:
            values = np.asarray(values, dtype=np.float64, order="C")
            if known.size <= _EQUALITY_SCAN:
                found = np.array([np.count_nonzero(values == v) for v in known.tolist()], np.int64)
                if found.sum() == values.size:
                    self._set_exact(known, counts + found)
                    return
            at = np.searchsorted(known, values)
            np.minimum(at, known.size - 1, out=at)
            hit = known[at] == values
            if hit.all():
                self._set_exact(known, counts + np.bincount(at, minlength=known.size))
                return
            counts = counts + np.bincount(at[hit], minlength=known.size)
            values = values[~hit]
        if values.size > _EXACT_PROBE and known.size + np.unique(values[:_EXACT_PROBE]).size > MAX_EXACT_VALUES:
            self._overflow()
            return
        new, new_counts = np.unique(values, return_counts=True)
        if known.size + new.size > MAX_EXACT_VALUES:
            self._overflow()
            return
        merged = np.concatenate((known, new.astype(np.float64)))
        order = np.argsort(merged, kind="stable")
        self._set_exact(merged[order], np.concatenate((counts, new_counts.astype(np.int64)))[order])

    def _merge_exact(self, other: NumericSketch) -> None:
        if self.exact_overflow:
            return
        if other.exact_overflow:
            self._overflow()
            return
        if other._exact_values.size == 0:
            return
        mine, theirs = (self._exact_values, self._exact_counts), (other._exact_values, other._exact_counts)
        if mine[0].size == 0:  # the arrays are read-only, so they can be shared
            self._exact_values, self._exact_counts = theirs
            return
        if mine[0].size == theirs[0].size and np.array_equal(mine[0], theirs[0]):  # the usual case: same values
            self._set_exact(mine[0], mine[1] + theirs[1])
            return
        values = np.union1d(mine[0], theirs[0])
        if values.size > MAX_EXACT_VALUES:
            self._overflow()
            return
        counts = np.zeros(values.size, np.int64)
        for part_values, part_counts in (mine, theirs):
            counts[np.searchsorted(values, part_values)] += part_counts
        self._set_exact(values, counts)

    @property
    def variance(self) -> float:
        """Population variance of the finite values (NaN if there are none)."""
        n = self.finite_count
        return self.m2 / n if n else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)

    def update(self, values: np.ndarray) -> None:
        """Add a 1-D array of any real dtype. Shares its code with
        ``update_numeric_block`` so that both give bit-identical moments."""
        values = np.asarray(values)
        if values.ndim != 1:
            raise ValueError(f"NumericSketch.update takes a 1-D array, got shape {values.shape}")
        update_numeric_block([self], values.reshape(-1, 1))

    def _absorb(self, n: int, mean: float, m2: float, lo: float, hi: float) -> None:
        """Chan et al.'s pairwise merge of (n, mean, m2, min, max) of finite values, all Python
        floats: their arithmetic overflows to inf without a warning, so no np.errstate (and no
        numpy scalar) costs a few microseconds a column of every block.

        The mean is a weighted sum rather than ``ma + delta*nb/n`` so that
        merging is exactly commutative, not just up to rounding."""
        if n == 0:
            return
        na = self.finite_count  # callers raise the counts only after this
        if na == 0:
            self.mean, self.m2 = mean, m2
        else:
            total = na + n
            delta = mean - self.mean  # may overflow to inf: m2 then is +inf, as documented
            merged = (na * self.mean + n * mean) / total
            if not math.isfinite(merged):  # means near the float64 limit: weigh them before adding
                merged = self.mean * (na / total) + mean * (n / total)
            self.mean = merged
            self.m2 = self.m2 + m2 + delta * delta * (na * n / total)
        self._min = min(self._min, lo)
        self._max = max(self._max, hi)

    def merge(self, other: NumericSketch) -> None:
        """Fold ``other`` into this sketch in place; ``other`` is unchanged."""
        other_kll = other._kll.__copy__() if other is self else other._kll
        count, missing, infinite = other.count, other.missing, other.infinite  # other may be self
        if not self.exact_overflow:  # a continuous column's merges skip even the call
            self._merge_exact(other)
        self._absorb(other.finite_count, other.mean, other.m2, other._min, other._max)
        self.count += count
        self.missing += missing
        self.infinite += infinite
        self._kll.merge(other_kll)

    def copy(self) -> NumericSketch:
        """An independent copy (merges mutate their target: copy an aggregate before sharing it)."""
        out = NumericSketch.__new__(NumericSketch)
        out.__dict__.update(self.__dict__)  # scalars, and the read-only exact arrays (shared, never written)
        out._kll = self._kll.__copy__()
        out._view, out._edges = None, {}
        return out

    def quantiles(self, qs: Sequence[float]) -> np.ndarray:
        """Values at normalised ranks ``qs``: the smallest retained x with
        P(X <= x) >= q. NaN for every q when there are no finite values."""
        qs = np.asarray(qs, dtype=np.float64)
        if self._kll.is_empty():
            return np.full(qs.shape, np.nan)
        if not np.all((qs >= 0) & (qs <= 1)):
            raise ValueError("quantile ranks must lie in [0, 1]")
        out = self._kll.get_quantiles(qs.ravel().tolist(), inclusive=True)
        return np.asarray(out, dtype=np.float64).reshape(qs.shape)

    def cdf(self, points: Sequence[float]) -> np.ndarray:
        """P(X <= x) over the finite values at each point (any order, repeats
        allowed). NaN when there are no finite values or at a NaN point."""
        pts = np.asarray(points, dtype=np.float64)
        out = np.full(pts.shape, np.nan)
        ok = ~np.isnan(pts)
        if self._kll.is_empty() or not ok.any():
            return out
        # get_cdf wants strictly increasing split points; it returns one more
        # value than points (the mass up to +inf), which is dropped.
        uniq, inverse = np.unique(pts[ok], return_inverse=True)
        cdf = np.asarray(self._kll.get_cdf(uniq.tolist(), inclusive=True)[:-1])
        out[ok] = cdf[inverse]
        return out

    def sorted_view(self) -> tuple[np.ndarray, np.ndarray]:
        """(items, cdf): the distinct retained items ascending (float64) and
        the inclusive CDF at each, the step function that ``cdf`` and
        ``quantiles`` read; every comparison between two sketches works on it
        in numpy. Empty arrays when there are no finite values.

        Cached until the KLL changes (it is identified by object and n, and
        every update or merge raises n): a reference profile kept in memory
        pays for this once, not at every drift evaluation."""
        kll = self._kll
        if self._view is not None and self._view[0] is kll and self._view[1] == kll.n:
            return self._view[2], self._view[3]
        items, weights = items_and_weights(kll)
        order = np.argsort(items, kind="stable")
        items, cumulative = items[order], np.cumsum(weights[order])
        last = np.append(items[1:] != items[:-1], True)[: items.size]  # last of equal items: inclusive
        items, cdf = items[last], cumulative[last] / max(kll.n, 1)
        items.flags.writeable = cdf.flags.writeable = False  # shared by every caller
        self._view = (kll, kll.n, items, cdf)
        self._edges = {}
        return items, cdf

    def bin_edges(self, bins: int) -> np.ndarray:
        """The retained items at ranks 1/bins .. (bins-1)/bins, duplicates dropped (a point mass
        keeps one edge): the edges of ``bins`` equal-mass bins, as PSI reads them. Cached with
        the sorted view, so a reference profile pays for them once."""
        items, cdf = self.sorted_view()
        edges = self._edges.get(bins)
        if edges is None:
            at = np.minimum(np.searchsorted(cdf, np.arange(1, bins) / bins), items.size - 1)
            edges = np.unique(items[at]) if items.size else items
            edges.flags.writeable = False
            self._edges[bins] = edges
        return edges

    def rank_error(self) -> float:
        """The KLL's normalised single-sided rank error (99th percentile bound)."""
        return self._kll.normalized_rank_error(False)

    def to_proto(self, name: str, role: int, source: str) -> summary_pb2.ColumnSummary:
        """``role`` is a ``ColumnSummary.Role`` value. With no finite values
        min/max are written as 0 (the proto3 default): they mean nothing then,
        and ``from_proto`` restores the empty state from the counts."""
        has_finite = self.finite_count > 0
        return summary_pb2.ColumnSummary(
            name=name, kind=summary_pb2.ColumnSummary.NUMERIC, role=role, source=source,
            count=self.count, missing=self.missing, infinite=self.infinite,
            mean=self.mean, m2=self.m2,
            min=self._min if has_finite else 0.0, max=self._max if has_finite else 0.0,
            kll=self._kll.serialize(),
            exact_values=self._exact_values.tolist(), exact_counts=self._exact_counts.tolist(),
            exact_overflow=self.exact_overflow,
        )

    @classmethod
    def from_proto(cls, msg: summary_pb2.ColumnSummary) -> NumericSketch:
        """Rebuild a sketch; raises InvalidArgument on corrupt or inconsistent input."""
        if msg.kind != summary_pb2.ColumnSummary.NUMERIC:
            raise InvalidArgument(f"column {msg.name!r} is not NUMERIC")
        if msg.frequent_items or msg.distinct:
            raise InvalidArgument(f"column {msg.name!r} is NUMERIC but carries categorical sketches")
        sketch = cls()
        if msg.kll:
            check_kll(msg.kll)
            sketch._kll = _deserialize(ds.kll_floats_sketch.deserialize, msg.kll, "KLL")
        if msg.missing + msg.infinite > msg.count:
            raise InvalidArgument(f"column {msg.name!r}: missing + infinite exceeds count")
        sketch.count, sketch.missing, sketch.infinite = msg.count, msg.missing, msg.infinite
        if sketch._kll.n != sketch.finite_count:
            raise InvalidArgument(
                f"column {msg.name!r}: KLL holds {sketch._kll.n} values, counts say {sketch.finite_count}"
            )
        check_moments(msg)
        if sketch.finite_count:
            sketch.mean, sketch.m2, sketch._min, sketch._max = msg.mean, msg.m2, msg.min, msg.max
        check_exact(msg)
        if msg.exact_overflow or (sketch.finite_count and not msg.exact_values):
            sketch._overflow()  # the second case: a window from an agent that predates exact counts
        elif msg.exact_values:
            sketch._set_exact(np.array(msg.exact_values, np.float64), np.array(msg.exact_counts, np.int64))
        return sketch


def check_moments(msg: summary_pb2.ColumnSummary) -> None:
    """The moments of a numeric column mean something: a finite mean, an M2 that is not NaN or
    negative (+inf is what the agent's float64 sums give for values beyond ~1e154), and finite
    min <= max when there are finite values. Raises InvalidArgument naming the field."""
    name = msg.name
    if not math.isfinite(msg.mean):
        raise InvalidArgument(f"column {name!r}: mean must be finite, got {msg.mean}")
    if math.isnan(msg.m2) or msg.m2 < 0:
        raise InvalidArgument(f"column {name!r}: m2 must be 0 or more, got {msg.m2}")
    if msg.count - msg.missing - msg.infinite > 0:
        if not (math.isfinite(msg.min) and math.isfinite(msg.max)):
            raise InvalidArgument(f"column {name!r}: min and max must be finite, got {msg.min} and {msg.max}")
        if msg.min > msg.max:
            raise InvalidArgument(f"column {name!r}: min {msg.min} is greater than max {msg.max}")


def check_exact(msg: summary_pb2.ColumnSummary) -> None:
    """The exact counts of a numeric column are what ``NumericSketch`` writes: at most
    MAX_EXACT_VALUES finite values, strictly ascending (so distinct), one positive count each,
    counts adding up to the column's finite values, the first and last value its min and max;
    both lists empty when ``exact_overflow`` is set. Raises InvalidArgument naming the field."""
    if not msg.exact_values and not msg.exact_counts:
        return
    name, values, counts = msg.name, list(msg.exact_values), list(msg.exact_counts)
    # Plain Python on at most MAX_EXACT_VALUES items: cheaper than building arrays, and this runs for every
    # discrete column of every window at ingest and in every merge of the collector.
    if msg.exact_overflow:
        raise InvalidArgument(f"column {name!r}: exact_overflow is set but exact_values or exact_counts are not empty")
    if len(values) != len(counts):
        raise InvalidArgument(f"column {name!r}: {len(values)} exact_values but {len(counts)} exact_counts")
    if len(values) > MAX_EXACT_VALUES:
        raise InvalidArgument(f"column {name!r}: {len(values)} exact_values, at most {MAX_EXACT_VALUES} allowed")
    if not all(map(math.isfinite, values)):
        raise InvalidArgument(f"column {name!r}: exact_values must be finite")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise InvalidArgument(f"column {name!r}: exact_values must be distinct and in ascending order")
    if min(counts) < 1:
        raise InvalidArgument(f"column {name!r}: exact_counts must be positive")
    finite = msg.count - msg.missing - msg.infinite
    if sum(counts) != finite:
        raise InvalidArgument(f"column {name!r}: exact_counts add up to {sum(counts)}, "
                              f"the column has {finite} finite values")
    if (values[0], values[-1]) != (msg.min, msg.max):
        raise InvalidArgument(f"column {name!r}: exact_values run from {values[0]} to {values[-1]}, "
                              f"min and max are {msg.min} and {msg.max}")


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

