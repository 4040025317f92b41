"""``CollectorExporter``: the window sink that delivers windows to the collector.

``export`` only writes the window into the on-disk spool and wakes the sender;
it never touches the network and never raises. One daemon thread keeps one
bidirectional ``AgentService.Stream`` open: a Hello first, then the spooled
windows oldest first (batched when behind), at most ``max_in_flight`` unacked.
The collector acks only after its commit; an ack deletes the spooled file, so
delivery is at-least-once and the collector's ``(agent_id, run_id, seq)`` key
makes it effectively once (resends after a reconnect come back DUPLICATE).
Windows left by earlier runs of this agent (same agent id, their own run ids)
go out on the same stream, oldest first; the Hello names their models
(``spooled_models``) so that the collector accepts them.

Commands from the collector (managed agents: serve, shadow, unshadow) go to
the ``on_command`` callback, which must only hand them on (it runs on the
stream's reading loop); answers go back with ``send_model_state``, and
``update_hello`` keeps the Hello of the next reconnect current.

Several collectors (``target`` "a:4317,b:4317", or a list): the agent streams to one at a time,
starting at the one its agent id hashes to (so a fleet spreads over them), and moves on to the next
when its stream ends or cannot be set up -- at once while there are others not tried since the
last success, with backoff once every one has failed. The spool moves with it: windows in flight
and unacked are resent to the next collector, whose ``(agent_id, run_id, seq)`` key (one database
behind every collector) answers DUPLICATE for any the dead one had stored. A gRPC target that
resolves to several addresses (``dns:///collectors.example:4317``) is one entry: gRPC's resolver
gives every address and ``pick_first``, shuffled, spreads agents and skips dead ones.

Back-pressure: gRPC's flow control holds a write until the collector reads,
the in-flight limit holds further windows until acks come, and a
``retry-after-ms`` trailer on RESOURCE_EXHAUSTED sets the next wait. Whatever
the collector does, windows wait on disk (bounded, oldest dropped and counted)
and serving goes on.
"""
from __future__ import annotations

import json
import logging
import os
import random
import ssl
import zlib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import grpc

from agent.spool import DEFAULT_MAX_BYTES, Spool
from protos import collector_pb2, collector_pb2_grpc, summary_pb2

log = logging.getLogger(__name__)

