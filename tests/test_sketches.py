"""Properties and accuracy of agent/sketches.py, the summary math shared by agent and collector.

KLL compaction draws from a process-wide C++ RNG that Python cannot seed, so
once a sketch holds more than k values its exact contents vary between runs.
Tests therefore compare KLL state byte for byte only below k values (exact
mode) and otherwise check quantiles against the raw data within the sketch's
own rank error (the 99th-percentile bound; measured worst case ~0.7 of it here).
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from agent.errors import InvalidArgument
from agent.sketches import (
    DEFAULT_K,
    MAX_EXACT_VALUES,
    CategoricalSketch,
    NumericSketch,
    from_proto,
    ks_pvalue,
    ks_statistic,
    update_numeric_block,
    update_numeric_blocks,
)
from protos import summary_pb2

CS = summary_pb2.ColumnSummary
settings.register_profile("sketches", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("sketches")

SPECIAL = [math.nan, math.inf, -math.inf]
finite_floats = st.floats(min_value=-1e6, max_value=1e6, width=32)
numbers = st.one_of(finite_floats, finite_floats, finite_floats, st.sampled_from(SPECIAL))
columns = hnp.arrays(np.float32, st.integers(0, 150), elements=numbers)
windows = st.lists(columns, min_size=1, max_size=5)
categories = st.one_of(st.sampled_from(["a", "b", "c", "d", "é", "", "1"]), st.none(), st.integers(0, 3), st.just(b"b"))
cat_columns = st.lists(categories, max_size=120).map(lambda xs: np.array(xs, dtype=object))


def sketch_of(*arrays: np.ndarray, k: int = DEFAULT_K) -> NumericSketch:
    sketch = NumericSketch(k)
    for values in arrays:
        sketch.update(values)
    return sketch


def merged(*sketches: NumericSketch | CategoricalSketch) -> NumericSketch | CategoricalSketch:
    out = type(sketches[0])()
    for sketch in sketches:
        out.merge(sketch)
    return out


def same_float(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def moments_tolerance(values: np.ndarray) -> tuple[float, float]:
    """Absolute tolerances for (mean, m2) on top of 1e-9 relative: rounding
    scales with the values' magnitude, which matters when a mean or m2 is ~0."""
    finite = values[np.isfinite(values)].astype(np.float64)
    scale = float(np.max(np.abs(finite))) if finite.size else 0.0
    return 1e-12 * (1.0 + scale), 1e-12 * (1.0 + finite.size * scale * scale)


def assert_numeric_close(a: NumericSketch, b: NumericSketch, tol: tuple[float, float]) -> None:
    assert (a.count, a.missing, a.infinite) == (b.count, b.missing, b.infinite)
    assert same_float(a.min, b.min) and same_float(a.max, b.max)
    assert math.isclose(a.mean, b.mean, rel_tol=1e-9, abs_tol=tol[0])
    assert math.isclose(a.m2, b.m2, rel_tol=1e-9, abs_tol=tol[1])


def assert_numeric_identical(a: NumericSketch, b: NumericSketch) -> None:
    assert (a.count, a.missing, a.infinite) == (b.count, b.missing, b.infinite)
    for name in ("min", "max", "mean", "m2"):
        assert same_float(getattr(a, name), getattr(b, name)), name
    assert_same_exact(a, b)


def assert_same_exact(a: NumericSketch, b: NumericSketch) -> None:
    ea, eb = a.exact_counts, b.exact_counts
    assert (ea is None) == (eb is None)
    if ea is not None and eb is not None:
        np.testing.assert_array_equal(ea[0], eb[0])
        np.testing.assert_array_equal(ea[1], eb[1])


