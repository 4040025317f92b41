"""``outrider agent proxy --relay-listen``: a byte relay in front of a real OIP server, watched off the request path.

Replies are compared as bytes with the upstream's own answers; what the relay's tap reads is checked
against what was sent (methods, rows, ids), through HTTP/2 written by grpcio and by h2 (padding,
priorities, CONTINUATION, resets, compression). Windows at a real collector, with labels and drift:
tests/test_proxy.py's collector test, through both ports.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import signal
import socket
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import numpy as np
import onnxruntime as ort
import pytest

from agent import examples
from agent.h2tap import Tap, TapError
from agent.proxy import ProxyMonitor
from agent.proxy_grpc import ProxyServer, proxy_calls_counter, serve_proxy
from agent import proxy_relay
from agent.proxy_relay import RelayServer, serve_relay
from agent.server import serve
from protos import agent_pb2, agent_pb2_grpc
from protos import open_inference_pb2 as pb
from test_cli_contract import run as run_cli
from test_delivery import start, wait_until
from test_proxy import (HANG_GUARD, INFER, Raw, free_address, idle, in_memory, infer_request, pass_through_cases,
                        tritonclient)

METHOD = "/inference.GRPCInferenceService/"


def schema(model: Path) -> Any:
    """The model's metadata as an upstream serving it answers ModelMetadata."""
    from agent.dataplane import DataPlane

    return DataPlane(ort.InferenceSession(str(model)), "m", "1").metadata("m")


@pytest.fixture
def upstream(lr_model: Path) -> Iterator[Any]:
    server = serve(ort.InferenceSession(str(lr_model)), "m", "1", "127.0.0.1:0")
    yield server
    server.stop(grace=0)


