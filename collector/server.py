"""The collector's gRPC endpoint: AgentService (window streams) and OpsService (queries).

(The work of one agent stream, and the set of live streams, is in collector/streams.py.)

Servicers only convert messages and call the plain core (``collector.store``,
``collector.ingest``); the one error hierarchy in ``agent.errors`` becomes
gRPC statuses through ``grpc_errors`` / ``grpc_stream_errors``.

An agent stream is read by its own thread while the handler thread sends
replies, so acks (sent only once the store has committed the windows) never
wait for the next request and reading never waits for a commit.
"""
from __future__ import annotations

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

from agent.errors import (InvalidArgument, NotFound, ResourceExhausted, Unavailable,
                          grpc_errors, grpc_stream_errors)
from agent.hello import package_version
from collector import alerts, audit
from collector.auth import AuthConfig, AuthInterceptor, TLSFiles, current_identity
from collector.ingest import Limits, validate_hello, validate_model_key, validate_profile
from collector.streams import AgentStream, LiveStreams, read_hello
from collector.rollup import RetentionPolicy
from collector.evaluation import DriftEvaluator, EvaluationLoop
from collector.gate import GatePolicy
from collector.data_ops import DataOps
from collector.governance_ops import GovernanceOps
from collector.rollout import RolloutPusher, artifact_chunks
from collector.rollout_ops import RolloutOps
from collector.rollback_policy import RollbackPolicy
from collector.shadow_ops import ShadowOps
from collector.registry import ArtifactStore, Registry
from collector.store import Store
from collector.webhook import Webhook
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
    def __init__(self, store: Store, *, limits: Limits, max_agents: int, retry_after_ms: int,
                 max_in_flight: int = 64) -> None:
        self.store = store
        self.limits = limits
        self.max_agents = max_agents
        self.max_in_flight = max_in_flight  # ack messages per stream not yet sent
        self.retry_after_ms = retry_after_ms
        self.live = LiveStreams()
        self.rollouts = RolloutPusher(store, self.live, limits)  # commands to managed agents
        self.artifacts: ArtifactStore | None = None  # the registry's, for FetchArtifact (set by serve_collector)
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
        try:
            self.store.record_hello(hello, time.time_ns())
        except ResourceExhausted as exc:
            raise self.retry_later(exc) from None
        stream = AgentStream(self, hello, requests)
        self.live.add(stream)
        if not context.add_callback(stream.gone):
            stream.close()
            return
        identity = current_identity()
        log.info("agent %s run %s (%s %s) connected as %s", hello.agent_id, hello.run_id, hello.model_name,
                 hello.model_version, identity.name if identity else "?")
        if hello.managed:  # after live.add: a change committed from now on reaches this stream too
            self.rollouts.hello(stream)
        threading.Thread(target=stream.read, name=f"outrider-stream-{hello.agent_id}", daemon=True).start()
        yield from stream.replies()

    @grpc_stream_errors
    def FetchArtifact(self, request: pb.FetchArtifactRequest,
                      context: grpc.ServicerContext) -> Iterator[pb.ArtifactChunk]:
        if self.artifacts is None:
            raise Unavailable("this collector keeps no model artifacts")
        yield from artifact_chunks(self.store.read(), self.artifacts, request.model_name, request.version,
                                   self.limits)


class OpsServicer(RolloutOps, GovernanceOps, ShadowOps, DataOps, pb_grpc.OpsServiceServicer):
    def __init__(self, store: Store, agents: AgentServicer, auth: AuthInterceptor,
                 evaluator: DriftEvaluator, registry: Registry) -> None:
        self.store = store
        self.agents = agents
        self.auth = auth
        self.evaluator = evaluator
        self.registry = registry
        self._version = package_version()

    @grpc_errors
    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        agents = self.store.agents()
        for agent in agents:
            agent.connected = self.agents.live.connected(agent.agent_id, agent.run_id)
        counters = self.store.counters
        return pb.StatusResponse(
            agents=agents, models=self.store.model_totals(), collector_version=self._version,
            counters=pb.CollectorCounters(
                windows_stored=counters.get("windows_stored", 0),
                windows_duplicate=counters.get("windows_duplicate", 0),
                windows_rejected=self.agents.windows_rejected,
                auth_failures=self.auth.failures,
                write_queue_depth=self.store.queue_depth(),
            ),
        )

    @grpc_errors
    def ListWindows(self, request: pb.ListWindowsRequest, context: grpc.ServicerContext) -> pb.ListWindowsResponse:
        if not request.model_name:
            raise InvalidArgument("model_name is required (outrider windows --model NAME)")
        if request.limit > MAX_LIST_LIMIT:
            raise InvalidArgument(f"limit {request.limit} is over the maximum of {MAX_LIST_LIMIT}")
        windows = self.store.windows(request.model_name, request.model_version, since_ns=request.since_unix_nano,
                                     limit=request.limit or DEFAULT_LIST_LIMIT,
                                     include_summaries=request.include_summaries)
        return pb.ListWindowsResponse(windows=windows)

    @grpc_errors
    def AttachProfile(self, request: pb.AttachProfileRequest,
                      context: grpc.ServicerContext) -> pb.AttachProfileResponse:
        validate_model_key(request.model_name, request.model_version, self.agents.limits)
        if not request.HasField("profile"):
            raise InvalidArgument("profile is required (outrider attach MODEL VERSION PROFILE.pb)")
        validate_profile(request.profile, self.agents.limits)
        identity = current_identity()
        replaced = self.store.attach_profile(request.model_name, request.model_version, request.profile,
                                             identity.name if identity else "unknown", time.time_ns())
        log.info("reference profile of %s %s attached by %s (%d columns, %d rows)%s", request.model_name,
                 request.model_version, identity.name if identity else "?", len(request.profile.columns),
                 request.profile.rows, ", replacing the previous one" if replaced else "")
        return pb.AttachProfileResponse(model_name=request.model_name, model_version=request.model_version,
                                        columns=len(request.profile.columns), replaced=replaced)


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
        reply = pb.DriftResponse()
        db = self.store.read()
        for version in self._versions(request.model_name, request.model_version):
            past = alerts.history(db, request.model_name, version, (request.history or 20) + 1)
            if not past:  # never evaluated yet: say why now, without recording
                past = [self.evaluator.evaluate(request.model_name, version, record=False)]
            reply.latest.append(past[0])
            reply.history.extend(past[1:])
        return reply

    @grpc_errors
    def EvaluateDrift(self, request: pb.DriftRequest, context: grpc.ServicerContext) -> pb.DriftResponse:
        versions = self._versions(request.model_name, request.model_version)
        return pb.DriftResponse(latest=[self.evaluator.evaluate(request.model_name, v) for v in versions])

    @grpc_errors
    def ListAlerts(self, request: pb.ListAlertsRequest, context: grpc.ServicerContext) -> pb.ListAlertsResponse:
        if request.limit > MAX_LIST_LIMIT:
            raise InvalidArgument(f"limit {request.limit} is over the maximum of {MAX_LIST_LIMIT}")
        return pb.ListAlertsResponse(alerts=alerts.alerts(self.store.read(), request.model_name,
                                                          request.include_resolved, request.limit or 1000))

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
        return pb.ListAuditResponse(entries=audit.entries(self.store.read(), request.model_name,
                                                          request.limit or DEFAULT_LIST_LIMIT))

    @grpc_errors
    def VerifyAudit(self, request: pb.VerifyAuditRequest, context: grpc.ServicerContext) -> pb.VerifyAuditResponse:
        result = audit.verify(self.store.read())
        return pb.VerifyAuditResponse(ok=result.ok, entries=result.entries, first_broken_id=result.first_broken_id,
                                      problem=result.problem)


