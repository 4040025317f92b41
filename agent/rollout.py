"""Managed agents: the collector names the model version, the agent fetches, checks and swaps it.

An agent started with only a model name (``outrider agent serve --model-name
NAME --collector ...``) serves nothing until the collector's ``serve``
command names a registry version. ``RolloutController`` carries out each
command on its own thread (never gRPC's): fetch the artifact with
``AgentService.FetchArtifact`` (size and sha256 verified, cached as
``<spool_dir>/models/<sha256>.onnx`` by ``agent.artifacts.ArtifactCache``),
load it as a ``MonitoredSession`` (same agent and run as the agent, windows
numbered on through ``AgentSink``, columns named as the registry names them
for that version: the command's ``feature_names``, those of the version's
reference), check it against the registry's schema and warm it up
(``agent.artifacts``), swap, answer with a ``ModelState``. Any
failure answers ok=false with the reason and the old version keeps serving.
The last good version is remembered in
``models/current.json``, so a restart serves it at once, collector or not.
A ``reference`` command (``agent.reference``) carries a version's reference
projection: kept per version, given to that version's session when it loads,
and to the running session at once (from its next window) when it is the one
served.
The switch the OIP servicer reads per request is ``agent.switch.ModelSwitch``;
a replaced version is closed once its last request has finished, by a thread
of its own (``RolloutController._retire``), never by a request.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from agent import feature_names
from agent.artifacts import ArtifactCache, check_schema, warm_up, write_json
from agent.dataplane import DataPlane
from agent.errors import FailedPrecondition, InvalidArgument, OutriderError, Unavailable
from agent.feedback import PredictionLog
from agent.runtime import RuntimeOptions
from agent.reference import REFERENCE, from_command
from agent.shadow import DEFAULT_QUEUE, ShadowRunner
from agent.sketches import joint
from agent.switch import LoadedVersion, ModelSwitch
from protos import collector_pb2, collector_pb2_grpc, summary_pb2

log = logging.getLogger(__name__)

CURRENT_FILE = "current.json"
MAX_REFERENCES = 8  # versions whose reference projection is kept (production, shadow, the next promotion...)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DIGITS = re.compile(r"^[0-9]{1,10}$")


# ----------------------------------------------------------------- windows of every version

class AgentSink:
    """The one window sequence of an agent whose sessions come and go: renumbers every window
    ``seq`` = 0, 1, 2, ... across versions and attaches the shadow's comparison, then exports.

    Labels still join the predictions of the version last replaced (``PredictionLog.replaces``)
    after its session has closed; what they add up to goes out after each window as a window of
    that version with no rows, only its ``performance`` (as a session's last window may be)."""

    def __init__(self, target: Any, shadow: Callable[[], summary_pb2.ShadowSummary | None] | None = None) -> None:
        self.target = target
        self.shadow = shadow
        self._lock = threading.Lock()  # the summary threads of two sessions may export at once
        self._next = 0
        self._replaced: list[tuple[str, str, PredictionLog]] = []  # (version, sha256, its predictions)

    def export(self, window: summary_pb2.WindowSummary) -> None:
        with self._lock:  # held across export, so the spool's order is the seq order
            window.seq = self._next
            self._next += 1
            if self.shadow is not None:
                try:
                    summary = self.shadow()
                    if summary is not None:
                        window.shadow.CopyFrom(summary)
                except Exception:
                    log.exception("could not attach the shadow summary to window %s", window.seq)
            self.target.export(window)
            self._export_late_labels(window)

    def replaced(self, version: str, sha256: str, predictions: PredictionLog) -> None:
        """``version`` was swapped out; its predictions stay reachable for labels (the new version's
        log ``replaces`` its log). Any older one was cut off then: drained once more, then dropped."""
        with self._lock:
            self._replaced.append((version, sha256, predictions))

    def late_labels_pending(self) -> bool:
        with self._lock:
            return any(any(p.pending()) for _, _, p in self._replaced)

    def _export_late_labels(self, after: summary_pb2.WindowSummary) -> None:
        for version, sha256, predictions in self._replaced:
            try:
                performance = predictions.take_performance()  # also purges its expired predictions
                if not (performance.labeled or performance.unmatched):
                    continue
                late = summary_pb2.WindowSummary(
                    agent_id=after.agent_id, run_id=after.run_id, seq=self._next, model_name=after.model_name,
                    model_version=version, model_sha256=sha256, start_unix_nano=after.end_unix_nano,
                    end_unix_nano=after.end_unix_nano, performance=performance)
                self._next += 1
                self.target.export(late)
            except Exception:
                log.exception("could not send the late labels of version %s", version)
        del self._replaced[:-1]  # only the last replaced version can still be joined


# ------------------------------------------------------------------------ the controller

@dataclass(frozen=True)
class Wanted:
    """A command's version, checked."""

    version: str
    sha256: str
    size: int
    schema_json: str
    feature_names: dict[str, list[str]] | None = None  # the version's column names, per input


def _names(text: str) -> dict[str, list[str]] | None:
    """The command's ``feature_names``: JSON ``{input: [names]}``, or empty when the registry has none."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise InvalidArgument(f"command names feature_names {text[:80]!r}; expected a JSON object {{input: [names]}}")
    return feature_names.coerce(value, "the command's feature_names")  # type: ignore[return-value]


def parse_serve(args: Any) -> Wanted:
    """A `serve` command's arguments (from the collector) as the version it names; InvalidArgument when they do not parse."""
    version, sha = args.get("version", ""), args.get("sha256", "").lower()
    if not _DIGITS.match(version) or int(version) == 0:
        raise InvalidArgument(f"command names version {version!r}; expected a registry version number")
    if not _SHA256.match(sha):
        raise InvalidArgument(f"command names sha256 {sha!r}; expected 64 hex digits")
    try:
        size = int(args.get("size", ""))
    except ValueError:
        raise InvalidArgument(f"command names size {args.get('size')!r}; expected a number of bytes") from None
    if size <= 0:
        raise InvalidArgument(f"command names size {size}; expected a positive number of bytes")
    return Wanted(version, sha, size, args.get("schema_json", ""), _names(args.get("feature_names", "")))


class RolloutController:
    """A managed agent's model: its exporter, ``switch``, artifact cache and command thread.

    ``session_options`` go to every ``MonitoredSession`` (window_seconds,
    summarizer, join_seconds, ...); its ``runtime`` (an ``agent.runtime.RuntimeOptions``)
    sets how onnxruntime runs every version, shadowed ones too. Serve ``switch`` with
    ``agent.server.serve_switch(controller.switch, ..., owner=controller)``.
    """

    def __init__(self, model_name: str, collector: str, *, agent_id: str | None = None,
                 spool_dir: str | os.PathLike | None = None, token: str | None = None, tls: Any = None,
                 session_options: dict[str, Any] | None = None, exporter_options: dict[str, Any] | None = None,
                 shadow_queue: int = DEFAULT_QUEUE, fetch_timeout: float = 300.0) -> None:
        import onnxruntime

        from agent.hello import open_exporter, package_version

        self.model_name = model_name
        self.agent_id = agent_id or socket.gethostname()
        self.run_id = uuid.uuid4().hex
        self.session_options = dict(session_options or {})
        # onnxruntime's options (agent.runtime): also for a shadowed candidate, which is not monitored
        self.runtime: RuntimeOptions = self.session_options.pop("runtime", None) or RuntimeOptions()
        if "feature_names" in self.session_options:
            raise ValueError("a managed agent's column names come from the registry with each version; "
                             "do not pass feature_names in session_options")
        self.shadow_queue, self.fetch_timeout = shadow_queue, fetch_timeout
        hello = collector_pb2.Hello(
            agent_id=self.agent_id, run_id=self.run_id, host=socket.gethostname(), model_name=model_name,
            agent_version=package_version(), onnxruntime_version=onnxruntime.__version__,
            started_unix_nano=time.time_ns(), managed=True)
        self.exporter = open_exporter(collector, hello, spool_dir, token, tls, start=False,
                                      **(exporter_options or {}))
        try:
            self.cache = ArtifactCache(self.exporter.spool.directory / "models")
        except BaseException:
            self.exporter.close(0)
            raise
        self.switch = ModelSwitch(model_name)
        self.sink = AgentSink(self.exporter, self._take_shadow)
        self._lock = threading.Lock()  # the counters and the shadow leftover
        self._leftover: summary_pb2.ShadowSummary | None = None  # of a shadow stopped before its last window
        self._stats = {"commands": 0, "failed": 0, "swaps": 0}
        self._last_state = collector_pb2.ModelState()
        self._retiring: list[threading.Thread] = []
        self._references: dict[str, joint.Projection | None] = {}  # version -> projection, oldest first
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._fetch_call: Any = None
        self._closed = False
        self.restored = self._restore()
        self.exporter.on_command = self.submit
        self._worker = threading.Thread(target=self._work, name="outrider-rollout", daemon=True)
        self._worker.start()
        self.exporter.start()

    # --- from the exporter's stream ---------------------------------------------------
    def submit(self, command: collector_pb2.Command) -> None:
        """Queue a command for the controller's thread (called on the stream's reading loop: no waiting)."""
        if self._closed:
            log.info("collector command %s (%s) arrived while shutting down; not carried out", command.id,
                     command.kind)
            return
        self._commands.put(command)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    def state(self) -> collector_pb2.ModelState:
        """The ModelState of the last command (or of the restored version)."""
        with self._lock:
            copy = collector_pb2.ModelState()
            copy.CopyFrom(self._last_state)
            return copy

    def _work(self) -> None:
        while True:
            command = self._commands.get()
            if command is None:
                return
            self._carry_out(command)

    def _carry_out(self, command: collector_pb2.Command) -> None:
        handlers = {"serve": self._serve, "shadow": self._shadow, "unshadow": self._unshadow,
                    REFERENCE: self._reference}
        error = ""
        try:
            handler = handlers.get(command.kind)
            if handler is None:
                raise InvalidArgument(f"unknown command kind {command.kind!r}; this agent knows "
                                      f"{', '.join(handlers)}")
            handler(command.args)
        except OutriderError as exc:
            error = str(exc)
        except Exception as exc:  # onnxruntime's load errors have no common base class
            log.debug("command %s failed", command.id, exc_info=True)
            error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        with self._lock:
            self._stats["commands"] += 1
            self._stats["failed"] += bool(error)
        if error:
            log.error("collector command %s (%s) failed, %s: %s", command.id, command.kind,
                      self._serving_words(), error)
        self._answer(command.id, error)

    def _serving_words(self) -> str:
        current = self.switch.current
        return f"version {current.version} keeps serving" if current else "nothing is served yet"

    def _answer(self, command_id: str, error: str) -> None:
        current, shadow = self.switch.current, self.switch.shadow
        state = collector_pb2.ModelState(
            command_id=command_id, model_version=current.version if current else "",
            model_sha256=current.sha256 if current else "", ok=not error, error=error,
            shadow_version=shadow.version if shadow else "", shadow_share=shadow.share if shadow else 0.0)
        with self._lock:
            self._last_state = state
        self._update_hello(state)
        if command_id or error:
            self.exporter.send_model_state(state)

    def _update_hello(self, state: collector_pb2.ModelState) -> None:
        from agent.hello import tensor_info

        current = self.switch.current
        fields: dict[str, Any] = {"model_state": state, "model_version": "", "model_sha256": "",
                                  "inputs": [], "outputs": []}
        if current is not None:
            fields.update(model_version=current.version, model_sha256=current.sha256,
                          inputs=[tensor_info(a) for a in current.session.get_inputs()],
                          outputs=[tensor_info(a) for a in current.session.get_outputs()])
        self.exporter.update_hello(**fields)

    # --- serve ------------------------------------------------------------------------
    def _serve(self, args: Any) -> None:
        wanted = parse_serve(args)
        current = self.switch.current
        if current is not None and (current.sha256, current.version) == (wanted.sha256, wanted.version):
            return  # already serving it
        path = self._artifact(wanted)
        loaded = self._load(path, wanted)
        self._swap(loaded)
        log.info("now serving %s version %s (sha256 %s)", self.model_name, wanted.version, wanted.sha256[:12])

    def _load(self, path: Path, wanted: Wanted) -> LoadedVersion:
        from agent import MonitoredSession

        # names that do not fit the model fail the command (InvalidArgument), the old version serving on
        options = dict(model_name=self.model_name, model_version=wanted.version, agent_id=self.agent_id,
                       run_id=self.run_id, sink=self.sink, feature_names=wanted.feature_names, **self.session_options,
                       **self.runtime.session_kwargs())
        projection = self._references.get(wanted.version)
        try:
            session = MonitoredSession(str(path), reference=projection, **options)
        except InvalidArgument as exc:
            if projection is None:
                raise
            # the names or the projection do not fit: without the projection (names that do not fit fail again,
            # and so does the command); a projection whose columns are not this model's only loses its column
            log.error("%s version %s: %s", self.model_name, wanted.version, exc)
            session = MonitoredSession(str(path), **options)
        try:
            if session.model_sha256 != wanted.sha256:  # the cache checked it; a file changed under us
                raise FailedPrecondition(f"{path} has sha256 {session.model_sha256}, expected {wanted.sha256}")
            check_schema(session, wanted.schema_json)
            warm_up(session)
            plane = DataPlane(session, self.model_name, wanted.version)
        except BaseException:
            session.close()  # not close(0): a summary process killed mid-start is reported as a crash
            raise
        return LoadedVersion(plane, session, wanted.version, wanted.sha256, wanted.schema_json,
                             feature_names=wanted.feature_names)

    def _swap(self, loaded: LoadedVersion) -> None:
        if self._closed:  # a load that outlived close(): nothing may serve it any more
            loaded.session.close()
            raise Unavailable("the agent is shutting down")
        current = self.switch.current  # only this thread swaps: it is what ``swap`` replaces
        previous = getattr(current.session, "predictions", None) if current is not None else None
        predictions = getattr(loaded.session, "predictions", None)
        if predictions is not None:  # labels for the replaced version's predictions still join them
            predictions.replaces(previous)
        old = self.switch.swap(loaded)
        if old is not None and previous is not None:
            self.sink.replaced(old.version, old.sha256, previous)
        with self._lock:
            self._stats["swaps"] += 1
        try:
            write_json(self.cache.directory / CURRENT_FILE, {
                "model_name": self.model_name, "version": loaded.version, "sha256": loaded.sha256,
                "schema_json": loaded.schema_json, "feature_names": loaded.feature_names,
                "saved_unix_nano": time.time_ns()})
            shadow = self.switch.shadow
            self.cache.prune({loaded.sha256} | ({shadow.sha256} if shadow else set()))
        except OSError as exc:  # serving goes on; only a restart without the collector would miss it
            log.error("cannot remember version %s in %s: %s", loaded.version, self.cache.directory, exc)
        if old is not None:
            self._retire(old)

    def _retire(self, old: LoadedVersion) -> None:
        """Close ``old`` once its in-flight requests are done (its last window goes out then)."""
        def close() -> None:
            old.idle.wait()
            old.session.close()

        thread = threading.Thread(target=close, name=f"outrider-retire-{old.version}", daemon=True)
        thread.start()
        self._retiring = [t for t in self._retiring if t.is_alive()] + [thread]

    def _artifact(self, wanted: Wanted) -> Path:
        path = self.cache.cached(wanted.sha256)
        if path is not None:
            return path
        what = f"{self.model_name} version {wanted.version}"
        channel = self.exporter.channel()
        try:
            stub = collector_pb2_grpc.AgentServiceStub(channel)
            call = stub.FetchArtifact(
                collector_pb2.FetchArtifactRequest(model_name=self.model_name, version=int(wanted.version)),
                metadata=self.exporter.metadata, timeout=self.fetch_timeout)
            self._fetch_call = call
            if self._closed:
                call.cancel()
            return self.cache.store(call, wanted.sha256, wanted.size, what)
        except grpc.RpcError as exc:
            raise Unavailable(f"cannot fetch {what} from the collector: "
                              f"{exc.code().name} {exc.details() or ''}".rstrip()) from None
        finally:
            self._fetch_call = None
            channel.close()

    # --- reference --------------------------------------------------------------------
    def _reference(self, args: Any) -> None:
        """Keep the version's projection; the session serving that version uses it from its next window."""
        version, projection = from_command(args)
        self._references.pop(version, None)
        self._references[version] = projection
        while len(self._references) > MAX_REFERENCES:
            del self._references[next(iter(self._references))]
        current = self.switch.current
        if current is not None and current.version == version:
            current.session.set_reference(projection)  # InvalidArgument: the answer says why
            log.info("reference projection of %s version %s %s", self.model_name, version,
                     "installed" if projection is not None else "removed")

    # --- shadow -----------------------------------------------------------------------
    def _shadow(self, args: Any) -> None:
        import onnxruntime

        wanted = parse_serve(args)
        try:
            share = float(args.get("share", ""))
        except ValueError:
            share = float("nan")
        if not 0 < share <= 1:
            raise InvalidArgument(f"command names share {args.get('share')!r}; expected a number in (0, 1]")
        running = self.switch.shadow
        if running is not None and running.sha256 == wanted.sha256 and running.version == wanted.version:
            running.share = share  # read per request: takes effect at once
            return
        path = self._artifact(wanted)
        kwargs = self.runtime.session_kwargs()
        session = onnxruntime.InferenceSession(str(path), kwargs["sess_options"], kwargs["providers"])
        check_schema(session, wanted.schema_json)
        warm_up(session)
        runner = ShadowRunner(session, wanted.version, wanted.sha256, share, queue_size=self.shadow_queue)
        self._stop_shadow()
        self.switch.shadow = runner
        log.info("shadowing %s version %s on %.0f%% of requests", self.model_name, wanted.version, share * 100)

    def _unshadow(self, args: Any) -> None:
        self._stop_shadow()

    def _stop_shadow(self) -> None:
        runner = self.switch.shadow
        if runner is None:
            return
        self.switch.shadow = None
        runner.stop()
        summary = runner.take()
        if summary is not None:
            with self._lock:  # goes out with the next window
                self._leftover = summary
        log.info("stopped shadowing %s version %s", self.model_name, runner.version)

    def _take_shadow(self) -> summary_pb2.ShadowSummary | None:
        with self._lock:
            leftover, self._leftover = self._leftover, None
        if leftover is not None:
            return leftover
        runner = self.switch.shadow
        return runner.take() if runner is not None else None

    # --- restart ----------------------------------------------------------------------
    def _restore(self) -> bool:
        """Serve the version remembered in current.json, if its file is intact."""
        path = self.cache.directory / CURRENT_FILE
        try:
            saved = json.loads(path.read_text())
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s: %s", path, exc)
            return False
        try:
            if saved.get("model_name") != self.model_name:
                raise FailedPrecondition(f"it is for model {saved.get('model_name')!r}, not {self.model_name!r}")
            names = saved.get("feature_names")
            wanted = Wanted(str(saved["version"]), str(saved["sha256"]), 0, saved.get("schema_json", ""),
                            feature_names.coerce(names, f"{CURRENT_FILE}'s feature_names") if names else None)
            artifact = self.cache.cached(wanted.sha256)
            if artifact is None:
                raise FailedPrecondition(f"its file {self.cache.path(wanted.sha256).name} is missing")
            self._swap(self._load(artifact, wanted))
        except Exception as exc:
            log.warning("not serving the version remembered in %s: %s; waiting for the collector", path, exc)
            with self._lock:
                self._stats["failed"] += 1
            return False
        log.info("serving %s version %s from %s until the collector names the production version",
                 self.model_name, wanted.version, self.cache.directory)
        self._answer("", "")
        return True

    # --- shutdown ---------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> None:
        """Stop taking commands, stop the shadow, close the versions (their last windows flush),
        then give the exporter ``timeout`` to deliver."""
        if self._closed:
            return
        self._closed = True
        call = self._fetch_call
        if call is not None:
            call.cancel()
        self._commands.put(None)
        self._worker.join(timeout)
        self._stop_shadow()
        current = self.switch.current
        if current is not None:
            with self._lock:  # the shadow's last counts (and late labels) need a window to travel in
                pending = self._leftover is not None
            pending = pending or self.sink.late_labels_pending()
            current.session.close(timeout, flush_always=pending)
        for thread in self._retiring:
            thread.join(timeout)
        self.exporter.close(timeout)