@pytest.fixture(params=["c", "python"])
def pumps(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The relay's pumps as built (agent/_relay.c), and the Python ones a build without a compiler gets."""
    if request.param == "python":
        monkeypatch.setattr(proxy_relay, "_relay", None)
    elif proxy_relay._relay is None:  # installed without the C extension: only CI must have it
        if os.environ.get("CI") == "true":
            pytest.fail("agent._relay is not built: pip install -e . compiles agent/_relay.c (needs gcc)")
        pytest.skip("agent._relay is not built")
    return request.param


@pytest.fixture
def front(upstream: Any, pumps: str) -> Iterator[tuple[ProxyServer, RelayServer, Any]]:
    """The proxy (its --listen: health, feedback) and its relay, counting calls in one registry."""
    from agent.metrics import AgentMetrics

    metrics = AgentMetrics()
    calls = proxy_calls_counter(metrics.registry)
    running = serve_proxy(upstream.address, "m", in_memory, "127.0.0.1:0", metrics=metrics, calls=calls)
    relay = serve_relay("127.0.0.1:0", upstream.address, running.monitor, calls, registry=metrics.registry)
    yield running, relay, metrics
    relay.stop(0)
    running.stop(grace=0)


def scrape(metrics: Any) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


# ------------------------------------------------------------------ pass-through, and what the tap reads


def test_relayed_replies_are_the_upstreams_bytes_and_the_models_calls_are_summarised(upstream: Any, front: Any):
    running, relay, metrics = front
    direct, through = Raw(upstream.address), Raw(relay.address)
    cases = pass_through_cases()
    for method, request in cases:
        assert through.call(method, request) == direct.call(method, request), (method, request.ListFields()[:2])
    idle(running)
    stats = running.monitor.stats()
    assert stats["captured"] == 2  # with-id and typed; the subset lacks an output
    assert stats["unmonitored"]["partial_outputs"] == 1 and stats["unmonitored"]["other_model"] == 1
    assert stats["upstream_errors"] == 2 and stats["capture_failures"] == 0
    session = running.monitor.session
    assert session.stats()["errors"] == 2 and session.stats()["rows_captured"] == 14  # two calls of seven rows
    page = scrape(metrics)
    assert 'outrider_proxy_calls_total{code="OK",method="ModelInfer"} 3.0' in page
    assert 'outrider_proxy_calls_total{code="INVALID_ARGUMENT",method="ModelInfer"} 2.0' in page
    assert 'outrider_proxy_calls_total{code="NOT_FOUND",method="ModelInfer"} 1.0' in page
    assert 'outrider_proxy_calls_total{code="OK",method="ServerLive"} 1.0' in page
    assert 'outrider_proxy_calls_total{code="OK",method="ModelMetadata"} 1.0' in page
    assert 'outrider_proxy_relay_connections{protocol="grpc"} 1.0' in page
    assert 'outrider_proxy_relay_unobserved_connections_total{protocol="grpc"} 0.0' in page


def test_calls_whose_headers_change_hpacks_table_are_all_read_right(upstream: Any, front: Any):
    """Large, changing metadata evicts the table's entries call after call (the tap's cache of decoded
    blocks must follow); methods alternate; every call is counted under its own method, every
    inference call summarised with its own id."""
    running, relay, metrics = front
    channel = grpc.insecure_channel(relay.address)
    infer, live = channel.unary_unary(INFER), channel.unary_unary(METHOD + "ServerLive")
    x = examples.tabular_data(1, seed=4)[0]
    rng = np.random.default_rng(0)
    for i in range(60):
        metadata = (("x-pad", rng.bytes(300).hex()),) if i % 3 else ()  # 600 bytes: a 4 KiB table holds few
        infer(infer_request(x, f"id-{i}").SerializeToString(), metadata=metadata, timeout=HANG_GUARD)
        if i % 2:
            live(pb.ServerLiveRequest().SerializeToString(), metadata=metadata, timeout=HANG_GUARD)
    idle(running)
    page = scrape(metrics)
    assert 'outrider_proxy_calls_total{code="OK",method="ModelInfer"} 60.0' in page
    assert 'outrider_proxy_calls_total{code="OK",method="ServerLive"} 30.0' in page
    assert running.monitor.stats()["captured"] == 60
    logged = running.monitor.session.predictions
    assert all(logged.label(f"id-{i}", "1") for i in range(60))  # each call kept under the id it was sent with


def test_feedback_by_the_clients_id_on_the_proxys_port_joins_a_relayed_call(upstream: Any, front: Any):
    running, relay, _ = front
    x, y = examples.tabular_data(4, seed=5)
    assert Raw(relay.address).call("ModelInfer", infer_request(x, "labelled"))[0] == "OK"
    idle(running)
    reply = agent_pb2_grpc.FeedbackServiceStub(grpc.insecure_channel(running.address)).Feedback(
        agent_pb2.FeedbackRequest(labels=[agent_pb2.Label(request_id="labelled", row=j, class_label=str(int(y[j])))
                                          for j in range(4)]), timeout=HANG_GUARD)
    assert reply.matched == 4 and reply.unmatched == 0


def test_a_label_sent_as_soon_as_its_relayed_reply_arrives_joins_it(upstream: Any, front: Any):
    """The monitor takes the relay's chunks only every DRAIN_SECONDS; feedback waits for it, not the client."""
    running, relay, _ = front
    feedback = agent_pb2_grpc.FeedbackServiceStub(grpc.insecure_channel(running.address))
    for i in range(5):
        x, y = examples.tabular_data(2, seed=20 + i)
        assert Raw(relay.address).call("ModelInfer", infer_request(x, f"at-once-{i}"))[0] == "OK"
        reply = feedback.Feedback(agent_pb2.FeedbackRequest(labels=[
            agent_pb2.Label(request_id=f"at-once-{i}", row=j, class_label=str(int(y[j]))) for j in range(2)]),
            timeout=HANG_GUARD)
        assert (reply.matched, reply.unmatched) == (2, 0)


# ------------------------------------------------------------------ HTTP/2 as other clients write it


def _exchange(request_headers: list[tuple[str, str]], message: bytes, *, reply: bytes | None, status: str = "0",
              reset: bool = False, pad: int = 0, priority: bool = False, compressed: bool = False) -> Tap:
    """One call between an h2 client and an h2 server in memory, every byte fed to a tap in order."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    tap = Tap()
    got: list[Any] = []
    clock = iter(range(1, 10_000))

    def flow(source: Any, sink: Any, from_client: bool) -> None:
        data = source.data_to_send()
        if data:
            got.extend(tap.client(data, next(clock)) if from_client else tap.server(data, next(clock)))
            sink.receive_data(data)

    client.initiate_connection()
    server.initiate_connection()
    flow(client, server, True)
    flow(server, client, False)
    flow(client, server, True)
    body = (b"\x01" + len(gzip.compress(message)).to_bytes(4, "big") + gzip.compress(message)) if compressed \
        else b"\x00" + len(message).to_bytes(4, "big") + message
    client.send_headers(1, request_headers, **({"priority_weight": 200, "priority_depends_on": 0} if priority else {}))
    client.send_data(1, body, end_stream=True, pad_length=pad or None)
    flow(client, server, True)
    if reset:
        client.reset_stream(1)
        flow(client, server, True)
        tap.got = got  # type: ignore[attr-defined]
        return tap
    server.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
    if reply is not None:
        server.send_data(1, b"\x00" + len(reply).to_bytes(4, "big") + reply, pad_length=pad or None)
    server.send_headers(1, [("grpc-status", status), ("grpc-message", "bad%20input%3A no")], end_stream=True)
    flow(server, client, False)
    tap.got = got  # type: ignore[attr-defined]
    return tap


def _headers(path: str = INFER, extra: tuple[tuple[str, str], ...] = ()) -> list[tuple[str, str]]:
    return [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "up"),
            ("content-type", "application/grpc"), ("te", "trailers"), *extra]


def test_the_tap_reads_padding_priorities_continuations_and_compressed_messages():
    request = infer_request(np.ones((2, 20)), "h2").SerializeToString()
    big = (("x-big", "v" * 40_000),)  # past the 16 KiB frame: CONTINUATION frames
    tap = _exchange(_headers(extra=big), request, reply=b"reply-bytes", pad=17)
    (call,) = tap.got  # type: ignore[attr-defined]
    assert (call.method, call.request, call.reply, call.status) == (INFER, request, b"reply-bytes", 0)
    assert call.latency_ns > 0
    (prioritised,) = _exchange(_headers(), request, reply=b"r", priority=True).got  # type: ignore[attr-defined]
    assert (prioritised.request, prioritised.reply) == (request, b"r")
    (zipped,) = _exchange(_headers(extra=(("grpc-encoding", "gzip"),)), request, reply=b"r",
                          compressed=True).got  # type: ignore[attr-defined]
    assert zipped.request == request
    (failed,) = _exchange(_headers(), request, reply=None, status="3").got  # type: ignore[attr-defined]
    assert (failed.status, failed.message, failed.reply) == (3, "bad input: no", None)
    (reset,) = _exchange(_headers(), request, reply=None, reset=True).got  # type: ignore[attr-defined]
    assert reset.status == -1 and reset.method == INFER


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def test_the_same_header_bytes_are_read_anew_once_the_table_under_them_changed():
    """HPACK's index 62 is the newest entry: after another path is inserted, the very bytes that meant
    one path mean the other, and the tap must not answer from what it read before."""
    import hpack

    encoder, server, tap, methods = hpack.Encoder(), hpack.Encoder(), Tap(), []
    tap.client(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 0)
    blocks = []
    for stream, path in enumerate([METHOD + "ModelInfer", METHOD + "ModelInfer", METHOD + "ServerLive",
                                   METHOD + "ServerLive", METHOD + "ModelInfer"], start=1):
        block = encoder.encode([(":method", "POST"), (":path", path)])
        blocks.append(block)
        tap.client(_frame(0x1, 0x4 | 0x1, 2 * stream - 1, block), stream)  # HEADERS, END_HEADERS | END_STREAM
        trailers = server.encode([(":status", "200"), ("grpc-status", "0")])  # a trailers-only answer
        methods += [c.method for c in tap.server(_frame(0x1, 0x5, 2 * stream - 1, trailers), stream)]
    assert blocks[1] == blocks[3]  # the same bytes, another path
    assert [m.rsplit("/", 1)[1] for m in methods] == ["ModelInfer", "ModelInfer", "ServerLive", "ServerLive",
                                                       "ModelInfer"]


def test_bytes_that_are_not_http2_stop_the_tap_not_the_bytes():
    tap = Tap()
    with pytest.raises(TapError, match="preface"):
        tap.client(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 1)
    assert tap.broken and tap.client(b"PRI * HTTP/2.0", 2) == []


def test_a_connection_the_monitor_cannot_keep_up_with_is_relayed_unchanged_and_counted(upstream: Any, pumps: str):
    """A queue that takes nothing (0 bytes): every chunk is dropped, so the tap cannot follow the connection.
    Its replies are still the upstream's, and it is counted as unobserved."""
    from prometheus_client import CollectorRegistry

    monitor = ProxyMonitor("m", in_memory)
    registry = CollectorRegistry()
    relay = serve_relay("127.0.0.1:0", upstream.address, monitor, proxy_calls_counter(registry), registry=registry,
                        queue_bytes=0)
    try:
        x = examples.tabular_data(3, seed=6)[0]
        for i in range(3):
            request = infer_request(x, f"q{i}")
            assert Raw(relay.address).call("ModelInfer", request) == Raw(upstream.address).call("ModelInfer", request)
        wait_until(monitor.idle, timeout=HANG_GUARD, what="the monitor to take the relay's queue")
        assert relay.unobserved >= 1 and monitor.stats()["unmonitored"]["queue_full"] >= 1
        assert monitor.stats()["captured"] == 0
    finally:
        relay.stop(0)
        monitor.close(0)


# ------------------------------------------------------------------ an upstream that is not there


def test_an_unreachable_upstream_is_unavailable_naming_it_and_served_again_when_back(lr_model: Path):
    address = free_address()
    monitor = ProxyMonitor("m", in_memory)
    from prometheus_client import CollectorRegistry

    relay = serve_relay("127.0.0.1:0", address, monitor, proxy_calls_counter(CollectorRegistry()))
    back = None
    try:
        monitor.monitor(schema(lr_model))  # read while it was up: its calls that fail now are the windows' errors
        through = Raw(relay.address)
        x = examples.tabular_data(2, seed=7)[0]
        code, details, _, _ = through.call("ModelInfer", infer_request(x, "down"))  # hang guard: HANG_GUARD
        assert code == "UNAVAILABLE" and f"upstream {address} is unreachable" in details
        assert through.call("ModelInfer", infer_request(x, model="other"))[0] == "UNAVAILABLE"
        assert through.call("ServerLive", pb.ServerLiveRequest())[0] == "UNAVAILABLE"
        wait_until(monitor.idle, timeout=HANG_GUARD, what="the monitor to take the refused calls")
        assert monitor.stats()["upstream_errors"] == 1 and monitor.stats()["unmonitored"]["other_model"] == 1
        assert monitor.session.stats()["errors"] == 1
        back = serve(ort.InferenceSession(str(lr_model)), "m", "1", address)
        wait_until(lambda: through.call("ModelInfer", infer_request(x, "up"))[0] == "OK", timeout=HANG_GUARD,
                   what="the relay to reach the upstream once it is back")
    finally:
        relay.stop(0)
        monitor.close(0)
        if back is not None:
            back.stop(grace=0)


@contextlib.contextmanager
def upstream_taking(handle: Callable[[socket.socket], None]) -> Iterator[str]:
    """An upstream that accepts connections and gives each to ``handle`` (on the accepting thread); its address."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def take() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                handle(listener.accept()[0])
            except OSError:
                continue

    taker = threading.Thread(target=take, daemon=True)
    taker.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        taker.join(5)
        listener.close()


def test_an_upstream_that_does_not_answer_is_unavailable_after_the_bound():
    """A server that takes the connection and never says a word: the call fails, it does not hang. A gRPC client
    waits for the server's SETTINGS before it sends a call; the relay closes the connection after the bound."""
    from prometheus_client import CollectorRegistry

    held: list[socket.socket] = []
    with upstream_taking(held.append) as address:
        monitor = ProxyMonitor("m", in_memory)
        relay = RelayServer("127.0.0.1:0", address, monitor, proxy_calls_counter(CollectorRegistry()),
                            upstream_timeout=1.0)
        try:
            code, details, _, _ = Raw(relay.address).call("ServerLive", pb.ServerLiveRequest())  # hang guard
            assert code == "UNAVAILABLE" and "before receiving SETTINGS" not in details  # not the client's timeout
        finally:
            relay.stop(0)
            monitor.close(0)


def test_a_call_an_upstream_leaves_unanswered_is_unavailable_after_the_bound_and_an_error_of_the_model(
        lr_model: Path):
    """An upstream whose HTTP/2 answers (SETTINGS, PING) but whose calls never come back, as a server whose model
    hangs: the call fails after the bound, and it is one of the model's errors, as the full port counts it."""
    from prometheus_client import CollectorRegistry

    def hung(sock: socket.socket) -> None:
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        connection.initiate_connection()
        try:
            sock.sendall(connection.data_to_send())
            while data := sock.recv(65536):
                connection.receive_data(data)  # settings acked, requests read and never answered
                sock.sendall(connection.data_to_send())
        except OSError:
            pass

    with upstream_taking(lambda sock: threading.Thread(target=hung, args=(sock,), daemon=True).start()) as address:
        monitor = ProxyMonitor("m", in_memory)
        relay = RelayServer("127.0.0.1:0", address, monitor, proxy_calls_counter(CollectorRegistry()),
                            upstream_timeout=1.0)
        try:
            monitor.monitor(schema(lr_model))
            x = examples.tabular_data(2, seed=9)[0]
            assert Raw(relay.address).call("ModelInfer", infer_request(x, "unanswered"))[0] == "UNAVAILABLE"
            # the client hears of the closed connection before its end reaches the monitor's queue
            wait_until(lambda: relay.connections() == 0 and monitor.idle(), timeout=HANG_GUARD,
                       what="the monitor to take the closed connection")
            assert monitor.stats()["upstream_errors"] == 1 and monitor.session.stats()["errors"] == 1
        finally:
            relay.stop(0)
            monitor.close(0)


# ------------------------------------------------------------------ the CLI, as a real process


def test_the_cli_relays_answer_tritonclient_as_the_upstream_does(tmp_path: Path, lr_model: Path):
    """Both relays of a real `agent proxy`, gRPC and REST, before a real `agent serve`: tritonclient's answers
    through them are the upstream's, and their calls land in the proxy's counts."""
    from test_proxy_rest import tritonclient as tritonclient_http

    up_grpc = free_address()
    upstream, up_rest = start(["agent", "serve", "--model", str(lr_model), "--model-name", "m", "--listen", up_grpc,
                               "--http-listen", "127.0.0.1:0", "--spool-dir", str(tmp_path / "up")],
                              r"rest on http://(\S+)")
    metrics = free_address()
    proxy, relays = start(["agent", "proxy", "--upstream", up_grpc, "--upstream-http", up_rest, "--model-name", "m",
                           "--listen", "127.0.0.1:0", "--relay-listen", "127.0.0.1:0", "--http-relay-listen",
                           "127.0.0.1:0", "--metrics", metrics],
                          r"proxying \S+ on \S+ \(m: monitoring version 1\); (relay on \S+; REST relay on \S+)")
    try:
        relay, rest_relay = relays.split()[2].rstrip(";"), relays.split()[-1]
        direct, through = tritonclient(up_grpc), tritonclient(relay)
        assert through == direct
        assert through["bad"][0] == "StatusCode.INVALID_ARGUMENT"
        direct, through = tritonclient_http(up_rest), tritonclient_http(rest_relay)
        assert through == direct and through["bad"][0] == "400"
        def page() -> str:
            with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=HANG_GUARD) as answer:
                return answer.read().decode()

        # the relays count calls as the monitor's thread reads them, a pass (DRAIN_SECONDS) after the replies
        wait_until(lambda: 'outrider_proxy_calls_total{code="200",method="ModelInfer"}' in page(), timeout=HANG_GUARD,
                   what="the REST relay's calls counted")
        text = page()
        assert 'outrider_proxy_calls_total{code="OK",method="ModelInfer"}' in text
        assert 'outrider_proxy_relay_connections{protocol="grpc"}' in text  # both relays' series, one family
        assert 'outrider_proxy_relay_connections{protocol="rest"}' in text
    finally:
        for proc in (proxy, upstream):
            proc.send_signal(signal.SIGTERM)
        for proc in (proxy, upstream):
            assert proc.wait(HANG_GUARD) == 0


