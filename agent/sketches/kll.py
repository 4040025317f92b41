"""The DataSketches KLL floats sketch, at the level of its serial format.

One home for what Outrider reads and writes of KLL bytes itself rather than through the
binding: the check of bytes taken from the wire (``check_kll``), the retained items and
weights the drift engine compares (``items_and_weights``), and a block of values compacted
in numpy into one small sketch (``compacted``) that the summary worker merges in place of
feeding every value to the binding one at a time. The format is the documented one
(https://datasketches.apache.org/docs/KLL/KLLSketch.html, kll_sketch_impl.hpp): an 8-byte
preamble (serial version, family 15, flags, k, m = 8), then n, min k and the number of
levels, the level offsets (uint32, the last one implied by the capacity), min, max and the
float32 items level by level, an item at level h standing for 2**h values.
"""
from __future__ import annotations

import functools
import math
import os
import struct

import datasketches as ds
import numpy as np

from agent.errors import InvalidArgument

# The largest KLL k taken from the wire: 5x the reference k. A larger k (the format allows 65535)
# would make every merge into that column keep that many more items.
MAX_K = 4096
# Flags byte of the DataSketches KLL serial format (byte 3 of the preamble).
_KLL_EMPTY, _KLL_SORTED_LEVEL_ZERO, _KLL_SINGLE_ITEM = 1, 2, 4
_KLL_FAMILY, _KLL_M = 15, 8

# Blocks of this many rows or more are compacted in numpy (``compacted``) and merged: 8-18 ns a
# value less than the binding's update, which sorts and halves level 0 item by item. Smaller
# blocks go to the binding: below ~400 rows the merge's fixed cost wins.
COMPACT_ROWS = 512
# ``compacted`` sorts runs of this many values: np.sort of 512 float32 stays in L1 cache (1.6 ns
# a value here, 14 for one sort of 4,800), and a run halves three times to 64 with no leftover.
RUN = 512
_RUN_LEVELS = 3
_rng = np.random.default_rng()


def _reseed() -> None:
    global _rng
    _rng = np.random.default_rng()


os.register_at_fork(after_in_child=_reseed)  # a forked serving process draws its own coins, not a copy of ours


def _halve(a: np.ndarray) -> np.ndarray:
    """KLL's compaction of sorted runs of even length (the last axis): each run keeps its odd or
    its even items, by its own coin. Every item kept stands for two: unbiased at every rank."""
    coins = _rng.random(a.shape[:-1]) < 0.5  # 3x faster than integers(0, 2) for a few dozen coins
    return np.where(coins[..., None], a[..., 1::2], a[..., 0::2])


def _odd_out(a: np.ndarray, levels: list[np.ndarray]) -> np.ndarray:
    """Leave the first item of an odd-length level at that level (as KLL does); ``a`` minus it."""
    odd = a.shape[-1] % 2
    levels.append(a[:, :odd])
    return a[:, odd:]