class RollupLoop:
    """Merges old windows into coarser levels every ``interval`` seconds, on its own thread,
    then runs ``housekeeping`` (the removal of retired versions' artifacts past their retention)."""

    def __init__(self, store: Store, policy: RetentionPolicy, interval: float,
                 housekeeping: Callable[[int], Any] | None = None) -> None:
        self.store = store
        self.policy = policy
        self.interval = interval
        self.housekeeping = housekeeping  # also run each pass, with the time (e.g. removing retired artifacts)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outrider-rollup", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.rollup(time.time_ns(), self.policy)
            except Exception:  # keep rolling up next time; the windows stay where they are
                log.exception("rollup failed")
            if self.housekeeping is not None:
                try:
                    self.housekeeping(time.time_ns())
                except Exception:  # try again next pass
                    log.exception("removing retired model artifacts failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


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
                    http: str | None = None, synchronous: str = "FULL") -> CollectorServer:
    """Open the store at ``db_path`` (or take ``store``, which is then the server's to close)
    and serve on ``listen`` (port 0 picks one). ``metrics`` (a ``collector.metrics.CollectorMetrics``)
    is bound to this collector's parts, for its /metrics.

    Drift is evaluated every ``drift_interval`` seconds (0: only on demand);
    evaluations older than ``evaluation_keep_seconds`` are pruned; alerts that
    open or resolve go to ``webhook``. Registered model versions' artifacts live
    beside the database (``collector.registry``); ``gate_policy`` sets the gate's tolerances.
    Retired versions' artifacts are removed ``retired_artifact_retention`` seconds after their
    retirement (by the rollup loop). A drift alert open for ``retrain_after_evaluations``
    consecutive evaluations opens a retraining request (0: never). Severe degradation within
    ``rollback_watch_seconds`` of a promotion (0: never) requests a rollback, or makes it when
    ``rollback_action`` is "act" (``collector.rollback_policy``).

    ``synchronous`` is the store's SQLite setting (``collector.store``): FULL (acked windows are on
    disk) or NORMAL (may lose acked windows on power loss); it does not apply to a given ``store``.

    Without ``auth`` every caller is trusted: the caller (the CLI) makes sure
    ``listen`` is a loopback address then. ``http`` (HOST:PORT) also serves the read-only web
    page there (``collector.web``; loopback only without ``auth``). Raises ``OSError`` when the address
    cannot be bound. Signal handling is left to the caller.
    """
    store = store if store is not None else Store(db_path, synchronous=synchronous)
    try:
        interceptor = AuthInterceptor(auth, on_refusal=audit.AuthFailureLog(store.submit))
        agents = AgentServicer(store, limits=limits or Limits(), max_agents=max_agents, retry_after_ms=retry_after_ms)
        if metrics is not None:
            metrics.watch(store, agents, interceptor)
        health_servicer = health.HealthServicer()
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_agents + OPS_THREADS, thread_name_prefix="outrider-collector"),
            interceptors=[interceptor],
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
        registry = Registry(store, policy=gate_policy, limits=agents.limits)
        agents.artifacts = registry.artifacts
        pb_grpc.add_OpsServiceServicer_to_server(OpsServicer(store, agents, interceptor, evaluator, registry), server)
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
    for service in ("", *SERVICES):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    server.start()
    rollup = RollupLoop(store, retention, rollup_interval,
                        housekeeping=lambda now: registry.remove_retired_artifacts(retired_artifact_retention, now))
    evaluation = EvaluationLoop(evaluator, drift_interval, evaluation_keep_seconds) if drift_interval > 0 else None
    host = listen.rsplit(":", 1)[0]
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