def assert_exact_matches_data(sketch: NumericSketch, values: np.ndarray) -> None:
    """Exact counts of the finite values while there are at most MAX_EXACT_VALUES distinct ones, none after."""
    finite = np.asarray(values)[np.isfinite(values)].astype(np.float64)
    uniq, counts = np.unique(finite, return_counts=True)
    if uniq.size > MAX_EXACT_VALUES:
        assert sketch.exact_counts is None and sketch.exact_overflow
        return
    assert sketch.exact_counts is not None
    np.testing.assert_array_equal(sketch.exact_counts[0], uniq)
    np.testing.assert_array_equal(sketch.exact_counts[1], counts)


def assert_matches_data(sketch: NumericSketch, values: np.ndarray) -> None:
    """Exact counts and extremes, moments as numpy's, quantiles within rank error."""
    values = np.asarray(values)
    finite = np.sort(values[np.isfinite(values)]).astype(np.float64)
    assert sketch.count == values.size
    assert sketch.missing == int(np.isnan(values).sum())
    assert sketch.infinite == int(np.isinf(values).sum())
    assert sketch.finite_count == finite.size
    assert_exact_matches_data(sketch, values)
    if finite.size == 0:
        assert math.isnan(sketch.min) and math.isnan(sketch.max) and math.isnan(sketch.variance)
        assert np.isnan(sketch.quantiles([0.5])).all()
        return
    mean_tol, m2_tol = moments_tolerance(values)
    assert (sketch.min, sketch.max) == (finite[0], finite[-1])
    assert math.isclose(sketch.mean, finite.mean(), rel_tol=1e-9, abs_tol=mean_tol)
    assert math.isclose(sketch.m2, finite.size * finite.var(), rel_tol=1e-9, abs_tol=m2_tol)
    assert_quantile_ranks(sketch, finite, np.linspace(0.0, 1.0, 21))


def assert_quantile_ranks(sketch: NumericSketch, sorted_finite: np.ndarray, qs: np.ndarray) -> None:
    """The value returned for rank q must have a rank in the raw data within
    rank_error() of q: at most q + eps of the data lies strictly below it and
    at least q - eps at or below it."""
    values = sketch.quantiles(qs).astype(sorted_finite.dtype)
    n, eps = sorted_finite.size, sketch.rank_error()
    below = np.searchsorted(sorted_finite, values, "left") / n
    at_or_below = np.searchsorted(sorted_finite, values, "right") / n
    assert np.all(below <= qs + eps + 1e-12), (qs, below)
    assert np.all(at_or_below >= qs - eps - 1e-12), (qs, at_or_below)


# ---------------------------------------------------------------- numeric properties


@given(columns)
def test_update_matches_the_data(values: np.ndarray) -> None:
    assert_matches_data(sketch_of(values), values)


@given(columns, columns)
def test_numeric_merge_is_commutative(x: np.ndarray, y: np.ndarray) -> None:
    a, b = sketch_of(x), sketch_of(y)
    ab, ba = merged(a, b), merged(b, a)
    assert_numeric_identical(ab, ba)  # exactly: the merge is written symmetrically
    assert_matches_data(ab, np.concatenate([x, y]))
    assert_matches_data(ba, np.concatenate([y, x]))