def test_cli_relay_flags_that_cannot_go_together_exit_2_in_one_line(tmp_path: Path):
    base = ("agent", "proxy", "--upstream", "127.0.0.1:1", "--model-name", "m", "--relay-listen", "127.0.0.1:0")
    auth = tmp_path / "auth.toml"
    auth.write_text('[[client]]\nname = "web"\ntoken = "a-long-random-token-0123"\n')
    for extra, said in ((("--auth-file", str(auth)), "--auth-file"),
                        (("--managed", "--collector", "127.0.0.1:2"), "--managed"),
                        (("--upstream-tls-ca", "system"), "--upstream-tls-ca")):
        done = run_cli(*base, *extra)
        assert done.code == 2 and f"--relay-listen and {said} exclude each other" in done.one_line()
    rest_only = run_cli("agent", "proxy", "--upstream-http", "127.0.0.1:1", "--http-listen", "127.0.0.1:0",
                        "--model-name", "m", "--relay-listen", "127.0.0.1:0")
    assert rest_only.code == 2 and "--relay-listen relays gRPC to --upstream HOST:PORT" in rest_only.one_line()
    grpc_only = run_cli("agent", "proxy", "--upstream", "127.0.0.1:1", "--model-name", "m",
                        "--http-relay-listen", "127.0.0.1:0")
    assert grpc_only.code == 2 and "--http-listen and --upstream-http go together" in grpc_only.one_line()
    managed = run_cli("agent", "proxy", "--upstream-http", "127.0.0.1:1", "--model-name", "m",
                      "--http-relay-listen", "127.0.0.1:0", "--managed", "--collector", "127.0.0.1:2")
    assert managed.code == 2 and "--http-relay-listen and --managed exclude each other" in managed.one_line()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        busy = run_cli("agent", "proxy", "--upstream", "127.0.0.1:1", "--model-name", "m", "--listen",
                       "127.0.0.1:0", "--relay-listen", address, "--summarizer", "thread")
        assert busy.code == 2 and f"cannot listen on {address}" in busy.one_line()


