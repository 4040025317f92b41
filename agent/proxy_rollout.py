"""A managed proxy: the collector names the model version, the upstream loads it, the proxy monitors it.

``outrider agent proxy --managed`` says so in its Hello, as a managed agent does (``agent.rollout``),
and the collector sends it the same commands. ``ProxyRollout`` carries out each on its own thread:

- ``serve`` (a promotion or rollback, naming registry version V): ask the upstream to load the model
  through the OIP model-repository extension (``RepositoryModelLoad`` of
  ``inference.GRPCInferenceService``: Triton's, and MLServer 1.7's on the same service; over REST,
  ``POST /v2/repository/models/{name}/load``, when the proxy forwards REST alone), wait until
  ``ModelReady`` says the upstream's version U of it is ready (U = ``--upstream-version`` with
  ``{version}`` replaced by V: by default U is V), read U's metadata, and only then switch what the
  proxy monitors to V (windows carry model_version V, columns named as the registry names them) and
  pin the model's inference calls that name no version to U (``ProxyMonitor.pin``). Any failure
  (the upstream's error, a version it does not hold, a schema that does not fit) answers ok=false
  with the reason, and the version monitored and pinned before goes on: nothing is half-switched.
- ``reference``: kept per version, given to the version's session, as a managed agent does.
- ``shadow``: refused (the upstream runs the model; the proxy has no second model to run);
  ``unshadow``: nothing runs, so nothing to stop.

Why pinned: the upstream's default version is its own rule (MLServer and Triton serve the highest
version loaded), so after a rollback to V-1 unversioned calls would still reach V; and the extension's
Unload names a model, not a version (both servers unload every version), so the proxy cannot make V-1
the default by unloading V. Pinning adds the version to the request and changes nothing else; calls
that name a version pass unchanged (and are summarised only when it is the one served).

The version is not remembered across restarts: until the collector names one (on the Hello, when the
model has a production version), calls pass through unpinned and unmonitored (``no_schema``).
"""
from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
import uuid
from typing import Any
from urllib.parse import quote

import grpc

from agent.errors import FailedPrecondition, InvalidArgument, OutriderError, Unavailable
from agent.proxy import ProxyMonitor
from agent.reference import REFERENCE, from_command
from agent.rollout import MAX_REFERENCES, AgentSink, parse_serve
from protos import collector_pb2
from protos import open_inference_pb2 as pb

log = logging.getLogger(__name__)

DEFAULT_VERSION_TEMPLATE = "{version}"
DEFAULT_LOAD_TIMEOUT = 300.0
READY_POLL_SECONDS = 0.2


def upstream_version(template: str, version: str, model: str) -> str:
    """The upstream's version string for registry ``version`` of ``model`` (``--upstream-version``)."""
    try:
        named = template.format(version=version, model=model)
    except (KeyError, IndexError, ValueError) as exc:
        raise InvalidArgument(f"--upstream-version {template!r} cannot be filled in ({exc!r}); use {{version}} "
                              "and {model}, doubling other braces") from None
    if not named or not named.isprintable() or len(named) > 128:
        raise InvalidArgument(f"--upstream-version {template!r} gives {named!r} for version {version}; "
                              "expected 1 to 128 printable characters")
    return named


def check_template(template: str) -> str:
    """``template`` when it names the version (a template without it would give every version one name)."""
    if "{version}" not in template:
        raise InvalidArgument(f"--upstream-version {template!r} does not contain {{version}}; e.g. '{{version}}' "
                              "or 'v{version}'")
    upstream_version(template, "1", "model")
    return template


