"""The plots of one model version, from its drift evaluations, reference profile and recent windows.

Statistics come from ``agent.sketches`` (the one home of the summary math);
this module only chooses what to draw: the ratio of each column's effect size
to its threshold over time (heat map), each column's main statistic against
its threshold, the output columns now against the reference, realised
performance, and the shadow version next to production.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from agent import sketches
from collector.monitoring.drift import DriftConfig
from collector.monitoring.effect import main_statistic, ratio
from collector.monitoring.estimate import ESTIMATED_PERFORMANCE
from collector.monitoring.evaluation import PERFORMANCE, accuracy, mae
from collector.web import svg
from collector.web.html import Markup, clock, el, num
from protos import collector_pb2 as pb
from protos import summary_pb2

CS = summary_pb2.ColumnSummary
BINS = 20
TOP_CATEGORIES = 10


def _plot(title: str, chart: Markup) -> Markup:
    return el("div", el("h3", title), chart, class_="plot")


def drift_plots(history: Sequence[pb.DriftEvaluation], config: DriftConfig) -> tuple[Markup, list[Markup]]:
    """The heat map (columns x evaluations) and one time series per column."""
    done = [e for e in history if e.evaluated]
    if not done:
        return el("p", "no drift evaluation with enough rows yet", class_="muted"), []
    names = list(dict.fromkeys(c.name for e in done for c in e.columns
                               if c.name not in (PERFORMANCE, ESTIMATED_PERFORMANCE)))
    times = [float(e.evaluated_unix_nano) for e in done]
    cols = [{c.name: c for c in e.columns} for e in done]
    values = [[ratio(by[n], config) if n in by else math.nan for by in cols] for n in names]
    marked = [[bool(n in by and by[n].drifted) for by in cols] for n in names]
    heat = svg.heatmap("heatmap", "drift: effect size / threshold per column over time", names, times, values,
                       marked, x_label=clock)
    series = []
    for i, name in enumerate(names):
        present = [by.get(name) for by in cols]
        kind = next(c for c in present if c is not None)
        label, _, threshold = main_statistic(kind, config)
        ys = [main_statistic(c, config)[1] if c is not None else math.nan for c in present]
        chart = svg.line_chart(f"series-{i}", f"{name}: {label}", times, [(label, ys)], threshold=threshold,
                               marks=[bool(c is not None and c.drifted) for c in present], x_label=clock,
                               width=320, height=150)
        series.append(el("div", el("h3", name, " ", el("span", label, class_="muted")), chart,
                         class_="plot drift-series"))
    return heat, series


def _estimated(evaluation: pb.DriftEvaluation) -> float:
    """The label-free accuracy estimate, NaN when the evaluation made none (no calibration)."""
    made = any(c.name == ESTIMATED_PERFORMANCE for c in evaluation.columns)
    return evaluation.estimated_accuracy if made else math.nan


def performance_plot(history: Sequence[pb.DriftEvaluation], windows: Sequence[summary_pb2.WindowSummary],
                     config: DriftConfig) -> Markup:
    """Realised accuracy (or MAE) per evaluation against the reference's tolerance, with the
    label-free estimate beside it (classifiers with a calibrated profile); per window when no
    evaluation had enough labels or an estimate."""
    points = [e for e in history if math.isfinite(e.accuracy) or math.isfinite(e.mae)
              or math.isfinite(_estimated(e))]
    if points:
        classify = any(math.isfinite(e.accuracy) or math.isfinite(_estimated(e)) for e in points)
        xs = [float(e.evaluated_unix_nano) for e in points]
        ys = [e.accuracy if classify else e.mae for e in points]
        ref = [e.reference_accuracy if classify else e.reference_mae for e in points]
        estimated = [_estimated(e) for e in points]
        if classify and not any(math.isfinite(r) for r in ref):  # no labels yet: the estimate's own reference
            ref = [e.reference_estimated_accuracy if math.isfinite(_estimated(e)) else math.nan for e in points]
        last = next((r for r in reversed(ref) if math.isfinite(r)), math.nan)
        threshold = last - config.accuracy_drop if classify else last * (1 + config.mae_increase)
        marks = [any(c.name in (PERFORMANCE, ESTIMATED_PERFORMANCE) and c.drifted for c in e.columns)
                 for e in points]
        label = "accuracy" if classify else "MAE"
        series = [(label, ys), ("reference", ref)]
        if any(math.isfinite(v) for v in estimated):
            series.insert(1, ("estimated (no labels)", estimated))
        return el("div", _plot(f"realised {label} per evaluation (threshold: reference {num(last)} "
                     f"{'-' if classify else '×'} tolerance)",
                     svg.line_chart("performance", f"realised {label}", xs, series,
                                    threshold=threshold if math.isfinite(threshold) else None, marks=marks,
                                    x_label=clock, width=640)), class_="plots")
    labelled = [w for w in windows if w.performance.labeled]
    if not labelled:
        return el("p", "no labels have arrived yet (agents join them by request id: feedback())", class_="muted")
    xs = [float(w.end_unix_nano) for w in labelled]
    classify = bool(labelled[-1].performance.classes)
    ys = [accuracy(w.performance) if classify else mae(w.performance) for w in labelled]
    label = "accuracy" if classify else "MAE"
    chart = svg.line_chart("performance", f"realised {label}", xs, [(label, ys)], x_label=clock, width=640)
    return el("div", _plot(f"realised {label} per window", chart), class_="plots")


def _merged(columns: Sequence[CS]) -> sketches.NumericSketch | sketches.CategoricalSketch | None:
    merged = None
    for c in columns:
        s = sketches.from_proto(c)
        if merged is None:
            merged = s
        elif type(s) is type(merged):
            merged.merge(s)
    return merged


def _shares(sketch: sketches.NumericSketch, edges: np.ndarray) -> list[float]:
    cdf = np.nan_to_num(sketch.cdf(edges), nan=0.0)
    shares = np.diff(cdf)
    shares[0] += cdf[0]  # the tails go into the outer bins, so the shares add up to one
    shares[-1] += 1.0 - cdf[-1]
    return shares.tolist()


def prediction_plots(profile: summary_pb2.ReferenceProfile | None,
                     windows: Sequence[summary_pb2.WindowSummary]) -> list[Markup]:
    """Each output column of the recent windows against the reference profile's."""
    if profile is None:
        return [el("p", "no reference profile: nothing to compare the predictions with", class_="muted")]
    out = []
    outputs = [c for c in profile.columns if c.role == CS.PREDICTION]
    for i, ref_col in enumerate(outputs):
        ref = sketches.from_proto(ref_col)
        cur = _merged([c for w in windows for c in w.columns if c.name == ref_col.name])
        title = (f"{ref_col.name}: reference vs {len(windows)} windows to {clock(windows[-1].end_unix_nano)}"
                 if windows else ref_col.name)
        if cur is None or type(cur) is not type(ref):
            out.append(el("div", el("h3", ref_col.name), el("p", "no current data", class_="muted"), class_="plot"))
        elif isinstance(ref, sketches.NumericSketch):
            qs = np.concatenate([ref.quantiles([0.005, 0.995]), cur.quantiles([0.005, 0.995])])
            lo, hi = float(np.nanmin(qs)), float(np.nanmax(qs))
            if not (math.isfinite(lo) and math.isfinite(hi)):
                continue
            edges = np.linspace(lo, hi if hi > lo else lo + 1.0, BINS + 1)
            out.append(_plot(title, svg.distributions(f"pred-{i}", title, edges.tolist(), _shares(ref, edges),
                                                      _shares(cur, edges))))
        else:
            ref_n, cur_n = max(ref.present, 1), max(cur.present, 1)
            ref_s = {k: v / ref_n for k, v in ref.frequent_items()}
            cur_s = {k: v / cur_n for k, v in cur.frequent_items()}
            top = sorted(set(ref_s) | set(cur_s), key=lambda k: -(ref_s.get(k, 0) + cur_s.get(k, 0)))[:TOP_CATEGORIES]
            groups = [("reference", [ref_s.get(k, 0.0) for k in top]), ("now", [cur_s.get(k, 0.0) for k in top])]
            out.append(_plot(title, svg.bars(f"pred-{i}", title, top, groups, classes=("ref", "s0"))))
    return out or [el("p", "the reference profile has no output columns", class_="muted")]