# ------------------------------------------------------------------ OIP over REST: --http-relay-listen


@pytest.fixture
def rest_front(lr_model: Path, pumps: str) -> Iterator[tuple[Any, ProxyServer, RelayServer, Any]]:
    """A REST upstream (agent serve's), the proxy's monitor and its REST relay, counting in one registry."""
    from agent.metrics import AgentMetrics
    from test_proxy_rest import start_upstream

    up = start_upstream(lr_model)
    metrics = AgentMetrics()
    calls = proxy_calls_counter(metrics.registry)
    running = serve_proxy(up.grpc.address, "m", in_memory, "127.0.0.1:0", metrics=metrics, calls=calls)
    relay = serve_relay("127.0.0.1:0", up.rest.address, running.monitor, calls, protocol="rest",
                        registry=metrics.registry)
    yield up, running, relay, metrics
    relay.stop(0)
    running.stop(grace=0)
    up.rest.stop()
    up.grpc.stop(grace=0)


def test_rest_relayed_replies_are_the_upstreams_bytes_and_the_models_calls_are_summarised(rest_front: Any):
    from test_proxy_rest import call, pass_through_cases

    up, running, relay, metrics = rest_front
    for method, path, body, headers in pass_through_cases():
        direct = call(up.rest.port, method, path, body, headers)
        assert call(relay.port, method, path, body, headers) == direct, (method, path)
    idle(running)
    stats = running.monitor.stats()
    assert stats["captured"] == 2  # with-id and binary; the subset lacks an output
    assert stats["unmonitored"]["partial_outputs"] == 1 and stats["unmonitored"]["other_model"] == 1
    assert stats["upstream_errors"] == 3 and stats["capture_failures"] == 0  # bad, empty, not json
    assert running.monitor.session.stats()["errors"] == 3
    page = scrape(metrics)
    assert 'outrider_proxy_calls_total{code="200",method="ModelInfer"} 3.0' in page
    assert 'outrider_proxy_calls_total{code="400",method="ModelInfer"} 4.0' in page  # and GET .../infer
    assert 'outrider_proxy_calls_total{code="404",method="ModelInfer"} 1.0' in page
    assert 'outrider_proxy_calls_total{code="200",method="ServerLive"} 1.0' in page
    assert 'outrider_proxy_calls_total{code="404",method="other"} 1.0' in page  # /v2/repository/index