KEEPALIVE = [("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000),
             ("grpc.keepalive_permit_without_calls", 1),
             # A name that resolves to several collectors: each agent picks one at random (not all the
             # first), and a dead address is skipped. Ignored for a single address.
             ("grpc.service_config", json.dumps({"loadBalancingConfig": [
                 {"pick_first": {"shuffleAddressList": True}}]}))]
FAILOVER_DELAY = (0.05, 0.25)  # seconds before trying the next collector, while some are untried

Code = grpc.StatusCode
# Worth retrying soon: the collector is restarting, overloaded, or the network blinked.
RETRYABLE = frozenset({Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.RESOURCE_EXHAUSTED, Code.ABORTED,
                       Code.INTERNAL, Code.UNKNOWN, Code.CANCELLED})
# Anything else (bad token, no permission, a protocol mismatch) needs an operator, who may fix it on
# the collector without restarting us: logged once, retried at the slowest pace.
MAX_RETRY_AFTER = 300.0
MAX_PENDING_STATES = 64  # answers to commands waiting for a stream; older ones are dropped (and counted)
BATCH_MAX_BYTES = 1 << 20  # well under gRPC's default 4 MiB receive limit
MAX_SPOOLED_MODELS = 64  # models of earlier runs named in a Hello (a spool rarely holds more than one)
Ack = collector_pb2.WindowAck


@dataclass(frozen=True)
class TLSConfig:
    """PEM files for a TLS connection; all optional (no root_cert: the system's trusted CAs)."""

    root_cert: str | os.PathLike | None = None
    client_cert: str | os.PathLike | None = None  # with client_key: mutual TLS
    client_key: str | os.PathLike | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """Read the files now (each connection re-reads them, so rotated certificates are picked up)."""
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("TLS client_cert and client_key go together")

        def read(path: str | os.PathLike | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return grpc.ssl_channel_credentials(root_certificates=read(self.root_cert),
                                            private_key=read(self.client_key),
                                            certificate_chain=read(self.client_cert))

    def ssl_context(self) -> ssl.SSLContext:
        """The same for an HTTP client (``ssl``): the peer's certificate and host name are verified."""
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("TLS client_cert and client_key go together")
        context = ssl.create_default_context(cafile=os.fspath(self.root_cert) if self.root_cert else None)
        if self.client_cert is not None:
            context.load_cert_chain(os.fspath(self.client_cert), os.fspath(self.client_key))  # type: ignore[arg-type]
        return context


TLS = TLSConfig | Mapping[str, Any] | bool | None
OnCommand = Callable[[collector_pb2.Command], None]


class _Stream:
    """State of one stream attempt, shared by the sender thread and gRPC's request-reading thread."""

    def __init__(self) -> None:
        self.call: Any = None
        self.ready = False        # the Hello went out: the transport is up
        self.done = False
        self.in_flight: OrderedDict[tuple[str, int], str] = OrderedDict()  # (run_id, seq) -> spool key
        self.cursor: str | None = None  # last spool key sent on this stream
        self.next_status = 0.0
        self.status_sent: tuple[int, ...] = ()


class CollectorExporter:
    """A window sink that spools windows and streams them to the collector at ``target`` (HOST:PORT;
    several, comma-separated or a sequence: failover, see the module's docstring).

    ``token`` is sent as ``authorization: Bearer <token>``; ``tls`` is a
    ``TLSConfig`` (or a dict of its fields, or True for the system CAs), None for
    plaintext. ``close(timeout)`` delivers what it can in that time; the rest
    stays in ``spool_dir`` for the next start. ``on_command`` receives the
    collector's commands; ``start=False`` defers connecting until ``start()``
    (so that the first Hello can describe a model loaded after the spool was opened).
    """

    def __init__(self, target: str | Sequence[str], *, hello: collector_pb2.Hello, spool_dir: str | os.PathLike,
                 token: str | None = None, tls: TLS = None, max_in_flight: int = 64, batch_max: int = 32,
                 max_spool_bytes: int = DEFAULT_MAX_BYTES, status_seconds: float = 30.0,
                 initial_backoff: float = 1.0, max_backoff: float = 30.0,
                 on_command: OnCommand | None = None, start: bool = True) -> None:
        for name, value in (("max_in_flight", max_in_flight), ("batch_max", batch_max),
                            ("status_seconds", status_seconds), ("initial_backoff", initial_backoff),
                            ("max_backoff", max_backoff)):
            if value <= 0:
                raise ValueError(f"{name} must be greater than 0, not {value}")
        self.targets = split_targets(target)
        # Agents of one fleet start at different collectors; one agent always starts at the same one.
        self._target_index = zlib.crc32(hello.agent_id.encode()) % len(self.targets)
        self.max_in_flight, self.batch_max = max_in_flight, batch_max
        self.status_seconds = status_seconds
        self.initial_backoff, self.max_backoff = initial_backoff, max_backoff
        self._hello = collector_pb2.Hello()
        self._hello.CopyFrom(hello)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._tls = _tls_config(tls)
        if self._tls is not None:
            self._tls.credentials()  # a missing or unreadable file is the caller's error, now
        self.spool = Spool(spool_dir, max_spool_bytes)
        self._cond = threading.Condition()
        self._changes = 0          # bumped on export / ack / close: wakes the request reader
        self._closing = threading.Event()
        self._stop = threading.Event()
        self._closed = False
        self._sender_done = False
        self._stream: _Stream | None = None
        self._failures = 0         # consecutive, for the backoff exponent
        self._reported: tuple[Any, str] | None = None  # the operator-level error already logged
        self._stats = {"windows_sent": 0, "windows_acked": 0, "windows_rejected": 0, "retries": 0, "failovers": 0,
                       "export_errors": 0, "commands": 0, "model_states_sent": 0, "model_states_dropped": 0}
        self.on_command = on_command
        self._states: deque[collector_pb2.ModelState] = deque()
        self._thread = threading.Thread(target=self._run, name="outrider-exporter", daemon=True)
        self._started = False
        if start:
            self.start()

    def start(self) -> None:
        """Start connecting (once; done by the constructor unless ``start=False``)."""
        with self._cond:
            if self._started:
                return
            self._started = True
        self._thread.start()

    # --- managed agents ---------------------------------------------------------------
    def send_model_state(self, state: collector_pb2.ModelState) -> None:
        """Send ``state`` on the stream as soon as it is up (next message out); never blocks.
        Kept across reconnects; past ``MAX_PENDING_STATES`` unsent the oldest is dropped."""
        copy = collector_pb2.ModelState()
        copy.CopyFrom(state)
        with self._cond:
            if len(self._states) >= MAX_PENDING_STATES:
                self._states.popleft()
                self._stats["model_states_dropped"] += 1
            self._states.append(copy)
            self._changes += 1
            self._cond.notify_all()

    def update_hello(self, **fields: Any) -> None:
        """Change the Hello sent on the next (re)connect, e.g. ``model_version=``, ``inputs=``,
        ``model_state=``; message and repeated fields are replaced whole."""
        with self._cond:
            hello = self._hello
            for name, value in fields.items():
                field = hello.DESCRIPTOR.fields_by_name[name]
                if field.is_repeated:
                    hello.ClearField(name)
                    getattr(hello, name).extend(value)
                elif field.message_type is not None:
                    getattr(hello, name).CopyFrom(value)
                else:
                    setattr(hello, name, value)

    def hello(self) -> collector_pb2.Hello:
        """A copy of the Hello the next connection sends."""
        with self._cond:
            hello = collector_pb2.Hello()
            hello.CopyFrom(self._hello)
        return hello

    @property
    def target(self) -> str:
        """The collector this agent streams to now (or tries next)."""
        return self.targets[self._target_index]

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata of every request to the collector (the bearer token)."""
        return self._metadata

    def channel(self) -> grpc.Channel:
        """A new channel to the collector with this exporter's TLS settings (the caller closes it)."""
        return self._channel()

    # --- the sink ---------------------------------------------------------------------
    def export(self, window: summary_pb2.WindowSummary) -> None:
        """Spool the window and wake the sender; never blocks on the network, never raises."""
        try:
            self.spool.put(window)
        except Exception:
            log.exception("cannot spool window %s/%s", getattr(window, "run_id", "?"), getattr(window, "seq", "?"))
            with self._cond:
                self._stats["export_errors"] += 1
            return
        self._poke()

    def stats(self) -> dict[str, int | bool]:
        """Counters since start, the connection state, and the spool's (persistent) counts."""
        with self._cond:
            out: dict[str, int | bool] = dict(self._stats)
            stream = self._stream
            out["connected"] = bool(stream and stream.ready and not stream.done)
            out["in_flight"] = len(stream.in_flight) if stream else 0
        status = self.spool.status()
        for field in ("windows", "bytes", "dropped_windows", "dropped_rows", "rejected_windows"):
            out[f"spool_{field}"] = getattr(status, field)
        return out

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is spooled (until acked or ``timeout``), then stop; the rest stays spooled."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + timeout
        self._closing.set()  # also cuts a backoff wait short: one more attempt, now
        self.start()  # never started: one attempt now, like a backoff cut short
        self._poke()
        with self._cond:  # acks and the thread's exit notify
            self._cond.wait_for(lambda: self._sender_done or not len(self.spool),
                                max(0.0, deadline - time.monotonic()))
        self._stop.set()
        with self._cond:
            stream = self._stream
            self._changes += 1
            self._cond.notify_all()
        if stream is not None and stream.call is not None:
            stream.call.cancel()
        self._thread.join(max(1.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning("exporter thread did not stop; its spool %s stays locked", self.spool.directory)
            return
        left = len(self.spool)
        if left:
            log.warning("%d window(s) not acknowledged by %s yet; kept in %s for the next start",
                        left, self.target, self.spool.directory)
        self.spool.close()

    def __enter__(self) -> "CollectorExporter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _poke(self) -> None:
        with self._cond:
            self._changes += 1
            self._cond.notify_all()

    # --- the sender thread ------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._closing.is_set() and not len(self.spool):
                    break
                error = self._stream_once()
                if self._stop.is_set() or self._closing.is_set():
                    break  # closing: one attempt only; what is left waits in the spool
                delay = self._delay(error)
                with self._cond:
                    self._stats["retries"] += 1
                    if len(self.targets) > 1:
                        self._target_index = (self._target_index + 1) % len(self.targets)
                        self._stats["failovers"] += 1
                self._closing.wait(delay)
        except Exception:  # a bug; windows wait in the spool for the next start
            log.exception("exporter to %s stopped", self.target)
        finally:
            with self._cond:
                self._sender_done = True
                self._cond.notify_all()  # close() may be waiting for us

    def _stream_once(self) -> BaseException | None:
        """One stream, from connect to its end; the error that ended it (None: ended cleanly)."""
        try:
            channel = self._channel()
        except Exception as exc:  # e.g. a TLS file gone since start
            log.error("cannot set up a channel to %s: %s", self.target, exc)
            return exc
        stream = _Stream()
        with self._cond:
            self._stream = stream
        try:
            call = collector_pb2_grpc.AgentServiceStub(channel).Stream(self._requests(stream),
                                                                       metadata=self._metadata)
            stream.call = call
            if self._stop.is_set():
                call.cancel()
            for message in call:
                if message.HasField("acks"):
                    self._on_acks(stream, message.acks)
                elif message.HasField("command"):
                    self._on_command(message.command)
            return None
        except grpc.RpcError as exc:
            return exc
        except Exception as exc:  # a bug here must not end delivery for good
            log.exception("exporter stream to %s failed", self.target)
            return exc
        finally:
            with self._cond:
                stream.done = True
                self._stream = None
                self._changes += 1
                self._cond.notify_all()
            channel.close()

    def _on_command(self, command: collector_pb2.Command) -> None:
        with self._cond:
            self._stats["commands"] += 1
        handler = self.on_command
        if handler is None:
            log.warning("collector command %r (%s) ignored: this agent was started with a model file, "
                        "not managed by the collector", command.kind, command.id)
            return
        try:
            handler(command)
        except Exception:  # a bug in the handler must not end delivery
            log.exception("collector command %r (%s) could not be handed on", command.kind, command.id)

    def _channel(self) -> grpc.Channel:
        # A fresh channel per attempt: our backoff decides when to reconnect, not the channel's own.
        # Keepalive pings notice a collector that vanished without closing the connection
        # (the collector allows them: grpc.http2.min_ping_interval_without_data_ms = 10 s).
        if self._tls is None:
            return grpc.insecure_channel(self.target, options=KEEPALIVE)
        return grpc.secure_channel(self.target, self._tls.credentials(), options=KEEPALIVE)

    def _requests(self, stream: _Stream):
        """The stream's outgoing messages; iterated by gRPC's thread, one at a time (flow control)."""
        hello = self.hello()
        hello.spool.CopyFrom(self.spool.status())
        # Windows of earlier runs (perhaps of another model) go out on this stream too: name their models.
        others = [m for m in self.spool.models() if m != hello.model_name]
        if len(others) > MAX_SPOOLED_MODELS:
            log.warning("the spool %s holds windows of %d other models; naming %d, the collector refuses the "
                        "windows of the rest", self.spool.directory, len(others), MAX_SPOOLED_MODELS)
        hello.spooled_models[:] = others[:MAX_SPOOLED_MODELS]
        stream.status_sent = _counts(hello.spool)
        stream.next_status = time.monotonic() + self.status_seconds
        yield collector_pb2.AgentMessage(hello=hello)
        # gRPC asks for the next message only once the last one was written to a live transport.
        # (Not channel.subscribe: its polling thread races channel.close() and raises.)
        stream.ready = True
        while True:
            message = self._next_message(stream)
            if message is None:
                return
            yield message

    def _next_message(self, stream: _Stream) -> collector_pb2.AgentMessage | None:
        while True:
            with self._cond:
                if stream.done or self._stop.is_set():
                    return None
                changes = self._changes
                room = min(self.batch_max, self.max_in_flight - len(stream.in_flight))
                if self._states:  # answers to commands go first: the collector waits for them
                    self._stats["model_states_sent"] += 1
                    return collector_pb2.AgentMessage(model_state=self._states.popleft())
            status = self.spool.status()
            if time.monotonic() >= stream.next_status or _counts(status) != stream.status_sent:
                stream.status_sent = _counts(status)
                stream.next_status = time.monotonic() + self.status_seconds
                return collector_pb2.AgentMessage(status=status)
            if room > 0:
                batch = _fit(self.spool.pending(room, after=stream.cursor))
                if batch:
                    with self._cond:
                        if stream.done:
                            return None
                        for key, window in batch:
                            stream.in_flight[(window.run_id, window.seq)] = key
                        stream.cursor = batch[-1][0]
                        self._stats["windows_sent"] += len(batch)
                    return collector_pb2.AgentMessage(
                        windows=collector_pb2.WindowBatch(windows=[w for _, w in batch]))
            with self._cond:
                if self._changes == changes and not stream.done and not self._stop.is_set():
                    self._cond.wait(max(0.0, stream.next_status - time.monotonic()))

    def _on_acks(self, stream: _Stream, acks: collector_pb2.Acks) -> None:
        acked = rejected = 0
        for ack in acks.acks:
            with self._cond:
                key = stream.in_flight.pop((ack.run_id, ack.seq), None)
            if key is None:
                log.debug("ack for window %s/%s, which is not in flight", ack.run_id, ack.seq)
            elif ack.result in (Ack.STORED, Ack.DUPLICATE):
                self.spool.remove(key)
                acked += 1
            elif ack.result == Ack.REJECTED:
                self.spool.mark_rejected(key)
                rejected += 1
                log.warning("collector rejected window %s/%s: %s; not resent", ack.run_id, ack.seq,
                            ack.reason or "no reason given")
            else:  # unknown to this agent: keep it, the next connection resends it
                log.warning("ack for window %s/%s has unknown result %d; kept in the spool",
                            ack.run_id, ack.seq, ack.result)
        with self._cond:
            self._stats["windows_acked"] += acked
            self._stats["windows_rejected"] += rejected
            if acked or rejected:
                if self._failures or self._reported:
                    log.info("delivering windows to %s again", self.target)
                self._failures = 0
                self._reported = None
            self._changes += 1
            self._cond.notify_all()

    def _delay(self, error: BaseException | None) -> float:
        """Seconds until the next attempt, and the one log line it deserves. With several collectors
        the next one is tried at once while some have not been tried since the last success; the
        backoff (or the refusal's slow pace) applies once every one has failed."""
        code = error.code() if isinstance(error, grpc.RpcError) else None
        details = (error.details() if isinstance(error, grpc.RpcError) else str(error or "")) or ""
        failures, self._failures = self._failures, self._failures + 1
        untried = (failures + 1) % len(self.targets) != 0
        if error is not None and code not in RETRYABLE:
            if self._reported != (code, details):
                self._reported = (code, details)
                log.error("collector %s refused the stream: %s %s; windows wait in the spool %s; "
                          "retrying every %.0f s", self.target, getattr(code, "name", type(error).__name__),
                          details, self.spool.directory, self.max_backoff)
            return random.uniform(*FAILOVER_DELAY) if untried else self.max_backoff
        n = min(failures // len(self.targets), 32)  # rounds over every collector
        delay = min(self.max_backoff, self.initial_backoff * 2 ** n * random.uniform(0.8, 1.2))
        if code is Code.RESOURCE_EXHAUSTED:
            retry_after = _retry_after(error)
            if retry_after is not None:
                delay = retry_after
        if untried:
            delay = random.uniform(*FAILOVER_DELAY)
        level = logging.WARNING if failures == 0 else logging.DEBUG
        following = f"; trying {self.targets[(self._target_index + 1) % len(self.targets)]}" if len(
            self.targets) > 1 else ""
        log.log(level, "collector %s: stream ended (%s%s)%s in %.1f s", self.target,
                getattr(code, "name", "closed by the collector"), f": {details}" if details else "",
                following or "; retrying", delay)
        return delay


def split_targets(target: str | Sequence[str]) -> list[str]:
    """The collectors of ``target``: "a:1,b:2" or a sequence of addresses; at least one."""
    parts = target.split(",") if isinstance(target, str) else list(target)
    targets = [t.strip() for t in parts if t.strip()]
    if not targets:
        raise ValueError("no collector address given")
    return targets


def _counts(status: collector_pb2.SpoolStatus) -> tuple[int, ...]:
    """The parts of a status worth an immediate message when they change."""
    return (status.dropped_windows, status.dropped_rows, status.rejected_windows)


def _fit(batch: list[tuple[str, summary_pb2.WindowSummary]]) -> list[tuple[str, summary_pb2.WindowSummary]]:
    """The first windows of ``batch`` that fit in one message (always at least one)."""
    total = 0
    for i, (_, window) in enumerate(batch):
        total += window.ByteSize()
        if i and total > BATCH_MAX_BYTES:
            return batch[:i]
    return batch


def _retry_after(error: grpc.RpcError) -> float | None:
    try:
        for key, value in error.trailing_metadata() or ():
            if key == "retry-after-ms":
                return min(MAX_RETRY_AFTER, max(0.0, float(value) / 1000))
    except Exception:  # a malformed hint: fall back to our own backoff
        return None
    return None


def _tls_config(tls: TLS) -> TLSConfig | None:
    if tls is None or tls is False:
        return None
    if tls is True:
        return TLSConfig()
    if isinstance(tls, TLSConfig):
        return tls
    return TLSConfig(**dict(tls))
