"""Every comparison between two sketches: the statistics the drift engine reads.

Numeric comparisons work on each sketch's ``sorted_view()``: the KLL's CDF is
a step function that only jumps at retained items, so evaluating both CDFs at
the union of retained items (``_merged_cdfs``) gives the *exact* KS distance,
Wasserstein distance and bin masses of the two sketched distributions, in
numpy, with no grid to tune. They differ from the raw-data values by the
sketches' rank error (about rank_error(a) + rank_error(b) for KS; see
``wasserstein`` for the tails).

Categorical comparisons work on cells built from the two frequent-items
sketches (``categorical_cells``): one per category whose count both sketches
vouch for, an "unseen" cell for categories the reference never had, and an
"other" cell for what lies beyond the sketches' lists. A numeric column with
exact counts on both sides is compared the same way on cells of its values
(``discrete_cells``, ``compare_discrete``).

Missing values (NaN, None, empty; for numeric columns infinities too: any
value that is not a finite number) are compared as a rate with a
two-proportion test (``compare_missing``).

scipy is imported inside the functions that need it: the agent's summary
helper process imports this package and never compares anything.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from agent.sketches.categorical import CategoricalSketch
from agent.sketches.numeric import NumericSketch

# Floor for a bin's or cell's share in PSI, on both sides: an empty bin would
# make ln(c/r) infinite. 1e-4 is the usual choice in PSI practice; it caps one
# emptied reference decile at (0.1 - 1e-4) * ln(0.1 / 1e-4) ~ 0.69, still far
# past any threshold, so the floor never hides a real shift.
PSI_EPSILON = 1e-4
# Below this effective sample size the KS p-value is scipy's exact-asymptotic
# kstwo.sf (as ks_2samp(method="asymp")); above it that takes milliseconds to
# seconds (its cost grows with n), so Stephens' corrected limit is used instead.
_KS_EXACT_BELOW = 500
# Ranks left out at each end by ``wasserstein``: about the rank error of an
# agent window's KLL (DEFAULT_K), below which its tail quantiles are noise.
WASSERSTEIN_TRIM = 0.01
UNSEEN, OTHER = "<unseen>", "<other>"
# Anderson-Darling's p-value is that of continuous values: with a point mass the statistic's null
# spread is wider and the p-value too small (clean samples of 500 vs 2,000 values: a 0/1 column read
# p < 0.01 in 5.2 % of them, a column 60 % zeros in 3.6 %; values rounded so that one value holds
# 10 % of them, 1.3 %). Where one value holds more than this share of both sides' finite values
# there is no AD p-value: KS alone (conservative with ties) and, for few values, chi-square.
AD_MAX_TIE_SHARE = 0.1
# A full frequent-items sketch knows a count only within its error bound; a
# category gets a cell of its own only if that bound is at most this share of it.
CELL_TOLERANCE = 0.1


class NumericComparison(NamedTuple):
    ks_d: float
    ks_p: float
    psi: float
    wasserstein: float  # W1 divided by the reference's standard deviation
    ad: float = math.nan  # two-sample Anderson-Darling A2 (Scholz-Stephens, midranks)
    ad_p: float = math.nan  # its asymptotic p-value (``ad_pvalue``)


class CategoricalComparison(NamedTuple):
    chi2: float
    chi2_p: float
    js: float  # Jensen-Shannon distance, base 2, in [0, 1]
    psi: float


class MissingComparison(NamedTuple):
    p: float  # two-sided two-proportion z-test; NaN when it cannot differ (no value, or none or all missing)
    difference: float  # current rate minus reference rate
    effect: float  # Cohen's h: |2 asin sqrt(current rate) - 2 asin sqrt(reference rate)|


class Cells(NamedTuple):
    labels: list[str]
    reference: np.ndarray  # counts per cell (float: sketched counts)
    current: np.ndarray


def missing_rate(sketch: NumericSketch | CategoricalSketch) -> float:
    """Share of values that were missing (NaN, None or empty); NaN if no values.
    Infinite numeric values are not missing: they are counted apart."""
    return sketch.missing / sketch.count if sketch.count else math.nan


def not_finite(sketch: NumericSketch | CategoricalSketch) -> int:
    """Values that are not a usable number or category: missing, and for numeric columns infinite."""
    return sketch.missing + (sketch.infinite if isinstance(sketch, NumericSketch) else 0)


def compare_missing(reference: NumericSketch | CategoricalSketch,
                    current: NumericSketch | CategoricalSketch) -> MissingComparison:
    """The share of values that are not finite (``not_finite``), current against reference.

    The test is the pooled two-proportion z-test (both sides are samples), two-sided. It is
    not a test when the pooled rate is 0 or 1 (nothing can differ): p is NaN then, so the
    drift engine leaves it out of Benjamini-Hochberg's m. The effect size is Cohen's h, the
    difference of the rates on the arcsine-square-root scale, whose sampling noise is about
    sqrt(1/n_ref + 1/n_cur) whatever the rates: 0 -> 1 % reads 0.20, 0 -> 10 % 0.64,
    10 -> 17 % 0.20, 50 -> 60 % 0.20, 0 -> 100 % pi."""
    n_ref, n_cur = reference.count, current.count
    if n_ref == 0 or n_cur == 0:
        return MissingComparison(math.nan, math.nan, math.nan)
    bad_ref, bad_cur = not_finite(reference), not_finite(current)
    rate_ref, rate_cur = bad_ref / n_ref, bad_cur / n_cur
    effect = abs(2 * math.asin(math.sqrt(rate_cur)) - 2 * math.asin(math.sqrt(rate_ref)))
    pooled = (bad_ref + bad_cur) / (n_ref + n_cur)
    if pooled <= 0 or pooled >= 1:
        return MissingComparison(math.nan, rate_cur - rate_ref, effect)
    z = (rate_cur - rate_ref) / math.sqrt(pooled * (1 - pooled) * (1 / n_ref + 1 / n_cur))
    return MissingComparison(math.erfc(abs(z) / math.sqrt(2)), rate_cur - rate_ref, effect)


# ---------------------------------------------------------------- numeric

Merged = tuple[np.ndarray, np.ndarray, np.ndarray]  # x, Fa(x), Fb(x)


def _merged_cdfs(a: NumericSketch, b: NumericSketch) -> Merged | None:
    """Both step CDFs at every jump of either (the union of retained items,
    ascending); None if either side has no finite values.

    One stable argsort of the two sorted item arrays (a merge), then each
    side's CDF is its own CDF at "how many of its items lie at or before
    here". Of equal values only the last position is kept, so both CDFs
    there count every item <= x (inclusive, as ``NumericSketch.cdf``)."""
    (ai, ac), (bi, bc) = a.sorted_view(), b.sorted_view()
    if ai.size == 0 or bi.size == 0:
        return None
    values = np.concatenate((ai, bi))
    order = np.argsort(values, kind="stable")
    x = values[order]
    na = np.cumsum(order < ai.size)
    nb = np.arange(1, x.size + 1) - na
    last = np.empty(x.size, dtype=bool)
    np.not_equal(x[1:], x[:-1], out=last[:-1])
    last[-1] = True
    x, na, nb = x[last], na[last], nb[last]
    return x, np.concatenate(([0.0], ac))[na], np.concatenate(([0.0], bc))[nb]


def ks_statistic(a: NumericSketch, b: NumericSketch) -> float:
    """Two-sample Kolmogorov-Smirnov D between the finite values of two sketches.

    The exact sup |Fa - Fb| of the sketched CDFs (reached at a jump of
    either); it differs from the raw-data D by at most about rank_error(a) +
    rank_error(b). NaN if either side has no finite values.
    """
    merged = _merged_cdfs(a, b)
    return math.nan if merged is None else float(np.max(np.abs(merged[1] - merged[2])))


def _ks_pvalue_from(d: float, m: int, n: int) -> float:
    if math.isnan(d):
        return math.nan
    en = m * n / (m + n)
    if en >= _KS_EXACT_BELOW:
        from scipy import special  # late: see the module docstring

        # Stephens (1970): within 1% (relative) of kstwo.sf for p >= 0.01 and
        # 4% down to p = 1e-6 at en >= 500, in microseconds at any n.
        root = math.sqrt(en)
        return float(special.kolmogorov((root + 0.12 + 0.11 / root) * d))
    from scipy import stats

    # scipy rounds the effective size, which gives 0 (and NaN) for 1 vs 1 value.
    return float(stats.kstwo.sf(d, max(1.0, np.round(en))))


def ks_pvalue(a: NumericSketch, b: NumericSketch) -> float:
    """Asymptotic two-sample KS p-value with the finite counts as sample sizes:
    scipy's ``ks_2samp(method="asymp")`` for small samples, Stephens'
    approximation of the same distribution past an effective size of 500
    (scipy's own takes milliseconds to seconds there: its cost grows with n).

    With large counts a D of the size of the sketch error alone is already
    "significant": decisions should also require an effect size well above
    rank_error() (the drift engine's threshold does this)."""
    return _ks_pvalue_from(ks_statistic(a, b), a.finite_count, b.finite_count)


def _ad_statistic(merged: Merged, n_a: int, n_b: int) -> float:
    """Two-sample Anderson-Darling A2 of the two step CDFs: Scholz and Stephens' (1987) A2_akN
    for k = 2, the version for ties (midranks; scipy's ``anderson_ksamp`` default), with each
    side's counts read from its CDF; NaN where one value holds more than AD_MAX_TIE_SHARE of
    them. Under the null its mean is 1 whatever the sizes. With two
    samples the second side's term is the first's with its sign flipped (the midranks add up),
    so one is computed and weighed by 1/n_a + 1/n_b."""
    _, fa, fb = merged
    n = n_a + n_b
    ma = fa * n_a  # values of a at or before each point
    both = ma + fb * n_b
    ties = np.empty_like(both)
    ties[0], ties[1:] = both[0], both[1:] - both[:-1]
    mid = both - 0.5 * ties
    denominator = mid * (n - mid) - 0.25 * n * ties
    jumps = np.empty_like(ma)
    jumps[0], jumps[1:] = ma[0], ma[1:] - ma[:-1]
    gap = n * (ma - 0.5 * jumps) - n_a * mid
    # a point holding every value (one distinct value in all) has no denominator: it says nothing
    if float(ties.max()) > AD_MAX_TIE_SHARE * n:
        return math.nan  # a point mass: see AD_MAX_TIE_SHARE
    weight = ties / np.where(denominator > 0, denominator, np.inf)
    return (n - 1) / n**2 * (1 / n_a + 1 / n_b) * float(np.dot(weight, gap * gap))


def ad_pvalue(a2: float) -> float:
    """P(A2 >= a2) under the null, from the limiting distribution of the Anderson-Darling
    statistic (the two-sample A2 for k = 2 has the one-sample limit): Marsaglia and Marsaglia's
    (2004) ``ADinf``, within 2e-6 of the CDF everywhere; its upper branch models
    log(-log(CDF)), so p-values far below 1e-6 keep their relative accuracy. scipy's
    ``anderson_ksamp`` caps its p-value to [0.001, 0.25], useless in a Benjamini-Hochberg family."""
    if math.isnan(a2):
        return math.nan
    if a2 <= 0:
        return 1.0
    z = a2
    if z < 2:
        cdf = math.exp(-1.2337141 / z) / math.sqrt(z) * (
            2.00012 + (.247105 - (.0649821 - (.0347962 - (.011672 - .00168691 * z) * z) * z) * z) * z)
        return min(1.0, max(0.0, 1.0 - cdf))
    exponent = 1.0776 - (2.30695 - (.43424 - (.082433 - (.008056 - .0003146 * z) * z) * z) * z) * z
    return -math.expm1(-math.exp(exponent))


def ad_test(a: NumericSketch, b: NumericSketch) -> tuple[float, float]:
    """(A2, p) of the two-sample Anderson-Darling test between the finite values of two sketches;
    (NaN, NaN) if either side has none or one value holds more than AD_MAX_TIE_SHARE of them
    (AD's p-value is for continuous values). Beside KS because KS reads only the largest CDF gap,
    near the middle: a change of spread (variance x1.5 moved D to ~0.06, p ~2e-4 at 1,000 rows)
    or of a tail is where Anderson-Darling, which weighs the whole CDF and its tails, is far
    stronger (p ~1e-20 on the same rows). Like KS, it reads the sketches' rank error as
    difference once the counts are large: decisions need an effect size as well."""
    merged = _merged_cdfs(a, b)
    if merged is None:
        return math.nan, math.nan
    a2 = _ad_statistic(merged, a.finite_count, b.finite_count)
    return a2, ad_pvalue(a2)


def _normalised_w1(merged: Merged, reference: NumericSketch, trim: float) -> float:
    """The area between the two CDFs inside the band trim <= F <= 1 - trim,
    over the reference std. That band's area is the integral of
    |Qr(u) - Qc(u)| over u in [trim, 1 - trim], read in x instead of u:
    the integral of |clip(Fr) - clip(Fc)| dx, exact for step CDFs."""
    x, fr, fc = merged
    lo, hi = trim, 1.0 - trim
    # Plain ufuncs, not np.clip / np.diff: those wrappers cost more than the arithmetic at these sizes.
    gap = np.abs(np.minimum(np.maximum(fr, lo), hi) - np.minimum(np.maximum(fc, lo), hi))
    w1 = float(np.dot(gap[:-1], x[1:] - x[:-1]))
    std = reference.std
    if std > 0:
        return w1 / std
    return 0.0 if w1 == 0 else math.inf  # any movement off a constant is unbounded in std units


def wasserstein(reference: NumericSketch, current: NumericSketch, trim: float = WASSERSTEIN_TRIM) -> float:
    """Wasserstein-1 distance between the two sketched distributions divided by
    the reference's standard deviation (Evidently's normalisation): a pure
    shift of 0.25 sigma reads about 0.25 whatever the distribution's shape.

    W1 = integral over u of |Qr(u) - Qc(u)|, exact for the step CDFs, over
    u in [trim, 1 - trim]. Trimmed because beyond the sketches' rank error
    (~1.3% at DEFAULT_K) a KLL cannot place its quantiles: there a retained
    item stands for up to 2**h values, and on heavy tails that alone moved the
    untrimmed W1/std of clean lognormal traffic to 0.1-0.5 (the raw data's
    stayed below 0.06). ``trim=0`` gives the plain W1 of the sketches.
    inf if the reference is constant and the current is not; NaN without
    finite values on either side."""
    if not 0.0 <= trim < 0.5:
        raise ValueError("trim must lie in [0, 0.5)")
    merged = _merged_cdfs(reference, current)
    return math.nan if merged is None else _normalised_w1(merged, reference, trim)


def _psi_from_shares(ref: np.ndarray, cur: np.ndarray) -> float:
    ref, cur = np.maximum(ref, PSI_EPSILON), np.maximum(cur, PSI_EPSILON)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def _numeric_psi(merged: Merged, reference: NumericSketch, bins: int) -> float:
    """PSI on ``bins`` equal-mass bins of the reference. Edges are reference
    quantiles (duplicates dropped, so a point mass keeps its own bin); both
    sides' masses are read from their CDFs at the edges, not assumed 1/bins.
    The edges are reference items, so they are among the merged points."""
    edges = reference.bin_edges(bins)
    x, fr, fc = merged
    at = np.searchsorted(x, edges)
    ref, cur = (np.concatenate(([0.0], f[at], [1.0])) for f in (fr, fc))
    ref, cur = ref[1:] - ref[:-1], cur[1:] - cur[:-1]
    return _psi_from_shares(ref, cur)


def compare_numeric(
    reference: NumericSketch, current: NumericSketch, bins: int = 10, trim: float = WASSERSTEIN_TRIM
) -> NumericComparison:
    """All numeric statistics at once, from one merge of the two sketches."""
    merged = _merged_cdfs(reference, current)
    if merged is None:
        return NumericComparison(math.nan, math.nan, math.nan, math.nan)
    d = float(np.max(np.abs(merged[1] - merged[2])))
    a2 = _ad_statistic(merged, reference.finite_count, current.finite_count)
    return NumericComparison(
        ks_d=d,
        ks_p=_ks_pvalue_from(d, reference.finite_count, current.finite_count),
        psi=_numeric_psi(merged, reference, bins),
        wasserstein=_normalised_w1(merged, reference, trim),
        ad=a2,
        ad_p=ad_pvalue(a2),
    )


# ---------------------------------------------------------------- categorical


def _count_if_known(sketch: CategoricalSketch, item: str, error: int) -> float | None:
    """An item's count if the sketch knows it to within CELL_TOLERANCE: always
    when the sketch is exact (error 0; an untracked item then has count 0),
    else only for a heavy hitter whose count dwarfs the error bound, taken as
    the middle of its [lower, upper] bounds. None: pool it in "<other>"."""
    if error == 0:
        return float(sketch.estimate(item))
    lower, upper = sketch.count_bounds(item)
    if lower <= 0 or error > CELL_TOLERANCE * lower:
        return None
    return (lower + upper) / 2


def categorical_cells(reference: CategoricalSketch, current: CategoricalSketch) -> Cells:
    """The cells every categorical statistic is computed over.

    A category listed by either sketch gets its own cell when both sketches
    know its count (``_count_if_known``): exactly, while a sketch has room for
    every distinct value, or within CELL_TOLERANCE for the heavy hitters of a
    full one. A category the reference never had (exact reference, count 0)
    goes to "<unseen>". Every other category, and the mass beyond both lists,
    is pooled in "<other>" on both sides, so a full sketch's error-laden tail
    counts are never compared with precise ones: on a 500-category Zipf
    column, comparing them flagged clean traffic with JS ~0.2 and PSI ~0.6.
    Missing values are not cells (``missing_rate`` reports them). Cells
    empty on both sides are dropped."""
    ref_error, cur_error = reference.error_bound(), current.error_bound()
    items = dict.fromkeys(item for item, _ in reference.frequent_items())
    items.update(dict.fromkeys(item for item, _ in current.frequent_items()))
    labels: list[str] = []
    ref_counts: list[float] = []
    cur_counts: list[float] = []
    unseen = 0.0
    for item in items:
        r = _count_if_known(reference, item, ref_error)
        c = _count_if_known(current, item, cur_error)
        if r is None or c is None:
            continue
        if r == 0:
            unseen += c
        else:
            labels.append(item)
            ref_counts.append(r)
            cur_counts.append(c)
    labels += [UNSEEN, OTHER]
    ref_counts += [0.0, max(0.0, reference.present - sum(ref_counts))]
    cur_counts += [unseen, max(0.0, current.present - sum(cur_counts) - unseen)]
    ref, cur = np.array(ref_counts, dtype=np.float64), np.array(cur_counts, dtype=np.float64)
    keep = (ref > 0) | (cur > 0)
    return Cells([label for label, k in zip(labels, keep) if k], ref[keep], cur[keep])


def _chi2_from(cells: Cells) -> tuple[float, float]:
    """Pearson's chi-square on the 2 x cells table (reference row, current row).

    A test of homogeneity rather than goodness of fit to the reference shares
    taken as exact: the reference is a sample too, and treating it as exact
    makes a large current "significant" with no drift at all (the statistic
    grows like current/reference rows per degree of freedom). An unseen
    category's expected count comes from the pooled row, so it needs no floor."""
    table = np.vstack([cells.reference, cells.current])
    totals = table.sum(axis=1)
    if totals.min() <= 0:  # one side has no present values (or there are no cells)
        return math.nan, math.nan
    if len(cells.labels) < 2:
        return 0.0, 1.0
    expected = np.outer(totals, table.sum(axis=0)) / totals.sum()
    statistic = float(np.sum((table - expected) ** 2 / expected))
    from scipy import special  # late: see the module docstring

    return statistic, float(special.chdtrc(len(cells.labels) - 1, statistic))


def _js_from(cells: Cells) -> float:
    r_total, c_total = cells.reference.sum(), cells.current.sum()
    if r_total <= 0 or c_total <= 0:
        return math.nan
    p, q = cells.reference / r_total, cells.current / c_total
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(p / m), 0.0) + np.where(q > 0, q * np.log2(q / m), 0.0)
    return float(math.sqrt(max(0.0, float(terms.sum()) / 2)))


def _cat_psi_from(cells: Cells) -> float:
    r_total, c_total = cells.reference.sum(), cells.current.sum()
    if r_total <= 0 or c_total <= 0:
        return math.nan
    return _psi_from_shares(cells.reference / r_total, cells.current / c_total)


def chi2(reference: CategoricalSketch, current: CategoricalSketch) -> tuple[float, float]:
    """(statistic, p-value) of the chi-square test over ``categorical_cells``;
    (NaN, NaN) if either side has no present values."""
    return _chi2_from(categorical_cells(reference, current))


def js_distance(reference: CategoricalSketch, current: CategoricalSketch) -> float:
    """Jensen-Shannon distance (sqrt of the divergence, base 2: 0 same, 1
    disjoint) between the two distributions over ``categorical_cells``."""
    return _js_from(categorical_cells(reference, current))


def compare_categorical(reference: CategoricalSketch, current: CategoricalSketch) -> CategoricalComparison:
    """All categorical statistics at once, over one set of cells."""
    cells = categorical_cells(reference, current)
    statistic, p = _chi2_from(cells)
    return CategoricalComparison(chi2=statistic, chi2_p=p, js=_js_from(cells), psi=_cat_psi_from(cells))


def discrete_cells(reference: NumericSketch, current: NumericSketch) -> Cells | None:
    """Cells of a numeric column's values from both sides' exact counts: one per reference value
    (labelled by its shortest repr), and "<unseen>" for current values the reference never had.
    None when either side has no exact counts (more distinct values than it keeps, or unknown)."""
    ref, cur = reference.exact_counts, current.exact_counts
    if ref is None or cur is None:
        return None
    (ref_values, ref_counts), (cur_values, cur_counts) = ref, cur
    current_at = np.zeros(ref_values.size)
    if cur_values.size and ref_values.size:
        at = np.minimum(np.searchsorted(ref_values, cur_values), ref_values.size - 1)
        known = ref_values[at] == cur_values
        np.add.at(current_at, at[known], cur_counts[known])
        unseen = float(cur_counts[~known].sum())
    else:
        unseen = float(cur_counts.sum())
    labels = [repr(v) for v in ref_values.tolist()] + [UNSEEN]
    reference_cells = np.append(ref_counts.astype(np.float64), 0.0)
    current_cells = np.append(current_at, unseen)
    keep = (reference_cells > 0) | (current_cells > 0)
    return Cells([label for label, k in zip(labels, keep) if k], reference_cells[keep], current_cells[keep])


def compare_discrete(reference: NumericSketch, current: NumericSketch) -> CategoricalComparison | None:
    """The categorical statistics (chi-square, Jensen-Shannon, PSI) over ``discrete_cells``:
    a numeric column judged by the frequencies of its values. None without exact counts."""
    cells = discrete_cells(reference, current)
    if cells is None:
        return None
    statistic, p = _chi2_from(cells)
    return CategoricalComparison(chi2=statistic, chi2_p=p, js=_js_from(cells), psi=_cat_psi_from(cells))


def psi(
    reference: NumericSketch | CategoricalSketch, current: NumericSketch | CategoricalSketch, bins: int = 10
) -> float:
    """Population stability index, sum (c - r) ln(c / r) over shares floored
    at PSI_EPSILON. Numeric: ``bins`` equal-mass bins of the reference.
    Categorical: over ``categorical_cells`` (``bins`` is unused)."""
    if isinstance(reference, NumericSketch) and isinstance(current, NumericSketch):
        merged = _merged_cdfs(reference, current)
        return math.nan if merged is None else _numeric_psi(merged, reference, bins)
    if isinstance(reference, CategoricalSketch) and isinstance(current, CategoricalSketch):
        return _cat_psi_from(categorical_cells(reference, current))
    raise TypeError("psi compares two sketches of the same kind")