def test_rest_calls_on_one_kept_alive_connection_are_paired_with_their_answers(rest_front: Any):
    """Requests and answers pair in order on one connection, whatever sizes the bodies have."""
    import http.client

    from test_proxy_rest import infer_body

    _, running, relay, _ = rest_front
    connection = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=HANG_GUARD)
    rows = 0
    try:
        for i in range(12):
            x = examples.tabular_data(1 + i * 5, seed=i)[0]
            body, headers = infer_body(x, f"k-{i}", binary=bool(i % 2), binary_outputs=bool(i % 3))
            connection.request("POST", "/v2/models/m/infer", body=body, headers=headers)
            reply = connection.getresponse()
            assert reply.status == 200
            reply.read()
            rows += len(x)
            connection.request("GET", "/v2/health/ready")
            ready = connection.getresponse()
            assert ready.status == 200 and ready.read()
    finally:
        connection.close()
    idle(running)
    assert running.monitor.stats()["captured"] == 12
    assert running.monitor.session.stats()["rows_captured"] == rows
    assert all(running.monitor.session.predictions.label(f"k-{i}", "1") for i in range(12))


def test_an_unreachable_rest_upstream_is_503_naming_it(lr_model: Path):
    import json

    from prometheus_client import CollectorRegistry

    from test_proxy_rest import call, infer_body

    address = free_address()
    monitor = ProxyMonitor("m", in_memory)
    relay = serve_relay("127.0.0.1:0", address, monitor, proxy_calls_counter(CollectorRegistry()), protocol="rest")
    try:
        monitor.monitor(schema(lr_model))
        status, headers, body = call(relay.port, "POST", "/v2/models/m/infer",
                                     *infer_body(examples.tabular_data(2, seed=8)[0]))
        assert status == 503 and ("content-type", "application/json") in headers
        assert f"upstream {address} is unreachable" in json.loads(body)["error"]
        assert "--upstream-http" in json.loads(body)["error"]
        assert call(relay.port, "GET", "/v2/models/m/ready", b"", {})[0] == 503
        wait_until(monitor.idle, timeout=HANG_GUARD, what="the monitor to take the refused call")
        assert monitor.stats()["upstream_errors"] == 1 and monitor.session.stats()["errors"] == 1
    finally:
        relay.stop(0)
        monitor.close(0)


