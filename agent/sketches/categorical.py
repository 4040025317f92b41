"""Categorical columns: ``CategoricalSketch``.

Counts, missing values, an Apache DataSketches frequent-strings sketch (exact
while a column has fewer distinct values than the sketch's map holds, heavy
hitters with an error bound beyond) and an HLL distinct count. Values are
compared as text, so ints, bools, bytes and strings from any agent merge.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any

import datasketches as ds
import numpy as np

from agent.errors import InvalidArgument
from agent.sketches.numeric import _deserialize
from protos import summary_pb2


# Bounds on sketches taken from the wire, read from their preambles before deserialising: the
# frequent-items format lets a few bytes claim a map of 2**lg_cur entries, allocated at once
# (a 2**28 map is gigabytes), and an HLL's lg_k sets the size of every union with it.
MAX_FREQUENT_LG_MAX_K = 12  # agents use 7
MIN_HLL_LG_K, MAX_HLL_LG_K = 4, 16  # agents use 11


def _check_frequent_items_header(name: str, data: bytes) -> None:
    if len(data) < 8:
        return  # too short to be anything: the deserialiser says so
    lg_max, lg_cur = data[3], data[4]
    if lg_max > MAX_FREQUENT_LG_MAX_K or lg_cur > lg_max:
        raise InvalidArgument(f"column {name!r}: frequent-items sketch declares a map of 2**{lg_cur} entries "
                              f"(at most 2**{lg_max}); at most 2**{MAX_FREQUENT_LG_MAX_K} allowed")


def _is_missing(item: Any) -> bool:
    if item is None or (isinstance(item, (str, bytes)) and not item):
        return True
    return isinstance(item, (float, np.floating)) and math.isnan(item)


def _as_text(item: Any) -> str:
    """Categories are compared as text: ints and floats as their str, bytes as UTF-8."""
    if isinstance(item, (bytes, np.bytes_)):
        return bytes(item).decode("utf-8", errors="backslashreplace")
    if isinstance(item, np.generic):
        item = item.item()
    return item if isinstance(item, str) else str(item)


class CategoricalSketch:
    """One categorical column: count, missing (None, empty string, or NaN),
    frequent items (DataSketches ``frequent_strings_sketch``) and a distinct
    count (DataSketches ``hll_sketch``, HLL_8)."""

    def __init__(self, lg_max_k: int = 7, hll_lg_k: int = 11) -> None:
        self.count = 0
        self.missing = 0
        self.lg_max_k = lg_max_k
        self._freq = ds.frequent_strings_sketch(lg_max_k)
        self._hll = ds.hll_sketch(hll_lg_k, ds.HLL_8)
        self._listing: list[tuple[str, int]] | None = None  # frequent_items(), until the next update or merge

    @property
    def present(self) -> int:
        """Values that are not missing: the total weight of the frequent items."""
        return self.count - self.missing

    def update(self, values: np.ndarray) -> None:
        """Add a 1-D array of str, bytes, ints, bools, floats or objects.

        The Python bindings have no vector update, so values are first
        counted (np.unique, or a Counter for object arrays, which may mix
        types) and each distinct value updates the sketches once, with its
        count as the weight; HLL is idempotent, so this is exact."""
        values = np.asarray(values)
        if values.ndim != 1:
            raise ValueError(f"CategoricalSketch.update takes a 1-D array, got shape {values.shape}")
        weights: Counter[str] = Counter()
        if values.dtype.kind == "O":
            for item, n in Counter(values.tolist()).items():
                weights["" if _is_missing(item) else _as_text(item)] += n
        elif values.dtype.kind in "USiubf":
            uniq, counts = np.unique(values, return_counts=True)
            for item, n in zip(uniq.tolist(), counts.tolist()):
                weights["" if _is_missing(item) else _as_text(item)] += n
        else:
            raise ValueError(f"categorical sketches do not take dtype {values.dtype}")
        self._listing = None
        self.count += values.size
        self.missing += weights.pop("", 0)
        for item, n in weights.items():
            self._freq.update(item, n)
            self._hll.update(item)

    def merge(self, other: CategoricalSketch) -> None:
        """Fold ``other`` into this sketch in place; ``other`` is unchanged."""
        self._listing = None
        self.count += other.count
        self.missing += other.missing
        self._freq.merge(other._freq.__copy__() if other is self else other._freq)
        union = ds.hll_union(self._hll.lg_config_k)
        union.update(self._hll)
        union.update(other._hll)
        self._hll = union.get_result(ds.HLL_8)

    def copy(self) -> CategoricalSketch:
        """An independent copy (merges mutate their target: copy an aggregate before sharing it)."""
        out = CategoricalSketch.__new__(CategoricalSketch)
        out.__dict__.update(self.__dict__)
        out._freq = self._freq.__copy__()
        out._hll = ds.hll_sketch.deserialize(self._hll.serialize_updatable())
        out._listing = None
        return out

    def frequent_items(self) -> list[tuple[str, int]]:
        """(item, estimated count), most frequent first, ties by item.

        NO_FALSE_NEGATIVES: every item whose true count exceeds the sketch's
        error bound is listed (and possibly a few that do not). Cached until the
        next update or merge: a reference profile lists its items once."""
        if self._listing is None:
            rows = self._freq.get_frequent_items(ds.NO_FALSE_NEGATIVES)
            self._listing = sorted(((row[0], int(row[1])) for row in rows), key=lambda r: (-r[1], r[0]))
        return list(self._listing)

    def estimate(self, item: str) -> int:
        """Estimated count of one category: exact while the sketch is not full
        (``error_bound() == 0``); 0 for an item the sketch does not track."""
        return int(self._freq.get_estimate(item))

    def count_bounds(self, item: str) -> tuple[int, int]:
        """(lower, upper) bounds of one category's true count."""
        return int(self._freq.get_lower_bound(item)), int(self._freq.get_upper_bound(item))

    def error_bound(self) -> int:
        """The most any listed count can be off by: 0 while the sketch has room
        for every distinct value it has seen, so every count is exact."""
        # The bindings do not expose the offset itself; upper - lower bound of
        # any item is exactly that offset, tracked or not.
        return int(self._freq.get_upper_bound("") - self._freq.get_lower_bound(""))

    def distinct_estimate(self) -> float:
        return float(self._hll.get_estimate())

    def to_proto(self, name: str, role: int, source: str) -> summary_pb2.ColumnSummary:
        return summary_pb2.ColumnSummary(
            name=name, kind=summary_pb2.ColumnSummary.CATEGORICAL, role=role, source=source,
            count=self.count, missing=self.missing,
            frequent_items=self._freq.serialize(), distinct=self._hll.serialize_compact(),
        )

    @classmethod
    def from_proto(cls, msg: summary_pb2.ColumnSummary) -> CategoricalSketch:
        """Rebuild a sketch; raises InvalidArgument on corrupt or inconsistent input."""
        if msg.kind != summary_pb2.ColumnSummary.CATEGORICAL:
            raise InvalidArgument(f"column {msg.name!r} is not CATEGORICAL")
        if (msg.kll or msg.infinite or msg.mean or msg.m2 or msg.min or msg.max or msg.exact_values
                or msg.exact_counts or msg.exact_overflow):
            raise InvalidArgument(f"column {msg.name!r} is CATEGORICAL but carries numeric fields "
                                  "(kll, infinite, mean, m2, min, max or exact counts)")
        if msg.missing > msg.count:
            raise InvalidArgument(f"column {msg.name!r}: missing exceeds count")
        sketch = cls()
        if msg.frequent_items:
            _check_frequent_items_header(msg.name, msg.frequent_items)
            sketch._freq = _deserialize(ds.frequent_strings_sketch.deserialize, msg.frequent_items, "frequent-items")
            # The format does not carry lg_max_k; recover it from epsilon = 3.5 / 2**lg_max_k.
            sketch.lg_max_k = round(math.log2(3.5 / sketch._freq.epsilon))
        if msg.distinct:
            if len(msg.distinct) >= 4 and not MIN_HLL_LG_K <= msg.distinct[3] <= MAX_HLL_LG_K:
                raise InvalidArgument(f"column {msg.name!r}: HLL sketch has lg_k = {msg.distinct[3]}, "
                                      f"from {MIN_HLL_LG_K} to {MAX_HLL_LG_K} allowed")
            sketch._hll = _deserialize(ds.hll_sketch.deserialize, msg.distinct, "HLL")
        if sketch._freq.total_weight != msg.count - msg.missing:
            raise InvalidArgument(
                f"column {msg.name!r}: frequent-items weight {sketch._freq.total_weight}"
                f" does not match {msg.count - msg.missing} present values"
            )
        sketch.count, sketch.missing = msg.count, msg.missing
        return sketch
