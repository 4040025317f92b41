"""The drift policy: when a column has drifted, and when an alert opens or clears.

The statistics live in ``agent.sketches`` (one home of summary math); this
module only decides. A column drifts when an *effect size* passes its
threshold AND its test is *significant* after Benjamini-Hochberg across the
model's columns. Both are needed: with thousands of rows a test finds
differences nobody cares about (and the sketches' own ~1% rank error
becomes "significant" past ~10^5 rows), while an effect size alone on a
small sample is noise.

Defaults (``DriftConfig``) are the issue's, kept because calibration met the
targets with them (tests/test_drift.py: 20 columns, 100k-row reference, span
of three 1,000-row windows):

- numeric: normalised Wasserstein >= 0.1 or PSI >= 0.2. 0.1 is Evidently's
  default for Wasserstein/std; PSI 0.2 is the common "significant shift"
  line (0.1-0.2 "moderate"). A 0.25 sigma mean shift reads W ~0.25 and is
  caught once two of the three windows in the span carry it (W ~0.17);
  over 1,000 clean evaluations the worst W was ~0.08 and the worst PSI
  ~0.015. Wasserstein is trimmed to ranks [1%, 99%] (see
  ``agent.sketches.wasserstein``): untrimmed, the sketches' own tail error
  pushed clean lognormal columns to 0.1-0.5.
- categorical: Jensen-Shannon distance (base 2) >= 0.1 or PSI >= 0.2 over
  the same cells. One category going from 30% to 45% reads JS ~0.14 once the
  span is all new traffic (~0.09 with two of three windows, so it is
  flagged after 2 or 3 windows); clean traffic stayed below ~0.035.
  From these figures JS ~0.07 would likely catch it a window earlier with
  clean traffic still well below; not changed, the target is met as is.
- q = 0.05 false discovery rate; the p-value is KS for numeric columns and
  chi-square (homogeneity, 2 x cells) for categorical ones.
- k = 3 consecutive verdicts to open an alert and 3 to resolve it, so one
  noisy evaluation neither pages anyone nor clears a real problem.
- span 1 hour, at least 1,000 current rows per column.

Missing-value rates are reported with every verdict but do not decide it.
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


@dataclass(frozen=True)
class DriftConfig:
    """One model's drift policy; stored as JSON via ``to_dict``/``from_dict``."""

    wasserstein_threshold: float = 0.1  # numeric: W1 / reference std
    numeric_psi_threshold: float = 0.2
    js_threshold: float = 0.1  # categorical: Jensen-Shannon distance, base 2
    categorical_psi_threshold: float = 0.2
    q: float = 0.05  # Benjamini-Hochberg false discovery rate across the model's columns
    consecutive: int = 3  # k: verdicts in a row to open, and to resolve, an alert
    span_seconds: float = 3600.0  # recent windows merged into the current sketch
    min_rows: int = 1000  # fewer current rows in a column: not evaluated
    psi_bins: int = 10  # numeric PSI: equal-mass bins of the reference
    accuracy_drop: float = 0.05  # realised accuracy this far below the reference's opens a performance alert
    mae_increase: float = 0.2  # regression: realised MAE this much above the reference's (relative)

    def __post_init__(self) -> None:
        for name in ("wasserstein_threshold", "numeric_psi_threshold", "js_threshold",
                     "categorical_psi_threshold", "span_seconds", "accuracy_drop", "mae_increase"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 < value < math.inf:
                raise InvalidArgument(f"drift config: {name} must be a positive number, got {value!r}")
        if not _is_number(self.q) or not 0 < self.q <= 1:
            raise InvalidArgument(f"drift config: q must lie in (0, 1], got {self.q!r}")
        for name, low, high in (("consecutive", 1, 1000), ("min_rows", 1, 10**12), ("psi_bins", 2, 1000)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise InvalidArgument(f"drift config: {name} must be an integer in [{low}, {high}], got {value!r}")

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


def _not_evaluated(ref: Sketch | None, cur: Sketch | None, config: DriftConfig) -> str:
    """Why a column cannot be compared, or "" if it can."""
    if ref is None:
        return "not in the reference profile"
    if cur is None:
        return "no current data"
    if type(ref) is not type(cur):
        return f"kind changed: reference {_kind_name(ref)}, current {_kind_name(cur)}"
    if cur.count < config.min_rows:
        return f"only {cur.count} current rows (min_rows {config.min_rows})"
    present = (lambda s: s.finite_count) if isinstance(ref, sketches.NumericSketch) else (lambda s: s.present)
    word = "finite" if isinstance(ref, sketches.NumericSketch) else "present"
    if present(ref) == 0:
        return f"no {word} values in the reference"
    if present(cur) == 0:
        return f"no {word} values in the current data"
    return ""


def _kind(sketch: Sketch) -> int:
    return CS.NUMERIC if isinstance(sketch, sketches.NumericSketch) else CS.CATEGORICAL


def _kind_name(sketch: Sketch) -> str:
    return CS.Kind.Name(_kind(sketch))


def evaluate(
    reference: Mapping[str, Sketch],
    current: Mapping[str, Sketch],
    config: DriftConfig | None = None,
    roles: Mapping[str, int] | None = None,
) -> list[collector_pb2.ColumnDrift]:
    """Compare every column of ``current`` (the span's windows merged) with
    ``reference``; one ``ColumnDrift`` per column of either, reference order
    first. Kinds come from the sketch types; ``roles`` maps a name to a
    ``ColumnSummary.Role`` (FEATURE if absent).

    A column that cannot be compared gets a ``reason``, ``drifted`` False and
    NaN statistics and ``p_adjusted``, and is left out of BH's m. Keep the
    reference sketches between calls: each caches its sorted view.
    """
    config = config or DriftConfig()
    roles = roles or {}
    out: list[collector_pb2.ColumnDrift] = []
    effects: list[list[str]] = []
    pvalues: list[float] = []
    nan = math.nan
    for name in dict.fromkeys([*reference, *current]):
        ref, cur = reference.get(name), current.get(name)
        some = ref if ref is not None else cur
        assert some is not None
        col = collector_pb2.ColumnDrift(
            name=name, kind=_kind(some), role=roles.get(name, CS.FEATURE),
            psi=nan, ks_d=nan, ks_p=nan, wasserstein=nan, chi2=nan, chi2_p=nan, js=nan, p_adjusted=nan,
            missing_rate=sketches.missing_rate(cur) if cur is not None else nan,
            reference_missing_rate=sketches.missing_rate(ref) if ref is not None else nan,
            rows=cur.count if cur is not None else 0,
        )
        col.reason = _not_evaluated(ref, cur, config)
        passed: list[str] = []
        p = nan
        if col.reason:
            pass
        elif isinstance(ref, sketches.NumericSketch):
            assert isinstance(cur, sketches.NumericSketch)
            num = sketches.compare_numeric(ref, cur, bins=config.psi_bins)
            col.ks_d, col.ks_p, col.psi, col.wasserstein = num.ks_d, num.ks_p, num.psi, num.wasserstein
            p = num.ks_p
            if num.wasserstein >= config.wasserstein_threshold:
                passed.append(f"wasserstein {num.wasserstein:.3g} >= {config.wasserstein_threshold:g}")
            if num.psi >= config.numeric_psi_threshold:
                passed.append(f"psi {num.psi:.3g} >= {config.numeric_psi_threshold:g}")
        else:
            assert isinstance(ref, sketches.CategoricalSketch) and isinstance(cur, sketches.CategoricalSketch)
            cat = sketches.compare_categorical(ref, cur)
            col.chi2, col.chi2_p, col.js, col.psi = cat.chi2, cat.chi2_p, cat.js, cat.psi
            p = cat.chi2_p
            if cat.js >= config.js_threshold:
                passed.append(f"js {cat.js:.3g} >= {config.js_threshold:g}")
            if cat.psi >= config.categorical_psi_threshold:
                passed.append(f"psi {cat.psi:.3g} >= {config.categorical_psi_threshold:g}")
        out.append(col)
        effects.append(passed)
        pvalues.append(p)
    for col, passed, p_adjusted in zip(out, effects, benjamini_hochberg(pvalues)):
        col.p_adjusted = p_adjusted
        if passed and p_adjusted <= config.q:
            test = "KS" if col.kind == CS.NUMERIC else "chi2"
            col.drifted = True
            col.reason = f"{', '.join(passed)}; {test} p_adjusted {p_adjusted:.2g} <= q {config.q:g}"
    return out


# ---------------------------------------------------------------- alerts


def verdict(column: collector_pb2.ColumnDrift) -> bool | None:
    """The column's verdict for the alert machine: None when it was not
    evaluated (NaN p_adjusted), which must neither open nor clear an alert."""
    return None if math.isnan(column.p_adjusted) else column.drifted


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
