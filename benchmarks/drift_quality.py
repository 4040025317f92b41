"""Drift quality: false alarms, detection and time to alert of Outrider's drift engine, beside scipy.

    python -m benchmarks.drift_quality [--runs 10] [--clean-references 10] [--clean-minutes 300] [--json]
    python -m benchmarks.drift_quality --grid      # the measurement that chose the shipped defaults
    python -m benchmarks.drift_quality --only correlation --kinds static   # one scenario, one kind of run
    python -m benchmarks.drift_quality --no-scipy --shipped-spans --only clean --clean-configs 500/1000 --save a.pkl

Everything goes through Outrider's own code path: 20 mixed columns are summarised by the agent's
``WindowBuilder`` (a reference profile at REFERENCE_K like ``outrider profile``, and one window per
minute of traffic), the collector merges the windows of each span (``collector.monitoring.evaluation.merge_spans``,
the evaluator's own function), ``collector.monitoring.drift`` compares and decides, and ``AlertTracker`` steps
the alert machine. Nothing is re-implemented here but the data.

The columns (``COLUMNS``): normal, standard normal, uniform, lognormal, Pareto (alpha 3), Student t
(2 degrees of freedom), exponential, zero-inflated lognormal, Poisson(3), small-integer codes 0-4, a
0/1 flag, Zipf counts, rounded ages, two columns with 5 % and 30 % missing values, a correlated pair
(rho 0.9), and three categorical ones (5 colours, yes/no, a 500-value Zipf product). The agent adds
"@reconstruction_error" (``RECONSTRUCTION_ERROR``): the reference's PCA projection is fitted as
``outrider profile`` fits it (``agent.profile.reference_projection``: on a random half of the
reference, the profile's column sketched over the other half), and every traffic window gets the
column from the ``WindowBuilder`` holding that projection, as an agent given the profile does.

Two kinds of run:

- **timeline** (``timeline``): 60 clean minutes fill the longest span, then the change (if any) from
  minute 1 on, an evaluation at the end of every minute. Reported: evaluations (= minutes) to the
  first flag of a changed column and to the alert (k in a row), and the columns flagged that did not
  change. A clean timeline gives the false alarms: flagged evaluations per 1,000 and alerts per 10,000.
- **static** (``static``): each evaluation compares the reference with fresh rows drawn all from the
  changed distribution (one span): the issue's "per evaluation at 1,000 rows" detection rates.

Beside Outrider's shipped defaults, each table shows "before" (the policy before issue 11: the hour
only, no missing-rate test, numeric columns never judged by their frequencies) and scipy's
two-sample KS (numeric, finite values) and chi-square (categorical) on the raw rows of the same
spans with a Bonferroni correction over every test (alpha 0.05), alert after the same k.
Evidently and NannyML run on the same rows in a venv of their own: ``benchmarks/drift_peers.py``.

``--grid`` runs the same timelines once, keeps every span's statistics, and replays
``collector.monitoring.drift.decide`` and the alert machine under candidate policies (spans, q, thresholds, k).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import pickle
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import sketches  # noqa: E402
from agent.capture import Reduce, Slot  # noqa: E402
from agent.profile import reference_projection  # noqa: E402
from agent.sketches import joint  # noqa: E402
from agent.worker import BLOCK_ROWS, Identity, WindowBuilder  # noqa: E402
from collector.monitoring import drift  # noqa: E402
from collector.monitoring.drift import AlertTracker, Compared, DriftConfig  # noqa: E402
from collector.monitoring.evaluation import merge_spans  # noqa: E402
from protos import summary_pb2  # noqa: E402

CS = summary_pb2.ColumnSummary
NS = 1_000_000_000
T0 = 1_800_000_000 * NS  # the clock of every timeline (any fixed time will do)
WARMUP_MINUTES = 60

# ------------------------------------------------------------------ the data

COLOURS = (np.array(list("ABCDE")), np.array([0.30, 0.25, 0.20, 0.15, 0.10]))
COLOURS_SHIFTED = np.r_[0.45, COLOURS[1][1:] * 0.55 / 0.70]  # "A" 30 % -> 45 %, the rest in proportion
CODES = np.array([0.40, 0.25, 0.15, 0.12, 0.08])  # small-integer codes 0..4
CODES_SHIFTED = np.array([0.30, 0.35, 0.15, 0.12, 0.08])  # P(0) 40 -> 30 %, P(1) 25 -> 35 %
_ZIPF = 1.0 / np.arange(1, 501) ** 1.1
PRODUCTS = (np.array([f"p{i}" for i in range(500)]), _ZIPF / _ZIPF.sum())
YESNO = (np.array(["yes", "no"]), np.array([0.8, 0.2]))

NUMERIC = ["normal", "standard", "uniform", "lognormal", "pareto", "student_t2", "exponential", "zero_inflated",
           "poisson", "codes", "flag", "zipf_count", "age", "missing5", "missing30", "corr_a", "corr_b"]
CATEGORICAL = ["colour", "member", "product"]
COLUMNS = NUMERIC + CATEGORICAL
RECONSTRUCTION_ERROR = joint.RECONSTRUCTION_ERROR  # computed by the agent's worker from the numeric columns
ALL_COLUMNS = [*COLUMNS, RECONSTRUCTION_ERROR]


def _with_missing(rng: np.random.Generator, values: np.ndarray, share: float) -> np.ndarray:
    values = values.astype(np.float64)
    values[rng.random(values.size) < share] = np.nan
    return values


def clean_rows(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """``n`` rows of the 20 columns, as the model would be sent them."""
    a = rng.standard_normal(n)
    return {
        "normal": rng.normal(50.0, 10.0, n),
        "standard": rng.standard_normal(n),
        "uniform": rng.uniform(0.0, 1.0, n),
        "lognormal": rng.lognormal(0.0, 1.0, n),
        "pareto": rng.pareto(3.0, n) + 1.0,
        "student_t2": rng.standard_t(2, n),
        "exponential": rng.exponential(2.0, n),
        "zero_inflated": np.where(rng.random(n) < 0.6, 0.0, rng.lognormal(1.0, 0.5, n)),
        "poisson": rng.poisson(3.0, n).astype(np.float64),
        "codes": rng.choice(5, n, p=CODES).astype(np.float64),
        "flag": (rng.random(n) < 0.1).astype(np.float64),
        "zipf_count": np.minimum(rng.zipf(2.0, n), 100_000).astype(np.float64),
        "age": np.round(rng.normal(40.0, 12.0, n)),
        "missing5": _with_missing(rng, rng.normal(10.0, 3.0, n), 0.05),
        "missing30": _with_missing(rng, rng.lognormal(0.0, 0.5, n), 0.30),
        "corr_a": a,
        "corr_b": 0.9 * a + math.sqrt(1 - 0.81) * rng.standard_normal(n),
        "colour": rng.choice(COLOURS[0], n, p=COLOURS[1]),
        "member": rng.choice(YESNO[0], n, p=YESNO[1]),
        "product": rng.choice(PRODUCTS[0], n, p=PRODUCTS[1]),
    }


@dataclass(frozen=True)
class Change:
    """A change of the traffic: which columns it changes, and how (applied to clean rows)."""

    columns: frozenset[str]
    apply: Callable[[np.random.Generator, dict[str, np.ndarray]], dict[str, np.ndarray]]


def _set(name: str, fn: Callable[[np.random.Generator, dict[str, np.ndarray]], np.ndarray]) -> Callable:
    def apply(rng: np.random.Generator, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**rows, name: fn(rng, rows)}
    return apply


def _select(rng: np.random.Generator, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Row selection: rows whose corr_a is below 0 are kept only half of the time (a segment half
    lost upstream). Both correlated columns change; the rest of each kept row is as it was."""
    keep = (rows["corr_a"] >= 0) | (rng.random(rows["corr_a"].size) < 0.5)
    return {name: values[keep] for name, values in rows.items()}