class _Repository:
    """What both protocols' repositories share: waiting until a loaded version is ready."""

    address: str
    call: Any = None  # a load in flight that ``close`` can cancel (gRPC only)

    def ready(self, name: str, version: str) -> bool:
        raise NotImplementedError

    def listed(self, name: str) -> list[Any] | None:
        """The repository index's entries of ``name`` (``.version``, ``.state``, ``.reason``); None: no index."""
        raise NotImplementedError

    def wait_ready(self, name: str, version: str, timeout: float) -> None:
        """Return once the upstream says ``version`` of ``name`` is ready; raise saying why it is not,
        at once when its index lists no such version or lists it UNAVAILABLE with a reason."""
        deadline = time.monotonic() + timeout
        while not self.ready(name, version):
            entries = self.listed(name)
            if entries is not None:
                found = [m for m in entries if m.version == version]
                if not found:
                    # a version the upstream cannot serve says so (Triton lists one whose folder is gone);
                    # MLServer's gRPC says "State.READY"
                    held = sorted({m.version + ("" if m.state.upper().rsplit(".", 1)[-1] in ("", "READY")
                                                else f" ({m.state})") for m in entries if m.version}) or ["none"]
                    raise FailedPrecondition(f"upstream {self.address} loaded model '{name}' but lists no version "
                                             f"{version!r} of it (it lists: {', '.join(held)}); add it to the "
                                             "upstream's repository (Triton: and to its version_policy), or map "
                                             "registry versions with --upstream-version")
                if found[0].state.upper() == "UNAVAILABLE" and found[0].reason:
                    raise FailedPrecondition(f"upstream {self.address} could not load model '{name}' version "
                                             f"{version}: {found[0].reason}")
            if time.monotonic() >= deadline:
                raise Unavailable(f"upstream {self.address} did not make model '{name}' version {version} ready "
                                  f"within {timeout:g} s (--upstream-load-timeout-seconds)")
            time.sleep(READY_POLL_SECONDS)


def repository_of(upstream: Any) -> _Repository:
    """The model-repository extension of the proxy's upstream: over gRPC when the proxy forwards gRPC
    (``--upstream``), else over REST (``--upstream-http`` alone)."""
    channel = getattr(upstream, "channel", None)
    return UpstreamRepository(channel, upstream.address) if channel is not None else RestRepository(upstream)


class UpstreamRepository(_Repository):
    """The upstream's model-repository extension, over the proxy's gRPC channel to it."""

    def __init__(self, channel: grpc.Channel, address: str) -> None:
        self.address = address
        prefix = "/inference.GRPCInferenceService/"
        self._load = channel.unary_unary(prefix + "RepositoryModelLoad",
                                         request_serializer=pb.RepositoryModelLoadRequest.SerializeToString,
                                         response_deserializer=pb.RepositoryModelLoadResponse.FromString)
        self._index = channel.unary_unary(prefix + "RepositoryIndex",
                                          request_serializer=pb.RepositoryIndexRequest.SerializeToString,
                                          response_deserializer=pb.RepositoryIndexResponse.FromString)
        self._ready = channel.unary_unary(prefix + "ModelReady",
                                          request_serializer=pb.ModelReadyRequest.SerializeToString,
                                          response_deserializer=pb.ModelReadyResponse.FromString)
        self.call: Any = None  # the load in flight (cancelled by close)

    def load(self, name: str, timeout: float) -> None:
        """Ask the upstream to load (or reload) ``name``; returns when it says it has, else raises saying why."""
        self.call = self._load.future(pb.RepositoryModelLoadRequest(model_name=name), timeout=timeout)
        try:
            self.call.result()
        except grpc.RpcError as err:
            code, details = err.code(), err.details() or ""
            if code is grpc.StatusCode.UNIMPLEMENTED:
                raise FailedPrecondition(f"upstream {self.address} does not speak the OIP model-repository "
                                         f"extension (RepositoryModelLoad: {details}); drop --managed, or put "
                                         "a server that does (Triton, MLServer) upstream") from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise Unavailable(f"upstream {self.address} is unreachable: {details}") from None
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                raise Unavailable(f"upstream {self.address} did not load model '{name}' within {timeout:g} s "
                                  "(--upstream-load-timeout-seconds)") from None
            raise FailedPrecondition(f"upstream {self.address} could not load model '{name}': "
                                     f"{code.name} {details}".rstrip()) from None
        finally:
            self.call = None

    def ready(self, name: str, version: str) -> bool:
        try:
            return self._ready(pb.ModelReadyRequest(name=name, version=version), timeout=5.0).ready
        except grpc.RpcError:
            return False

    def listed(self, name: str) -> list[pb.RepositoryIndexResponse.ModelIndex] | None:
        """The repository's entries of ``name`` (None: the upstream gives no index)."""
        try:
            index = self._index(pb.RepositoryIndexRequest(), timeout=5.0)
        except grpc.RpcError:
            return None
        return [m for m in index.models if m.name == name]