def shadow_plots(windows: Sequence[summary_pb2.WindowSummary]) -> tuple[dict[str, float], list[Markup]]:
    """The shadow's counts over the recent windows, its agreement over time, its score difference and
    latency quantiles next to production's."""
    with_shadow = [w for w in windows if w.HasField("shadow") and w.shadow.calls]
    if not with_shadow:
        return {}, []
    totals = {f: float(sum(getattr(w.shadow, f) for w in with_shadow))
              for f in ("calls", "rows", "skipped", "errors", "label_rows", "label_agree")}
    totals["agreement"] = totals["label_agree"] / totals["label_rows"] if totals["label_rows"] else math.nan
    plots = []
    xs = [float(w.end_unix_nano) for w in with_shadow]
    agree = [w.shadow.label_agree / w.shadow.label_rows if w.shadow.label_rows else math.nan for w in with_shadow]
    if any(math.isfinite(a) for a in agree):
        plots.append(_plot("label agreement with production per window",
                           svg.line_chart("shadow-agreement", "label agreement", xs, [("agreement", agree)],
                                          x_label=clock)))
    qs = [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99]
    diff = _merged([w.shadow.score_diff for w in with_shadow if w.shadow.HasField("score_diff")])
    if isinstance(diff, sketches.NumericSketch) and diff.finite_count:
        plots.append(_plot("score difference (shadow - production), quantiles",
                           svg.bars("shadow-diff", "score difference quantiles", [f"p{q * 100:g}" for q in qs],
                                    [("shadow - production", diff.quantiles(qs).tolist())])))
    lat_q = [0.5, 0.9, 0.99]
    prod = _merged([w.latency for w in with_shadow if w.HasField("latency")])
    shadow = _merged([w.shadow.latency for w in with_shadow if w.shadow.HasField("latency")])
    groups = [(label, s.quantiles(lat_q).tolist()) for label, s in (("production", prod), ("shadow", shadow))
              if isinstance(s, sketches.NumericSketch) and s.finite_count]
    if groups:
        plots.append(_plot("latency per call (µs)", svg.bars("shadow-latency", "latency quantiles (µs)",
                                                              [f"p{q * 100:g}" for q in lat_q], groups)))
    return totals, plots
