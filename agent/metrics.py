"""Prometheus ``/metrics`` of the agent: requests, failures and latency of inference, and
the monitoring counters the session and its exporter already keep.

Requests are counted and timed by the agent's ModelInfer handler itself
(``agent.handlers``), through a ``Recorder`` whose prometheus_client children
are bound once per model version (a lock and an add per update, as
prometheus_client's own counters are); the access check's interceptor counts the
calls it answers in the handler's place (a refused token) with ``observe``.
Everything else is read when Prometheus scrapes, by a custom collector, from
whatever session is served *then* (a managed agent swaps its session at run
time), so nothing is added to the request path for it. Each ``AgentMetrics``
has its own registry: several agents in one process (tests) never clash over
the global default one.
"""
from __future__ import annotations

import ipaddress
import logging
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
# Fixed buckets (seconds) are what let Prometheus add histograms of many agents together
# (sum by (le)); they span a small tabular model's ~50 us to a slow model's 10 s.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

SCRAPE_SECONDS = 2.0  # how long the supervisor of --processes waits for one child's /metrics

# What is served now: an object with ``session``, ``model_name`` and ``model_version``
# (an ``agent.dataplane.DataPlane``), or None before anything is.
Served = Callable[[], Any]


class MetricsEndpoint:
    """prometheus_client's own HTTP server for one registry, on its own daemon thread."""

    def __init__(self, registry: CollectorRegistry, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        # OSError (address in use, unknown host) goes to the caller, who says what to fix.
        self._server, self._thread = start_http_server(int(port), host, registry=registry)
        self.host = host
        self.port: int = self._server.server_port
        self._stopped = False

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}/metrics"

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class Endpoints:
    """The /metrics endpoints serving one registry; shared by the agent's and the collector's metrics."""

    def __init__(self, registry: CollectorRegistry, what: str) -> None:
        self.registry, self._what = registry, what
        self._endpoints: list[MetricsEndpoint] = []
        self._lock = threading.Lock()

    def start_http(self, listen: str) -> MetricsEndpoint:
        """Serve /metrics on ``listen`` (HOST:PORT, port 0 picks one); raises OSError if it cannot."""
        endpoint = MetricsEndpoint(self.registry, listen)
        with self._lock:
            self._endpoints.append(endpoint)
        log.info("%s metrics on %s", self._what, endpoint.url)
        return endpoint

    def close(self) -> None:
        with self._lock:
            endpoints, self._endpoints = self._endpoints, []
        for endpoint in endpoints:
            endpoint.stop()