@given(columns, columns, columns)
def test_numeric_merge_is_associative(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> None:
    a, b, c = sketch_of(x), sketch_of(y), sketch_of(z)
    left = merged(merged(a, b), c)
    right = merged(a, merged(b, c))
    assert_numeric_close(left, right, moments_tolerance(np.concatenate([x, y, z])))
    assert_matches_data(left, np.concatenate([x, y, z]))
    assert_matches_data(right, np.concatenate([x, y, z]))


@given(windows)
def test_merging_windows_equals_one_sketch_of_all_rows(parts: list[np.ndarray]) -> None:
    everything = np.concatenate(parts)
    whole = sketch_of(everything)
    combined = merged(*(sketch_of(part) for part in parts))
    assert_numeric_close(combined, whole, moments_tolerance(everything))
    assert_matches_data(combined, everything)


def test_merge_does_not_change_the_other_and_handles_self() -> None:
    a, b = sketch_of(np.arange(10.0)), sketch_of(np.arange(5.0))
    a.merge(b)
    assert b.count == 5 and b.mean == 2.0
    b.merge(b)
    assert_matches_data(b, np.concatenate([np.arange(5.0), np.arange(5.0)]))


@given(
    hnp.arrays(
        st.sampled_from([np.float32, np.float64]),
        st.tuples(st.integers(0, 200), st.integers(1, 6)),
        elements=numbers,
    )
)
def test_block_update_is_identical_to_per_column_update(block: np.ndarray) -> None:
    by_block = [NumericSketch() for _ in range(block.shape[1])]
    update_numeric_block(by_block, block)
    for j, sketch in enumerate(by_block):
        alone = sketch_of(block[:, j])
        assert_numeric_identical(sketch, alone)
        # <= k values: the KLL has not compacted, so it is deterministic.
        assert sketch._kll.serialize() == alone._kll.serialize()


@given(
    hnp.arrays(np.float32, st.tuples(st.integers(0, 120), st.integers(1, 6)), elements=numbers),
    hnp.arrays(np.float32, st.tuples(st.integers(1, 120), st.integers(1, 6)), elements=numbers),
)
def test_block_moments_are_bit_identical_to_merging_the_blocks_sketch(before: np.ndarray, block: np.ndarray) -> None:
    """Updating a sketch with a block gives the same count, min, max and moments, bit for bit, as
    merging a sketch of that block into it (the block path and the merge share Chan's formula)."""
    cols = min(before.shape[1], block.shape[1])
    before, block = before[:, :cols], block[:, :cols]
    by_block = [sketch_of(before[:, j]) for j in range(cols)]
    update_numeric_block(by_block, block)
    for j, sketch in enumerate(by_block):
        alone = sketch_of(before[:, j])
        alone.merge(sketch_of(block[:, j]))
        for name in ("count", "min", "max", "mean", "m2"):
            assert same_float(getattr(sketch, name), getattr(alone, name)), name


def test_block_update_on_large_dirty_blocks() -> None:
    rng = np.random.default_rng(7)
    # rows fed to the KLL in sorted runs of 512: whole runs, whole runs and a rest, a rest alone
    blocks = [(rng.normal(size=(rows, 20)) * 10 + 100).astype(np.float32) for rows in (8192, 8492, 300)]
    blocks[1][::97, 3] = np.nan
    blocks[1][5, 7] = np.inf
    blocks[2][:, 11] = np.nan
    by_block = [NumericSketch() for _ in range(20)]
    for block in blocks:
        update_numeric_block(by_block, block)
    for j, sketch in enumerate(by_block):
        column = [block[:, j] for block in blocks]
        assert_numeric_identical(sketch, sketch_of(*column))
        assert_matches_data(sketch, np.concatenate(column))


def same_rows(rows: int) -> st.SearchStrategy:
    return st.tuples(
        hnp.arrays(st.sampled_from([np.float32, np.int64]), st.tuples(st.just(rows), st.integers(1, 4)),
                   elements=st.integers(-1000, 1000)),
        hnp.arrays(st.sampled_from([np.float32, np.float64]), st.tuples(st.just(rows), st.integers(1, 3)),
                   elements=numbers))


@given(st.integers(0, 200).flatmap(same_rows))
def test_parts_of_the_same_rows_are_summarised_as_each_part_alone(blocks: tuple[np.ndarray, np.ndarray]) -> None:
    """``update_numeric_blocks`` (one call for a model's inputs, outputs and derived columns) gives
    every column what ``update_numeric_block`` of its own part gives: any dtypes, NaN and inf included."""
    ints, floats = blocks
    parts = [ints, floats, floats[:, :1] * 2]
    together = [[NumericSketch() for _ in range(p.shape[1])] for p in parts]
    update_numeric_blocks(list(zip(together, parts)))
    for sketches, part in zip(together, parts):
        alone = [NumericSketch() for _ in range(part.shape[1])]
        update_numeric_block(alone, part)
        for a, b in zip(sketches, alone):
            assert_numeric_identical(a, b)
            assert a._kll.serialize() == b._kll.serialize()  # <= k values: no coin was tossed


def test_parts_must_hold_the_same_rows() -> None:
    with pytest.raises(ValueError, match="same rows"):
        update_numeric_blocks([([NumericSketch()], np.zeros((4, 1))), ([NumericSketch()], np.zeros((5, 1)))])


def test_block_shape_must_match() -> None:
    with pytest.raises(ValueError):
        update_numeric_block([NumericSketch()], np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError):
        NumericSketch().update(np.zeros((4, 2)))


def test_empty_sketch() -> None:
    empty = NumericSketch()
    assert (empty.count, empty.finite_count, empty.mean, empty.m2) == (0, 0, 0.0, 0.0)
    assert math.isnan(empty.min) and math.isnan(empty.max) and math.isnan(empty.std)
    assert np.isnan(empty.quantiles([0.1, 0.9])).all() and np.isnan(empty.cdf([0.0])).all()
    empty.update(np.array([], np.float32))
    assert empty.count == 0
    full = sketch_of(np.array([1.0, 2.0, 3.0]))
    for left, right in ((NumericSketch(), full), (full, NumericSketch())):
        left.merge(right)
        assert_matches_data(left, np.array([1.0, 2.0, 3.0]))
    both = merged(NumericSketch(), NumericSketch())
    assert both.count == 0 and math.isnan(both.min)


def test_non_finite_values_are_counted_not_summarised() -> None:
    values = np.array([np.nan, np.inf, -np.inf, 1.0, np.nan, 3.0])
    sketch = sketch_of(values)
    assert (sketch.count, sketch.missing, sketch.infinite, sketch.finite_count) == (6, 2, 2, 2)
    assert (sketch.min, sketch.max, sketch.mean, sketch.variance) == (1.0, 3.0, 2.0, 1.0)
    only_bad = sketch_of(np.array([np.nan, np.inf]))
    assert (only_bad.missing, only_bad.infinite) == (1, 1)
    assert math.isnan(only_bad.min) and only_bad.mean == 0.0


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int8, np.int64, np.uint16, np.bool_])
def test_any_real_dtype(dtype: type) -> None:
    values = np.array([0, 1, 1, 0, 1], dtype=dtype)
    sketch = sketch_of(values)
    assert (sketch.count, sketch.min, sketch.max, sketch.mean) == (5, 0.0, 1.0, 0.6)
    assert sketch.quantiles([1.0])[0] == 1.0


