"""The drift evaluation: recent windows of a model version against its reference.

For each model version with a reference profile, the windows of every agent
over the policy's spans (raw and rolled-up; by default the last 5 minutes and
the last hour, each counted in whole minutes: the last N minutes plus the
current one, see ``collector.monitoring.spans``) are merged into one current summary per
span, compared column by column (``collector.monitoring.drift.evaluate_spans``: one
Benjamini-Hochberg family over every span), and the realised performance
(labels joined by the agents) over the longest span is compared with the
profile's. The spans' summaries are kept in memory between evaluations
(``collector.monitoring.spans.SpanCache``): windows this collector stores are merged into
them at ingest, so each evaluation lists only the ids stored since the last one
and reads and merges just the windows stored elsewhere; its cost grows neither
with the span nor with the fleet; the first one after a start reads the whole
span. Every evaluation is stored, so its history can be plotted;
the alert machine steps with it, and alerts that open or resolve go to the
webhook. Alerts of a version that is no longer served are resolved with that
reason (``collector.monitoring.alerts.resolve_unserved``). A loop thread runs this on a
schedule; ``EvaluateDrift`` runs it on demand.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import Callable

from agent import sketches
from collector.lifecycle import retraining, rollback_policy
from collector.lifecycle.rollback_policy import RollbackPolicy
from collector.monitoring import alerts, drift, estimate
from collector.monitoring.spans import SpanCache, merge_since
from collector.monitoring.webhook import Webhook
from collector.store import alerts as alert_store
from collector.store.leases import Lease
from collector.store.store import Store
from protos import collector_pb2 as pb
from protos import summary_pb2

log = logging.getLogger(__name__)

MIN_LABELS = 100      # labelled rows in the span before realised performance is judged
PERFORMANCE = "performance"


def accuracy(perf: summary_pb2.Performance) -> float:
    n = len(perf.classes)
    if not perf.labeled or not n or len(perf.confusion) != n * n:
        return math.nan
    return sum(perf.confusion[i * n + i] for i in range(n)) / perf.labeled


def mae(perf: summary_pb2.Performance) -> float:
    return perf.abs_error_sum / perf.labeled if perf.labeled and not perf.classes else math.nan


def merge_spans(windows: Sequence[summary_pb2.WindowSummary], now_ns: int,
                spans: Sequence[float]) -> list[summary_pb2.WindowSummary | None]:
    """One merged summary per span (``spans`` in seconds, shortest first): the windows that
    ended within it (``end >= now - span``, not counted in whole buckets as evaluations are).

    ``windows`` must be newest first (as the store returns them). They are folded into one
    merge, newest first, and each span's summary is taken as the merge passes its start, so
    every window is parsed and merged once whatever the number of spans. None: no window; the
    same object as the previous span's when no window lies between the two spans' starts."""
    return [summary for summary, _ in merge_since(windows, [now_ns - int(s * 1e9) for s in spans])]


def performance_drift(current: summary_pb2.Performance, reference: summary_pb2.Performance,
                      config: drift.DriftConfig) -> pb.ColumnDrift | None:
    """A pseudo-column for the alert machine: realised accuracy fell (or MAE rose)
    past the policy's tolerance versus the profile's. None: nothing to judge."""
    if not reference.labeled:
        return None
    nan = math.nan  # no distribution statistics: this column compares metrics
    col = pb.ColumnDrift(name=PERFORMANCE, rows=current.labeled, p_adjusted=nan, psi=nan, ks_d=nan, ks_p=nan,
                         wasserstein=nan, chi2=nan, chi2_p=nan, js=nan, missing_rate=nan,
                         reference_missing_rate=nan)
    if current.labeled < MIN_LABELS:
        col.reason = f"{current.labeled} labelled rows in the span, {MIN_LABELS} needed"
        return col
    col.p_adjusted = 0.0  # evaluated: the alert machine counts this verdict
    if reference.classes:
        now, before = accuracy(current), accuracy(reference)
        col.drifted = before - now >= config.accuracy_drop
        col.reason = f"accuracy {now:.3f} vs reference {before:.3f} (tolerated drop {config.accuracy_drop:g})"
    else:
        now, before = mae(current), mae(reference)
        col.drifted = now >= before * (1 + config.mae_increase)
        col.reason = f"MAE {now:.4g} vs reference {before:.4g} (tolerated increase {config.mae_increase:.0%})"
    return col


class DriftEvaluator:
    """Evaluates model versions and records the results; thread-safe."""

    def __init__(self, store: Store, webhook: Webhook | None = None,
                 clock: Callable[[], int] = time.time_ns, retrain_after_evaluations: int = 10,
                 rollback: RollbackPolicy = RollbackPolicy()) -> None:
        self.store, self.webhook, self.clock = store, webhook, clock
        self.rollback = rollback  # severe degradation soon after a promotion: request (or make) a rollback
        self.push_rollout: Callable[[int], object] | None = None  # tells the agents of a rollback made by policy
        self.connected: alerts.Connected | None = None  # whose streams are open (the server's); else the table
        # a drift alert open this many consecutive evaluations opens a retraining request (0: never)
        self.retrain_after_evaluations = retrain_after_evaluations
        # Reference sketches are parsed once per profile (they cache their sorted views).
        self._references: dict[tuple[str, str], tuple[bytes, dict, dict]] = {}
        self.spans = SpanCache(store)  # the spans' current summaries, kept between evaluations
        self._lock = threading.Lock()

    def _reference(self, name: str, version: str, profile: summary_pb2.ReferenceProfile) -> tuple[dict, dict]:
        key, stamp = (name, version), profile.data_sha256.encode() + str(profile.created_unix_nano).encode()
        with self._lock:
            cached = self._references.get(key)
            if cached is None or cached[0] != stamp:
                cached = (stamp, {c.name: sketches.from_proto(c) for c in profile.columns},
                          {c.name: c.role for c in profile.columns})
                self._references[key] = cached
        return cached[1], cached[2]

    def evaluate(self, model_name: str, model_version: str, *, record: bool = True) -> pb.DriftEvaluation:
        now = self.clock()
        config, _ = alerts.get_config(self.store.read(), model_name)
        evaluation = pb.DriftEvaluation(model_name=model_name, model_version=model_version,
                                        evaluated_unix_nano=now, accuracy=math.nan, reference_accuracy=math.nan,
                                        mae=math.nan, reference_mae=math.nan)
        evaluation.estimated_accuracy = evaluation.reference_estimated_accuracy = math.nan
        profile = self.store.profile(model_name, model_version)
        if profile is None:
            evaluation.reason = (f"no reference profile for {model_name} {model_version}: "
                                 f"outrider profile ..., then outrider attach {model_name} {model_version} PROFILE")
            return evaluation  # nothing to record: the loop only visits versions with a profile
        spans_seconds = config.spans()
        merged = self.spans.read(model_name, model_version, now, spans_seconds)
        current = merged[-1].summary if merged[-1] is not None else summary_pb2.WindowSummary()
        evaluation.rows = current.rows
        evaluation.window_start_unix_nano = current.start_unix_nano
        evaluation.window_end_unix_nano = current.end_unix_nano
        if current.rows < config.min_rows:
            evaluation.reason = (f"{current.rows} rows in the last {config.span_seconds:g} s; "
                                 f"at least {config.min_rows} needed")
        else:
            reference, roles = self._reference(model_name, model_version, profile)
            currents, previous = [], None
            for seconds, span in zip(spans_seconds, merged):
                # A shorter span with too few rows is not compared; nor one that holds the same
                # windows as the next longer span (the same test twice): the longer one stands for it.
                if span is None or span.summary.rows < config.min_rows:
                    continue
                if previous is not None and span.windows == previous.windows:
                    currents.pop()
                currents.append((seconds, span.columns))
                previous = span
            evaluation.columns.extend(drift.evaluate_spans(reference, currents, config, roles))
            evaluation.evaluated = True
            evaluation.not_compared = len(drift.not_compared(evaluation.columns, reference))
            evaluation.reason = drift.summary(evaluation.columns, reference)
        perf = performance_drift(current.performance, profile.performance, config)
        if perf is not None:
            evaluation.columns.append(perf)
            evaluation.evaluated = evaluation.evaluated or not math.isnan(perf.p_adjusted)
        estimated, reference_estimated, est = estimate.estimated_performance(current, profile, config)
        evaluation.estimated_accuracy, evaluation.reference_estimated_accuracy = estimated, reference_estimated
        if est is not None:  # label-free, beside the realised one: the same alert machine
            evaluation.columns.append(est)
            evaluation.evaluated = evaluation.evaluated or not math.isnan(est.p_adjusted)
        evaluation.accuracy, evaluation.mae = accuracy(current.performance), mae(current.performance)
        evaluation.reference_accuracy = accuracy(profile.performance)
        evaluation.reference_mae = mae(profile.performance)
        if record:
            self._record(evaluation, config)
        return evaluation

    def _record(self, evaluation: pb.DriftEvaluation, config: drift.DriftConfig) -> None:
        def write(db):  # alerts and policy-opened retraining and rollback requests: one transaction
            now = self.clock()
            served = alerts.served(db, evaluation.model_name, evaluation.model_version, now, self.connected)
            changed = alerts.record(db, evaluation, config.consecutive, now, is_served=served)
            return (changed, retraining.policy(db, evaluation, self.retrain_after_evaluations, now),
                    rollback_policy.apply(db, evaluation, self.rollback, now))

        changed, opened, rolled = self.store.write(write)
        for alert in changed:
            log.warning("alert %d %s: %s %s %s: %s", alert.id, alert.state, alert.model_name,
                        alert.model_version, alert.column, alert.summary)
            if self.webhook is not None:
                self.webhook.notify(alerts.event(alert))
        if opened is not None:
            log.warning("retraining request %d opened for %s %s: %s", opened.id, opened.model_name,
                        opened.model_version, opened.reason)
            if self.webhook is not None:
                self.webhook.notify(retraining.event(opened))
        if rolled is not None:
            rollback_policy.announce(rolled, self.webhook, self.push_rollout)

    def evaluate_all(self) -> list[pb.DriftEvaluation]:
        done, profiles = [], self.store.profiles()
        self.spans.forget(profiles)  # versions no longer evaluated free their memory
        for name, version in profiles:
            try:
                done.append(self.evaluate(name, version))
            except Exception:  # one model's failure must not stop the others
                log.exception("drift evaluation of %s %s failed", name, version)
        return done


class EvaluationLoop:
    """Runs ``evaluate_all`` every ``interval`` seconds and prunes old evaluations, while it holds
    ``lease`` (several collectors on one database: one of them evaluates; released on ``stop``)."""

    def __init__(self, evaluator: DriftEvaluator, interval: float, keep_seconds: float,
                 lease: Lease | None = None) -> None:
        self.evaluator, self.interval, self.keep_seconds = evaluator, interval, keep_seconds
        self.lease = lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outrider-drift", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.lease is not None and not self.lease.hold():
                # Another collector evaluates (alerts, retraining, rollbacks) and rolls up: this one's span
                # cache would miss its rollup passes, so it starts cold if the lease comes back.
                self.evaluator.spans.forget(())
                continue
            self.evaluator.evaluate_all()
            cutoff = self.evaluator.clock() - int(self.keep_seconds * 1e9)
            try:
                self.evaluator.store.write(lambda db: alert_store.delete_evaluations_before(db, cutoff))
            except Exception:
                log.exception("pruning old drift evaluations failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.lease is not None:
            self.lease.release()
