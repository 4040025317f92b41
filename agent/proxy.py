"""Monitoring in front of an inference server that runs the model: the transport-free core of
``outrider agent proxy``.

The proxy's front (``agent.proxy_grpc`` for gRPC; REST slots in beside it) forwards each call to
the upstream server unchanged and hands ``ProxyMonitor.offer`` a *decoder*: a function that,
called later on the monitor's own thread, parses a copy of the call into an ``ObservedCall``
(inputs and outputs as OIP tensors). So the request thread pays for one append to a bounded
deque, never for parsing nor for waking a thread (the monitor drains the deque every
``DRAIN_SECONDS``); a full deque drops the call from monitoring and counts it.

What is monitored: one model (``--model-name``), in the version its schema was read for. Its
schema comes from the upstream's ModelMetadata (``UpstreamModel``): the inputs and outputs as
OIP tensors, which ``MonitoredSession`` takes in place of an onnxruntime session, so the ring,
summaries, windows, spool, exporter and feedback are the agent's own. Everything else passes
through and is counted by reason (``UNMONITORED``): another model, another version, a reply
that lacks some of the model's outputs (the client asked for a subset), a call before the
schema could be read, a call that does not decode against the schema.

A managed proxy (``agent.proxy_rollout``) is told the version by the collector: ``monitor`` is
then given the registry's version and the upstream's name for it (``upstream_version``), which
``pin`` hands the fronts, so that inference calls of the model that name no version go to it.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent import tensors
from agent.dataplane import DataPlane, ModelMetadata
from agent.errors import OutriderError
from agent.switch import LoadedVersion, ModelSwitch
from agent.tensors import TensorSpec, WireTensor

log = logging.getLogger(__name__)

# OIP datatype -> the onnxruntime type string MonitoredSession plans its capture from.
OIP_TO_ONNX = {oip: onnx for onnx, oip in tensors.ONNX_TO_OIP.items()}
# Why a call passed through without being summarised (the label of outrider_proxy_unmonitored_calls).
UNMONITORED = ("other_model", "other_version", "no_schema", "partial_outputs", "undecodable", "queue_full")
DEFAULT_QUEUE_CALLS = 4096
# How long a call may wait to be summarised: each pass pays a wake-up and cold caches (~0.1 ms), so a pass
# should find many calls.
DRAIN_SECONDS = 0.05


@dataclass(frozen=True)
class TensorArg:
    """An upstream tensor as onnxruntime's NodeArg shows one (what capture planning reads)."""

    name: str
    type: str
    shape: list[Any]


@dataclass(frozen=True)
class _ModelMeta:
    graph_name: str
    custom_metadata_map: dict[str, str] = field(default_factory=dict)


class UpstreamModel:
    """The surface of an ``onnxruntime.InferenceSession`` for a model the upstream runs, built from
    its ModelMetadata: enough for ``MonitoredSession`` (planning, Hello, feedback), never run here."""

    model_sha256 = ""  # the upstream's model file is not ours to hash

    def __init__(self, meta: ModelMetadata) -> None:
        unknown = [f"{s.name} ({s.datatype})" for s in (*meta.inputs, *meta.outputs) if s.datatype not in OIP_TO_ONNX]
        if unknown:
            raise OutriderError(f"model '{meta.name}' has tensors of datatypes OIP does not define: "
                                f"{', '.join(unknown)}")
        if not meta.inputs or not meta.outputs:
            raise OutriderError(f"model '{meta.name}': its metadata lists no inputs or no outputs")
        self.meta = meta
        self._inputs = [_arg(s) for s in meta.inputs]
        self._outputs = [_arg(s) for s in meta.outputs]

    def get_inputs(self) -> list[TensorArg]:
        return self._inputs

    def get_outputs(self) -> list[TensorArg]:
        return self._outputs

    def get_modelmeta(self) -> _ModelMeta:
        return _ModelMeta(self.meta.name)

    def run(self, output_names: Sequence[str] | None, input_feed: Any, run_options: Any = None) -> list[Any]:
        raise OutriderError(f"model '{self.meta.name}' runs on the upstream server; the proxy only observes it")