def test_wide_floats_stay_finite_in_the_kll() -> None:
    sketch = sketch_of(np.array([1e300, -1e300, 0.0]))
    assert sketch.finite_count == 3 and sketch.max == 1e300
    assert math.isinf(sketch.m2)  # documented: squares overflow float64
    assert np.isfinite(sketch.quantiles([0.0, 1.0])).all()


def test_cdf_is_inclusive_and_accepts_any_order() -> None:
    sketch = sketch_of(np.array([1.0, 2.0, 2.0, 3.0]))
    np.testing.assert_allclose(sketch.cdf([3.0, 0.0, 2.0, 2.0, 1.5]), [1.0, 0.0, 0.75, 0.75, 0.25])
    assert np.isnan(sketch.cdf([np.nan]))[0]


# ---------------------------------------------------------------- serialisation


@given(columns)
def test_numeric_proto_round_trip(values: np.ndarray) -> None:
    sketch = sketch_of(values)
    msg = sketch.to_proto("age", CS.FEATURE, "X")
    back = from_proto(CS.FromString(msg.SerializeToString()))
    assert isinstance(back, NumericSketch)
    assert_numeric_identical(back, sketch)
    assert back._kll.serialize() == sketch._kll.serialize()
    assert back.to_proto("age", CS.FEATURE, "X") == msg
    assert (msg.name, msg.kind, msg.role, msg.source) == ("age", CS.NUMERIC, CS.FEATURE, "X")