class _Entry:
    """One entry of a REST repository index (the JSON object's fields, as the gRPC message has them)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.name, self.version = str(doc.get("name", "")), str(doc.get("version", "") or "")
        self.state, self.reason = str(doc.get("state", "") or ""), str(doc.get("reason", "") or "")


class RestRepository(_Repository):
    """The same extension over HTTP/REST (``agent.proxy_rest.RestUpstream``): ``POST
    /v2/repository/models/{name}/load``, ``POST /v2/repository/index``, ``GET .../versions/{v}/ready``."""

    def __init__(self, upstream: Any) -> None:
        self.upstream, self.address = upstream, upstream.address

    def load(self, name: str, timeout: float) -> None:
        path = f"/v2/repository/models/{quote(name, safe='')}/load"
        try:
            status, body = self.upstream.request("POST", path, b"{}", timeout=timeout)
        except TimeoutError:
            raise Unavailable(f"upstream {self.address} did not load model '{name}' within {timeout:g} s "
                              "(--upstream-load-timeout-seconds)") from None
        except OSError as exc:
            raise Unavailable(f"upstream {self.address} is unreachable: {exc}") from None
        if status == 200:
            return
        said = f"HTTP {status} {_error_text(body)}".rstrip()
        if status in (404, 405, 501):  # no such model, or no such endpoint: the upstream's words tell which
            said += (" (a server without the OIP model-repository extension over REST answers so too: Triton and "
                     "MLServer have it; else drop --managed)")
        raise FailedPrecondition(f"upstream {self.address} could not load model '{name}': {said}")

    def ready(self, name: str, version: str) -> bool:
        try:
            path = f"/v2/models/{quote(name, safe='')}/versions/{quote(version, safe='')}/ready"
            return self.upstream.request("GET", path)[0] == 200
        except OSError:
            return False

    def listed(self, name: str) -> list[_Entry] | None:
        try:
            status, body = self.upstream.request("POST", "/v2/repository/index", b"{}")
            entries = json.loads(body) if status == 200 else None
        except (OSError, ValueError):
            return None
        if not isinstance(entries, list):
            return None
        return [_Entry(e) for e in entries if isinstance(e, dict) and e.get("name") == name]


def _error_text(body: bytes) -> str:
    """An OIP error body's message (``{"error": ...}``), else its first 200 characters."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return doc["error"][:500]
    return body[:200].decode("utf-8", "replace")