def _arg(spec: TensorSpec) -> TensorArg:
    return TensorArg(spec.name, OIP_TO_ONNX[spec.datatype], [d if d >= 0 else None for d in spec.shape])


@dataclass
class ObservedCall:
    """One inference call as the upstream answered it, decoded from whichever transport carried it."""

    model_name: str
    model_version: str        # of the reply ("" when the upstream does not say)
    request_id: str           # the client's id, or the one the proxy assigned ("" for none)
    inputs: list[WireTensor]
    outputs: list[WireTensor] | None  # None: the upstream answered with an error
    latency_ns: int


# A decoder, run on the monitor's thread: the call, or None when it is not an inference call.
Decoder = Callable[[], ObservedCall | None]


class Source(Protocol):
    """Where the monitor's thread takes more calls from on each pass (``agent.proxy_relay``'s chunk queue)."""

    def take(self) -> list[Decoder]: ...

    def waiting(self) -> int: ...


# Opens the MonitoredSession for a schema (the CLI's collector, spool, window options); a managed proxy
# also passes feature_names and reference, as the registry has them for the version.
SessionFactory = Callable[..., Any]


@dataclass(eq=False)
class MonitoredVersion(LoadedVersion):
    """The version monitored, and the upstream's name for it ("" when the proxy is not managed: then the
    replies' own version is compared with ``version``, and no call is pinned)."""

    upstream_version: str = ""


