"""One agent's window stream, and the set of streams open now.

An agent stream is read by its own thread while the handler thread sends
replies, so acks (sent only once the store has committed the windows) never
wait for the next request and reading never waits for a commit. Commands to
managed agents (``collector.lifecycle.rollout``) join the same reply queue at any time.

Which windows a stream may carry: those of the Hello's agent id, any run
(an agent restarted while the collector was down sends its earlier runs'
windows from its spool on its new stream), for the Hello's model or one of
its ``spooled_models`` (``hello_refusal`` checked that the caller's token
may send for each of them), sealed intact
(``agent.checksum``) and valid (``collector.base.ingest``). Anything else is acked
REJECTED with the reason and counted; the ``(agent_id, run_id, seq)`` key
stores each window once however often it comes. Once a batch is committed and
acked, its windows' sketches, parsed by the validation, are offered to the drift
evaluator's span cache (``collector.monitoring.spans.SpanCache.offer``), so the evaluation
need not read and parse them again.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from agent.checksum import check
from agent.errors import InvalidArgument, OutriderError, ResourceExhausted, Unavailable
from collector.api.metrics import batch_acked, batch_received
from collector.base.auth import LOCAL, Identity
from collector.base.ingest import validate_window
from protos import collector_pb2 as pb
from protos import summary_pb2

if TYPE_CHECKING:
    from collector.api.fleet import FleetMember
    from collector.base.ingest import Limits
    from collector.lifecycle.rollout import RolloutPusher
    from collector.monitoring.spans import SpanCache
    from collector.store.store import Store

log = logging.getLogger(__name__)

# What a stream's reader thread, the store's callbacks and the rollout pusher tell the reply generator.
_ACKS, _DONE, _EOF, _DRAIN, _ERROR, _GONE, _COMMAND = range(7)


def _acks(acks: Sequence[pb.WindowAck]) -> pb.CollectorMessage:
    return pb.CollectorMessage(acks=pb.Acks(acks=acks))


class LiveStreams:
    """The agent streams open now: ``connected`` in Status, and whom to tell when shutting down."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: set[AgentStream] = set()
        self._runs: Counter[tuple[str, str]] = Counter()
        self._draining = False
        # runs streaming to other collectors of the fleet (collector.api.fleet.FleetMember.remote_connected)
        self.remote: Callable[[str, str], bool] | None = None

    def add(self, stream: AgentStream) -> None:
        with self._lock:
            self._streams.add(stream)
            self._runs[stream.key] += 1
            if self._draining:
                stream.drain()

    def remove(self, stream: AgentStream) -> bool:
        """Forget ``stream``; True when it was the last one open for its run."""
        with self._lock:
            if stream not in self._streams:
                return False
            self._streams.discard(stream)
            self._runs[stream.key] -= 1
            if self._runs[stream.key] > 0:
                return False
            del self._runs[stream.key]
            return True

    def connected(self, agent_id: str, run_id: str) -> bool:
        """Streaming here, or to another collector with a fresh heartbeat."""
        with self._lock:
            if self._runs[(agent_id, run_id)] > 0:
                return True
        return self.remote is not None and self.remote(agent_id, run_id)

    def of_model(self, model_name: str, managed: bool = False) -> list[AgentStream]:
        """The open streams of ``model_name``'s agents (only managed ones, if ``managed``)."""
        with self._lock:
            return [s for s in self._streams
                    if s.hello.model_name == model_name and (s.hello.managed or not managed)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)

    def drain(self) -> None:
        with self._lock:
            self._draining = True
            for stream in self._streams:
                stream.drain()


