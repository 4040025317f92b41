"""The collector's gRPC endpoint: AgentService (window streams) and OpsService (queries).

(The work of one agent stream, and the set of live streams, is in collector/api/streams.py.)

Servicers only convert messages and call the plain core (``collector.store.store``,
``collector.base.ingest``); the one error hierarchy in ``agent.errors`` becomes
gRPC statuses through ``grpc_errors`` / ``grpc_stream_errors``.

An agent stream is read by its own thread while the handler thread sends
replies, so acks (sent only once the store has committed the windows) never
wait for the next request and reading never waits for a commit.
"""
from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent.errors import (InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, Unavailable,
                          grpc_errors, grpc_stream_errors)
from agent.guard import DecodeGuard
from agent.hello import package_version
from collector.api.data_ops import DataOps
from collector.api.fleet import FleetMember
from collector.api.governance_ops import GovernanceOps
from collector.api.rollout_ops import RolloutOps
from collector.api.shadow_ops import ShadowOps
from collector.api.streams import AgentStream, LiveStreams, artifact_refusal, hello_refusal, read_hello
from collector.base.auth import AGENT_SERVICE, LOCAL, AuthConfig, AuthInterceptor, Identity, TLSFiles, current_identity
from collector.base.ingest import Limits, validate_hello, validate_model_key, validate_profile
from collector.lifecycle.gate import GatePolicy
from collector.lifecycle.registry import ArtifactStore, Registry
from collector.lifecycle.rollback_policy import RollbackPolicy
from collector.lifecycle.rollout import RolloutPusher, artifact_chunks
from collector.monitoring import alerts
from collector.monitoring.evaluation import DriftEvaluator, EvaluationLoop
from collector.monitoring.spans import SpanCache
from collector.monitoring.webhook import Webhook
from collector.store import audit, leases, paging
from collector.store.leases import Lease
from collector.store.rollup import RetentionPolicy
from collector.store.store import Store
from protos import collector_pb2 as pb
from protos import collector_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICES = (pb.DESCRIPTOR.services_by_name["AgentService"].full_name,
            pb.DESCRIPTOR.services_by_name["OpsService"].full_name)
DEFAULT_LIST_LIMIT = 1000
MAX_LIST_LIMIT = 10_000
OPS_THREADS = 16  # handler threads left for operators' calls when every agent slot is taken
DEFAULT_MAX_RECEIVE_BYTES = 64 * 1024 * 1024
DEFAULT_RETIRED_ARTIFACT_RETENTION = 30 * 86400.0  # seconds a retired version's artifact is kept

