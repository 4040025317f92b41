"""The drift policy: when a column has drifted, and when an alert opens or clears.

The statistics live in ``agent.sketches`` (one home of summary math); this
module only decides. A column drifts when an *effect size* passes its
threshold AND its test is *significant* after Benjamini-Hochberg. Both are
needed: with thousands of rows a test finds differences nobody cares about
(and the sketches' own ~1% rank error becomes "significant" past ~10^5 rows),
while an effect size alone on a small sample is noise.

What is tested, per column and per span (``compare_column``):

- numeric: normalised Wasserstein >= 0.1 or PSI >= 0.2, with KS and
  Anderson-Darling as one test (the smaller p-value, Sidak-corrected for two:
  ``sidak_min``), so a numeric column is one entry in the family, as before.
  0.1 is Evidently's default for Wasserstein/std; PSI 0.2 the common
  "significant shift" line. Wasserstein is trimmed to ranks [1%, 99%] (see
  ``agent.sketches.wasserstein``): untrimmed, the sketches' own tail error
  pushed clean lognormal columns to 0.1-0.5. KS alone reads the largest CDF
  gap, which a change of spread keeps small: variance x1.5 at 1,000 rows
  passed the Wasserstein threshold every time but KS's p (median 2e-4) cleared
  q 0.01 over ~26 tests in 61 of 100 evaluations; Anderson-Darling, which
  weighs the whole CDF and its tails, read p ~1e-20 on the same rows. AD's
  p-value is for continuous values: where one value holds more than 10 % of
  the values (a 0/1 flag, a column mostly zeros) there is none, and KS (and
  chi-square for a discrete column) decide alone. With AD on such columns a
  0/1 flag against 500-row references was flagged in ~3.5 % of clean
  evaluations (13-19 alerts in 3,000).
- categorical: Jensen-Shannon distance (base 2) >= 0.08 or PSI >= 0.2 over
  the same cells, with the chi-square homogeneity test.
- discrete: a numeric column whose reference has exact counts of at most
  DISCRETE_MAX_VALUES values (integer codes, flags, small counts) is judged
  as numeric AND by its frequencies like a categorical one (chi-square, JS,
  PSI over its values; values the reference never had pool in "<unseen>").
  The issue's P(0) 40 -> 30 %, P(1) 25 -> 35 % in a 0-4 column reads JS
  ~0.106 with all rows changed; sampling noise at 1,000 rows puts 5 % of
  evaluations below 0.088, hence 0.08 (0.1 caught 73 % at 1,000 rows).
- missing rate (missing + infinite values, any column): Cohen's h >= 0.2
  (0 -> 1 %, 10 -> 17 %, 50 -> 60 %) with the two-proportion z-test. h's
  noise does not depend on the rate, so one threshold serves a column that
  is never missing and one that is missing 30 % of the time. A column that
  goes entirely missing is drift (h = pi), not "no data".

Spans: each evaluation compares the last ``short_span_seconds`` (300) and the
last ``span_seconds`` (3600) with the reference (counted in whole buckets by
the evaluator's span cache, ``collector.monitoring.spans``: the last 5 or 60 whole minutes
plus the current one), and every test of every
span is one Benjamini-Hochberg family (``decide``): looking twice is paid for
in the correction. The short span sees a change within minutes (at 1,000
rows a minute it holds 5,000 rows, plenty for these effect sizes); the hour
sees slow drifts and low-traffic models (a span with fewer than min_rows rows
is skipped, and so is a short span holding the same windows as the hour: the
evaluator does not test the same rows twice). ``span_seconds`` of each column
names the span that decided.

Defaults (``DriftConfig``), chosen with benchmarks/drift_quality.py (its
``--grid`` replays candidate policies over one run's statistics; 2026-12-06,
2-core VM). 20 mixed columns and "@reconstruction_error", one agent window
and one evaluation a minute, 10 runs per change with a 50,000-row reference
at 1,000 rows a minute; minutes from the change to the alert, median (range):

    change                 shipped (5 min + 1 h, q 0.01, k 2)   before (1 h, q 0.05, k 3)
    mean +0.5 sd           2 (2-3)                              15 (14-15)
    correlation 0.9 -> 0   2 (2-2)                              never
    row selection          3 (3-4)                              26 (23-27)
    mean +0.25 sd          3 (3-4)                              27 (24-31)
    variance x1.5          4 (4-5)                              38 (36-40)
    category 30 -> 45 %    4 (4-5)                              49 (46-49)
    missing 0 -> 10 %      2 (2-2)                              never
    small integer          5 (5-6)                              never
    heavy tail             5 (4-6)                              45 (34-51)

no column flagged that did not change in 600 evaluations of each. Clean
traffic, references of 500 and 50,000 rows (10 draws each) at 1,000 and
10,000 rows a minute: 1 evaluation of 12,000 flagged (missing5, against a
500-row reference), no alert; KS alone none; before 24 flagged, no alert,
all against 500-row references (the run before: 20 and 1 alert). In the grid (KS alone), q = 0.05 flagged 25-27 of those
evaluations and opened 3 alerts: a 500-row reference's own sampling error,
shared by every evaluation against it, puts clean columns at W ~0.1 with KS
p_adjusted 0.03-0.04. q = 0.001 flagged none but caught variance x1.5 in 25 %
of single 1,000-row evaluations. Short spans of 3 minutes were a minute
faster and flagged 3 clean evaluations; 10 minutes missed the 10-minute
target for variance and category. k = 3 (a minute later) put row selection
at the 5-minute target; k = 2 opened no clean alert either.

Per single evaluation of 1,000 rows (one span) against a 50,000-row
reference, 100 each: missing 0 -> 10 % and the correlation break 100/100,
the small-integer shift 99/100 (100/100 at 10,000 rows; before 43 and 3),
variance x1.5 99/100 (before 87/100), a heavier tail 98/100 (before
99/100), every other change 100/100. With KS alone at q 0.01 (this policy
before Anderson-Darling) variance x1.5 read 61/100 and the heavier tail
95/100: the p-value gate failed, not the effect sizes (Wasserstein passed
in 100/100). The two spans were not the cause: these evaluations have one
span (~26 tests; q 0.05 -> 0.01 and ~6 more tests moved KS's bar for one
changed column from 2.5e-3 to 3.8e-4). With two spans the live family has
~52, which for one changed column costs what a Sidak correction over its two
spans would (p <= q/52 either way). On 500 more
evaluations (other seeds): variance 496/500 (KS alone 270, before 419),
heavier tail 472/500 (KS alone 430, before 467), clean 1/500 flagged (KS
alone 1, before 3). What single evaluations still miss (2-4 % of the heavier
tail) are samples that barely show the change (KS and AD p ~1e-3): only a
laxer q recovers them, and q = 0.05 is what flagged clean evaluations.

A column that cannot be compared says why in its reason, which starts "not
compared:" for a reference column (no such column in traffic, a changed
kind, too few rows); it has no verdict (NaN p_adjusted), so the alert machine
neither opens nor clears on it, and ``summary`` never calls an evaluation
"no drift" while a reference column went uncompared.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent import sketches
from agent.errors import InvalidArgument
from protos import collector_pb2, summary_pb2

Sketch = sketches.NumericSketch | sketches.CategoricalSketch
CS = summary_pb2.ColumnSummary

# Alert state machine per column.
OK, ALERTING = "ok", "alerting"
OPENED, RESOLVED = "opened", "resolved"


# How a column is judged (ColumnDrift.method).
NUMERIC, CATEGORICAL, DISCRETE = "numeric", "categorical", "discrete"
# A numeric reference column with at most this many distinct values (exact counts in the
# profile) is judged by its frequencies as well: integer codes, flags, small counts.
DISCRETE_MAX_VALUES = 20
NOT_IN_TRAFFIC = "not compared: no such column in traffic"
NOT_IN_REFERENCE = "not in the reference profile"


@dataclass(frozen=True)
class DriftConfig:
    """One model's drift policy; stored as JSON via ``to_dict``/``from_dict``."""

    wasserstein_threshold: float = 0.1  # numeric: W1 / reference std
    numeric_psi_threshold: float = 0.2
    js_threshold: float = 0.08  # categorical and discrete: Jensen-Shannon distance, base 2
    categorical_psi_threshold: float = 0.2
    missing_threshold: float = 0.2  # missing (+ infinite) rate: Cohen's h (0 -> 1 %, 10 -> 17 %, 50 -> 60 %)
    q: float = 0.01  # Benjamini-Hochberg false discovery rate across every test of every span
    consecutive: int = 2  # k: verdicts in a row to open, and to resolve, an alert
    span_seconds: float = 3600.0  # the longest span: recent windows merged into the current sketch
    short_span_seconds: float = 300.0  # evaluated too, in the same BH family (0: only span_seconds)
    min_rows: int = 1000  # fewer current rows in a span (or a column): not evaluated
    psi_bins: int = 10  # numeric PSI: equal-mass bins of the reference
    accuracy_drop: float = 0.05  # realised accuracy this far below the reference's opens a performance alert
    mae_increase: float = 0.2  # regression: realised MAE this much above the reference's (relative)

    def __post_init__(self) -> None:
        for name in ("wasserstein_threshold", "numeric_psi_threshold", "js_threshold", "categorical_psi_threshold",
                     "missing_threshold", "span_seconds", "accuracy_drop", "mae_increase"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 < value < math.inf:
                raise InvalidArgument(f"drift config: {name} must be a positive number, got {value!r}")
        if not _is_number(self.short_span_seconds) or not 0 <= self.short_span_seconds < math.inf:
            raise InvalidArgument("drift config: short_span_seconds must be 0 (off) or a positive number, "
                                  f"got {self.short_span_seconds!r}")
        if not _is_number(self.q) or not 0 < self.q <= 1:
            raise InvalidArgument(f"drift config: q must lie in (0, 1], got {self.q!r}")
        for name, low, high in (("consecutive", 1, 1000), ("min_rows", 1, 10**12), ("psi_bins", 2, 1000)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise InvalidArgument(f"drift config: {name} must be an integer in [{low}, {high}], got {value!r}")

    def spans(self) -> tuple[float, ...]:
        """The spans evaluated, shortest first: the short span when it is shorter than the long one."""
        if 0 < self.short_span_seconds < self.span_seconds:
            return (self.short_span_seconds, self.span_seconds)
        return (self.span_seconds,)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DriftConfig:
        """Fields not given keep their defaults, so stored configs survive new
        fields; unknown fields are refused (a typo must not silently revert a
        threshold to its default). Integral floats (3.0 from JSON) are accepted."""
        if not isinstance(data, Mapping):
            raise InvalidArgument("drift config must be an object")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise InvalidArgument(f"drift config: unknown field(s) {', '.join(map(str, unknown))}")
        values: dict[str, Any] = {}
        for name, value in data.items():
            if known[name].type == "int" and isinstance(value, float) and value.is_integer():
                value = int(value)
            elif known[name].type == "float" and _is_number(value):
                value = float(value)
            values[name] = value
        return cls(**values)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def benjamini_hochberg(pvalues: Sequence[float]) -> np.ndarray:
    """BH-adjusted p-values (step-up, monotone, capped at 1). NaN entries are
    not tests: they stay NaN and do not count in m. A column is significant
    at false discovery rate q when its adjusted p-value is <= q."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    tested = ~np.isnan(p)
    m = int(tested.sum())
    if m == 0:
        return out
    order = np.argsort(p[tested], kind="stable")
    scaled = p[tested][order] * m / np.arange(1, m + 1)
    adjusted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    result = np.empty(m)
    result[order] = adjusted
    out[tested] = result
    return out


# ---------------------------------------------------------------- statistics of one span


@dataclass
class Compared:
    """One column compared over one span: its statistics (``drift``, no verdict yet) and those
    ColumnDrift does not carry: the Anderson-Darling p-value of a numeric column (NaN: none) and
    the reference's rate of values that are not finite."""

    drift: collector_pb2.ColumnDrift
    reference_not_finite: float = math.nan  # the reference's missing + infinite rate (ColumnDrift's is missing only)
    ad_p: float = math.nan


def _kind(sketch: Sketch) -> int:
    return CS.NUMERIC if isinstance(sketch, sketches.NumericSketch) else CS.CATEGORICAL


def _kind_name(sketch: Sketch) -> str:
    return CS.Kind.Name(_kind(sketch))


def is_discrete(reference: Sketch) -> bool:
    """A numeric reference column with exact counts of at most DISCRETE_MAX_VALUES values."""
    if not isinstance(reference, sketches.NumericSketch):
        return False
    exact = reference.exact_counts
    return exact is not None and 0 < exact[0].size <= DISCRETE_MAX_VALUES


def _not_comparable(ref: Sketch | None, cur: Sketch | None, config: DriftConfig) -> str:
    """Why a column cannot be compared at all in this span, or "" if it can."""
    if ref is None:
        return NOT_IN_REFERENCE
    if cur is None:
        return NOT_IN_TRAFFIC
    if type(ref) is not type(cur):
        return f"not compared: kind changed: reference {_kind_name(ref)}, current {_kind_name(cur)}"
    if cur.count < config.min_rows:
        return f"not compared: only {cur.count} current rows (min_rows {config.min_rows})"
    return ""


def _distribution_gap(ref: Sketch, cur: Sketch) -> str:
    """Why the values' distributions cannot be compared (the missing rates still can), or ""."""
    numeric = isinstance(ref, sketches.NumericSketch)
    present = (lambda s: s.finite_count) if numeric else (lambda s: s.present)
    word = "finite" if numeric else "present"
    if present(ref) == 0:
        return f"no {word} values in the reference"
    if present(cur) == 0:
        return f"no {word} values in the current data"
    return ""


def compare_column(name: str, ref: Sketch | None, cur: Sketch | None, config: DriftConfig,
                   role: int = CS.FEATURE, span_seconds: float = 0.0) -> Compared:
    """Every statistic of one column over one span; ``drift.drifted`` is left False and
    ``p_adjusted`` NaN (``decide`` sets them). A column that cannot be compared gets a reason."""
    nan = math.nan
    some = ref if ref is not None else cur
    assert some is not None
    col = collector_pb2.ColumnDrift(
        name=name, kind=_kind(some), role=role,
        psi=nan, ks_d=nan, ks_p=nan, wasserstein=nan, chi2=nan, chi2_p=nan, js=nan, p_adjusted=nan,
        missing_rate=sketches.missing_rate(cur) if cur is not None else nan,
        reference_missing_rate=sketches.missing_rate(ref) if ref is not None else nan,
        rows=cur.count if cur is not None else 0, missing_p=nan, missing_diff=nan, missing_effect=nan,
        span_seconds=span_seconds,
    )
    out = Compared(col)
    col.reason = _not_comparable(ref, cur, config)
    if col.reason:
        return out
    assert ref is not None and cur is not None
    missing = sketches.compare_missing(ref, cur)
    col.missing_p, col.missing_diff, col.missing_effect = missing.p, missing.difference, missing.effect
    out.reference_not_finite = sketches.not_finite(ref) / ref.count if ref.count else math.nan
    gap = _distribution_gap(ref, cur)
    if gap:
        compared = not math.isnan(missing.p)
        col.method = (NUMERIC if isinstance(ref, sketches.NumericSketch) else CATEGORICAL) if compared else ""
        col.reason = f"distribution not compared: {gap}" if compared else f"not compared: {gap}"
        return out
    if isinstance(ref, sketches.NumericSketch):
        assert isinstance(cur, sketches.NumericSketch)
        num = sketches.compare_numeric(ref, cur, bins=config.psi_bins)
        col.ks_d, col.ks_p, col.psi, col.wasserstein = num.ks_d, num.ks_p, num.psi, num.wasserstein
        out.ad_p = num.ad_p
        col.method = NUMERIC
        discrete = sketches.compare_discrete(ref, cur) if is_discrete(ref) else None
        if discrete is not None:  # None: the current has more distinct values than it counts exactly
            col.method = DISCRETE
            col.chi2, col.chi2_p, col.js, col.psi = discrete.chi2, discrete.chi2_p, discrete.js, discrete.psi
    else:
        assert isinstance(cur, sketches.CategoricalSketch)
        cat = sketches.compare_categorical(ref, cur)
        col.chi2, col.chi2_p, col.js, col.psi = cat.chi2, cat.chi2_p, cat.js, cat.psi
        col.method = CATEGORICAL
    return out


def compare(reference: Mapping[str, Sketch], current: Mapping[str, Sketch], config: DriftConfig,
            roles: Mapping[str, int] | None = None, span_seconds: float = 0.0) -> list[Compared]:
    """``compare_column`` for every column of either side, reference order first."""
    roles = roles or {}
    return [compare_column(name, reference.get(name), current.get(name), config, roles.get(name, CS.FEATURE),
                           span_seconds)
            for name in dict.fromkeys([*reference, *current])]


# ---------------------------------------------------------------- verdicts


@dataclass
class _Test:
    """One hypothesis test of one column in one span, and the effect sizes past their thresholds."""

    span: int  # index into the spans
    name: str  # column
    label: str  # "KS/AD", "chi2", "missing-rate"
    p: float
    passed: list[str]
    adjusted: float = math.nan


def sidak_min(pvalues: Sequence[float]) -> float:
    """One p-value for several tests of one hypothesis: the smallest, Sidak-corrected for how
    many there were (1 - (1 - min p)^n; NaN ones are not tests). Exact for independent tests and
    conservative for positively dependent ones such as KS and Anderson-Darling on the same
    values, so the column enters Benjamini-Hochberg once and the family does not grow."""
    tested = [p for p in pvalues if not math.isnan(p)]
    if not tested:
        return math.nan
    smallest = min(tested)
    return 1.0 if smallest >= 1 else max(0.0, -math.expm1(len(tested) * math.log1p(-smallest)))


def _tests(span: int, compared: Compared, config: DriftConfig) -> list[_Test]:
    col = compared.drift
    out = []
    if not math.isnan(col.ks_p):
        passed = []
        if col.wasserstein >= config.wasserstein_threshold:
            passed.append(f"wasserstein {col.wasserstein:.3g} >= {config.wasserstein_threshold:g}")
        if col.method == NUMERIC and col.psi >= config.numeric_psi_threshold:
            passed.append(f"psi {col.psi:.3g} >= {config.numeric_psi_threshold:g}")
        # KS and Anderson-Darling test the same hypothesis (the same values): one entry in the family
        out.append(_Test(span, col.name, "KS/AD", sidak_min([col.ks_p, compared.ad_p]), passed))
    if not math.isnan(col.chi2_p):
        passed = []
        if col.js >= config.js_threshold:
            passed.append(f"js {col.js:.3g} >= {config.js_threshold:g}")
        if col.psi >= config.categorical_psi_threshold:
            passed.append(f"psi {col.psi:.3g} >= {config.categorical_psi_threshold:g}")
        out.append(_Test(span, col.name, "chi2", col.chi2_p, passed))
    if not math.isnan(col.missing_p):
        passed = []
        if col.missing_effect >= config.missing_threshold:
            before = compared.reference_not_finite
            passed.append(f"missing {_percent(before)} -> {_percent(before + col.missing_diff)}"
                          f" (h {col.missing_effect:.2g} >= {config.missing_threshold:g})")
        out.append(_Test(span, col.name, "missing-rate", col.missing_p, passed))
    return out


def _percent(rate: float) -> str:
    return f"{rate * 100:.3g} %"


def _span_words(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def decide(spans: Sequence[Sequence[Compared]], config: DriftConfig) -> list[collector_pb2.ColumnDrift]:
    """The verdicts, one ColumnDrift per column, from the comparisons of one or more spans
    (``spans``, shortest first, each from ``compare``).

    Every test of every span (KS, chi-square, missing-rate; NaN ones are not tests) is one
    family for Benjamini-Hochberg at ``config.q``, so looking at several spans is paid for in
    the correction rather than in more false alarms. A test drifts when one of its effect
    sizes passes its threshold and its adjusted p-value is <= q; a column drifts when any of
    its tests does. A drifted column is reported from the shortest span that drifted (its
    statistics, ``span_seconds`` and the adjusted p of its strongest drifted test); any other
    column from the longest span that has it, with the smallest adjusted p of its tests there
    (NaN when none could be run: the alert machine then neither opens nor clears)."""
    tests = [t for i, span in enumerate(spans) for c in span for t in _tests(i, c, config)]
    for test, adjusted in zip(tests, benjamini_hochberg([t.p for t in tests])):
        test.adjusted = float(adjusted)
    by_column: dict[str, list[_Test]] = {}
    for test in tests:
        by_column.setdefault(test.name, []).append(test)
    found: dict[str, dict[int, Compared]] = {}
    for i, span in enumerate(spans):
        for compared in span:
            found.setdefault(compared.drift.name, {})[i] = compared
    out = []
    for name, per_span in found.items():
        column_tests = by_column.get(name, [])
        drifted = [t for t in column_tests if t.passed and t.adjusted <= config.q]
        if drifted:
            span = min(t.span for t in drifted)
            deciding = sorted((t for t in drifted if t.span == span), key=lambda t: t.adjusted)
            col = collector_pb2.ColumnDrift()
            col.CopyFrom(per_span[span].drift)
            col.drifted = True
            col.p_adjusted = deciding[0].adjusted
            why = " | ".join(f"{', '.join(t.passed)}; {t.label} p_adjusted {t.adjusted:.2g} <= q {config.q:g}"
                             for t in deciding)
            note = f"; {col.reason}" if col.reason else ""
            col.reason = f"{why} (last {_span_words(col.span_seconds)}){note}"
        else:
            span = max(per_span)
            col = collector_pb2.ColumnDrift()
            col.CopyFrom(per_span[span].drift)
            own = [t.adjusted for t in column_tests if t.span == span]
            col.p_adjusted = min(own) if own else math.nan
        out.append(col)
    return out


def evaluate_spans(reference: Mapping[str, Sketch], currents: Sequence[tuple[float, Mapping[str, Sketch]]],
                   config: DriftConfig | None = None,
                   roles: Mapping[str, int] | None = None) -> list[collector_pb2.ColumnDrift]:
    """Compare ``reference`` with the current sketches of each span (``(span_seconds,
    columns)``, shortest first) and decide (``decide``). Keep the reference sketches between
    calls: each caches its sorted view."""
    config = config or DriftConfig()
    return decide([compare(reference, current, config, roles, span) for span, current in currents], config)


def evaluate(
    reference: Mapping[str, Sketch],
    current: Mapping[str, Sketch],
    config: DriftConfig | None = None,
    roles: Mapping[str, int] | None = None,
) -> list[collector_pb2.ColumnDrift]:
    """Compare every column of ``current`` (one span's windows merged) with ``reference``; one
    ``ColumnDrift`` per column of either, reference order first. Kinds come from the sketch
    types; ``roles`` maps a name to a ``ColumnSummary.Role`` (FEATURE if absent).

    A column that cannot be compared gets a ``reason``, ``drifted`` False and NaN statistics
    and ``p_adjusted``, and is left out of BH's m."""
    config = config or DriftConfig()
    return evaluate_spans(reference, [(config.span_seconds, current)], config, roles)


def not_compared(columns: Iterable[collector_pb2.ColumnDrift], reference: Iterable[str]) -> list[
        collector_pb2.ColumnDrift]:
    """The reference's columns that got no verdict (no test could be run; each reason says why)."""
    names = set(reference)
    return [c for c in columns if c.name in names and math.isnan(c.p_adjusted)]


def summary(columns: Sequence[collector_pb2.ColumnDrift], reference: Iterable[str], shown: int = 5) -> str:
    """One line for an evaluation: what drifted, and loudly what could not be compared. It never
    says "no drift" while a reference column went uncompared."""
    drifted = [c.name for c in columns if c.drifted]
    missing = not_compared(columns, reference)
    compared = sum(1 for c in columns if not math.isnan(c.p_adjusted))
    parts = [f"drift in {', '.join(drifted)}"] if drifted else []
    if missing:
        reasons: dict[str, list[str]] = {}
        for c in missing:
            reasons.setdefault(c.reason.removeprefix("not compared: "), []).append(c.name)
        listed = "; ".join(f"{why}: {', '.join(names[:shown])}" + (f" and {len(names) - shown} more"
                                                                  if len(names) > shown else "")
                           for why, names in reasons.items())
        parts.append(f"NOT COMPARED: {len(missing)} reference column{'s' if len(missing) != 1 else ''} ({listed})")
        if not drifted:
            parts.append(f"none of the {compared} compared column{'s' if compared != 1 else ''} drifted")
    elif not drifted:
        parts.append("no drift")
    return "; ".join(parts)
# ---------------------------------------------------------------- alerts


def verdict(column: collector_pb2.ColumnDrift) -> bool | None:
    """The column's verdict for the alert machine: None when it was not
    evaluated (NaN p_adjusted), which must neither open nor clear an alert."""
    return None if math.isnan(column.p_adjusted) else column.drifted


def verdict_label(column: collector_pb2.ColumnDrift) -> str:
    """For people: DRIFT, ok, NOT COMPARED (no test could be run; its reason says why), or "-"
    (a traffic column the reference does not have, a pseudo-column without enough labels)."""
    if column.drifted:
        return "DRIFT"
    if not math.isnan(column.p_adjusted):
        return "ok"
    return "NOT COMPARED" if column.reason.startswith("not compared") else "-"


def next_state(state: str, streak: int, drifted: bool | None, k: int) -> tuple[str, int, str | None]:
    """One step of a column's alert machine: (state, streak, event).

    ``streak`` counts consecutive verdicts that contradict ``state`` (drifted
    while OK, clean while ALERTING); at ``k`` the state flips and the event
    is OPENED or RESOLVED. An agreeing verdict resets the streak, so a
    flapping column never flips; ``drifted=None`` (not evaluated) changes
    nothing. Acknowledging an alert is the collector's business, not a state here."""
    if state not in (OK, ALERTING):
        raise InvalidArgument(f"unknown alert state {state!r}")
    if k < 1 or streak < 0:
        raise InvalidArgument("k must be >= 1 and streak >= 0")
    if drifted is None:
        return state, streak, None
    if drifted == (state == ALERTING):
        return state, 0, None
    if streak + 1 < k:
        return state, streak + 1, None
    return (ALERTING, 0, OPENED) if state == OK else (OK, 0, RESOLVED)


@dataclass
class AlertTracker:
    """The alert machine of every column of one model version, to persist as
    ``to_dict()`` between evaluations (columns never seen are OK)."""

    k: int = 3
    columns: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (state, streak)

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise InvalidArgument(f"alert k must be an integer >= 1, got {self.k!r}")

    def observe(self, drift: Iterable[collector_pb2.ColumnDrift]) -> list[tuple[str, str]]:
        """Feed one evaluation; returns (column, OPENED | RESOLVED) for each flip."""
        events = []
        for column in drift:
            state, streak = self.columns.get(column.name, (OK, 0))
            state, streak, event = next_state(state, streak, verdict(column), self.k)
            self.columns[column.name] = (state, streak)
            if event:
                events.append((column.name, event))
        return events

    def alerting(self) -> list[str]:
        return sorted(name for name, (state, _) in self.columns.items() if state == ALERTING)

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k, "columns": {name: [state, streak] for name, (state, streak) in self.columns.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AlertTracker:
        try:
            columns = {str(name): (str(s), int(n)) for name, (s, n) in data.get("columns", {}).items()}
            tracker = cls(k=int(data.get("k", 3)), columns=columns)
        except (TypeError, ValueError, AttributeError) as exc:
            raise InvalidArgument(f"corrupt alert state: {exc}") from exc
        for state, streak in columns.values():
            next_state(state, streak, None, tracker.k)  # validates
        return tracker