def test_empty_numeric_serialises_without_infinities() -> None:
    msg = NumericSketch().to_proto("x", CS.PREDICTION, "y")
    assert (msg.min, msg.max) == (0.0, 0.0)
    back = NumericSketch.from_proto(msg)
    back.merge(sketch_of(np.array([5.0])))
    assert (back.min, back.max) == (5.0, 5.0)


def test_large_numeric_round_trip_keeps_quantiles() -> None:
    values = np.random.default_rng(3).lognormal(size=50_000).astype(np.float32)
    sketch = sketch_of(values, k=800)
    back = NumericSketch.from_proto(CS.FromString(sketch.to_proto("x", CS.FEATURE, "X").SerializeToString()))
    assert back.k == 800 and back.rank_error() == sketch.rank_error()
    qs = np.linspace(0, 1, 11)
    np.testing.assert_array_equal(back.quantiles(qs), sketch.quantiles(qs))


def _bad_numeric(**fields: object) -> CS:
    msg = sketch_of(np.arange(300.0)).to_proto("x", CS.FEATURE, "X")
    for name, value in fields.items():
        setattr(msg, name, value)
    return msg


@pytest.mark.parametrize(
    "msg",
    [
        _bad_numeric(kll=b"garbage"),
        _bad_numeric(kll=sketch_of(np.arange(300.0)).to_proto("x", 1, "X").kll[:-9]),
        _bad_numeric(count=299),  # KLL holds more values than the counts say
        _bad_numeric(missing=400),
        _bad_numeric(kind=CS.KIND_UNSPECIFIED),
        _bad_numeric(kind=CS.CATEGORICAL),
    ],
    ids=["garbage", "truncated", "count-mismatch", "missing>count", "no-kind", "wrong-kind"],
)
def test_corrupt_numeric_is_invalid_argument(msg: CS) -> None:
    with pytest.raises(InvalidArgument):
        from_proto(msg)
    with pytest.raises(InvalidArgument):
        (CategoricalSketch if msg.kind == CS.CATEGORICAL else NumericSketch).from_proto(msg)


@given(st.binary(max_size=300), st.binary(max_size=300), st.binary(max_size=300))
def test_random_bytes_never_escape_as_other_errors(kll: bytes, freq: bytes, hll: bytes) -> None:
    for msg in (CS(kind=CS.NUMERIC, kll=kll), CS(kind=CS.CATEGORICAL, frequent_items=freq, distinct=hll)):
        try:
            from_proto(msg)
        except InvalidArgument:
            pass


@pytest.mark.parametrize("field", ["frequent_items", "distinct"])
def test_corrupt_categorical_is_invalid_argument(field: str) -> None:
    sketch = CategoricalSketch()
    sketch.update(np.array(["a", "b", "b"]))
    msg = sketch.to_proto("c", CS.FEATURE, "X")
    setattr(msg, field, getattr(msg, field)[:-3])
    with pytest.raises(InvalidArgument):
        from_proto(msg)
    valid = sketch.to_proto("c", CS.FEATURE, "X")
    with pytest.raises(InvalidArgument):  # the sketch holds 3 values, the counts say 9
        from_proto(CS(kind=CS.CATEGORICAL, count=9, frequent_items=valid.frequent_items))


# ---------------------------------------------------------------- categorical


def cat_sketch(*arrays: np.ndarray) -> CategoricalSketch:
    sketch = CategoricalSketch()
    for values in arrays:
        sketch.update(values)
    return sketch


