"""Prometheus ``/metrics`` of the collector.

Everything but the ack latency is read when Prometheus scrapes: the counters
the Status RPC reports, the live agent streams, and from the database the
open alerts and each model version's latest drift evaluation. The database is
read over a connection of this module's own (one, guarded by a lock: the
scrape server starts a thread per request, and the store's per-thread readers
would pile up), so a scrape never touches the store's writer or its queue.

The ack latency is the one thing observed as it happens: from a batch of
windows arriving on an agent stream to its ack being sent, after the commit
(``batch_received`` / ``batch_acked``, called by ``collector.api.streams``).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.metrics import Endpoints
from collector.store import alerts as alert_store
from collector.store import fleet
from collector.store.engine import Conn, StoreError
from protos import collector_pb2 as pb
from protos import summary_pb2

log = logging.getLogger(__name__)

# Group commits take milliseconds; a backed-up writer or a slow disk, seconds.
ACK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
NUMERIC, CATEGORICAL = summary_pb2.ColumnSummary.NUMERIC, summary_pb2.ColumnSummary.CATEGORICAL
# The statistics each way of judging a column uses (ColumnDrift.method, collector.monitoring.drift), as (method label,
# ColumnDrift field); a discrete column is judged as numeric and by its frequencies. Evaluations stored
# before ColumnDrift.method existed name it by the column's kind.
NUMERIC_STATISTICS = (("psi", "psi"), ("ks", "ks_d"), ("wasserstein", "wasserstein"))
FREQUENCY_STATISTICS = (("chi2", "chi2"), ("js", "js"))
METHODS = {"numeric": NUMERIC_STATISTICS, "discrete": (*NUMERIC_STATISTICS, *FREQUENCY_STATISTICS),
           "categorical": (("psi", "psi"), *FREQUENCY_STATISTICS)}
BY_KIND = {NUMERIC: "numeric", CATEGORICAL: "categorical"}
# Each test's own p-value, before Benjamini-Hochberg, as (test label, ColumnDrift field).
TESTS = (("ks", "ks_p"), ("chi2", "chi2_p"), ("missing_rate", "missing_p"))
ALERT_STATES = ("open", "acknowledged")
_RECEIVED = "outrider_received"  # attribute a batch's future carries from arrival to ack


class CollectorMetrics(Endpoints):
    """The collector's metrics. ``serve_collector(..., metrics=CollectorMetrics())`` has it
    ``watch`` the running parts; ``start_http(listen)`` serves /metrics."""

    def __init__(self, *, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry if registry is not None else CollectorRegistry(), "collector")
        self.ack_latency = Histogram("outrider_collector_ack_latency_seconds", "time from a batch of windows "
                                     "arriving on an agent stream to its ack being sent (after the commit)",
                                     buckets=ACK_BUCKETS, registry=self.registry)
        self._state: _StateCollector | None = None

    def watch(self, store: Any, agents: Any, auth: Any) -> None:
        """Read ``store`` (collector.store.store.Store), ``agents`` (the AgentServicer: live streams,
        rejections) and ``auth`` (the AuthInterceptor: failures) at every scrape."""
        if self._state is not None:
            raise ValueError("these metrics already watch a collector; make one CollectorMetrics per collector")
        self._state = _StateCollector(store, agents, auth)
        self.registry.register(self._state)
        agents.metrics = self  # how collector.api.streams finds the ack latency histogram

    def close(self) -> None:
        super().close()
        if self._state is not None:
            self._state.close()


def batch_received(future: futures.Future) -> None:
    """A batch of windows arrived and went to the store as ``future``: start its ack clock."""
    setattr(future, _RECEIVED, time.perf_counter())


def batch_acked(servicer: Any, future: futures.Future) -> None:
    """The ack of ``future``'s batch was just sent on ``servicer``'s stream."""
    metrics = getattr(servicer, "metrics", None)
    received = getattr(future, _RECEIVED, None)
    if metrics is not None and received is not None:
        metrics.ack_latency.observe(time.perf_counter() - received)


class _StateCollector:
    """prometheus_client custom collector: the collector's state, read at scrape time."""

    def __init__(self, store: Any, agents: Any, auth: Any) -> None:
        self.store, self.agents, self.auth = store, agents, auth
        self._lock = threading.Lock()
        self._conn: Conn | None = None
        self._closed = False

    def describe(self) -> list[Metric]:
        return []  # label sets vary with the data; no registration-time collect

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def collect(self) -> Iterator[Metric]:
        counters = self.store.counters
        windows = CounterMetricFamily("outrider_collector_windows", "windows received from agents, by result: "
                                      "stored, duplicate (a resend, already stored) or rejected (invalid)",
                                      labels=["result"])
        windows.add_metric(["stored"], counters.get("windows_stored", 0))
        windows.add_metric(["duplicate"], counters.get("windows_duplicate", 0))
        windows.add_metric(["rejected"], self.agents.windows_rejected)
        yield windows
        yield CounterMetricFamily("outrider_collector_auth_failures", "calls refused for a missing or bad token "
                                  "or a missing permission", value=self.auth.failures)
        yield GaugeMetricFamily("outrider_collector_write_queue_depth", "windows and other writes queued for "
                                "the database, not committed yet", value=self.store.queue_depth())
        yield CounterMetricFamily("outrider_collector_rollup_buckets_skipped", "rollup buckets whose merge failed "
                                  "(a window stored by an older collector that cannot be merged); retried each pass, "
                                  "the other buckets roll up", value=counters.get("rollup_buckets_skipped", 0))
        yield GaugeMetricFamily("outrider_collector_agents_connected", "agent streams open on this collector now "
                                "(several collectors on one database: sum them for the fleet)",
                                value=len(self.agents.live))
        fleet = getattr(self.agents, "fleet", None)
        if fleet is not None and fleet.leases:
            held = GaugeMetricFamily("outrider_collector_lease_held", "1 while this collector holds the lease of a "
                                     "background loop (several collectors on one database: one runs each)",
                                     labels=["lease"])
            for name, lease in sorted(fleet.leases.items()):
                held.add_metric([name], 1 if lease.held else 0)
            yield held
        spans = getattr(self.agents, "spans", None)
        if spans is not None:
            merged = spans.counters["windows_merged_at_ingest"]
            cache = CounterMetricFamily("outrider_collector_span_cache_windows", "windows stored here, by where "
                                        "drift evaluation merges them: at ingest (from the sketches validation "
                                        "parsed), or otherwise read from the database by the next evaluation of "
                                        "their version (one not evaluated yet, a busy or full cache)",
                                        labels=["merged"])
            cache.add_metric(["at_ingest"], merged)
            cache.add_metric(["by_evaluation"], max(0, counters.get("windows_stored", 0) - merged))
            yield cache
        with self._lock:
            try:
                db = self._db()
                families = [self._agent_info(db), *self._fleet_rows(db), self._alerts(db), *self._drift(db)]
            except StoreError:  # e.g. the file went away: the live counters above still go out
                log.exception("cannot read the collector's database for metrics")
                families = []
        yield from families

    def _db(self) -> Conn:
        if self._closed:
            raise StoreError("collector metrics are closed")
        if self._conn is None:  # its own reader: a scrape never waits for a request's thread-local one
            self._conn = self.store.engine.connect_reader()
        return self._conn

    def _agent_info(self, db: Conn) -> Metric:
        info = GaugeMetricFamily("outrider_collector_agent_info", "1 per agent run connected now, with the "
                                 "model version it serves (and, if managed, the version it was told to serve)",
                                 labels=["agent_id", "model", "version", "managed", "desired_version"])
        for agent_id, run_id, model, version, managed, desired in fleet.connected_agents(db):
            if self.agents.live.connected(agent_id, run_id):  # the table can lag a crash; the streams cannot
                info.add_metric([agent_id, model, version, "true" if managed else "false", desired], 1)
        return info

    def _fleet_rows(self, db: Conn) -> list[Metric]:
        rows = CounterMetricFamily("outrider_collector_rows", "rows summarised by agents in the windows "
                                   "stored, by model version", labels=["model", "version"])
        dropped = CounterMetricFamily("outrider_collector_dropped_rows", "rows agents could not summarise "
                                      "(their ring was full), as their stored windows report", labels=["model", "version"])
        for model, version, n, lost in fleet.run_totals(db):
            rows.add_metric([model, version], n)
            dropped.add_metric([model, version], lost)
        return [rows, dropped]

    def _alerts(self, db: Conn) -> Metric:
        family = GaugeMetricFamily("outrider_collector_open_alerts", "alerts not resolved yet, by model and "
                                   "state (open, or acknowledged by an operator)", labels=["model", "state"])
        counts = alert_store.counts_by_model_and_state(db, ALERT_STATES)
        models = fleet.profiled_models(db) | {m for m, _ in counts}
        for model in sorted(models):  # zeros for models watched for drift: "no alert" is a value too
            for state in ALERT_STATES:
                family.add_metric([model, state], counts.get((model, state), 0))
        return family

    def _drift(self, db: Conn) -> list[Metric]:
        labels = ["model", "version", "feature"]
        statistic = GaugeMetricFamily("outrider_collector_drift_statistic", "the latest drift evaluation's effect "
                                      "size per column: psi, ks (D), wasserstein (normalised by the reference "
                                      "std) for numeric columns; psi, chi2, js (Jensen-Shannon distance) for "
                                      "categorical ones; all five for discrete ones (few distinct numeric values, "
                                      "judged by their frequencies too); and for every compared column its missing "
                                      "rate's change (missing_diff, current - reference) and Cohen's h "
                                      "(missing_effect)", labels=[*labels, "method"])
        test_p = GaugeMetricFamily("outrider_collector_drift_test_p_value", "the latest evaluation's p-value of "
                                   "each test per column before the Benjamini-Hochberg adjustment: ks, chi2 "
                                   "(categorical and discrete columns), missing_rate (two-proportion z-test)",
                                   labels=[*labels, "test"])
        not_compared = GaugeMetricFamily("outrider_collector_drift_not_compared", "reference columns the latest "
                                         "evaluation could not compare (no verdict, drift or not; outrider drift "
                                         "says why)", labels=["model", "version"])
        p_value = GaugeMetricFamily("outrider_collector_drift_p_value", "the latest evaluation's p-value per "
                                    "column, Benjamini-Hochberg adjusted across the model's columns", labels=labels)
        detected = GaugeMetricFamily("outrider_collector_drift_detected", "1 when the latest evaluation found the "
                                     "column drifted (effect past its threshold and significant), else 0",
                                     labels=labels)
        evaluated = GaugeMetricFamily("outrider_collector_drift_evaluation_timestamp_seconds", "when the latest "
                                      "drift evaluation with enough rows ran", labels=["model", "version"])
        accuracy = GaugeMetricFamily("outrider_collector_accuracy", "a classifier's accuracy in the latest "
                                     "evaluation's span: realised (from labels), estimated (from the predictions' "
                                     "confidence through the reference's calibration, no labels needed), and the "
                                     "reference's own of each", labels=["model", "version", "kind"])
        for model, version in fleet.profiled_versions(db):
            body = alert_store.latest_evaluated_body(db, model, version)
            if body is None:
                continue
            evaluation = pb.DriftEvaluation.FromString(body)
            evaluated.add_metric([model, version], evaluation.evaluated_unix_nano / 1e9)
            not_compared.add_metric([model, version], evaluation.not_compared)
            estimated = any(c.name == "estimated_performance" for c in evaluation.columns)  # else unset, not 0
            for kind, value, present in (("realised", evaluation.accuracy, True),
                                         ("reference", evaluation.reference_accuracy, True),
                                         ("estimated", evaluation.estimated_accuracy, estimated),
                                         ("reference_estimated", evaluation.reference_estimated_accuracy, estimated)):
                if present and math.isfinite(value):
                    accuracy.add_metric([model, version, kind], value)
            for column in evaluation.columns:
                key = [model, version, column.name]
                detected.add_metric(key, int(column.drifted))
                if math.isfinite(column.p_adjusted) and column.kind in BY_KIND:
                    p_value.add_metric(key, column.p_adjusted)
                for method, value in _statistics(column):
                    statistic.add_metric([*key, method], value)
                for test, field in TESTS:
                    value = getattr(column, field)
                    if math.isfinite(value) and column.kind in BY_KIND:
                        test_p.add_metric([*key, test], value)
        return [statistic, test_p, p_value, detected, evaluated, not_compared, accuracy]


def _statistics(column: pb.ColumnDrift) -> Iterator[tuple[str, float]]:
    """(method label, value) of each statistic the column was judged by; NaN ones were not computed."""
    method = column.method or BY_KIND.get(column.kind, "")
    for label, field in METHODS.get(method, ()):
        value = getattr(column, field)
        if math.isfinite(value):  # NaN: not computed (e.g. no reference bins)
            yield label, value
    if not column.method or not math.isfinite(column.missing_diff):
        return  # the missing rates were not compared (or the evaluation predates the test)
    yield "missing_diff", column.missing_diff
    # h is 0 exactly when the rates are equal; 0 beside a change is an unset field (an evaluation
    # stored before missing_effect was filled), not an effect of 0
    if math.isfinite(column.missing_effect) and (column.missing_effect > 0 or column.missing_diff == 0):
        yield "missing_effect", column.missing_effect