class ProxyRollout:
    """A managed proxy's exporter, command thread and answers; ``monitor`` is the proxy's.

    Open the proxy's sessions with ``session_options()`` (its agent id, run and ``sink``: one window
    sequence across versions, as ``agent.rollout.AgentSink`` numbers it for a managed agent)."""

    def __init__(self, model_name: str, collector: str, monitor: ProxyMonitor, upstream: Any, *,
                 agent_id: str | None = None, spool_dir: Any = None, token: str | None = None, tls: Any = None,
                 version_template: str = DEFAULT_VERSION_TEMPLATE, load_timeout: float = DEFAULT_LOAD_TIMEOUT,
                 exporter_options: dict[str, Any] | None = None) -> None:
        from agent.hello import open_exporter, package_version

        self.model_name, self.monitor, self.upstream = model_name, monitor, upstream
        self.template, self.load_timeout = check_template(version_template), load_timeout
        self.repository = repository_of(upstream)
        self.agent_id = agent_id or socket.gethostname()
        self.run_id = uuid.uuid4().hex
        hello = collector_pb2.Hello(agent_id=self.agent_id, run_id=self.run_id, host=socket.gethostname(),
                                    model_name=model_name, agent_version=package_version(),
                                    started_unix_nano=time.time_ns(), managed=True)
        self.exporter = open_exporter(collector, hello, spool_dir, token, tls, start=False,
                                      **(exporter_options or {}))
        self.sink = AgentSink(self.exporter)
        self._lock = threading.Lock()
        self._stats = {"commands": 0, "failed": 0, "swaps": 0}
        self._references: dict[str, Any] = {}  # version -> projection, oldest first
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self.exporter.on_command = self.submit
        self._worker = threading.Thread(target=self._work, name="outrider-proxy-rollout", daemon=True)
        self._worker.start()
        self.exporter.start()

    def session_options(self) -> dict[str, Any]:
        return {"agent_id": self.agent_id, "run_id": self.run_id, "sink": self.sink}

    # --- from the exporter's stream ---------------------------------------------------
    def submit(self, command: collector_pb2.Command) -> None:
        """Queue a command for the rollout thread (called on the stream's reading loop: no waiting)."""
        if not self._closed:
            self._commands.put(command)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    def _work(self) -> None:
        while True:
            command = self._commands.get()
            if command is None:
                return
            self._carry_out(command)

    def _carry_out(self, command: collector_pb2.Command) -> None:
        handlers = {"serve": self._serve, REFERENCE: self._reference, "shadow": self._shadow,
                    "unshadow": lambda args: None}
        error = ""
        try:
            handler = handlers.get(command.kind)
            if handler is None:
                raise InvalidArgument(f"unknown command kind {command.kind!r}; a managed proxy knows "
                                      f"{', '.join(handlers)}")
            handler(command.args)
        except OutriderError as exc:
            error = str(exc)
        except Exception as exc:  # a bug: answered, never left unanswered
            log.exception("collector command %s failed", command.id)
            error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        with self._lock:
            self._stats["commands"] += 1
            self._stats["failed"] += bool(error)
        if error:
            current = self.monitor.switch.current
            log.error("collector command %s (%s) failed, %s: %s", command.id, command.kind,
                      f"version {current.version} stays monitored" if current else "nothing is monitored yet", error)
        self._answer(command.id, error)

    def _answer(self, command_id: str, error: str) -> None:
        from agent.hello import tensor_info

        current = self.monitor.switch.current
        # no sha256: the upstream's file is not ours to check against the registry's
        state = collector_pb2.ModelState(command_id=command_id, model_version=current.version if current else "",
                                         ok=not error, error=error)
        fields: dict[str, Any] = {"model_state": state, "model_version": "", "inputs": [], "outputs": []}
        if current is not None:
            fields.update(model_version=current.version,
                          inputs=[tensor_info(a) for a in current.session.get_inputs()],
                          outputs=[tensor_info(a) for a in current.session.get_outputs()])
        self.exporter.update_hello(**fields)
        if command_id or error:
            self.exporter.send_model_state(state)

    # --- serve ------------------------------------------------------------------------
    def _serve(self, args: Any) -> None:
        wanted = parse_serve(args)
        current = self.monitor.switch.current
        if current is not None and current.version == wanted.version:
            return  # already monitored and pinned
        name = self.model_name
        target = upstream_version(self.template, wanted.version, name)
        started = time.monotonic()
        self.repository.load(name, self.load_timeout)
        self.repository.wait_ready(name, target, max(self.load_timeout - (time.monotonic() - started), 1.0))
        meta = self.upstream.metadata(name, target)
        if self._closed:
            raise Unavailable("the proxy is shutting down")
        self.monitor.monitor(meta, version=wanted.version, upstream_version=target,
                             feature_names=wanted.feature_names, reference=self._references.get(wanted.version))
        with self._lock:
            self._stats["swaps"] += 1
        log.info("upstream %s serves %s version %s (registry version %s) in %.1f s; calls naming no version go "
                 "to it", self.upstream.address, name, target, wanted.version, time.monotonic() - started)

    # --- reference and shadow ---------------------------------------------------------
    def _reference(self, args: Any) -> None:
        version, projection = from_command(args)
        self._references.pop(version, None)
        self._references[version] = projection
        while len(self._references) > MAX_REFERENCES:
            del self._references[next(iter(self._references))]
        current = self.monitor.switch.current
        if current is not None and current.version == version:
            current.session.set_reference(projection)

    def _shadow(self, args: Any) -> None:
        raise FailedPrecondition("a proxy cannot shadow a version: the upstream runs the model, and the proxy has "
                                 "no second one to run; shadow on managed 'agent serve' agents")

    # --- shutdown ---------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> None:
        """Stop taking commands (a load in flight is cancelled); then give the exporter ``timeout`` to
        deliver. Stop the proxy first: its sessions' last windows go out through this exporter."""
        if self._closed:
            return
        self._closed = True
        call = self.repository.call
        if call is not None:
            call.cancel()
        self._commands.put(None)
        self._worker.join(timeout)
        self.exporter.close(timeout)