def test_the_rest_tap_pairs_pipelined_requests_skips_interim_answers_and_stops_at_head():
    from agent.h1tap import Http1Tap

    tap = Http1Tap()
    both = (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
            b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert tap.client(both[:30], 1) == [] and tap.client(both[30:], 2) == []
    answers = (b"HTTP/1.1 100 Continue\r\n\r\n"
               b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nInference-Header-Content-Length: 3\r\n\r\nabc"
               b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
    first, second = tap.server(answers, 10)
    assert (first.method, first.path, first.request, first.status, first.reply, first.reply_length,
            first.latency_ns) == ("POST", "/v2/models/m/infer", b"{}", 200, b"abc", "3", 9)
    assert (second.method, second.path, second.reply) == ("GET", "/v2/health/live", b"hi")
    with pytest.raises(TapError, match="HEAD"):
        tap.client(b"HEAD /v2 HTTP/1.1\r\nHost: x\r\n\r\n", 11)
    assert tap.broken


def test_requests_a_rest_connection_ended_on_are_the_relays_unreachable_calls_and_the_models_errors():
    from prometheus_client import CollectorRegistry

    from agent.h1tap import Http1Tap
    from agent.proxy import CallCounts
    from agent.relay_protocols import Rest
    from test_proxy_rest import infer_body

    tap = Http1Tap()
    body, headers = infer_body(examples.tabular_data(2, seed=3)[0], "left")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    tap.client(f"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body, 5)
    tap.client(b"GET /v2/health/ready HTTP/1.1\r\n\r\n", 6)
    left = tap.abandon(25)
    assert [(c.path, c.status, c.reply, c.latency_ns) for c in left] == [
        ("/v2/models/m/infer", 503, None, 20), ("/v2/health/ready", 503, None, 19)]
    assert tap.pending() == [] and tap.abandon(30) == []
    registry = CollectorRegistry()
    decoders = Rest().decoders(left, CallCounts(proxy_calls_counter(registry)), "m", "UNREACHABLE")
    assert registry.get_sample_value("outrider_proxy_calls_total", {"method": "ModelInfer", "code": "UNREACHABLE"}) == 1
    assert registry.get_sample_value("outrider_proxy_calls_total", {"method": "ServerReady", "code": "UNREACHABLE"}) == 1
    [failed] = [decode() for decode in decoders]
    assert (failed.model_name, failed.request_id, failed.outputs) == ("m", "left", None)


def test_hostile_bytes_on_either_relay_are_passed_on_and_the_relays_keep_serving(rest_front: Any):
    """Garbage, a half preface, a header block naming an HPACK entry that does not exist, and a request cut
    short: each goes to the upstream as it came (which refuses it), is counted as unobserved where the tap had
    to stop, and the next client's calls are answered and summarised as ever."""
    from test_proxy_rest import call, infer_body

    up, running, rest_relay, _ = rest_front
    from prometheus_client import CollectorRegistry

    grpc_relay = serve_relay("127.0.0.1:0", up.grpc.address, running.monitor, proxy_calls_counter(CollectorRegistry()))
    try:
        rng = np.random.default_rng(1)
        attacks = [rng.bytes(5000), b"PRI * HTTP/2.0\r\n",
                   b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(0x1, 0x5, 1, b"\xff\xff\xff\xff\x0f"),
                   b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"inp"]
        for relay in (grpc_relay, rest_relay):
            for attack in attacks:
                with socket.create_connection(("127.0.0.1", relay.port), timeout=HANG_GUARD) as sock:
                    sock.sendall(attack)
                    sock.shutdown(socket.SHUT_WR)
                    sock.settimeout(5)
                    try:
                        while sock.recv(65536):
                            pass
                    except OSError:
                        pass
        x = examples.tabular_data(3, seed=9)[0]
        assert Raw(grpc_relay.address).call("ModelInfer", infer_request(x, "after-g"))[0] == "OK"
        assert call(rest_relay.port, "POST", "/v2/models/m/infer", *infer_body(x, "after-r"))[0] == 200
        wait_until(lambda: running.monitor.stats()["captured"] >= 2, timeout=HANG_GUARD,
                   what="the calls after the attacks to be summarised")
        idle(running)
        assert running.monitor.stats()["capture_failures"] == 0
        assert grpc_relay.unobserved >= 1 and rest_relay.unobserved >= 1
        assert running.monitor.session.predictions.label("after-g", "1")
        assert running.monitor.session.predictions.label("after-r", "1")
    finally:
        grpc_relay.stop(0)
