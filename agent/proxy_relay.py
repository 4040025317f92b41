"""``agent proxy --relay-listen`` and ``--http-relay-listen``: the cheapest way through the proxy, a byte
relay that watches the calls it passes on.

Each connection a client opens here is paired with one to the upstream, and the bytes go across
unchanged both ways, HTTP/2 frames, settings and pings included: the relay ends neither side's
HTTP/2, so a reply is what the upstream sent, byte for byte. Two pumps a connection, one each way,
copy each chunk into a queue bounded in bytes; in C (``agent/_relay.c``) they run without the GIL,
so the monitor's Python work never delays a relayed byte (without the build, ``_ChunkQueue`` does
the same in Python). The ``ProxyMonitor``'s thread takes the chunks each pass (this server is one
of its sources), follows each connection with an ``agent.h2tap.Tap`` and summarises the model's
ModelInfer calls as the gRPC front's are: same sessions, windows, feedback and
``outrider_proxy_calls`` counts. What differs between gRPC (``--relay-listen``) and REST
(``--http-relay-listen``, HTTP/1.1 followed by ``agent.h1tap``) is in ``agent.relay_protocols``.

What a full proxy port (``--listen``) does and the relay cannot, since it changes no byte: check
tokens (``--auth-file``), give a request without an id one of its own, pin calls for ``--managed``,
serve feedback and health (they stay on ``--listen``), end TLS. The proxy's command refuses those
combinations.

Failures: an upstream that cannot be reached when a client connects is answered by the relay itself,
UNAVAILABLE naming it on every call the client sent, then GOAWAY, so the client connects again (and
finds the upstream once it is back). A unary OIP call the upstream leaves unanswered past
``--upstream-timeout-seconds`` closes the connection: the client's calls on it fail UNAVAILABLE
rather than hang (a client's shorter deadline cancels its call first, as ever). A connection the
tap could not follow (a chunk dropped because the queue was full, bytes it cannot read) is still
relayed, counted in ``outrider_proxy_relay_unobserved_connections`` (its dropped chunks in
``outrider_proxy_unmonitored_calls{reason="queue_full"}``). Over REST an unreachable upstream is a
503 ``{"error": ...}`` naming it.
"""
from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

from agent.h1tap import Http1Tap
from agent.h2tap import Tap, TapError, TappedCall
from agent.proxy import CallCounts, Decoder, ProxyMonitor
from agent.relay_protocols import PROTOCOLS

try:
    from agent import _relay  # type: ignore[attr-defined]  # the pumps in C (agent/_relay.c)
except ImportError:  # not built: the same pumps in Python (_ChunkQueue)
    _relay = None

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024
CONNECT_SECONDS = 5.0      # a connect to the upstream that takes longer is an unreachable upstream
WATCH_SECONDS = 0.5        # how often unanswered calls are checked against their timeout
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_QUEUE_BYTES = 64 << 20  # relayed bytes awaiting the monitor's thread, every connection together
ENDED = -1  # a queue entry's direction when it marks a connection's end