class AgentServicer(pb_grpc.AgentServiceServicer):
    """Agents' streams and artifact downloads. ``auth`` (the server's interceptor) records refusals
    made here: a token used for an agent id or a model its auth-file entry does not name."""

    def __init__(self, store: Store, *, limits: Limits, max_agents: int, retry_after_ms: int,
                 max_in_flight: int = 64, auth: AuthInterceptor | None = None, collector_id: str = "") -> None:
        self.store = store
        self.auth = auth
        self.limits = limits
        self.max_agents = max_agents
        self.max_in_flight = max_in_flight  # ack messages per stream not yet sent
        self.retry_after_ms = retry_after_ms
        self.live = LiveStreams()
        self.rollouts = RolloutPusher(store, self.live, limits)  # commands to managed agents
        self.fleet = FleetMember(store, self.rollouts, collector_id)  # started by serve_collector
        self.live.remote = self.fleet.remote_connected
        self.artifacts: ArtifactStore | None = None  # the registry's, for FetchArtifact (set by serve_collector)
        self.spans: SpanCache | None = None  # the evaluator's: stored windows are offered to it (collector.monitoring.spans)
        self.shutting_down = threading.Event()
        self._lock = threading.Lock()
        self._rejected = 0
        self._handlers = 0

    @property
    def windows_rejected(self) -> int:
        with self._lock:
            return self._rejected

    def count_rejected(self, n: int) -> None:
        with self._lock:
            self._rejected += n

    def retry_later(self, exc: ResourceExhausted) -> ResourceExhausted:
        """The store's queue is full: the agent keeps its windows and backs off this long."""
        wait = self.retry_after_ms
        return ResourceExhausted(f"{exc}; retry in {wait} ms", retry_after_ms=wait)

    @grpc_stream_errors
    def Stream(self, requests: Iterator[pb.AgentMessage], context: grpc.ServicerContext) -> Iterator[pb.CollectorMessage]:
        if self.shutting_down.is_set():
            raise Unavailable("the collector is shutting down: reconnect later")
        with self._lock:
            full = self._handlers >= self.max_agents
            if not full:
                self._handlers += 1
        if full:
            raise ResourceExhausted(f"the collector already serves {self.max_agents} agent streams; retry later",
                                    retry_after_ms=self.retry_after_ms * 10)
        try:
            yield from self._stream(requests, context)
        finally:
            with self._lock:
                self._handlers -= 1

    def _stream(self, requests: Iterator[pb.AgentMessage],
                context: grpc.ServicerContext) -> Iterator[pb.CollectorMessage]:
        hello = read_hello(requests, context, self.limits.hello_seconds)
        if hello is None:  # the client went away, or said nothing in time
            return
        validate_hello(hello, self.limits)
        identity = current_identity() or LOCAL
        self._permit(identity, hello_refusal(identity, hello), "Stream")
        try:
            self.store.record_hello(hello, time.time_ns())
            self.fleet.stream_opened(hello.agent_id, hello.run_id)
        except ResourceExhausted as exc:
            raise self.retry_later(exc) from None
        stream = AgentStream(self, hello, requests, identity)
        self.live.add(stream)
        if not context.add_callback(stream.gone):
            stream.close()
            return
        log.info("agent %s run %s (%s %s) connected as %s%s", hello.agent_id, hello.run_id, hello.model_name,
                 hello.model_version, identity.name,
                 f"; its spool also holds windows of {list(hello.spooled_models)}" if hello.spooled_models else "")
        # after live.add: a change committed from now on reaches this stream too
        self.rollouts.hello(stream)  # managed: what to serve; any agent: its version's reference projection
        threading.Thread(target=stream.read, name=f"outrider-stream-{hello.agent_id}", daemon=True).start()
        yield from stream.replies()

    def _permit(self, identity: Identity, refusal: str, method: str) -> None:
        """Raise PermissionDenied (recorded like the interceptor's refusals) when ``refusal`` says why."""
        if not refusal:
            return
        log.warning("refused AgentService/%s: %s", method, refusal)
        if self.auth is not None:
            self.auth.count_refusal(identity.name, f"rpc/{AGENT_SERVICE}/{method}", refusal)
        raise PermissionDenied(refusal)

    @grpc_stream_errors
    def FetchArtifact(self, request: pb.FetchArtifactRequest,
                      context: grpc.ServicerContext) -> Iterator[pb.ArtifactChunk]:
        identity = current_identity() or LOCAL
        self._permit(identity, artifact_refusal(identity, request.model_name), "FetchArtifact")
        if self.artifacts is None:
            raise Unavailable("this collector keeps no model artifacts")
        yield from artifact_chunks(self.store.read(), self.artifacts, request.model_name, request.version,
                                   self.limits)