def expected_counts(values: np.ndarray) -> tuple[Counter[str], int]:
    present: Counter[str] = Counter()
    missing = 0
    for item in values.tolist():
        if item is None or item in ("", b"") or (isinstance(item, float) and math.isnan(item)):
            missing += 1
        else:
            present[item.decode() if isinstance(item, bytes) else str(item)] += 1
    return present, missing


def assert_cat_matches(sketch: CategoricalSketch, values: np.ndarray) -> None:
    present, missing = expected_counts(values)
    assert (sketch.count, sketch.missing) == (values.size, missing)
    assert dict(sketch.frequent_items()) == dict(present)
    assert sketch.distinct_estimate() == pytest.approx(len(present), abs=0.5)


@given(cat_columns)
def test_categorical_update_matches_the_data(values: np.ndarray) -> None:
    assert_cat_matches(cat_sketch(values), values)


@given(cat_columns, cat_columns, cat_columns)
def test_categorical_merge_is_commutative_and_associative(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> None:
    a, b, c = cat_sketch(x), cat_sketch(y), cat_sketch(z)
    everything = np.concatenate([x, y, z])
    for combined in (merged(a, b, c), merged(c, b, a), merged(merged(a, b), c), merged(a, merged(b, c))):
        assert_cat_matches(combined, everything)
    assert merged(a, b).frequent_items() == merged(b, a).frequent_items()


@pytest.mark.parametrize(
    "values",
    [
        np.array(["x", "y", "", "x"]),
        np.array([b"x", b"y", b"", b"x"]),
        np.array([3, 4, 3]),
        np.array([1.0, np.nan, 1.0]),
        np.array([True, False, True]),
        np.array(["x", None, np.nan, "", 7, b"y"], dtype=object),
    ],
    ids=["str", "bytes", "int", "float", "bool", "object"],
)
def test_categorical_dtypes(values: np.ndarray) -> None:
    assert_cat_matches(cat_sketch(values), values)


def test_categorical_heavy_hitters_and_distinct_on_many_values() -> None:
    rng = np.random.default_rng(5)
    values = np.concatenate([np.full(20_000, "hot"), rng.integers(0, 5_000, 80_000).astype(str)])
    sketch = cat_sketch(*np.array_split(rng.permutation(values), 7))
    item, estimate = sketch.frequent_items()[0]
    assert item == "hot" and abs(estimate - 20_000) <= 3.5 / 2**7 * values.size  # the sketch's epsilon
    assert sketch.distinct_estimate() == pytest.approx(5_001, rel=0.05)  # lg_k=11: ~2.3% std error


@given(cat_columns)
def test_categorical_proto_round_trip(values: np.ndarray) -> None:
    sketch = cat_sketch(values)
    msg = sketch.to_proto("colour", CS.PREDICTION, "label")
    back = from_proto(CS.FromString(msg.SerializeToString()))
    assert isinstance(back, CategoricalSketch)
    assert (back.count, back.missing, back.lg_max_k) == (sketch.count, sketch.missing, 7)
    assert back.frequent_items() == sketch.frequent_items()
    # Not byte for byte: both DataSketches formats store hash tables, whose
    # layout after deserialising may differ; what they estimate may not.
    assert back.distinct_estimate() == sketch.distinct_estimate()


# ---------------------------------------------------------------- accuracy


def test_quantiles_within_rank_error_on_a_million_rows() -> None:
    rng = np.random.default_rng(11)
    values = np.concatenate([rng.normal(size=600_000), rng.exponential(3.0, size=400_000) + 2]).astype(np.float32)
    sketch = NumericSketch()
    for block in np.array_split(values, 123):
        sketch.update(block)
    finite = np.sort(values)
    assert_quantile_ranks(sketch, finite, np.round(np.arange(0.01, 1.0, 0.01), 2))
    assert math.isclose(sketch.mean, values.astype(np.float64).mean(), rel_tol=1e-9)
    assert math.isclose(sketch.std, values.astype(np.float64).std(), rel_tol=1e-9)


@pytest.mark.parametrize(
    ("seed", "shift", "scale"),
    [(1, 0.0, 1.0), (2, 0.0, 1.0), (3, 0.25, 1.0), (4, 0.25, 1.0), (5, 0.0, 1.5), (6, 0.1, 0.8)],
)
def test_ks_from_sketches_matches_scipy(seed: int, shift: float, scale: float) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=100_000).astype(np.float32)
    b = (rng.normal(size=100_000) * scale + shift).astype(np.float32)
    sa, sb = NumericSketch(), NumericSketch()
    for part in np.array_split(a, 10):  # as windows merged by the collector
        sa.merge(sketch_of(part))
    update_numeric_block([sb], b.reshape(-1, 1))
    expected = stats.ks_2samp(a, b).statistic
    assert abs(ks_statistic(sa, sb) - expected) <= 0.02
    assert ks_statistic(sa, sb) == ks_statistic(sb, sa)
    assert 0.0 <= ks_pvalue(sa, sb) <= 1.0


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # scipy's own 1-vs-1 case
@given(columns, columns)
def test_ks_is_exact_below_k(x: np.ndarray, y: np.ndarray) -> None:
    """Below k values the KLL keeps every value, so D and the asymptotic
    p-value must equal scipy's on the raw finite data."""
    fx, fy = x[np.isfinite(x)], y[np.isfinite(y)]
    a, b = sketch_of(x), sketch_of(y)
    if fx.size == 0 or fy.size == 0:
        assert math.isnan(ks_statistic(a, b)) and math.isnan(ks_pvalue(a, b))
        return
    expected = stats.ks_2samp(fx, fy, method="asymp")
    assert ks_statistic(a, b) == pytest.approx(expected.statistic, abs=1e-12)
    if fx.size == fy.size == 1:  # scipy's effective size rounds to 0 (NaN); ours to 1
        assert 0.0 <= ks_pvalue(a, b) <= 1.0
    else:
        assert ks_pvalue(a, b) == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-12)