def hello_refusal(identity: Identity, hello: pb.Hello) -> str:
    """Why ``identity`` may not open a stream with ``hello`` ("" if it may): its token must speak for
    the agent id and send for the model and every model of the windows waiting in the agent's spool."""
    if not identity.may_speak_for(hello.agent_id):
        return (f"{_token(identity)} may speak for agent ids {list(identity.agent_ids)}, not "
                f"{_shown(hello.agent_id)}; add it to agent_ids in the collector's auth file")
    for model, whose in ((hello.model_name, ""), *((m, " (its spool holds windows of it)")
                                                    for m in hello.spooled_models)):
        if not identity.may_send_for(model):
            return (f"{_token(identity)} may send for models {list(identity.models)}, not {_shown(model)}{whose}; "
                    "add it to models in the collector's auth file")
    return ""


def artifact_refusal(identity: Identity, model_name: str) -> str:
    """Why ``identity`` may not download ``model_name``'s artifacts ("" if it may)."""
    if identity.may_send_for(model_name):
        return ""
    return (f"{_token(identity)} may fetch models {list(identity.models)}, not {_shown(model_name)}; "
            "add it to models in the collector's auth file")


def _token(identity: Identity) -> str:
    return f"{identity.kind} token {identity.name!r}"


def _names(names: Iterable[str], most: int = 5) -> str:
    listed = sorted(names)
    more = f", ... ({len(listed)} in all)" if len(listed) > most else ""
    return "[" + ", ".join(_shown(n) for n in listed[:most]) + more + "]"


def _shown(name: str, limit: int = 80) -> str:
    """A caller's name fit for a message (not a megabyte of it)."""
    return repr(name) if len(name) <= limit else repr(name[:limit]) + f"... ({len(name)} characters)"


def read_hello(requests: Iterator[pb.AgentMessage], context: grpc.ServicerContext,
               seconds: float) -> pb.Hello | None:
    """A new stream's Hello, which must come first and within ``seconds``; None if the client
    went away or said nothing in time (the stream is cancelled then: waiting for good would
    hold one of the collector's agent slots)."""
    expired = threading.Event()

    def too_late() -> None:
        expired.set()
        context.cancel()  # ends the wait below

    late = threading.Timer(seconds, too_late)
    late.daemon = True
    late.start()
    try:
        first = next(requests, None)
    except grpc.RpcError:
        if expired.is_set():
            log.warning("a stream from %s sent no hello in %.0f s; cancelled it", context.peer(), seconds)
        return None
    finally:
        late.cancel()
    if first is None or first.WhichOneof("kind") != "hello":
        raise InvalidArgument("first message must be hello")
    return first.hello


class StreamHost(Protocol):
    """What a stream needs from the servicer that opened it (``collector.api.server.AgentServicer``
    is the one): the server wires the streams, so the streams name only this."""

    store: Store
    limits: Limits
    max_in_flight: int
    live: LiveStreams
    rollouts: RolloutPusher
    spans: SpanCache | None
    fleet: FleetMember

    def count_rejected(self, n: int) -> None: ...

    def retry_later(self, exc: ResourceExhausted) -> ResourceExhausted: ...