def _missing(rng: np.random.Generator, rows: dict[str, np.ndarray]) -> np.ndarray:
    return _with_missing(rng, rows["standard"], 0.10)


CHANGES: dict[str, Change] = {
    "mean +0.5 sd": Change(frozenset({"normal"}), _set("normal", lambda rng, r: r["normal"] + 5.0)),
    "mean +0.25 sd": Change(frozenset({"normal"}), _set("normal", lambda rng, r: r["normal"] + 2.5)),
    "variance x1.5": Change(frozenset({"normal"}),
                            _set("normal", lambda rng, r: 50.0 + (r["normal"] - 50.0) * math.sqrt(1.5))),
    "category 30 -> 45 %": Change(frozenset({"colour"}), _set(
        "colour", lambda rng, r: rng.choice(COLOURS[0], r["colour"].size, p=COLOURS_SHIFTED))),
    "missing 0 -> 10 %": Change(frozenset({"standard"}), _set("standard", _missing)),
    "small integer": Change(frozenset({"codes"}), _set(
        "codes", lambda rng, r: rng.choice(5, r["codes"].size, p=CODES_SHIFTED).astype(np.float64))),
    "heavy tail (Pareto 3 -> 2.5)": Change(frozenset({"pareto"}), _set(
        "pareto", lambda rng, r: rng.pareto(2.5, r["pareto"].size) + 1.0)),
    "row selection": Change(frozenset({"corr_a", "corr_b"}), _select),
    # Marginals unchanged: only the multivariate column (RECONSTRUCTION_ERROR) can see it.
    "correlation 0.9 -> 0": Change(frozenset({RECONSTRUCTION_ERROR}), _set(
        "corr_b", lambda rng, r: rng.standard_normal(r["corr_b"].size))),
}