def test_ks_pvalue_separates_shift_from_noise() -> None:
    rng = np.random.default_rng(9)
    base, same, shifted = (sketch_of(rng.normal(size=20_000) + s) for s in (0.0, 0.0, 0.5))
    assert ks_pvalue(base, shifted) < 1e-12
    # Loose on purpose: D here is sampling noise plus up to ~0.013 of sketch error.
    assert ks_pvalue(base, same) > 1e-6


def test_values_near_the_float64_limit_keep_a_finite_mean_that_the_collector_accepts():
    """A float64 feature near 1e308 overflowed the sum behind the mean: the window carried mean inf and the
    collector (rightly) refused it, losing the whole window. The mean is finite now, alone and merged."""
    from agent.sketches.numeric import check_moments

    huge = np.array([1e308, 1.5e308, 1.7e308, -1.2e308])
    a, b = NumericSketch(), NumericSketch()
    update_numeric_block([a], huge.reshape(-1, 1))
    b.update(np.full(5, 1.7e308))
    for sketch in (a, b):
        assert np.isfinite(sketch.mean)
        check_moments(sketch.to_proto("x", 1, "X"))
    a.merge(b)
    assert a.mean == pytest.approx((huge / 9).sum() + 5 * (1.7e308 / 9), rel=1e-12)
    assert a.count == 9 and a.min == -1.2e308 and a.max == 1.7e308
    check_moments(a.to_proto("x", 1, "X"))


# ---------------------------------------------------------------- exact counts of few distinct values

# Small domains (integer codes, flags) with NaN and inf mixed in; up to 40 distinct values, so some
# columns overflow MAX_EXACT_VALUES (32) and some do not, alone or only once merged.
small_domain = hnp.arrays(np.float32, st.integers(0, 300), elements=st.one_of(
    st.integers(-3, 36).map(float), st.sampled_from([0.5, -0.0, 1e6]), st.sampled_from(SPECIAL)))