class AgentStream:
    """One agent's open stream after its Hello: a reader thread and the reply generator."""

    def __init__(self, servicer: StreamHost, hello: pb.Hello, requests: Iterator[pb.AgentMessage],
                 identity: Identity = LOCAL) -> None:
        self.servicer = servicer
        self.store = servicer.store
        self.hello = hello
        self.identity = identity  # the caller; read here, since the reader thread has no gRPC context
        self.models = frozenset({hello.model_name, *hello.spooled_models})  # windows of these are accepted
        self.key = (hello.agent_id, hello.run_id)
        self._requests = requests
        self._out: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._in_flight = 0  # ack messages queued or being sent: bounded, so a client that stops
                             # reading its acks stops being read too (HTTP/2 flow control does the rest)
        self._outstanding: set[futures.Future] = set()  # submitted to the store, not yet acked
        self._offers: dict[futures.Future, tuple] = {}  # their windows' parsed sketches, for the span cache
        self._draining = False
        self._closed = False

    # ---------------------------------------------------------------- reader thread

    def read(self) -> None:
        try:
            for message in self._requests:
                kind = message.WhichOneof("kind")
                if kind == "windows":
                    if not self._windows(message.windows.windows):
                        return  # shutting down: what was not submitted is resent after reconnecting
                elif kind == "status":
                    self.store.record_spool(self.hello.agent_id, self.hello.run_id, message.status, time.time_ns())
                elif kind == "model_state":
                    self.servicer.rollouts.record(self.hello.agent_id, self.hello.run_id, message.model_state)
                elif kind == "hello":
                    raise InvalidArgument("hello may be sent only once, as the first message of a stream")
                else:
                    raise InvalidArgument("empty message: set one of hello, windows, status or model_state")
        except grpc.RpcError:  # the call ended (client went away, or we answered)
            self._out.put((_GONE, None))
        except Exception as exc:  # OutriderError or a bug: the reply generator ends the call with it
            self._out.put((_ERROR, exc))
        else:
            self._out.put((_EOF, None))

    def _windows(self, windows: Sequence[summary_pb2.WindowSummary]) -> bool:
        limit = self.servicer.limits.max_windows_per_batch
        if len(windows) > limit:
            raise InvalidArgument(f"a batch of {len(windows)} windows is over the limit of {limit}; "
                                  f"send at most {limit} windows per message")
        rejected, valid, parsed = [], [], []
        spans = self.servicer.spans
        for window in windows:
            reason, sketches = self._problem(window)
            if reason:
                rejected.append(pb.WindowAck(run_id=window.run_id, seq=window.seq,
                                             result=pb.WindowAck.REJECTED, reason=reason))
            else:
                valid.append(window)
                # kept until the commit only for the versions the span cache holds (a few)
                parsed.append(sketches if spans is not None and spans.wants(window.model_name,
                                                                            window.model_version) else None)
        if rejected:
            self.servicer.count_rejected(len(rejected))
            log.info("rejected %d window(s) from agent %s: %s", len(rejected), self.hello.agent_id, rejected[0].reason)
            if not self._reserve():
                return False
            self._out.put((_ACKS, rejected))
        if not valid:
            return True
        if not self._reserve():
            return False
        rowids: list[int] = []
        generation = self.store.rollup_generation  # before the commit (SpanCache.offer)
        with self._lock:
            try:
                future = self.store.submit_windows(valid, rowids)
            except ResourceExhausted as exc:
                raise self.servicer.retry_later(exc) from None
            self._outstanding.add(future)
            if any(p is not None for p in parsed):
                self._offers[future] = (valid, parsed, rowids, generation)
        batch_received(future)  # the ack latency's start (collector.api.metrics)
        future.add_done_callback(lambda done: self._out.put((_DONE, done)))
        return True

    def _reserve(self) -> bool:
        """Wait for room for one more ack message; False when the stream is ending."""
        with self._room:
            while self._in_flight >= self.servicer.max_in_flight and not (self._draining or self._closed):
                self._room.wait()
            if self._draining or self._closed:
                return False
            self._in_flight += 1
            return True

    def _sent(self) -> None:
        with self._room:
            self._in_flight -= 1
            self._room.notify()

    def _problem(self, window: summary_pb2.WindowSummary) -> tuple[str, list | None]:
        """Why ``window`` may not be stored from this stream ("" if it may), and its columns'
        sketches as validation parsed them. Any run of the Hello's agent is fine: windows of its
        earlier runs wait in its spool and come on this stream."""
        if window.agent_id != self.hello.agent_id:
            return (f"window of agent {_shown(window.agent_id)} sent on the stream of agent "
                    f"{_shown(self.hello.agent_id)}: a stream carries only its own agent's windows"), None
        if window.model_name not in self.models:  # (hello_refusal checked the caller's token for each of them)
            return (f"window of model {_shown(window.model_name)} sent on a stream whose hello names "
                    f"{_shown(self.hello.model_name)} and spooled models {_names(self.hello.spooled_models)}"), None
        damage = check(window)
        if damage:
            return damage, None
        try:
            return "", validate_window(window, self.servicer.limits)
        except InvalidArgument as exc:
            return str(exc), None

    def _offer(self, future: futures.Future) -> None:
        """Hand the span cache the sketches of the windows ``future`` stored (after their ack:
        the merge never delays it); a failure costs the evaluation a read, never an ack."""
        with self._lock:
            offer = self._offers.pop(future, None)
        if offer is None or future.exception() is not None or self.servicer.spans is None:
            return
        valid, parsed, rowids, generation = offer
        try:  # a bug here must not end the agent's stream
            self.servicer.spans.offer(((rowid, w, p) for w, p, rowid in zip(valid, parsed, rowids)
                                       if rowid and p is not None), generation)
        except Exception:
            log.exception("offering stored windows to the span cache failed; the evaluation reads them")

    # ---------------------------------------------------------------- reply generator

    def replies(self) -> Iterator[pb.CollectorMessage]:
        eof = False
        try:
            while True:
                kind, item = self._out.get()
                if kind == _ACKS:
                    yield _acks(item)
                    self._sent()
                elif kind == _DONE:
                    with self._lock:
                        self._outstanding.discard(item)
                    yield self._committed(item)
                    batch_acked(self.servicer, item)
                    self._sent()
                    self._offer(item)
                elif kind == _EOF:
                    eof = True
                elif kind == _ERROR:
                    yield from self._committed_so_far()
                    raise item
                elif kind == _COMMAND:
                    yield item
                elif kind == _GONE:
                    return
                with self._lock:
                    idle, draining = not self._outstanding, self._draining
                if idle and draining:
                    raise Unavailable("the collector is shutting down: reconnect and resend the un-acked windows")
                if idle and eof:
                    return
        finally:
            self.close()

    def _committed(self, future: futures.Future) -> pb.CollectorMessage:
        error = future.exception()
        if error is not None:
            raise error
        return _acks([pb.WindowAck(run_id=r.run_id, seq=r.seq, result=r.result) for r in future.result()])

    def _committed_so_far(self) -> Iterator[pb.CollectorMessage]:
        """Acks of what is already committed, so that less is resent after an error ends the stream."""
        with self._lock:
            done = [f for f in self._outstanding if f.done() and f.exception() is None]
            self._outstanding.difference_update(done)
        for future in done:
            yield self._committed(future)

    # ---------------------------------------------------------------- any thread

    def send(self, message: pb.CollectorMessage) -> bool:
        """Queue a message (a Command) for the agent; False when the stream has ended. Commands are
        few (one per change of a model's production version or shadow), so they are not bounded."""
        with self._lock:
            if self._closed:
                return False
        self._out.put((_COMMAND, message))
        return True

    def drain(self) -> None:
        """Stop taking windows; ack what is in flight, then end the stream."""
        with self._room:
            self._draining = True
            self._room.notify_all()
        self._out.put((_DRAIN, None))

    def gone(self) -> None:
        """gRPC's callback when the call has ended, however it ended. It runs on
        gRPC's polling thread, so it only wakes the reply generator, which closes."""
        self._out.put((_GONE, None))

    def close(self) -> None:
        with self._room:
            if self._closed:
                return
            self._closed = True
            self._offers.clear()  # not acked here: the evaluation reads them if they were stored
            self._room.notify_all()
        if self.servicer.live.remove(self):
            try:
                self.servicer.fleet.stream_closed(self.hello.agent_id, self.hello.run_id, time.time_ns())
            except OutriderError as exc:  # the store has closed (shutdown); Status shows live streams anyway
                log.debug("cannot record that agent %s disconnected: %s", self.hello.agent_id, exc)
            except Exception:
                log.exception("cannot record that agent %s disconnected", self.hello.agent_id)
        log.info("agent %s run %s disconnected", self.hello.agent_id, self.hello.run_id)