class ProxyMonitor:
    """Summarises the calls of one upstream model; ``offer`` is all the request path does."""

    def __init__(self, model_name: str, open_session: SessionFactory, *, model_version: str | None = None,
                 queue_calls: int = DEFAULT_QUEUE_CALLS) -> None:
        self.model_name = model_name
        self.switch = _UpstreamSwitch(model_name)  # the session now (None until the schema is read): Feedback's
        self._open_session = open_session
        self._pinned_version = model_version
        self._pending: deque[Decoder] = deque()
        self._sources: list[Source] = []
        self._capacity = queue_calls
        self._busy = False  # the monitor's thread holds calls taken off the deque
        self._passes = 0    # drain passes done: a session swapped out is idle after two more
        self._stop = threading.Event()
        self._wake = threading.Event()  # set to start a pass now (stopping, or feedback waiting on its calls)
        self._lock = threading.Lock()
        self._counts = {reason: 0 for reason in UNMONITORED}
        self.captured = 0          # calls summarised
        self.upstream_errors = 0   # calls of the model the upstream answered with an error (in the windows' errors)
        self.capture_failures = 0  # bugs: a decoder or capture that raised (counted, the reply was already sent)
        self._warned: set[str] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._drain, name="outrider-proxy-capture", daemon=True)
        self._thread.start()

    # --- the request path -----------------------------------------------------------
    def offer(self, decode: Decoder) -> None:
        """Hand over a call to summarise later; never blocks: a full queue counts it as ``queue_full``."""
        # len and append are each atomic; between them other threads may append too, so the deque can
        # pass its capacity by at most the number of request threads: still bounded.
        if len(self._pending) >= self._capacity:
            self.count("queue_full")
        else:
            self._pending.append(decode)

    # --- the schema -----------------------------------------------------------------
    @property
    def session(self) -> Any:
        current = self.switch.current
        return current.session if current is not None else None

    @property
    def pin(self) -> str:
        """The upstream's version that inference calls of the model naming none are sent to ("" : none)."""
        current = self.switch.current
        return current.upstream_version if current is not None else ""  # type: ignore[attr-defined]

    def monitor(self, meta: ModelMetadata, *, version: str | None = None, upstream_version: str = "",
                **options: Any) -> Any:
        """Start summarising the model whose upstream metadata is ``meta``, replacing any earlier
        schema. Raises ``OutriderError`` for a schema that cannot be monitored.

        Not managed (no ``upstream_version``): the old session closes first (its spool directory is
        free again only then), so a failure leaves calls passing through, counted as ``no_schema``.
        Managed: ``version`` is the registry's, ``options`` (feature_names, reference) go to the
        session factory; the new session opens first (the sessions share the proxy's one exporter)
        and a failure leaves the old one monitoring, nothing switched."""
        model = UpstreamModel(meta)
        version = version or self._pinned_version or (meta.versions[-1] if meta.versions else "") or "1"
        with self._lock:
            if self._closed:
                raise OutriderError("the proxy is stopping")
        old = self.switch.current
        if old is not None:
            self.settle()  # calls answered before the switch are summarised against the version that answered
        if old is not None and not upstream_version:
            self.switch.clear()
            old.session.close()
        try:
            session = self._open_session(model, version, **options)
        except OutriderError:
            raise
        except (OSError, ValueError) as exc:  # e.g. a spool directory that cannot be written
            raise OutriderError(f"{getattr(exc, 'strerror', None) or exc}"
                                f"{': ' + str(exc.filename) if getattr(exc, 'filename', None) else ''}") from None
        previous = getattr(old.session, "predictions", None) if old is not None and upstream_version else None
        if previous is not None and getattr(session, "predictions", None) is not None:
            session.predictions.replaces(previous)  # labels of the replaced version's calls still join them
        self.switch.swap(MonitoredVersion(DataPlane(session, self.model_name, version), session, version,
                                          upstream_version=upstream_version))
        if old is not None and upstream_version:
            replaced = getattr(old.session.sink, "replaced", None)  # agent.rollout.AgentSink: their late labels
            if previous is not None and replaced is not None:
                replaced(old.version, old.sha256, previous)
            self._retire(old.session)
        log.info("monitoring %s version %s: %d inputs, %d outputs from the upstream's metadata", self.model_name,
                 version, len(meta.inputs), len(meta.outputs))
        return session

    def _retire(self, session: Any, timeout: float = 10.0) -> None:
        """Close a swapped-out session once the monitor's thread can no longer be observing into it: a
        pass that started before the swap may still hold it, the one after cannot."""
        self._await_passes(2, timeout)
        session.close()

    def _await_passes(self, count: int, timeout: float) -> None:
        """Wake the monitor's thread for ``count`` more passes and wait for them (or ``timeout``)."""
        target, deadline = self._passes + count, time.monotonic() + timeout
        while self._passes < target and self._thread.is_alive() and time.monotonic() < deadline:
            self._wake.set()  # the next pass starts now, not DRAIN_SECONDS later
            time.sleep(0.0005)

    # --- the monitor's thread -------------------------------------------------------
    def add_source(self, source: Source) -> None:
        """Calls the monitor's thread also takes, each pass, from ``source`` (the relay's chunks)."""
        self._sources.append(source)

    def _drain(self) -> None:
        pending = self._pending
        while True:
            self._wake.wait(DRAIN_SECONDS)
            self._wake.clear()
            stopping = self._stop.is_set()
            self._busy = True
            for source in self._sources:
                try:
                    taken = source.take()
                except Exception:  # a bug here must not stop monitoring, nor reach any reply
                    self._failed()
                    continue
                for decode in taken:
                    self._observe_safely(decode)
            while pending:
                self._observe_safely(pending.popleft())
            self._busy = False
            self._passes += 1
            if stopping:
                return

    def _observe_safely(self, decode: Decoder) -> None:
        try:
            self._observe(decode)
        except Exception:  # a bug here must not stop monitoring, nor reach any reply
            self._failed()

    def _failed(self) -> None:
        with self._lock:
            self.capture_failures += 1
        log.exception("could not summarise a proxied call")

    def _observe(self, decode: Decoder) -> None:
        try:
            call = decode()
        except OutriderError as exc:
            self.count("undecodable", str(exc))
            return
        if call is None:
            return
        if call.model_name != self.model_name:
            self.count("other_model")
            return
        current = self.switch.current  # read once: the watch thread may swap in a new schema meanwhile
        if current is None:
            self.count("no_schema")
            return
        session, plane = current.session, current.plane
        answered_as = current.upstream_version or session.model_version  # type: ignore[attr-defined]
        if call.model_version not in ("", answered_as):
            self.count("other_version", f"the upstream answered with version {call.model_version!r}; "
                                         f"this proxy summarises version {answered_as!r}")
            return
        if call.outputs is None:
            session.observe_error()
            with self._lock:
                self.upstream_errors += 1
            return
        try:
            feed = {t.name: tensors.to_array(t, _spec(plane.inputs, t.name)) for t in call.inputs}
            by_name = {t.name: t for t in call.outputs}
            if any(spec.name not in by_name for spec in plane.outputs):
                self.count("partial_outputs")
                return
            outputs = [tensors.to_array(_fit(by_name[spec.name], spec), spec) for spec in plane.outputs]
        except OutriderError as exc:
            self.count("undecodable", str(exc))
            return
        if set(feed) != {spec.name for spec in plane.inputs}:
            self.count("undecodable", "a call lacks some of the model's inputs")
            return
        session.observe(feed, outputs, call.latency_ns, request_id=call.request_id or None)
        with self._lock:
            self.captured += 1

    def count(self, reason: str, why: str = "", calls: int = 1) -> None:
        """``calls`` that passed through unmonitored for ``reason`` (one of ``UNMONITORED``); ``why`` is logged
        the first time a reason is counted."""
        with self._lock:
            self._counts[reason] += calls
            first = reason not in self._warned
            self._warned.add(reason)
        if first and why:
            log.warning("proxied calls of %s pass through unmonitored (%s): %s; counted in "
                        "outrider_proxy_unmonitored_calls", self.model_name, reason, why)

    # --- for operators, metrics and tests --------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"captured": self.captured, "upstream_errors": self.upstream_errors,
                    "capture_failures": self.capture_failures, "queued": len(self._pending),
                    "unmonitored": dict(self._counts)}

    def settle(self, timeout: float = 2.0) -> None:
        """Return once the calls offered so far are summarised (or ``timeout`` passed): feedback waits on it, so
        a label sent as soon as its call's reply arrived finds the prediction, whatever ``DRAIN_SECONDS`` is."""
        if self.idle() or threading.current_thread() is self._thread:
            return
        # two passes: the one running now may have taken its calls before the ones this waits on were offered
        self._await_passes(2, timeout)

    def idle(self) -> bool:
        """Every call offered so far is summarised or counted (tests wait for it before sending labels)."""
        # busy last: the thread marks itself busy before it takes anything, so nothing taken is missed
        return not self._pending and not any(source.waiting() for source in self._sources) and not self._busy

    def close(self, timeout: float = 10.0) -> None:
        """Summarise what is queued, stop the thread, flush the session's last window."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        session = self.session
        if session is not None:
            session.close(timeout)


class CallCounts:
    """``outrider_proxy_calls{method, code}``, one front's children of it kept at hand. Method names come
    from clients, so the labels are bounded: past ``MAX_LABELS`` pairs, new methods count as ``other``."""

    MAX_LABELS = 256

    def __init__(self, calls: Any) -> None:
        self._calls = calls
        self._children: dict[tuple[str, str], Any] = {}

    def count(self, method: str, code: str) -> None:
        child = self._children.get((method, code))
        if child is None:
            label = method if len(self._children) < self.MAX_LABELS else "other"
            child = self._children[method, code] = self._calls.labels(label, code)
        child.inc()


class _UpstreamSwitch(ModelSwitch):
    def clear(self) -> None:
        """No session until the next schema's opens (the old one is being closed)."""
        with self._lock:
            self.current = None

    def waiting_message(self) -> str:
        return (f"model '{self.model_name}' is not monitored yet: the proxy waits for the upstream's metadata "
                "of it (is the upstream up, and is the model loaded there?)")


def _fit(tensor: WireTensor, spec: TensorSpec) -> WireTensor:
    """The reply's tensor in its metadata's rank when it only adds a trailing 1: MLServer's NumpyCodec
    sends a 1-D output ([N] in its metadata) as [N, 1]. The values are the same."""
    if len(tensor.shape) == len(spec.shape) + 1 and tensor.shape[-1] == 1:
        return tensor._replace(shape=tuple(tensor.shape[:-1]))
    return tensor


def _spec(specs: Sequence[TensorSpec], name: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise OutriderError(f"tensor '{name}' is not in the model's metadata")