def compacted(values: np.ndarray, k: int) -> list[bytes]:
    """Each row of ``values`` ([columns, n >= 2], finite float32) as one serialised KLL of ``k``.

    This is the compaction KLL does, done on the whole block at once in numpy: sorted runs halved
    by a coin each, an odd level's first item left behind, until the top level holds at most k
    items. Runs of RUN values are halved three levels at a time while the block has at least 8k
    values (KLL would have compacted those levels anyway), then the rest is sorted whole. The
    result has at most one item on each level below the top, so it fits the capacity of its
    levels, and its weights add up to n. Merged into a sketch, it is one more KLL to merge; the
    rank error measured over 160 columns of 40 streams was no worse than feeding the values one
    by one (mean of the worst error 0.0047 vs 0.0055, bound 0.0133)."""
    cols, n = values.shape
    levels: list[np.ndarray] = []  # per level from 0: its items, [cols, count], the last the top
    a = np.ascontiguousarray(values)  # min and max along the rows of a transposed block are strided
    lows, highs = a.min(axis=1, keepdims=True), a.max(axis=1, keepdims=True)
    # Not for fewer values: runs of a smaller block compacted a level or two at a time, each run by its
    # own coin, measured up to 3x the rank error of halving the block sorted whole (k = 800, 6,000 values).
    while a.shape[1] >= max(8 * k, 2 * RUN):
        full = a.shape[1] - a.shape[1] % RUN
        step = 1 << _RUN_LEVELS
        runs = np.sort(a[:, :full].reshape(cols, -1, RUN), axis=2)
        # Halving a sorted run three times, by a coin each, keeps every 8th item from an offset of 0-7:
        # one take of those places in the flat runs.
        count = cols * (full // RUN)
        starts = np.arange(0, count * RUN, RUN) + _rng.integers(0, step, count)
        kept = runs.reshape(-1).take(starts[:, None] + np.arange(0, RUN, step))
        tail = np.sort(a[:, full:], axis=1)
        for _ in range(_RUN_LEVELS):
            tail = _halve(_odd_out(tail, levels))
        a = np.concatenate([kept.reshape(cols, -1), tail], axis=1)
    if levels and RUN < a.shape[1] <= 2 * RUN and a.shape[1] > k:
        # After the runs (a block of 8k values or more): numpy sorts up to 512 float32 in registers (1.3 ns
        # a value) and more by partitioning (4-7 ns). Two sorted halves, each halved by its own coin, cost
        # one more compaction at this one level: the mean worst rank error of 8,192 values of five codes
        # measured 0.0049-0.0051 against 0.0048-0.0049. Smaller blocks are left alone: a clean drift check of
        # 1,000 such values then flagged 5 in 4,800 against none.
        a = _odd_out(a, levels)
        a = np.concatenate([_halve(np.sort(a[:, :RUN], axis=1)), _halve(np.sort(a[:, RUN:], axis=1))], axis=1)
    a = np.sort(a, axis=1)
    while a.shape[1] > k:
        a = _halve(_odd_out(a, levels))
    levels.append(a)
    # At most k items on top and one on each level below: within the capacity of that many levels
    # (k on top, at least m = 8 on each other), so the offsets below never go negative.
    sizes = [level.shape[1] for level in levels]
    retained = sum(sizes)
    offsets = np.cumsum([capacity(k, _KLL_M, len(levels)) - retained, *sizes[:-1]], dtype="<u4")
    head = struct.pack("<BBBBHBBQHBB", 5, 1, _KLL_FAMILY, _KLL_SORTED_LEVEL_ZERO, k, _KLL_M, 0,
                       n, k, len(levels), 0) + offsets.tobytes()
    body = np.concatenate([lows, highs, *levels], axis=1, dtype="<f4")
    return [head + row.tobytes() for row in body]


def merge_compacted(sketches: list[ds.kll_floats_sketch], values: np.ndarray, k: int) -> None:
    """Merge row j of ``values`` ([columns, n], finite float32) into ``sketches[j]`` (all of k)."""
    for sketch, data in zip(sketches, compacted(values, k)):
        sketch.merge(ds.kll_floats_sketch.deserialize(data))


def items_and_weights(kll: ds.kll_floats_sketch) -> tuple[np.ndarray, np.ndarray]:
    """The retained items (float64, unsorted) and their weights.

    Read from the sketch's own serialisation, the documented DataSketches
    format: preamble (n at byte 8, number of levels at byte 18), the level
    offsets (uint32), min, max, then the float32 items level by level; an item
    at level h stands for 2**h values. That is one memcpy and a frombuffer,
    ~50x faster than iterating the Python binding, which matters because the
    drift engine reads every current sketch this way on each evaluation. If
    the bytes ever disagree with the sketch's n we fall back to iterating."""
    data = kll.serialize()
    flags = data[3]
    if flags & _KLL_EMPTY:
        return np.empty(0), np.empty(0)
    if flags & _KLL_SINGLE_ITEM:
        return np.frombuffer(data, "<f4", 1, 8).astype(np.float64), np.ones(1)
    levels_count = data[18]
    levels = np.frombuffer(data, "<u4", levels_count, 20).astype(np.int64)
    items = np.frombuffer(data, "<f4", offset=20 + 4 * levels_count + 8).astype(np.float64)
    sizes = np.diff(np.append(levels - levels[0], items.size))
    weights = np.repeat(np.ldexp(1.0, np.arange(levels_count)), sizes)
    if sizes.min(initial=0) < 0 or weights.sum() != kll.n:  # pragma: no cover - format changed
        pairs = np.array([pair for pair in kll], dtype=np.float64).reshape(-1, 2)
        return pairs[:, 0], pairs[:, 1]
    return items, weights


@functools.lru_cache(maxsize=256)
def capacity(k: int, m: int, num_levels: int) -> int:
    """Items a KLL of ``num_levels`` levels holds (DataSketches' kll_helper::compute_total_capacity):
    level h (of depth num_levels - h - 1) holds max(m, round(k * (2/3)**depth))."""
    def shrink(k: int, depth: int) -> int:  # int_cap_aux_aux: pre-multiplied by 2 for rounding
        return (((2 * k) << depth) // 3**depth + 1) >> 1

    def level(depth: int) -> int:  # int_cap_aux
        return shrink(k, depth) if depth <= 30 else shrink(shrink(k, depth // 2), depth - depth // 2)

    return sum(max(m, level(num_levels - h - 1)) for h in range(num_levels))


def check_kll(data: bytes) -> None:
    """Raise InvalidArgument unless ``data`` is a structurally sound serialised KLL floats sketch.

    The DataSketches deserialiser trusts the level offsets it reads: a flipped byte there is
    accepted, then a merge or a quantile query reads out of bounds and kills the process. So
    the layout is checked here first, from the documented format: preamble (family 15, m 8,
    k, n, levels), level offsets in order up to the capacity k and the levels imply, a length
    that matches them, finite items, min and max, the levels above 0 sorted (level 0 too when
    the sorted flag says so), and item weights (2**level) that add up to n."""
    def corrupt(why: str) -> InvalidArgument:
        return InvalidArgument(f"corrupt KLL sketch: {why}")

    if len(data) < 8:
        raise corrupt(f"{len(data)} bytes is shorter than its preamble")
    preamble_ints, version, family, flags = data[0], data[1], data[2], data[3]
    k, m = int.from_bytes(data[4:6], "little"), data[6]
    if family != _KLL_FAMILY or m != _KLL_M:
        raise corrupt(f"family {family} and m {m}, expected {_KLL_FAMILY} and {_KLL_M}")
    if k > MAX_K:
        raise InvalidArgument(f"KLL sketch has k = {k}, at most {MAX_K} allowed")
    if k < _KLL_M:
        raise corrupt(f"k = {k} is below {_KLL_M}")
    if flags & _KLL_EMPTY:
        if (preamble_ints, len(data)) != (2, 8):
            raise corrupt("an empty sketch with data")
        return
    if flags & _KLL_SINGLE_ITEM:
        if (preamble_ints, version, len(data)) != (2, 2, 12) or not math.isfinite(struct.unpack_from("<f", data, 8)[0]):
            raise corrupt("a single-item sketch that is not one finite item")
        return
    if (preamble_ints, version) != (5, 1) or len(data) < 20:
        raise corrupt(f"preamble of {preamble_ints} ints, serial version {version}, {len(data)} bytes")
    n, num_levels = struct.unpack_from("<Q", data, 8)[0], data[18]
    header = 20 + 4 * num_levels + 8
    if not 1 <= num_levels <= 61 or len(data) < header:
        raise corrupt(f"{num_levels} levels in {len(data)} bytes")
    # Plain Python on the few level offsets: this runs for every numeric column at ingest.
    bounds = [*struct.unpack_from(f"<{num_levels}I", data, 20), capacity(k, m, num_levels)]
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    if min(sizes) < 0 or len(data) != header + 4 * (bounds[-1] - bounds[0]):
        raise corrupt("its level offsets do not match its capacity and length")
    if sum(size << h for h, size in enumerate(sizes)) != n:
        raise corrupt(f"its items' weights do not add up to its n = {n}")
    low, high = struct.unpack_from("<ff", data, header - 8)
    items = np.frombuffer(data, "<f4", offset=header)
    # NaN would break the C++ sorts (not a strict weak order): one float64 sum finds NaN and inf alike.
    if not (items.size and math.isfinite(low) and math.isfinite(high) and low <= high
            and math.isfinite(np.add.reduce(items, dtype=np.float64))):
        raise corrupt("items, min or max that are not finite")
    # Every level above 0 is a sorted run (level 0 too when flagged): a descent may only start a level.
    first = 0 if flags & _KLL_SORTED_LEVEL_ZERO else sizes[0]
    descents = (items[first + 1:] < items[first:-1]).nonzero()[0]
    if descents.size and not set((descents + (first + 1 + bounds[0])).tolist()) <= set(bounds[1:-1]):
        raise corrupt("a level that is not sorted")