class OpsServicer(RolloutOps, GovernanceOps, ShadowOps, DataOps, pb_grpc.OpsServiceServicer):
    """Every reply stays within ``max_reply_bytes``: list calls page (``collector.store.paging``), Status
    and Drift leave out their least relevant entries (they have no page token)."""

    def __init__(self, store: Store, agents: AgentServicer, auth: AuthInterceptor,
                 evaluator: DriftEvaluator, registry: Registry, *,
                 max_reply_bytes: int = paging.DEFAULT_MAX_REPLY_BYTES) -> None:
        self.store = store
        self.agents = agents
        self.auth = auth
        self.evaluator = evaluator
        self.registry = registry
        self.max_reply_bytes = max_reply_bytes
        self._version = package_version()

    @grpc_errors
    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        counters = self.store.counters
        reply = pb.StatusResponse(
            models=self.store.model_totals(), collector_version=self._version,
            counters=pb.CollectorCounters(
                windows_stored=counters.get("windows_stored", 0),
                windows_duplicate=counters.get("windows_duplicate", 0),
                windows_rejected=self.agents.windows_rejected,
                auth_failures=self.auth.failures,
                write_queue_depth=self.store.queue_depth(),
            ),
        )
        # Runs are never deleted: past the budget the oldest runs are left out (no page token here).
        page = paging.take(self.store.agent_rows(), "agents", max_bytes=self.max_reply_bytes,
                           used=reply.ByteSize())
        if page.next_token:
            log.warning("status lists the %d most recent agent runs; older runs are left out (reply budget "
                        "%d bytes)", len(page.items), self.max_reply_bytes)
        for agent in sorted(page.items, key=lambda a: (a.agent_id, a.restarts)):
            agent.connected = self.agents.live.connected(agent.agent_id, agent.run_id)
            if not agent.connected:  # its stream's collector stopped or died: no one holds it
                agent.collector_id = ""
            reply.agents.append(agent)
        self._fleet_state(reply)
        return reply

    def _fleet_state(self, reply: pb.StatusResponse) -> None:
        """The collectors sharing the database and the leases of the background loops (few rows: outside
        the reply budget)."""
        reply.collector_id = self.agents.fleet.id
        now = time.time_ns()
        for c in self.agents.fleet.members(now):
            reply.collectors.add(collector_id=c["id"], address=c["address"], started_unix_nano=c["started_ns"],
                                 heartbeat_unix_nano=c["heartbeat_ns"], live=c["live"], stopped=c["stopped"])
        for lease in leases.holders(self.store.read(), now):
            reply.leases.add(name=lease["name"], holder=lease["holder"], expires_unix_nano=lease["expires_ns"],
                             live=lease["live"])

    @grpc_errors
    def ListWindows(self, request: pb.ListWindowsRequest, context: grpc.ServicerContext) -> pb.ListWindowsResponse:
        if not request.model_name:
            raise InvalidArgument("model_name is required (outrider windows --model NAME)")
        if request.limit > MAX_LIST_LIMIT:
            raise InvalidArgument(f"limit {request.limit} is over the maximum of {MAX_LIST_LIMIT}")
        after = paging.cursor("windows", request.page_token, (int, int, int))
        limit = request.limit or DEFAULT_LIST_LIMIT
        rows = self.store.window_rows(request.model_name, request.model_version, request.since_unix_nano,
                                      request.include_summaries, after=after, limit=limit)
        page = paging.take(rows, "windows", max_bytes=self.max_reply_bytes, limit=limit)
        return pb.ListWindowsResponse(windows=page.items, next_page_token=page.next_token)

    @grpc_errors
    def AttachProfile(self, request: pb.AttachProfileRequest,
                      context: grpc.ServicerContext) -> pb.AttachProfileResponse:
        validate_model_key(request.model_name, request.model_version, self.agents.limits)
        if not request.HasField("profile"):
            raise InvalidArgument("profile is required (outrider attach MODEL VERSION PROFILE.pb)")
        validate_profile(request.profile, self.agents.limits)
        # a profile whose columns the traffic lacks would compare nothing: refused here, changing nothing
        warnings = self.registry.profile_fit(request.model_name, request.model_version, request.profile)
        identity = current_identity()
        replaced = self.store.attach_profile(request.model_name, request.model_version, request.profile,
                                             identity.name if identity else "unknown", time.time_ns())
        log.info("reference profile of %s %s attached by %s (%d columns, %d rows)%s", request.model_name,
                 request.model_version, identity.name if identity else "?", len(request.profile.columns),
                 request.profile.rows, ", replacing the previous one" if replaced else "")
        for warning in warnings:
            log.warning("reference profile of %s %s: %s", request.model_name, request.model_version, warning)
        self.agents.rollouts.push_reference(request.model_name, request.model_version)
        self.agents.fleet.announce_reference(request.model_name, request.model_version)
        return pb.AttachProfileResponse(model_name=request.model_name, model_version=request.model_version,
                                        columns=len(request.profile.columns), replaced=replaced,
                                        warnings=warnings)


    # --- drift ---------------------------------------------------------------------------

    def _versions(self, model_name: str, model_version: str) -> list[str]:
        if not model_name:
            raise InvalidArgument("model_name is required (outrider drift MODEL)")
        versions = [v for n, v in self.store.profiles() if n == model_name]
        if model_version:
            return [model_version]
        if not versions:
            raise NotFound(f"model {model_name!r} has no reference profile; "
                           f"attach one with: outrider attach {model_name} VERSION PROFILE")
        return versions

    @grpc_errors
    def Drift(self, request: pb.DriftRequest, context: grpc.ServicerContext) -> pb.DriftResponse:
        """The latest evaluation of each version, then history, newest first, while it fits the reply
        budget (history past it is left out: DriftResponse has no page token)."""
        db = self.store.read()
        versions = self._versions(request.model_name, request.model_version)

        def latest() -> Iterator[tuple[tuple, pb.DriftEvaluation]]:
            for version in versions:
                found = alerts.history(db, request.model_name, version, 1)
                # never evaluated yet: say why now, without recording
                yield (), found[0] if found else self.evaluator.evaluate(request.model_name, version, record=False)

        page = paging.take(latest(), "drift", max_bytes=self.max_reply_bytes)
        if page.next_token:
            log.warning("drift of %s: the latest evaluations of %d of %d versions fit the reply budget (%d bytes)",
                        request.model_name, len(page.items), len(versions), self.max_reply_bytes)
            versions = versions[:len(page.items)]
        reply = pb.DriftResponse(latest=page.items)
        wanted = request.history or 20
        for version in versions:
            rows = itertools.islice(alerts.history_rows(db, request.model_name, version, limit=wanted + 1), 1, None)
            page = paging.take(rows, "drift", max_bytes=self.max_reply_bytes, limit=wanted,
                               used=reply.ByteSize(), at_least_one=False)
            reply.history.extend(page.items)
            if page.next_token and len(page.items) < wanted:
                log.warning("drift of %s %s: %d of %d evaluations of history fit the reply budget (%d bytes)",
                            request.model_name, version, len(page.items), wanted, self.max_reply_bytes)
                break
        return reply

    @grpc_errors
    def EvaluateDrift(self, request: pb.DriftRequest, context: grpc.ServicerContext) -> pb.DriftResponse:
        versions = self._versions(request.model_name, request.model_version)
        return pb.DriftResponse(latest=[self.evaluator.evaluate(request.model_name, v) for v in versions])

    @grpc_errors
    def ListAlerts(self, request: pb.ListAlertsRequest, context: grpc.ServicerContext) -> pb.ListAlertsResponse:
        if request.limit > MAX_LIST_LIMIT:
            raise InvalidArgument(f"limit {request.limit} is over the maximum of {MAX_LIST_LIMIT}")
        (before,) = paging.cursor("alerts", request.page_token, (int,)) or (0,)
        limit = request.limit or DEFAULT_LIST_LIMIT
        rows = alerts.alert_rows(self.store.read(), request.model_name, request.include_resolved, before_id=before,
                                 limit=limit)
        page = paging.take(rows, "alerts", max_bytes=self.max_reply_bytes, limit=limit)
        return pb.ListAlertsResponse(alerts=page.items, next_page_token=page.next_token)

    @grpc_errors
    def AckAlert(self, request: pb.AckAlertRequest, context: grpc.ServicerContext) -> pb.Alert:
        identity = current_identity()
        actor = identity.name if identity else "unknown"
        acked = self.store.write(lambda db: alerts.acknowledge(db, request.id, actor, request.note, time.time_ns()))
        log.info("alert %d acknowledged by %s", request.id, actor)
        return acked

    @grpc_errors
    def GetDriftConfig(self, request: pb.DriftConfigRequest,
                       context: grpc.ServicerContext) -> pb.DriftConfigResponse:
        validate_model_key(request.model_name, "-", self.agents.limits)
        config, is_default = alerts.get_config(self.store.read(), request.model_name)
        return pb.DriftConfigResponse(model_name=request.model_name, config_json=json.dumps(config.to_dict()),
                                      is_default=is_default)

    @grpc_errors
    def SetDriftConfig(self, request: pb.DriftConfigRequest,
                       context: grpc.ServicerContext) -> pb.DriftConfigResponse:
        validate_model_key(request.model_name, "-", self.agents.limits)
        config = alerts.parse_config(request.config_json)
        identity = current_identity()
        actor = identity.name if identity else "unknown"
        self.store.write(lambda db: alerts.set_config(db, request.model_name, config, actor, time.time_ns()))
        log.info("drift policy of %s set by %s: %s", request.model_name, actor, config.to_dict())
        return pb.DriftConfigResponse(model_name=request.model_name, config_json=json.dumps(config.to_dict()),
                                      is_default=False)

    # --- audit ---------------------------------------------------------------------------

    @grpc_errors
    def ListAudit(self, request: pb.ListAuditRequest, context: grpc.ServicerContext) -> pb.ListAuditResponse:
        if request.limit > MAX_LIST_LIMIT:
            raise InvalidArgument(f"limit {request.limit} is over the maximum of {MAX_LIST_LIMIT}")
        (before,) = paging.cursor("audit", request.page_token, (int,)) or (0,)
        limit = request.limit or DEFAULT_LIST_LIMIT
        rows = audit.entry_rows(self.store.read(), request.model_name, before_id=before, limit=limit)
        page = paging.take(rows, "audit", max_bytes=self.max_reply_bytes, limit=limit)
        return pb.ListAuditResponse(entries=page.items, next_page_token=page.next_token)

    @grpc_errors
    def VerifyAudit(self, request: pb.VerifyAuditRequest, context: grpc.ServicerContext) -> pb.VerifyAuditResponse:
        result = audit.verify(self.store.read())
        return pb.VerifyAuditResponse(ok=result.ok, entries=result.entries, first_broken_id=result.first_broken_id,
                                      problem=result.problem)