@given(small_domain)
def test_exact_counts_match_the_data(values: np.ndarray) -> None:
    sketch = sketch_of(values)
    assert_exact_matches_data(sketch, values)
    by_blocks = sketch_of(*np.array_split(values, 7))  # new values arriving block after block
    assert_same_exact(by_blocks, sketch)


@given(small_domain, small_domain, small_domain)
def test_exact_counts_merge_commutatively_and_associatively(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> None:
    a, b, c = sketch_of(x), sketch_of(y), sketch_of(z)
    everything = np.concatenate([x, y, z])
    for combined in (merged(merged(a, b), c), merged(a, merged(b, c)), merged(c, b, a), merged(b, a, c)):
        assert_exact_matches_data(combined, everything)  # the same whatever the order: the data's own counts
    overflowed = sketch_of(np.arange(MAX_EXACT_VALUES + 1.0))
    for combined in (merged(a, overflowed), merged(overflowed, a)):
        assert combined.exact_counts is None  # sticky: a column that had more values never counts again


def test_overflow_is_decided_by_all_the_values_merged() -> None:
    low, high = sketch_of(np.arange(20.0)), sketch_of(np.arange(12.0, 32.0))
    both = merged(low, high)  # 32 distinct values in all: still exact
    assert both.exact_counts is not None and both.exact_counts[0].size == MAX_EXACT_VALUES
    assert list(both.exact_counts[1]) == [1] * 12 + [2] * 8 + [1] * 12
    assert merged(both, sketch_of(np.array([99.0]))).exact_counts is None  # one more: overflow
    both.update(np.array([5.0, 5.0, np.nan]))  # known values keep counting
    assert both.exact_counts[1][5] == 3


def test_a_continuous_column_stops_counting_after_its_first_block() -> None:
    rng = np.random.default_rng(3)
    sketches = [NumericSketch() for _ in range(3)]
    block = np.column_stack([rng.normal(size=8192), rng.integers(0, 5, 8192), rng.random(8192) < 0.1])
    update_numeric_block(sketches, block.astype(np.float32))
    continuous, codes, flag = sketches
    assert continuous.exact_overflow and continuous.exact_counts is None
    assert list(codes.exact_counts[0]) == [0.0, 1.0, 2.0, 3.0, 4.0] and codes.exact_counts[1].sum() == 8192
    assert list(flag.exact_counts[0]) == [0.0, 1.0]
    # A block whose first values repeat (sorted data) is counted whole before it overflows.
    ramp = NumericSketch()
    ramp.update(np.repeat(np.arange(40.0), 10))
    assert ramp.exact_overflow


def test_exact_counts_round_trip_and_older_agents_read_as_overflowed() -> None:
    codes = sketch_of(np.array([3.0, 1.0, 3.0, np.nan, np.inf]))
    msg = codes.to_proto("code", CS.FEATURE, "X")
    assert (list(msg.exact_values), list(msg.exact_counts), msg.exact_overflow) == ([1.0, 3.0], [1, 2], False)
    back = NumericSketch.from_proto(CS.FromString(msg.SerializeToString()))
    assert_same_exact(back, codes)
    continuous = sketch_of(np.linspace(0, 1, 100)).to_proto("x", CS.FEATURE, "X")
    assert continuous.exact_overflow and not continuous.exact_values
    older = CS()
    older.CopyFrom(msg)
    older.ClearField("exact_values")
    older.ClearField("exact_counts")  # a window from an agent that predates exact counts: unknown
    assert NumericSketch.from_proto(older).exact_counts is None
    empty = NumericSketch.from_proto(NumericSketch().to_proto("x", CS.FEATURE, "X"))
    assert empty.exact_counts is not None and empty.exact_counts[0].size == 0  # nothing seen yet: still exact
    empty.update(np.array([2.0]))
    assert list(empty.exact_counts[0]) == [2.0]
