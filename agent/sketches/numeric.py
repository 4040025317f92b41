"""Numeric columns: ``NumericSketch`` (a block of them is updated by ``agent.sketches.block``).

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
from agent.sketches.block import update_numeric_block
from agent.sketches.kll import check_kll, items_and_weights
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

# What the C++ deserialisers raise on malformed bytes (std exceptions as mapped by nanobind).
_DESERIALIZE_ERRORS = (ValueError, IndexError, RuntimeError, MemoryError, OverflowError)
_T = TypeVar("_T")


def _deserialize(fn: Callable[[bytes], _T], data: bytes, what: str) -> _T:
    """Shared with categorical.py: one way to turn C++ parse errors into InvalidArgument."""
    try:
        return fn(data)
    except _DESERIALIZE_ERRORS as exc:
        raise InvalidArgument(f"corrupt {what} sketch: {exc}") from exc


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