class RollupLoop:
    """Merges old windows into coarser levels every ``interval`` seconds, on its own thread,
    then runs ``housekeeping`` (removing retired versions' artifacts past their retention, forgetting
    collectors long gone),
    while it holds ``lease`` (several collectors on one database: one of them rolls up)."""

    def __init__(self, store: Store, policy: RetentionPolicy, interval: float,
                 housekeeping: Callable[[int], Any] | None = None, lease: Lease | None = None) -> None:
        self.store = store
        self.lease = lease
        self.policy = policy
        self.interval = interval
        self.housekeeping = housekeeping  # also run each pass, with the time (e.g. removing retired artifacts)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outrider-rollup", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.lease is not None and not self.lease.hold():
                continue  # another collector rolls up this time
            try:
                self.store.rollup(time.time_ns(), self.policy)
            except Exception:  # keep rolling up next time; the windows stay where they are
                log.exception("rollup failed")
            if self.housekeeping is not None:
                try:
                    self.housekeeping(time.time_ns())
                except Exception:  # try again next pass
                    log.exception("housekeeping (retired artifacts, departed collectors) failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.lease is not None:
            self.lease.release()


class CollectorServer:
    """A running collector: its bound ``port``, and ``stop`` for a graceful shutdown."""

    def __init__(self, server: grpc.Server, agents: AgentServicer, health_servicer: health.HealthServicer,
                 rollup: RollupLoop, store: Store, auth: AuthInterceptor, host: str, port: int) -> None:
        self.server = server
        self.agents = agents
        self.health = health_servicer
        self.rollup = rollup
        self.store = store
        self.auth = auth
        self.host = host
        self.port = port
        self.evaluation: EvaluationLoop | None = None
        self.webhook: Webhook | None = None
        self.registry: Registry | None = None
        self.web: Any = None  # the read-only web page (collector.web), when serving one
        self._stop_lock = threading.Lock()
        self._stopped = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, grace: float | None = 10.0) -> None:
        """NOT_SERVING; agent streams ack what is in flight and end; other calls get ``grace``
        seconds; then the store drains its queue and commits."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self.health.enter_graceful_shutdown()
        if self.web is not None:  # it reads the store: stop it first
            self.web.stop()
        self.agents.shutting_down.set()
        self.agents.live.drain()
        self.server.stop(grace).wait()
        self.rollup.stop()
        if self.evaluation is not None:
            self.evaluation.stop()
        if self.webhook is not None:
            self.webhook.close()
        self.agents.fleet.stop()  # after the loops released their leases: no heartbeat from here on
        self.auth.close()  # the refusals it holds become audit rows
        self.store.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped; False if ``timeout`` passed first."""
        return self.server.wait_for_termination(timeout)