class AgentMetrics(Endpoints):
    """The agent's metrics. ``serve(..., metrics=AgentMetrics())`` binds it to what the
    server serves and records its ModelInfer calls; ``start_http(listen)`` serves /metrics."""

    def __init__(self, served: Served | None = None, *, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry if registry is not None else CollectorRegistry(), "agent")
        self._served: Served = served or (lambda: None)
        self.requests = Counter("outrider_agent_requests", "ModelInfer requests received, by the model "
                                "version served when they arrived", ["model", "version"], registry=self.registry)
        self.failures = Counter("outrider_agent_request_failures", "ModelInfer requests answered with an error, "
                                "by gRPC status code", ["model", "version", "reason"], registry=self.registry)
        self.latency = Histogram("outrider_agent_inference_latency_seconds", "time to answer a ModelInfer "
                                 "request, failures included", ["model", "version"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self._recorders: dict[tuple[str, str], Recorder] = {}  # labels() once per version, not per call
        self._refusals: Callable[[], dict[str, int]] = dict
        self.registry.register(_MonitoringCollector(self))

    def bind(self, served: Served, refusals: Callable[[], dict[str, int]] | None = None) -> None:
        """Read what is served through ``served`` (called at every request and scrape), and the calls
        the server refused before any servicer ran through ``refusals`` ({reason: count}, at scrape)."""
        self._served = served
        if refusals is not None:
            self._refusals = refusals

    def refusals(self) -> dict[str, int]:
        return self._refusals()

    def add_refusals(self, more: Callable[[], dict[str, int]]) -> None:
        """Also count the calls another front refused (a REST port beside the gRPC one), under the same
        reasons: the page shows one ``outrider_agent_refused_calls`` whatever the protocol."""
        first = self._refusals

        def both() -> dict[str, int]:
            total = dict(first())
            for reason, count in more().items():
                total[reason] = total.get(reason, 0) + count
            return total

        self._refusals = both

    def served(self) -> Any:
        return self._served()


    # --- the request path ---------------------------------------------------------------
    def recorder(self, served: Any) -> Recorder:
        """What records the ModelInfer calls of ``served`` (what ``bind``'s ``served`` returns: labels from
        its ``model_name`` and ``model_version``), its label children bound once. Keep it while ``served``
        is served: a call then costs two prometheus_client updates and no label lookup."""
        key = (getattr(served, "model_name", ""), getattr(served, "model_version", ""))
        recorder = self._recorders.get(key)
        if recorder is None:  # a new version (startup, rollout): rare, so the dict stays small
            recorder = self._recorders[key] = Recorder(self, key)
        return recorder

    def observe(self, seconds: float, code: grpc.StatusCode | None) -> None:
        """One ModelInfer call that took ``seconds`` and ended with ``code`` (None: OK), counted under what
        is served now."""
        self.recorder(self._served()).record(seconds, code)


class Recorder:
    """Counts and times the ModelInfer calls of one model version (``AgentMetrics.recorder``)."""

    __slots__ = ("_metrics", "_key", "_count", "_time")

    def __init__(self, metrics: AgentMetrics, key: tuple[str, str]) -> None:
        self._metrics, self._key = metrics, key
        self._count = metrics.requests.labels(*key).inc  # bound once: each is a lock and an add per call
        self._time = metrics.latency.labels(*key).observe

    def record(self, seconds: float, code: grpc.StatusCode | None) -> None:
        """One call that took ``seconds`` and ended with ``code`` (None or OK: answered)."""
        self._count()
        self._time(seconds)
        if code is not None and code is not grpc.StatusCode.OK:
            self._metrics.failures.labels(*self._key, code.name).inc()

    def ok(self, seconds: float) -> None:
        """``record(seconds, None)``: one answered call, the usual one."""
        self._count()
        self._time(seconds)


# Exporter stats (agent.exporter.CollectorExporter.stats) -> (name, type, help).
_EXPORTER = (
    ("windows_sent", "outrider_agent_windows_sent", "counter", "windows sent to the collector (resends included)"),
    ("windows_acked", "outrider_agent_windows_acked", "counter",
     "windows the collector acknowledged after committing them"),
    ("windows_rejected", "outrider_agent_windows_rejected", "counter",
     "windows the collector refused for good (invalid); dropped from the spool"),
    ("retries", "outrider_agent_stream_retries", "counter",
     "new streams to the collector after one failed; un-acked windows are resent on them"),
    ("failovers", "outrider_agent_collector_failovers", "counter",
     "moves to the next of several collectors (--collector A,B,...) after a stream to one ended"),
    ("export_errors", "outrider_agent_spool_write_errors", "counter", "windows that could not be spooled (lost)"),
    ("in_flight", "outrider_agent_windows_in_flight", "gauge", "windows sent and not acknowledged yet"),
    ("spool_windows", "outrider_agent_spool_windows", "gauge", "windows waiting in the spool for an ack"),
    ("spool_bytes", "outrider_agent_spool_bytes", "gauge", "bytes of the windows waiting in the spool"),
    ("spool_dropped_windows", "outrider_agent_spool_dropped_windows", "counter",
     "windows dropped from the full spool (oldest first), over the spool's life"),
    ("spool_dropped_rows", "outrider_agent_spool_dropped_rows", "counter",
     "rows in the windows dropped from the full spool, over the spool's life"),
)


# PredictionLog.stats() (agent.feedback) -> (family, label value) of what left early or was left out.
_PREDICTIONS_DROPPED = (("evicted", "evicted"), ("expired", "expired"), ("ids_too_long", "id_too_long"),
                        ("too_large", "too_large"))
_LABEL_PROBLEMS = (("duplicate_labels", "duplicate"), ("other_class_labels", "other_class"),
                   ("out_of_range_labels", "out_of_range"))


def _feedback_families(stats: dict[str, int]) -> Iterator[Metric]:
    yield GaugeMetricFamily("outrider_agent_predictions_held", "predictions kept for feedback by request id",
                            value=stats.get("held", 0))
    yield GaugeMetricFamily("outrider_agent_predictions_held_bytes", "bytes the predictions kept for feedback "
                            "cost (ids, arrays, overhead), within the byte budget", value=stats.get("held_bytes", 0))
    dropped = CounterMetricFamily("outrider_agent_predictions_dropped", "predictions not kept for feedback, or "
                                  "dropped before a label came: evicted by the count or byte budget, expired after "
                                  "the join window, id longer than the limit, larger than the whole byte budget",
                                  labels=["reason"])
    for key, reason in _PREDICTIONS_DROPPED:
        dropped.add_metric([reason], stats.get(key, 0))
    yield dropped
    labels = CounterMetricFamily("outrider_agent_label_problems", "labels joined but not counted as sent: a second "
                                 "label for a row (ignored), a class beyond the bound (counted as <other>), a "
                                 "regression error out of range (unmatched)", labels=["reason"])
    for key, reason in _LABEL_PROBLEMS:
        labels.add_metric([reason], stats.get(key, 0))
    yield labels


class _MonitoringCollector:
    """Reads the served session's counters when scraped (prometheus_client's custom collector)."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # names vary with the session; no registration-time collect

    def collect(self) -> Iterator[Metric]:
        refused = CounterMetricFamily("outrider_agent_refused_calls", "calls on the agent's port refused before "
                                      "any servicer ran: undecodable body, body over its method's limit "
                                      "(too_large), no or unknown token (unauthenticated), a call the token may "
                                      "not make (permission_denied)", labels=["reason"])
        for reason, count in sorted((_call(self.metrics, "refusals") or {}).items()):
            refused.add_metric([reason], count)
        yield refused
        try:
            served = self.metrics.served()
        except Exception:  # a scrape must not fail on a session being swapped
            log.exception("cannot read the served session for metrics")
            return
        if served is None:
            return
        info = GaugeMetricFamily("outrider_agent_model_info", "the model version served now (1)",
                                 labels=["model", "version"])
        info.add_metric([served.model_name, served.model_version], 1)
        yield info
        session = getattr(served, "session", None)
        stats = _call(session, "stats")
        if stats is not None:  # a MonitoredSession; a bare InferenceSession keeps no counters
            for key, name, text in (("rows_captured", "outrider_agent_rows_captured", "rows copied off the "
                                     "request path for summaries"),
                                    ("rows_summarised", "outrider_agent_rows_summarized", "rows summarised "
                                     "into windows"),
                                    ("dropped_rows", "outrider_agent_rows_dropped", "rows not summarised: the "
                                     "ring was full or a feed could not be copied (inference was unaffected)"),
                                    ("skipped_rows", "outrider_agent_rows_skipped", "of the dropped rows, those "
                                     "the summary worker failed on (its log says why); the rest were never "
                                     "copied (ring full, or a feed that could not be copied)")):
                yield CounterMetricFamily(name, text, value=stats.get(key, 0))
            yield CounterMetricFamily("outrider_agent_window_sink_errors", "closed windows the sink failed to "
                                      "take (lost)", value=getattr(session, "export_failures", 0))
        feedback = _call(getattr(session, "predictions", None), "stats")
        if feedback is not None:  # a model whose predictions can be joined to labels
            yield from _feedback_families(feedback)
        sink = getattr(session, "sink", None)
        # a managed agent's sessions share one exporter behind a renumbering sink (agent.rollout.AgentSink)
        exporter = _call(sink, "stats") or _call(getattr(sink, "target", None), "stats")
        if exporter is None:
            return  # no collector configured: no delivery metrics (not a disconnected collector)
        for key, name, kind, text in _EXPORTER:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, text, value=exporter.get(key, 0))
        yield GaugeMetricFamily("outrider_agent_collector_connected", "1 while the stream to the collector "
                                "is open", value=int(bool(exporter.get("connected"))))


class ProcessMetrics(Endpoints):
    """/metrics of ``outrider agent serve --processes N`` (``agent.supervisor``): each child's own metrics,
    read from its loopback endpoint when Prometheus scrapes, every sample labelled ``process="I"``, and the
    supervisor's own. Labelled rather than summed: gauges such as ``outrider_agent_model_info`` do not add
    up, and ``sum without (process) (...)`` gives the sum for those that do."""

    def __init__(self, group: Any, *, registry: CollectorRegistry | None = None,
                 timeout: float = SCRAPE_SECONDS) -> None:
        super().__init__(registry if registry is not None else CollectorRegistry(), "agent")
        self.registry.register(_ProcessesCollector(group, timeout))


class _ProcessesCollector:
    def __init__(self, group: Any, timeout: float) -> None:
        self.group, self.timeout = group, timeout
        self.failed_scrapes = 0
        self._lock = threading.Lock()  # scrapes may run side by side

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.parser import text_string_to_metric_families

        merged: dict[str, Metric] = {}
        for index, url in self.group.scrape_targets():
            try:
                with urllib.request.urlopen(url, timeout=self.timeout) as reply:
                    families = list(text_string_to_metric_families(reply.read().decode()))
            except Exception as exc:  # a child stopping or restarting: its part is missing this once (counted)
                with self._lock:
                    self.failed_scrapes += 1
                log.warning("cannot read the metrics of process %d at %s: %s", index, url, exc)
                continue
            for family in families:
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
                for sample in family.samples:
                    into.add_sample(sample.name, {**sample.labels, "process": str(index)}, sample.value,
                                    sample.timestamp, sample.exemplar)
        yield from merged.values()
        yield GaugeMetricFamily("outrider_agent_processes", "serving processes sharing the agent's port "
                                "(agent serve --processes); fewer than asked while one restarts",
                                value=self.group.serving())
        yield CounterMetricFamily("outrider_agent_process_restarts", "serving processes that exited on their own "
                                  "and were started again", value=self.group.restarts)
        yield CounterMetricFamily("outrider_agent_process_scrape_failures", "times a serving process's metrics "
                                  "could not be read for a scrape (its samples were missing from it)",
                                  value=self.failed_scrapes)


def _call(obj: Any, method: str) -> dict[str, Any] | None:
    fn = getattr(obj, method, None)
    if not callable(fn):
        return None
    try:
        return fn()
    except Exception:  # e.g. a session closing under the scrape: skip its part this time
        log.exception("cannot read %s.%s() for metrics", type(obj).__name__, method)
        return None


def start_for_cli(make: Callable[[], Any], listen: str | None, flag: str = "--metrics") -> Any:
    """For a server CLI: None without ``listen``; else ``make()`` serving /metrics on it. A bad address
    is one UsageError line naming ``flag``; says where /metrics is, and warns when it is reachable
    beyond this machine (it has no auth)."""
    from agent.cli import UsageError

    if not listen:
        return None
    metrics = make()
    try:
        endpoint = metrics.start_http(listen)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0]
        raise UsageError(f"cannot serve metrics on {listen}: {reason}; "
                         f"pick a free port on a local address with {flag}") from None
    print(f"metrics on {endpoint.url}", flush=True)
    if not _is_loopback(endpoint.host):
        print(f"outrider: warning: {endpoint.url} has no authentication: anyone who can reach it sees model, "
              "feature and agent names", file=sys.stderr, flush=True)
    return metrics


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
