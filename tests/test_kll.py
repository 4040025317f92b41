"""agent/sketches/kll.py: a block of values compacted in numpy into one KLL, as the summary
worker merges it, against the bytes' own check, the exact data and the binding's own updates."""
from __future__ import annotations

import datasketches as ds
import numpy as np
import pytest

from agent.sketches import NumericSketch, kll, update_numeric_block

BOUND = ds.kll_floats_sketch(200).normalized_rank_error(False)  # 0.0133: KLL's 99th-percentile rank error


def cdf_error(sketch: ds.kll_floats_sketch, data: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The sketch's inclusive CDF minus the data's, at ``points`` (distinct, ascending)."""
    est = np.asarray(sketch.get_cdf(points.tolist(), inclusive=True)[:-1])
    return est - np.searchsorted(np.sort(data), points, side="right") / data.size


def sorted_runs(values: np.ndarray) -> np.ndarray:
    """How the worker fed the binding before blocks were compacted: sorted in runs of 512."""
    return np.concatenate([np.sort(run) for run in np.split(values, range(512, len(values), 512))])


def percentiles(data: np.ndarray) -> np.ndarray:
    return np.unique(np.quantile(data, np.linspace(0.01, 0.99, 99)).astype(np.float32))


@pytest.mark.parametrize("k", [8, 200, 800])
@pytest.mark.parametrize("n", [2, 3, 199, 200, 201, 512, 513, 1599, 1600, 4801, 12800, 20011])
def test_a_compacted_block_is_a_sound_kll_of_its_values(n: int, k: int) -> None:
    rng = np.random.default_rng(n * 1000 + k)
    values = rng.normal(size=(3, n)).astype(np.float32)
    values[2] = np.round(values[2])  # many ties
    for row, data in zip(values, kll.compacted(values, k)):
        kll.check_kll(data)  # the collector's own check of bytes from the wire
        sketch = ds.kll_floats_sketch.deserialize(data)
        assert (sketch.n, sketch.k) == (n, k)
        assert (sketch.get_min_value(), sketch.get_max_value()) == (row.min(), row.max())
        items, weights = kll.items_and_weights(sketch)
        assert weights.sum() == n and items.size <= k + int(np.log2(n)) + 1
        points = np.unique(row)
        err = np.abs(cdf_error(sketch, row, points))
        if n <= k:  # nothing to compact: the sketch holds every value
            assert err.max() == 0
        else:
            assert err.max() <= 4 * BOUND * 200 / k  # one compaction chain: a few times 2**levels / n


def test_compaction_is_unbiased_and_the_check_can_tell(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over many draws of the coins, the CDF of one block's sketch averages to the data's at every
    percentile. A compaction that always keeps the same item of each pair fails the same check."""
    values = np.random.default_rng(3).permutation(4800).astype(np.float32).reshape(1, -1)
    points = np.linspace(48, 4752, 99).astype(np.float32)

    def signed_errors() -> np.ndarray:
        return np.array([cdf_error(ds.kll_floats_sketch.deserialize(kll.compacted(values, 200)[0]), values[0], points)
                         for _ in range(300)])

    monkeypatch.setattr(kll, "_rng", np.random.default_rng(11))
    errors = signed_errors()
    spread = errors.std(axis=0).max() / np.sqrt(len(errors))
    assert 0 < spread and np.abs(errors.mean(axis=0)).max() < 5 * spread

    class LowerItems:  # every coin keeps the lower item of each pair
        def integers(self, low: int, high: int, size: tuple[int, ...]) -> np.ndarray:
            return np.zeros(size, np.int64)

        def random(self, size: tuple[int, ...]) -> np.ndarray:
            return np.ones(size)

    monkeypatch.setattr(kll, "_rng", LowerItems())
    assert np.abs(signed_errors().mean(axis=0)).max() > 5 * spread


def test_a_block_under_8k_values_is_halved_sorted_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below 8k values no level is compacted in runs: 6,000 values of five codes at k = 800 stay within
    0.002 of the data's CDF in each of 200 draws (measured 0.0012 at worst). Compacting their runs of 512
    a level or two at a time, each by its own coin, measured up to 0.0037."""
    monkeypatch.setattr(kll, "_rng", np.random.default_rng(17))
    rng = np.random.default_rng(16)
    worst = 0.0
    for _ in range(200):
        codes = rng.choice(5, 6000, p=[0.40, 0.25, 0.15, 0.12, 0.08]).astype(np.float32)
        sketch = ds.kll_floats_sketch.deserialize(kll.compacted(codes.reshape(1, -1), 800)[0])
        worst = max(worst, np.abs(cdf_error(sketch, codes, np.arange(4, dtype=np.float32))).max())
    assert worst <= 0.002


def test_blocks_merged_compacted_are_as_accurate_as_the_bindings_updates() -> None:
    """Windows of 5-40 blocks of 600-9,000 rows (what the worker drains at batch 64), four shapes
    of data, in arrival order and sorted: the worst CDF error of each column within KLL's bound,
    and on average no worse than feeding the same blocks to the binding (measured 0.0047 vs 0.0055)."""
    rng = np.random.default_rng(7)
    shapes = [rng.normal, rng.exponential, lambda size: rng.integers(0, 50, size) * 1.0, rng.lognormal]
    ours, bindings = [], []
    for stream in range(40):
        blocks = [np.stack([draw(size=rows) for draw in shapes], axis=1).astype(np.float32)
                  for rows in rng.integers(600, 9000, rng.integers(5, 40))]
        if stream % 2:
            blocks = [np.sort(block, axis=0) for block in blocks]
        data = np.concatenate(blocks)
        sketches = [NumericSketch() for _ in shapes]
        binding = [ds.kll_floats_sketch(200) for _ in shapes]
        for block in blocks:
            update_numeric_block(sketches, block)
            for j, sketch in enumerate(binding):
                sketch.update(sorted_runs(block[:, j]))
        for j in range(len(shapes)):
            assert sketches[j]._kll.n == len(data)
            points = percentiles(data[:, j])
            ours.append(np.abs(cdf_error(sketches[j]._kll, data[:, j], points)).max())
            bindings.append(np.abs(cdf_error(binding[j], data[:, j], points)).max())
    assert max(ours) <= BOUND
    assert np.mean(ours) <= 1.2 * np.mean(bindings)


def test_small_blocks_go_to_the_binding_and_stay_exact_below_k() -> None:
    values = np.random.default_rng(5).normal(size=(kll.COMPACT_ROWS - 1, 2)).astype(np.float32)
    sketches = [NumericSketch(k=800) for _ in range(2)]
    update_numeric_block(sketches, values)
    for j, sketch in enumerate(sketches):
        assert sketch._kll.num_retained == len(values)  # below k: every value kept, nothing merged
        assert np.abs(cdf_error(sketch._kll, values[:, j], np.unique(values[:, j]))).max() == 0