def rows(rng: np.random.Generator, n: int, change: Change | None = None) -> dict[str, np.ndarray]:
    """``n`` rows, changed by ``change`` (a selection draws more rows, keeps ``n``)."""
    if change is None:
        return clean_rows(rng, n)
    out: dict[str, np.ndarray] = {name: np.empty(0) for name in COLUMNS}
    while out["normal"].size < n:
        more = change.apply(rng, clean_rows(rng, 2 * n))
        out = {name: np.concatenate((out[name], more[name])) for name in COLUMNS}
    return {name: values[:n] for name, values in out.items()}


# ------------------------------------------------------------------ through the agent's summaries


class Summariser:
    """Rows -> the agent's WindowSummary, by ``WindowBuilder``; with the reference's ``projection``
    its windows carry ``@reconstruction_error`` as the agent's do (the worker computes it)."""

    slots = (Slot("X", CS.FEATURE, Reduce.NUMERIC, np.dtype(np.float32), (len(NUMERIC),), NUMERIC),
             Slot("C", CS.FEATURE, Reduce.CATEGORICAL, np.dtype("<U8"), (len(CATEGORICAL),), CATEGORICAL))

    def __init__(self, projection: joint.Projection | None = None) -> None:
        self.projection = projection

    @classmethod
    def features(cls, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's inputs (tensor name -> [rows, columns]) as a client would send them."""
        return {"X": np.column_stack([data[name] for name in NUMERIC]).astype(np.float32),
                "C": np.column_stack([data[name] for name in CATEGORICAL]).astype("<U8")}

    def window(self, data: dict[str, np.ndarray], start_ns: int, end_ns: int,
               k: int = sketches.DEFAULT_K) -> summary_pb2.WindowSummary:
        builder = WindowBuilder(self.slots, Identity("bench", "run", "m", "1", ""), k=k, start_ns=start_ns,
                                projection=self.projection)
        inputs = self.features(data)
        for i in range(0, len(inputs["X"]), BLOCK_ROWS):
            builder.add_rows([inputs["X"][i:i + BLOCK_ROWS], inputs["C"][i:i + BLOCK_ROWS]])
        return builder.close(end_ns, 0, 0)


Sketches = dict[str, sketches.NumericSketch | sketches.CategoricalSketch]


@dataclass
class Reference:
    sketches: Sketches
    legacy: Sketches  # the same without exact counts: judged as the code before issue 11 judged them
    raw: dict[str, np.ndarray]
    summariser: Summariser


def reference(seed: int, n: int) -> Reference:
    """A profile of ``n`` clean rows as ``outrider profile`` builds one (``agent.profile``): the
    captured columns at REFERENCE_K, and the projection fitted on a random half of the rows with
    its ``@reconstruction_error`` column sketched over the other half. The traffic's windows are
    then summarised with that projection, as an agent given this profile summarises them."""
    rng = np.random.default_rng([seed, n, 1])
    raw = clean_rows(rng, n)
    notes: list[str] = []
    projection, errors = reference_projection(Summariser.slots, Summariser.features(raw), sketches.REFERENCE_K,
                                              notes)
    assert projection is not None and errors is not None, notes
    profile = Summariser().window(raw, T0 - NS, T0, k=sketches.REFERENCE_K)
    profile.columns.append(errors)
    built = {c.name: sketches.from_proto(c) for c in profile.columns}
    # the policy before issue 11 had neither exact counts nor the multivariate column
    legacy = {c.name: sketches.from_proto(c) for c in profile.columns if c.name != RECONSTRUCTION_ERROR}
    for sketch in legacy.values():
        if isinstance(sketch, sketches.NumericSketch):
            sketch._overflow()  # noqa: SLF001 - "unknown", as a profile built before exact counts
    return Reference(built, legacy, raw, Summariser(projection))


def _sketches(summary: summary_pb2.WindowSummary) -> Sketches:
    return {c.name: sketches.from_proto(c) for c in summary.columns}


# ------------------------------------------------------------------ policies

SHIPPED = DriftConfig()
# The policy before issue 11: the hour only, its thresholds, q and k; no missing-rate test, no discrete
# judgement (see ``legacy``).
BEFORE = DriftConfig(short_span_seconds=0.0, js_threshold=0.1, q=0.05, consecutive=3)
STAT_SPANS = (120.0, 180.0, 300.0, 600.0, 900.0, 3600.0)  # every span whose statistics a timeline keeps


def legacy(compared: Compared) -> Compared:
    """A comparison as the engine before issue 11 made it: no missing-rate test (its reference was
    compared without exact counts, so no discrete judgement either)."""
    col = type(compared.drift)()
    col.CopyFrom(compared.drift)
    col.missing_p = math.nan
    return Compared(col)


@dataclass
class Evaluation:
    """The statistics of one evaluation: per span (seconds) the comparisons, for the shipped
    engine and as the engine before issue 11 would have made them; scipy's p-values per span."""

    minute: int
    spans: dict[float, list[Compared]]
    legacy: dict[float, list[Compared]]
    scipy: dict[float, dict[str, float]] = field(default_factory=dict)


def decide(evaluation: Evaluation, config: DriftConfig, *, old: bool = False,
           spans: Sequence[float] | None = None) -> list[str]:
    """The columns ``collector.monitoring.drift.decide`` flags in this evaluation under ``config``."""
    chosen = spans if spans is not None else config.spans()
    source = evaluation.legacy if old else evaluation.spans
    per_span = [source[s] for s in chosen if s in source]
    if not per_span:
        return []
    return [c.name for c in drift.decide(per_span, config) if c.drifted]


def scipy_flags(evaluation: Evaluation, spans: Sequence[float], alpha: float = 0.05) -> list[str]:
    """scipy's verdicts: every KS / chi-square p-value of the chosen spans, Bonferroni at ``alpha``."""
    tests = [(name, p) for s in spans for name, p in evaluation.scipy.get(s, {}).items() if not math.isnan(p)]
    if not tests:
        return []
    return sorted({name for name, p in tests if p <= alpha / len(tests)})


def scipy_pvalues(ref: dict[str, np.ndarray], cur: dict[str, np.ndarray]) -> dict[str, float]:
    from scipy import stats

    out = {}
    for name in NUMERIC:
        a, b = ref[name][np.isfinite(ref[name])], cur[name][np.isfinite(cur[name])]
        out[name] = float(stats.ks_2samp(a, b, method="asymp").pvalue) if a.size and b.size else math.nan
    for name in CATEGORICAL:
        labels, inverse = np.unique(np.concatenate((ref[name], cur[name])), return_inverse=True)
        table = np.vstack([np.bincount(inverse[:ref[name].size], minlength=labels.size),
                           np.bincount(inverse[ref[name].size:], minlength=labels.size)])
        out[name] = float(stats.chi2_contingency(table, correction=False).pvalue) if labels.size > 1 else 1.0
    return out


# ------------------------------------------------------------------ runs


def timeline(ref: Reference, rate: int, seed: int, change: Change | None, minutes: int, *,
             spans: Sequence[float] = STAT_SPANS, config: DriftConfig = SHIPPED,
             scipy_every: int = 0, scipy_spans: Sequence[float] = (), scipy_until: int = 10**9) -> list[Evaluation]:
    """WARMUP_MINUTES clean minutes, then ``minutes`` evaluated minutes of traffic changed by
    ``change`` (None: clean) at ``rate`` rows per minute, one agent window per minute. Evaluation
    m runs 30 s after minute m's window closed (so the 5-minute span holds 5 windows) and keeps
    each span's comparisons; scipy runs on every ``scipy_every``-th one up to ``scipy_until``."""
    rng = np.random.default_rng([seed, rate, 2])
    longest = max(spans)
    keep = int(longest // 60) + 1
    windows: deque[summary_pb2.WindowSummary] = deque(maxlen=keep)  # newest first
    raw: deque[dict[str, np.ndarray]] = deque(maxlen=keep)
    out = []
    for minute in range(1 - WARMUP_MINUTES, minutes + 1):
        end = T0 + minute * 60 * NS
        data = rows(rng, rate, change if minute > 0 else None)
        windows.appendleft(ref.summariser.window(data, end - 60 * NS, end))
        if scipy_every:
            raw.appendleft(data)
        if minute < 1:
            continue
        merged = merge_spans(list(windows), end + 30 * NS, spans)
        evaluation = Evaluation(minute, {}, {})
        for span, summary, longer in zip(spans, merged, [*merged[1:], None]):
            # as the evaluator: a span holding the same windows as the next longer one is not a test of its own
            if summary is None or summary.rows < config.min_rows or summary is longer:
                continue
            current = _sketches(summary)
            evaluation.spans[span] = drift.compare(ref.sketches, current, config, span_seconds=span)
            if span == longest:
                evaluation.legacy[span] = [legacy(c) for c in drift.compare(ref.legacy, current, config,
                                                                            span_seconds=span)]
            if scipy_every and span in scipy_spans and minute % scipy_every == 0 and minute <= scipy_until:
                count = int(span // 60)
                cur = {name: np.concatenate([r[name] for r in list(raw)[:count]]) for name in COLUMNS}
                evaluation.scipy[span] = scipy_pvalues(ref.raw, cur)
        out.append(evaluation)
    return out


def static(ref: Reference, rows_per_evaluation: int, seed: int, change: Change | None,
           evaluations: int, *, config: DriftConfig = SHIPPED, with_scipy: bool = True) -> list[Evaluation]:
    """``evaluations`` independent evaluations of ``rows_per_evaluation`` fresh rows, all changed."""
    rng = np.random.default_rng([seed, rows_per_evaluation, 3])
    span = config.span_seconds
    out = []
    for i in range(evaluations):
        data = rows(rng, rows_per_evaluation, change)
        current = _sketches(ref.summariser.window(data, T0, T0 + NS))
        evaluation = Evaluation(i, {span: drift.compare(ref.sketches, current, config, span_seconds=span)},
                                {span: [legacy(c) for c in drift.compare(ref.legacy, current, config,
                                                                         span_seconds=span)]})
        if with_scipy:
            evaluation.scipy[span] = scipy_pvalues(ref.raw, data)
        out.append(evaluation)
    return out


# ------------------------------------------------------------------ scoring


@dataclass
class Score:
    evaluations: int = 0
    flagged: int = 0  # evaluations flagging any column (clean) or a changed column (change)
    wrong: int = 0  # evaluations flagging a column that did not change
    wrong_columns: dict[str, int] = field(default_factory=dict)
    alerts: int = 0  # alerts opened (clean: false alarms; change: runs whose changed column alerted)
    first_flag: list[int | None] = field(default_factory=list)  # per run: minute of the first flag of a changed column
    first_alert: list[int | None] = field(default_factory=list)  # per run: minute its alert opened

    def row(self) -> dict:
        def spread(values: list[int | None]) -> str:
            got = sorted(v for v in values if v is not None)
            missed = len(values) - len(got)
            if not got:
                return "never" if values else "-"
            text = f"{got[len(got) // 2]} ({got[0]}-{got[-1]})"
            return text + (f", {missed} of {len(values)} never" if missed else "")

        return {"evaluations": self.evaluations, "flagged": self.flagged, "wrong": self.wrong,
                "flagged_per_1000": 1000 * self.flagged / max(self.evaluations, 1),
                "wrong_per_1000": 1000 * self.wrong / max(self.evaluations, 1),
                "wrong_columns": dict(sorted(self.wrong_columns.items())), "alerts": self.alerts,
                "first_flag": spread(self.first_flag), "first_alert": spread(self.first_alert),
                "first_flag_minutes": self.first_flag, "first_alert_minutes": self.first_alert}


def score(runs: Iterable[list[Evaluation]], flags: Callable[[Evaluation], list[str]], changed: frozenset[str],
          k: int) -> Score:
    """Flags of every evaluation of every run, and the alert machine (k in a row) over each run."""
    out = Score()
    for run in runs:
        tracker, first_flag, first_alert = AlertTracker(k=k), None, None
        for evaluation in run:
            names = flags(evaluation)
            out.evaluations += 1
            hit = [n for n in names if n in changed]
            wrong = [n for n in names if n not in changed]
            out.flagged += bool(hit) if changed else bool(names)
            out.wrong += bool(wrong) and bool(changed)
            for name in wrong:
                out.wrong_columns[name] = out.wrong_columns.get(name, 0) + 1
            if hit and first_flag is None:
                first_flag = evaluation.minute
            verdicts = [_verdict(name, name in names) for name in ALL_COLUMNS]
            for name, event in tracker.observe(verdicts):
                if event == drift.OPENED and (name in changed or not changed):
                    out.alerts += 1
                    if name in changed and first_alert is None:
                        first_alert = evaluation.minute
        out.first_flag.append(first_flag)
        out.first_alert.append(first_alert)
    if not changed:
        out.wrong = out.flagged
    return out


def _verdict(name: str, drifted: bool):
    from protos import collector_pb2

    return collector_pb2.ColumnDrift(name=name, drifted=drifted, p_adjusted=0.0)


# ------------------------------------------------------------------ the report


@dataclass
class Suite:
    runs: int = 10
    clean_references: int = 10
    clean_minutes: int = 300
    change_minutes: int = 60
    static_evaluations: int = 100
    seed: int = 11


CLEAN_CONFIGS = tuple(itertools.product((500, 50_000), (1_000, 10_000)))  # (reference rows, rows a minute)


def selected(name: str, only: Sequence[str]) -> bool:
    """Whether scenario ``name`` ("clean" or a CHANGES key) is among ``only`` (case-insensitive
    substrings; empty: every scenario)."""
    return not only or any(word.lower() in name.lower() for word in only)


def measure(suite: Suite, *, scipy: bool = True, log: Callable[[str], None] = print, only: Sequence[str] = (),
            kinds: Sequence[str] = ("timeline", "static"), spans: Sequence[float] = STAT_SPANS,
            clean_configs: Sequence[tuple[int, int]] = CLEAN_CONFIGS) -> dict:
    """The timeline and static runs of the report (those of the scenarios ``only`` selects, of
    the ``kinds`` asked for), each timeline keeping the statistics of ``spans``; returns their
    evaluations, keyed."""
    started = time.perf_counter()
    data: dict = {"clean": {}, "change": {}, "static": {}}
    refs: dict[tuple[int, int], Reference] = {}

    def ref(seed: int, n: int) -> Reference:
        if (seed, n) not in refs:
            refs[(seed, n)] = reference(seed, n)
        return refs[(seed, n)]

    short = SHIPPED.spans()
    timelines = "timeline" in kinds
    for ref_rows, rate in clean_configs:
        if not timelines or not selected("clean", only):
            break
        runs = [timeline(ref(suite.seed + r, ref_rows), rate, suite.seed + 100 + r, None, suite.clean_minutes,
                         spans=spans, scipy_every=(10 if rate == 1_000 else 50) if scipy else 0, scipy_spans=short)
                for r in range(suite.clean_references)]
        data["clean"][(ref_rows, rate)] = runs
        log(f"clean, reference {ref_rows:,}, {rate:,} rows/min: {sum(map(len, runs))} evaluations "
            f"({time.perf_counter() - started:.0f} s)")
    for name, change in CHANGES.items():
        if not timelines or not selected(name, only):
            continue
        runs = [timeline(ref(suite.seed + r, 50_000), 1_000, suite.seed + 200 + r, change, suite.change_minutes,
                         spans=spans, scipy_every=1 if scipy else 0, scipy_spans=short, scipy_until=20)
                for r in range(suite.runs)]
        data["change"][name] = runs
        log(f"{name}: {suite.runs} timelines ({time.perf_counter() - started:.0f} s)")
    for name, change in [("clean", None), *CHANGES.items()]:
        if "static" not in kinds or not selected(name, only):
            continue
        for n in (1_000, 10_000):
            data["static"][(name, n)] = static(ref(suite.seed, 50_000), n, suite.seed + 300, change,
                                               suite.static_evaluations, with_scipy=scipy)
    log(f"static evaluations ({time.perf_counter() - started:.0f} s)")
    return data


POLICIES = ("outrider", "before", "scipy")


def flags_for(policy: str, config: DriftConfig = SHIPPED) -> Callable[[Evaluation], list[str]]:
    if policy == "outrider":
        return lambda e: decide(e, config)
    if policy == "before":
        return lambda e: decide(e, BEFORE, old=True)
    return lambda e: scipy_flags(e, sorted(e.scipy))


def k_for(policy: str, config: DriftConfig = SHIPPED) -> int:
    """Verdicts in a row that open an alert: the policy's own k (scipy gets the shipped one)."""
    return BEFORE.consecutive if policy == "before" else config.consecutive


def report(data: dict, config: DriftConfig = SHIPPED) -> list[dict]:
    rows_out = []
    for (ref_rows, rate), runs in data["clean"].items():
        for policy in POLICIES:
            picked = [[e for e in run if e.scipy] for run in runs] if policy == "scipy" else runs
            s = score(picked, flags_for(policy, config), frozenset(), k_for(policy, config))
            rows_out.append({"kind": "clean timeline", "scenario": "clean", "reference": ref_rows, "rate": rate,
                             "policy": policy, **s.row()})
    for name, runs in data["change"].items():
        for policy in POLICIES:
            picked = [[e for e in run if e.scipy] for run in runs] if policy == "scipy" else runs
            s = score(picked, flags_for(policy, config), CHANGES[name].columns, k_for(policy, config))
            rows_out.append({"kind": "change timeline", "scenario": name, "reference": 50_000, "rate": 1_000,
                             "policy": policy, **s.row()})
    for (name, n), evaluations in data["static"].items():
        changed = CHANGES[name].columns if name in CHANGES else frozenset()
        for policy in POLICIES:
            s = score([[e] for e in evaluations], flags_for(policy, config), changed, 10**6)
            rows_out.append({"kind": "static", "scenario": name, "reference": 50_000, "rate": n, "policy": policy,
                             **s.row()})
    return rows_out


def print_tables(rows_out: list[dict]) -> None:
    print("\nClean traffic (timelines; one evaluation a minute; scipy on every 10th/50th):\n")
    print("| reference rows | rows/min | policy | evaluations | flagged per 1,000 | alerts | columns flagged |")
    print("|---:|---:|---|---:|---:|---:|---|")
    for r in (r for r in rows_out if r["kind"] == "clean timeline"):
        alerts = "n/a" if r["policy"] == "scipy" else r["alerts"]  # scipy: not every evaluation, so no k in a row
        print(f"| {r['reference']:,} | {r['rate']:,} | {r['policy']} | {r['evaluations']:,} | "
              f"{r['flagged_per_1000']:.2f} | {alerts} | {_columns(r['wrong_columns'])} |")
    print("\nChanges from minute 1 on (reference 50,000 rows, 1,000 rows/min, an evaluation a minute, so minutes ="
          " evaluations; median (min-max) over runs; scipy evaluated up to minute 20):\n")
    print("| change | policy | first flag, min | alert, min | alerted runs | evaluations flagging another "
          "column | columns wrongly flagged |")
    print("|---|---|---|---|---:|---:|---|")
    for r in (r for r in rows_out if r["kind"] == "change timeline"):
        runs = len(r["first_alert_minutes"])
        alerted = sum(m is not None for m in r["first_alert_minutes"])
        print(f"| {r['scenario']} | {r['policy']} | {r['first_flag']} | {r['first_alert']} | {alerted}/{runs} | "
              f"{r['wrong']} of {r['evaluations']} | {_columns(r['wrong_columns'])} |")
    print("\nPer evaluation, every row changed (reference 50,000 rows):\n")
    print("| change | rows | policy | detected (clean: flagged) | evaluations flagging another column |")
    print("|---|---:|---|---:|---:|")
    for r in (r for r in rows_out if r["kind"] == "static"):
        print(f"| {r['scenario']} | {r['rate']:,} | {r['policy']} | {r['flagged']}/{r['evaluations']} | "
              f"{r['wrong']}/{r['evaluations']} |")


def _columns(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} ({n})" for name, n in counts.items()) or "-"


# ------------------------------------------------------------------ the grid that chose the defaults


def grid(data: dict, log: Callable[[str], None] = print) -> list[dict]:
    """Replay candidate policies over the kept statistics: clean false alarms, time to alert and
    wrong columns of each change, per-evaluation detection. Flags are decided once per candidate;
    the alert machine is replayed for each k."""
    out = []
    for spans, q, js, missing in itertools.product(
            [(300.0, 3600.0), (180.0, 3600.0), (600.0, 3600.0), (300.0, 900.0, 3600.0), (3600.0,)],
            [0.05, 0.01, 0.001], [0.1, 0.08, 0.07], [0.2]):
        config = dataclasses.replace(SHIPPED, q=q, js_threshold=js, missing_threshold=missing)
        flagged: dict[int, list[str]] = {}

        def flags(e: Evaluation, config: DriftConfig = config, spans: tuple = spans) -> list[str]:
            key = id(e)
            if key not in flagged:
                flagged[key] = decide(e, config, spans=spans if len(e.spans) > 1 else None)
            return flagged[key]

        for k in (2, 3):
            row: dict = {"spans": spans, "q": q, "js": js, "missing": missing, "k": k}
            clean = [score(runs, flags, frozenset(), k) for runs in data["clean"].values()]
            row["clean"] = {f"{ref}/{rate}": f"{s.flagged}/{s.evaluations} flagged, {s.alerts} alerts"
                            for (ref, rate), s in zip(data["clean"], clean)}
            row["clean_flagged"] = sum(s.flagged for s in clean)
            row["clean_alerts"] = sum(s.alerts for s in clean)
            row["clean_evaluations"] = sum(s.evaluations for s in clean)
            for name, runs in data["change"].items():
                s = score(runs, flags, CHANGES[name].columns, k)
                alerts = [m if m is not None else 999 for m in s.first_alert]
                row[name] = f"alert {sorted(alerts)[len(alerts) // 2]}/{max(alerts)} min, wrong {s.wrong}"
            if k == 2:
                for (name, n), evaluations in data["static"].items():
                    changed = CHANGES[name].columns if name in CHANGES else frozenset()
                    s = score([[e] for e in evaluations], flags, changed, 10**6)
                    row[f"static {name} {n}"] = f"{s.flagged}/{s.evaluations} wrong {s.wrong}"
            out.append(row)
            log(json.dumps(row, default=str))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timelines per change")
    parser.add_argument("--clean-references", type=int, default=10, help="reference draws per clean configuration")
    parser.add_argument("--clean-minutes", type=int, default=300, help="evaluations per clean timeline")
    parser.add_argument("--change-minutes", type=int, default=60, help="evaluations after each change")
    parser.add_argument("--static", type=int, default=100, help="evaluations per static case")
    parser.add_argument("--only", action="append", default=[], metavar="SCENARIO",
                        help="run only the scenarios whose name contains SCENARIO ('clean', 'variance', "
                             "'correlation'...; repeatable)")
    parser.add_argument("--kinds", default="timeline,static",
                        help="which runs: timeline, static or both (comma-separated; default both)")
    parser.add_argument("--clean-configs", default=",".join(f"{r}/{n}" for r, n in CLEAN_CONFIGS),
                        help="clean timelines of these REFERENCE_ROWS/ROWS_PER_MINUTE pairs (comma-separated; "
                             "default: all four)")
    parser.add_argument("--shipped-spans", action="store_true",
                        help="keep only the shipped spans' statistics (a third of the work; --grid over them "
                             "then replays only those spans)")
    parser.add_argument("--no-scipy", action="store_true", help="skip the scipy side (faster)")
    parser.add_argument("--grid", action="store_true", help="replay candidate policies (how the defaults were chosen)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--save", metavar="FILE", help="keep the measured statistics in FILE (pickle)")
    parser.add_argument("--load", metavar="FILE", help="report (or --grid) from statistics kept by --save")
    args = parser.parse_args()
    suite = Suite(args.runs, args.clean_references, args.clean_minutes, args.change_minutes, args.static)
    started = time.perf_counter()
    if args.load:
        with open(args.load, "rb") as f:
            data = pickle.load(f)  # noqa: S301 - a file this script wrote
    else:
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        if not kinds or set(kinds) - {"timeline", "static"}:
            parser.error(f"--kinds takes timeline, static or both, got {args.kinds!r}")
        if args.only and not any(selected(name, args.only) for name in ["clean", *CHANGES]):
            parser.error(f"--only {args.only!r} matches no scenario: choose among clean, {', '.join(CHANGES)}")
        try:
            clean_configs = [tuple(int(x) for x in pair.split("/")) for pair in args.clean_configs.split(",")]
        except ValueError:
            parser.error(f"--clean-configs takes REFERENCE_ROWS/ROWS_PER_MINUTE pairs, got {args.clean_configs!r}")
        if not clean_configs or any(len(pair) != 2 or min(pair) < 1 for pair in clean_configs):
            parser.error(f"--clean-configs takes REFERENCE_ROWS/ROWS_PER_MINUTE pairs, got {args.clean_configs!r}")
        data = measure(suite, scipy=not args.no_scipy and not args.grid, log=lambda m: print(m, file=sys.stderr),
                       only=args.only, kinds=kinds, spans=SHIPPED.spans() if args.shipped_spans else STAT_SPANS,
                       clean_configs=clean_configs)
    if args.save:
        with open(args.save, "wb") as f:
            pickle.dump(data, f)
    if args.grid:
        rows_out = grid(data, log=lambda m: print(m, flush=True))
        if args.json:
            print(json.dumps(rows_out, indent=1, default=str))
        return 0
    rows_out = report(data)
    if args.json:
        print(json.dumps(rows_out, indent=1, default=str))
        return 0
    print(f"drift quality: {time.perf_counter() - started:.0f} s on {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; defaults {json.dumps(SHIPPED.to_dict())}")
    print_tables(rows_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