class _ChunkQueue:
    """``agent._relay.Queue`` in Python, for a build without the C extension: chunks relayed, copied for
    the monitor, bounded in bytes; ``pump`` relays one direction of a connection into it."""

    def __init__(self, max_bytes: int = DEFAULT_QUEUE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.dropped = 0
        self._items: deque[tuple[int, int, int, bytes]] = deque()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def entries(self) -> int:
        return len(self._items)

    def push(self, conn: int, from_client: int, ts: int, data: bytes) -> bool:
        with self._lock:
            if data and self._bytes + len(data) > self.max_bytes:
                self.dropped += 1
                return False
            self._items.append((conn, from_client, ts, data))
            self._bytes += len(data)
            return True

    def take(self) -> list[tuple[int, int, int, bytes]]:
        with self._lock:
            items, self._items, self._bytes = list(self._items), deque(), 0
        return items

    def pump(self, source: socket.socket, sink: socket.socket, conn: int, from_client: bool,
             flag: bytearray) -> None:
        try:
            while chunk := source.recv(CHUNK_BYTES):
                # queued before it is sent on, as agent/_relay.c says why
                if flag[0] and not self.push(conn, int(from_client), time.perf_counter_ns(), chunk):
                    flag[0] = 0
                sink.sendall(chunk)
        except OSError:
            pass


class _Connection:
    """A client's connection and its upstream twin: two pumps, one tap."""

    def __init__(self, relay: RelayServer, client: socket.socket, number: int) -> None:
        self.relay = relay
        self.number = number
        self.client = client
        self.upstream: socket.socket | None = None
        self.tap: Tap | Http1Tap = relay.speaks.tap(relay.max_message_bytes)
        self.flag = bytearray(b"\x01")  # both pumps copy chunks while 1; 0 once one was dropped or not followed
        self.counted = False         # counted as unobserved
        self.client_done = False     # the client closed its side
        self.upstream_ended = False  # the upstream closed (or failed) first: calls left pending are its failures
        self.deadline_hit = False
        self.connected_ns = 0        # when the upstream connection was made (perf_counter_ns)
        self.heard = False           # the monitor has seen bytes from the upstream

    def run(self) -> None:
        """The client's side: connect upstream, start the reply pump, relay the client's bytes."""
        relay = self.relay
        try:
            self.upstream = socket.create_connection(relay.upstream_address, timeout=CONNECT_SECONDS)
        except OSError as exc:
            relay.refuse(self.client, f"{exc.strerror or exc}")
            relay.forget(self)
            return
        self.upstream.settimeout(None)
        self.connected_ns = time.perf_counter_ns()
        for sock in (self.client, self.upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # frames go out as they come
        relay.following[self.number] = self
        replies = threading.Thread(target=self._pump, args=(self.upstream, self.client, False),
                                   name="outrider-relay-reply", daemon=True)
        replies.start()
        self._pump(self.client, self.upstream, True)
        replies.join()
        for sock in (self.client, self.upstream):  # closed only now: no pump can be using the descriptors
            sock.close()
        # after every chunk of the connection: the tap's last word (the pumps' clock: CLOCK_MONOTONIC)
        relay.queue.push(self.number, ENDED, time.monotonic_ns(), b"")
        relay.forget(self)

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        if _relay is not None:
            self.relay.queue.pump(source.fileno(), sink.fileno(), self.number, from_client, self.flag)
        else:
            self.relay.queue.pump(source, sink, self.number, from_client, self.flag)
        if from_client:
            self.client_done = True
            try:  # the upstream may still answer what was sent; it closes when it has
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        else:
            self.upstream_ended = not self.client_done
            self.shutdown()  # nothing more will be answered: the client's calls fail now, not at their deadline

    def overdue(self, now_ns: int) -> str:
        """Why the upstream is overdue ("" : it is not): a unary OIP call unanswered past the upstream timeout
        (streams live as long as their clients), or, where the server speaks first (gRPC's SETTINGS), nothing
        heard from it that long after connecting; clients would otherwise wait for their own timeouts (20 s)."""
        if not self.flag[0]:  # not followed: what the tap holds is stale, and says nothing of the upstream
            return ""
        timeout_ns = int(self.relay.upstream_timeout * 1e9)
        if self.relay.speaks.greets and not self.heard and self.connected_ns and \
                now_ns - self.connected_ns > timeout_ns:
            return "sent nothing since the connection was made"
        if any(self.relay.speaks.bounded(method) and now_ns - started > timeout_ns
               for _, method, started in self.tap.pending()):
            return "left a call unanswered"
        return ""

    def shutdown(self) -> None:
        """Both sockets shut: the pumps return (the descriptors are closed once they have)."""
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class RelayServer:
    """A running relay: ``port``, ``address``, ``stop``."""

    def __init__(self, listen: str, upstream: str, monitor: ProxyMonitor, calls: Any, *, protocol: str = "grpc",
                 upstream_timeout: float = 30.0, max_message_bytes: int = 64 << 20,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, queue_bytes: int = DEFAULT_QUEUE_BYTES) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol: one of {', '.join(PROTOCOLS)}")
        self.protocol = protocol
        self.speaks = PROTOCOLS[protocol]
        host, _, port = listen.rpartition(":")
        up_host, _, up_port = upstream.rpartition(":")
        self.upstream = upstream
        self.upstream_address = (up_host.strip("[]"), int(up_port))
        self.monitor = monitor
        self.counts = CallCounts(calls)
        self.upstream_timeout = upstream_timeout
        self.max_message_bytes = max_message_bytes
        self.max_connections = max_connections
        self.unobserved = 0  # connections not followed to the end (a dropped chunk, bytes that are not HTTP/2)
        self.refused = 0     # connections over max_connections, closed at once
        self.queue: Any = _relay.Queue(queue_bytes) if _relay is not None else _ChunkQueue(queue_bytes)
        self.following: dict[int, _Connection] = {}  # the monitor's thread forgets a connection at its end marker
        self._dropped = 0  # chunks the queue dropped, as counted so far
        self._numbers = itertools.count(1)
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host.strip("[]"), int(port)))
            self._listener.listen(128)
        except OSError as exc:
            self._listener.close()
            raise OSError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
        self.host = host
        self.port = self._listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, name="outrider-relay-accept", daemon=True),
                         threading.Thread(target=self._watch, name="outrider-relay-watch", daemon=True)]
        for thread in self._threads:
            thread.start()
        monitor.add_source(self)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def connections(self) -> int:
        with self._lock:
            return len(self._connections)

    # --- the relay's threads ----------------------------------------------------------
    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.05)  # e.g. out of file descriptors: try again, without spinning
                continue
            connection = _Connection(self, client, next(self._numbers))
            with self._lock:
                full = len(self._connections) >= self.max_connections
                if not full:
                    self._connections.add(connection)
            if full:
                self.refused += 1
                client.close()
                continue
            threading.Thread(target=connection.run, name="outrider-relay", daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_SECONDS):
            now = time.perf_counter_ns()
            with self._lock:
                overdue = [(c, why) for c in self._connections if (why := c.overdue(now))]
            for connection, why in overdue:
                log.warning("upstream %s %s for %g s (--upstream-timeout-seconds): its connection is closed, the "
                            "client's calls on it fail UNAVAILABLE", self.upstream, why, self.upstream_timeout)
                connection.deadline_hit = True
                connection.shutdown()

    def forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)

    # --- on the monitor's thread --------------------------------------------------------
    def waiting(self) -> int:
        # dropped chunks not yet counted are work too: the next pass marks their connections unobserved
        return self.queue.entries + (self.queue.dropped != self._dropped)

    def take(self) -> list[Decoder]:
        """The chunks relayed since the last pass, fed to their connections' taps: the decoders of the calls
        they completed (``agent.proxy.Source``)."""
        found: list[Decoder] = []
        for number, from_client, ts, chunk in self.queue.take():
            connection = self.following.get(number)
            if connection is None:
                continue
            if from_client == ENDED:
                del self.following[number]
                found += self._ended(connection, ts)
            elif connection.flag[0]:
                connection.heard = connection.heard or not from_client
                found += self.decoders(connection, connection.tap.client if from_client else connection.tap.server,
                                       chunk, ts)
        dropped = self.queue.dropped
        if dropped > self._dropped:  # the tap cannot follow a connection with a gap in it
            self.monitor.count("queue_full", calls=dropped - self._dropped)
            self._dropped = dropped
            for connection in list(self.following.values()):
                self._unobserved(connection)
        return found

    def _ended(self, connection: _Connection, now_ns: int) -> list[Decoder]:
        """Calls left unanswered when the connection closed, counted and (inference calls of the model) errors in
        the windows, as the full ports count them; a connection some chunk of which was dropped."""
        found: list[Decoder] = []
        if connection.flag[0]:  # else the tap stopped short: its calls in flight are not known
            code = "UNREACHABLE" if connection.upstream_ended or connection.deadline_hit else "CANCELLED"
            found = self.speaks.decoders(connection.tap.abandon(now_ns), self.counts, self.monitor.model_name, code)
        self._unobserved(connection)
        return found

    def _unobserved(self, connection: _Connection) -> None:
        if not connection.flag[0] and not connection.counted:
            connection.counted = True
            self.unobserved += 1

    def decoders(self, connection: _Connection, feed: Callable[[bytes, int], list[TappedCall]], chunk: bytes,
                 now_ns: int) -> list[Decoder]:
        """``chunk`` fed to the connection's tap: the monitor's decoders of the calls it completed, each call
        counted by method and status."""
        try:
            done = feed(chunk, now_ns)
        except TapError as exc:
            connection.flag[0] = 0  # the pumps copy no more for it
            if not connection.counted:
                log.warning("a relayed connection is passed on unobserved: %s", exc)
            self._unobserved(connection)
            return []
        return self.speaks.decoders(done, self.counts, self.monitor.model_name)

    def refuse(self, client: socket.socket, why: str) -> None:
        """Answer ``client``'s calls as the protocol can that the upstream is unreachable, naming it."""
        failed = self.speaks.refuse(client, f"upstream {self.upstream} is unreachable ({why}); check "
                                            f"{self.speaks.upstream_flag} and that the inference server is running",
                                    self.counts)
        for decode in failed:  # errors in the windows, as the full ports count them
            self.monitor.offer(decode)

    def stop(self, grace: float = 5.0) -> None:
        """Accept no more; let calls in flight finish for ``grace`` seconds, then close every connection."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self._listener.close()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._lock:
                busy = [c for c in self._connections if c.tap.pending()]
            if not busy:
                break
            time.sleep(0.05)
        with self._lock:
            left = list(self._connections)
        for connection in left:
            connection.shutdown()
        for thread in self._threads:
            thread.join(5)


class RelayCollector:
    """The relays' counts, read at scrape time, one series per relay (``protocol``: grpc, rest)."""

    def __init__(self, relays: list[RelayServer]) -> None:
        self.relays = relays

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        families = [
            (GaugeMetricFamily, "outrider_proxy_relay_connections", "connections open through the relay",
             RelayServer.connections),
            (CounterMetricFamily, "outrider_proxy_relay_unobserved_connections",
             "relayed connections passed on without being followed (a chunk dropped from a full capture queue, "
             "or bytes the tap cannot read): their calls are not summarised", lambda r: r.unobserved),
            (CounterMetricFamily, "outrider_proxy_relay_refused_connections",
             "connections closed at once: the relay already had its most", lambda r: r.refused)]
        for kind, name, text, value in families:
            family = kind(name, text, labels=["protocol"])
            for relay in self.relays:
                family.add_metric([relay.protocol], value(relay))
            yield family


def serve_relay(listen: str, upstream: str, monitor: ProxyMonitor, calls: Any, *, protocol: str = "grpc",
                registry: Any = None, upstream_timeout: float = 30.0, max_message_bytes: int = 64 << 20,
                queue_bytes: int = DEFAULT_QUEUE_BYTES) -> RelayServer:
    """Relay ``protocol`` ("grpc": HTTP/2, "rest": HTTP/1.1) on ``listen`` to ``upstream`` (HOST:PORT), watching
    the calls of ``monitor``'s model. Raises ``OSError`` when it cannot listen."""
    relay = RelayServer(listen, upstream, monitor, calls, protocol=protocol, upstream_timeout=upstream_timeout,
                        max_message_bytes=max_message_bytes, queue_bytes=queue_bytes)
    if registry is not None:  # else the caller registers one RelayCollector for all its relays
        registry.register(RelayCollector([relay]))
    return relay