def serve_collector(db_path: str | Path, listen: str = "127.0.0.1:50051", *, auth: AuthConfig | None = None,
                    tls: TLSFiles | None = None, retention: RetentionPolicy = RetentionPolicy(),
                    rollup_interval: float = 60.0, limits: Limits | None = None, max_agents: int = 256,
                    retry_after_ms: int = 1000, max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES,
                    store: Store | None = None, drift_interval: float = 60.0,
                    evaluation_keep_seconds: float = 7 * 86400.0, webhook: Webhook | None = None,
                    gate_policy: GatePolicy = GatePolicy(),
                    retired_artifact_retention: float = DEFAULT_RETIRED_ARTIFACT_RETENTION,
                    retrain_after_evaluations: int = 10, rollback_watch_seconds: float = 3600.0,
                    rollback_action: str = "request", metrics: Any = None,
                    http: str | None = None,
                    max_reply_bytes: int = paging.DEFAULT_MAX_REPLY_BYTES,
                    synchronous: str = "FULL", collector_id: str = "", heartbeat_interval: float = 5.0,
                    heartbeat_timeout: float | None = None, resync_interval: float = 10.0,
                    lease_ttl: float | None = None) -> CollectorServer:
    """Open the store at ``db_path`` (or take ``store``, which is then the server's to close)
    and serve on ``listen`` (port 0 picks one). ``metrics`` (a ``collector.api.metrics.CollectorMetrics``)
    is bound to this collector's parts, for its /metrics.

    Drift is evaluated every ``drift_interval`` seconds (0: only on demand);
    evaluations older than ``evaluation_keep_seconds`` are pruned; alerts that
    open or resolve go to ``webhook``. Registered model versions' artifacts live
    beside the database (``collector.lifecycle.registry``); ``gate_policy`` sets the gate's tolerances.
    Retired versions' artifacts are removed ``retired_artifact_retention`` seconds after their
    retirement (by the rollup loop). A drift alert open for ``retrain_after_evaluations``
    consecutive evaluations opens a retraining request (0: never). Severe degradation within
    ``rollback_watch_seconds`` of a promotion (0: never) requests a rollback, or makes it when
    ``rollback_action`` is "act" (``collector.lifecycle.rollback_policy``).

    ``synchronous`` is the store's SQLite setting (``collector.store.store``): FULL (acked windows are on
    disk) or NORMAL (may lose acked windows on power loss); it does not apply to a given ``store``.

    Without ``auth`` every caller is trusted: the caller (the CLI) makes sure
    ``listen`` is a loopback address then. ``http`` (HOST:PORT) also serves the read-only web
    page there (``collector.web``; loopback only without ``auth``). Operators' replies stay within
    ``max_reply_bytes`` (list calls continue with page tokens: ``collector.store.paging``). Raises ``OSError`` when the address
    cannot be bound. Signal handling is left to the caller.

    Several collectors may share one PostgreSQL database (``collector.api.fleet``): each has a
    ``collector_id`` (default host:pid-random) and a heartbeat every ``heartbeat_interval`` seconds; runs
    streaming to a collector whose heartbeat is older than ``heartbeat_timeout`` (default 3 intervals) are
    not connected; rollouts made through other collectors are also resynced every ``resync_interval``
    seconds; the rollup and evaluation loops run only while they hold their lease, which lapses
    ``lease_ttl`` seconds after its last renewal (default: 3 of the longer loop interval) and then passes
    to another collector.
    """
    store = store if store is not None else Store(db_path, synchronous=synchronous)
    refusals = audit.AuthFailureLog(store.submit)  # aggregated per caller and minute; flushed by its thread
    try:
        interceptor = AuthInterceptor(auth, on_refusal=refusals)
        agents = AgentServicer(store, limits=limits or Limits(), max_agents=max_agents, retry_after_ms=retry_after_ms,
                               auth=interceptor, collector_id=collector_id)
        if metrics is not None:
            metrics.watch(store, agents, interceptor)
        health_servicer = health.HealthServicer()
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_agents + OPS_THREADS, thread_name_prefix="outrider-collector"),
            # Authenticate first, so a refused caller's body is never parsed; then bodies that do not
            # decode are INVALID_ARGUMENT in one log line (agent.guard), not gRPC's traceback and INTERNAL.
            interceptors=[interceptor, DecodeGuard()],
            options=[
                ("grpc.max_receive_message_length", max_receive_bytes),
                ("grpc.so_reuseport", 0),  # a second collector on a busy port must fail, not share it
                # Agent streams live for days: find dead peers, and allow agents' keepalive pings.
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        pb_grpc.add_AgentServiceServicer_to_server(agents, server)
        evaluator = DriftEvaluator(store, webhook, retrain_after_evaluations=retrain_after_evaluations,
                                   rollback=RollbackPolicy(rollback_watch_seconds, rollback_action))
        evaluator.push_rollout = agents.rollouts.push_rollout  # a rollback made by policy reaches the agents
        evaluator.connected = agents.live.connected  # which agents serve a version now (alerts of unserved ones)
        agents.spans = evaluator.spans  # windows stored here are merged at ingest, not read again
        registry = Registry(store, policy=gate_policy, limits=agents.limits)
        agents.artifacts = registry.artifacts
        ops = OpsServicer(store, agents, interceptor, evaluator, registry, max_reply_bytes=max_reply_bytes)
        pb_grpc.add_OpsServiceServicer_to_server(ops, server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        try:
            port = (server.add_secure_port(listen, tls.server_credentials()) if tls
                    else server.add_insecure_port(listen))
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {listen}: {exc}") from None
        if port == 0:  # older grpcio reports a failed bind as port 0
            raise OSError(f"cannot listen on {listen}")
    except BaseException:
        store.close()
        raise
    host = listen.rsplit(":", 1)[0]
    try:
        # heartbeat before any stream says hello here
        agents.fleet.start(f"{host}:{port}", heartbeat_interval=heartbeat_interval,
                           heartbeat_timeout=heartbeat_timeout, resync_interval=resync_interval)
    except BaseException:
        store.close()
        raise
    for service in ("", *SERVICES):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    refusals.start()
    server.start()
    rollup = RollupLoop(store, retention, rollup_interval,
                        housekeeping=lambda now: (registry.remove_retired_artifacts(retired_artifact_retention, now),
                                                  agents.fleet.prune(now)),
                        lease=agents.fleet.lease(leases.BACKGROUND, lease_ttl or 3 * rollup_interval))
    evaluation = (EvaluationLoop(evaluator, drift_interval, evaluation_keep_seconds,
                                 lease=agents.fleet.lease(leases.BACKGROUND, lease_ttl or 3 * drift_interval))
                  if drift_interval > 0 else None)
    log.info("collector listening on %s:%d (db %s, %s)", host, port, db_path,
             "tokens required" if auth else "unauthenticated, loopback")
    running = CollectorServer(server, agents, health_servicer, rollup, store, interceptor, host, port)
    running.evaluation, running.webhook = evaluation, webhook
    running.registry = registry
    if http:  # the read-only web page, on its own threads (collector.web)
        from collector.web import start_web

        try:
            running.web = start_web(http, store, auth, interceptor, agents, tls)
        except BaseException:
            running.stop(grace=0)
            raise
    return running
