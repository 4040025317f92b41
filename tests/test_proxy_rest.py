"""``outrider agent proxy --http-listen`` in front of a real OIP REST server (``agent serve``'s, on loopback).

Replies are compared as status, headers and body bytes with the upstream's own answers to the same
request; windows go to a real collector (SQLite file) and its drift engine; the CLI runs as a real process.
"""
from __future__ import annotations

import gzip
import http.client
import http.server
import importlib.util
import json
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import CollectorRegistry

from agent import MonitoredSession, examples
from agent.profile import build_profile
from agent.proxy_grpc import ProxyServer, proxy_calls_counter, serve_proxy
from agent.proxy_relay import serve_relay
from agent.proxy_rest import REQUEST_ID_HEADER, serve_proxy_rest
from agent.rest import RestServer, SwitchBackend, serve_rest
from agent.server import serve
from collector.api.server import serve_collector
from protos import agent_pb2, agent_pb2_grpc
from protos import collector_pb2 as cpb
from protos import collector_pb2_grpc as cpb_grpc
from test_cli_contract import run as run_cli
from test_delivery import reap, start, wait_until  # noqa: F401  (reap: processes left by a failed test)
from test_proxy import free_address, in_memory

HANG_GUARD = 60


@dataclass
class Upstream:
    grpc: Any
    rest: RestServer


@dataclass
class Proxy:
    grpc: ProxyServer
    rest: RestServer

    @property
    def monitor(self) -> Any:
        return self.grpc.monitor

    def stop(self) -> None:
        self.rest.stop()
        self.grpc.stop(grace=0)


def start_upstream(lr_model: Path) -> Upstream:
    server = serve(ort.InferenceSession(str(lr_model)), "m", "1", "127.0.0.1:0")
    return Upstream(server, serve_rest(SwitchBackend(server.servicer.switch, server.servicer.shutting_down),
                                       "127.0.0.1:0"))


def start_proxy(up: Upstream, open_session: Any = in_memory, registry: Any = None, **rest: Any) -> Proxy:
    calls = proxy_calls_counter(registry or CollectorRegistry())
    running = serve_proxy(up.grpc.address, "m", open_session, "127.0.0.1:0", calls=calls)
    return Proxy(running, serve_proxy_rest(up.rest.address, running.monitor, calls, "127.0.0.1:0", **rest))


@pytest.fixture
def upstream(lr_model: Path) -> Iterator[Upstream]:
    up = start_upstream(lr_model)
    yield up
    up.rest.stop()
    up.grpc.stop(grace=0)


@pytest.fixture
def proxy(upstream: Upstream) -> Iterator[Proxy]:
    running = start_proxy(upstream)
    yield running
    running.stop()


def call(port: int, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, list[tuple[str, str]], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG_GUARD)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, [(k.lower(), v) for k, v in reply.getheaders()], reply.read()
    finally:
        conn.close()


def infer_body(x: np.ndarray, request_id: str = "", binary: bool = False, outputs: tuple[str, ...] = (),
               binary_outputs: bool = False) -> tuple[bytes, dict[str, str]]:
    doc: dict[str, Any] = {"inputs": [{"name": "X", "datatype": "FP32", "shape": list(x.shape)}]}
    if request_id:
        doc["id"] = request_id
    if binary_outputs:
        doc["parameters"] = {"binary_data_output": True}
    if outputs:
        doc["outputs"] = [{"name": n} for n in outputs]
    if binary:
        doc["inputs"][0]["parameters"] = {"binary_data_size": x.size * 4}
        head = json.dumps(doc).encode()
        return head + x.astype("<f4").tobytes(), {"Inference-Header-Content-Length": str(len(head)),
                                                   "Content-Type": "application/octet-stream"}
    doc["inputs"][0]["data"] = x.ravel().tolist()
    return json.dumps(doc).encode(), {"Content-Type": "application/json"}


def idle(running: Proxy) -> None:
    wait_until(running.monitor.idle, timeout=HANG_GUARD, what="the proxy's monitor to catch up")


def without_id(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k != REQUEST_ID_HEADER]


# ------------------------------------------------------------------ pass-through


def pass_through_cases() -> list[tuple[str, str, bytes | None, dict[str, str]]]:
    """REST calls every front must pass on as the upstream answers them: 2 summarised, 1 partial, 1 of another
    model, 3 the model's own errors, and the other OIP routes."""
    x = examples.tabular_data(7, seed=3)[0]
    return [
        ("POST", "/v2/models/m/infer", *infer_body(x, "with-id")),
        ("POST", "/v2/models/m/versions/1/infer", *infer_body(x, "binary", binary=True, binary_outputs=True)),
        ("POST", "/v2/models/m/infer", *infer_body(x, "subset", outputs=("label",))),
        ("POST", "/v2/models/nope/infer", *infer_body(x)),                                     # 404
        ("POST", "/v2/models/m/infer", *infer_body(x.astype(np.float64)[:, :3], "bad")),       # 400
        ("POST", "/v2/models/m/infer", b'{"id": "empty", "inputs": []}', {}),                  # 400
        ("POST", "/v2/models/m/infer", b"not json", {}),                                       # 400
        ("GET", "/v2/models/m/infer", None, {}),                                               # wrong method
        ("GET", "/v2", None, {}),
        ("GET", "/v2/health/live", None, {}),
        ("GET", "/v2/health/ready", None, {}),
        ("GET", "/v2/models/m", None, {}),
        ("GET", "/v2/models/m/versions/9", None, {}),
        ("GET", "/v2/models/m/ready?verbose=1", None, {}),
        ("GET", "/v2/models/m%2Fx", None, {}),
        ("GET", "/v2/repository/index", None, {}),
    ]


def test_replies_and_errors_are_the_upstreams_bytes(upstream: Upstream, proxy: Proxy):
    x = examples.tabular_data(7, seed=3)[0]
    for method, path, body, headers in pass_through_cases():
        direct = call(upstream.rest.port, method, path, body, headers)
        through = call(proxy.rest.port, method, path, body, headers)
        assert through == direct, (method, path)
    status, _, body = call(proxy.rest.port, "POST", "/v2/models/nope/infer", *infer_body(x))
    assert status == 404 and b"nope" in body
    idle(proxy)
    stats = proxy.monitor.stats()
    assert stats["captured"] == 2  # with-id and binary; the subset lacks an output
    assert stats["unmonitored"]["partial_outputs"] == 1 and stats["unmonitored"]["other_model"] == 2
    assert stats["upstream_errors"] == 3 and stats["capture_failures"] == 0  # bad, empty, not json
    assert proxy.monitor.session.stats()["errors"] == 3


class Echo(http.server.BaseHTTPRequestHandler):
    """An HTTP upstream that answers with what it received, gzip-encoded, and some hop-by-hop headers."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        seen = {"method": self.command, "path": self.path, "body": body.decode("latin-1"),
                "headers": [[k.lower(), v] for k, v in self.headers.items()]}
        reply = gzip.compress(json.dumps(seen).encode(), mtime=0)
        if "chunked" in self.path:  # of no stated length: the proxy streams it on
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (reply[:7], reply[7:]):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_response(207)
        for key, value in (("Content-Type", "application/json"), ("Content-Encoding", "gzip"),
                           ("X-Upstream", "echo"), ("Keep-Alive", "timeout=5"), ("Connection", "keep-alive, X-Hop"),
                           ("X-Hop", "only-this-hop"), ("Content-Length", str(len(reply)))):
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("proxy_auth", [False, True])
def test_method_path_query_body_and_end_to_end_headers_pass_both_ways_hop_by_hop_ones_do_not(proxy_auth: bool):
    from agent.proxy import ProxyMonitor
    from agent.tokens import ClientAuth

    echo = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    monitor = ProxyMonitor("m", in_memory)
    auth = ClientAuth.from_toml('[[client]]\nname = "web"\ntoken = "a-long-random-token-0123"\n') if proxy_auth \
        else None
    rest = serve_proxy_rest(f"127.0.0.1:{echo.server_port}", monitor, proxy_calls_counter(CollectorRegistry()),
                            "127.0.0.1:0", auth=auth)
    try:
        body = b"\x00binary\xffbody"
        status, headers, reply = call(rest.port, "POST", "/v2/models/m/versions/1/anything?b=%2F&a=1", body, {
            "X-Custom": "kept", "Authorization": "Bearer a-long-random-token-0123", "Keep-Alive": "timeout=9",
            "Connection": "keep-alive, X-Private", "X-Private": "hop", "TE": "trailers",
            "Content-Type": "application/x-anything", "Expect": "100-continue"})
        assert status == 207
        assert dict(headers)["x-upstream"] == "echo" and dict(headers)["content-encoding"] == "gzip"
        assert not {"keep-alive", "x-hop"} & dict(headers).keys()
        seen = json.loads(gzip.decompress(reply))  # passed on compressed, as the upstream sent it
        assert seen["method"] == "POST" and seen["path"] == "/v2/models/m/versions/1/anything?b=%2F&a=1"
        assert seen["body"].encode("latin-1") == body
        sent = dict(seen["headers"])
        assert sent["x-custom"] == "kept" and sent["content-type"] == "application/x-anything"
        assert not {"keep-alive", "x-private", "te", "user-agent", "expect"} & sent.keys()
        assert ("authorization" in sent) is not proxy_auth  # the proxy's own token is not the upstream's
        assert sent["accept-encoding"] == "identity"  # http.client's, not one the proxy added
        status, headers, streamed = call(rest.port, "POST", "/v2/chunked", body,
                                         {"Authorization": "Bearer a-long-random-token-0123"})
        assert status == 200 and json.loads(gzip.decompress(streamed))["body"].encode("latin-1") == body
    finally:
        rest.stop()
        monitor.close()
        echo.shutdown()
        echo.server_close()


def test_paths_outside_v2_are_the_proxys_404(proxy: Proxy):
    status, _, body = call(proxy.rest.port, "GET", "/metrics")
    assert status == 404 and "forwards /v2/..." in json.loads(body)["error"]


def test_a_request_without_an_id_keeps_its_reply_and_gets_the_proxys_id_for_feedback(upstream: Upstream,
                                                                                   proxy: Proxy):
    x, y = examples.tabular_data(5, seed=4)
    body, headers = infer_body(x, binary=True)
    direct = call(upstream.rest.port, "POST", "/v2/models/m/infer", body, headers)
    status, reply_headers, reply = call(proxy.rest.port, "POST", "/v2/models/m/infer", body, headers)
    assert status == 200 and reply == direct[2] and without_id(reply_headers) == direct[1]
    assigned = dict(reply_headers)[REQUEST_ID_HEADER]
    idle(proxy)
    channel = grpc.insecure_channel(proxy.grpc.address)
    feedback = agent_pb2_grpc.FeedbackServiceStub(channel)
    labels = [agent_pb2.Label(request_id=assigned, row=i, class_label=str(int(y[i]))) for i in range(5)]
    answer = feedback.Feedback(agent_pb2.FeedbackRequest(labels=labels), timeout=HANG_GUARD)
    assert (answer.matched, answer.unmatched) == (5, 0)
    # a client's own id is the one labels use, and no header is added; an "id" elsewhere is not one
    status, reply_headers, _ = call(proxy.rest.port, "POST", "/v2/models/m/infer", *infer_body(x, "mine"))
    assert status == 200 and REQUEST_ID_HEADER not in dict(reply_headers)
    nested = json.loads(infer_body(x)[0])
    nested["inputs"][0]["parameters"] = {"id": "not-the-request-id"}
    status, reply_headers, _ = call(proxy.rest.port, "POST", "/v2/models/m/infer", json.dumps(nested).encode())
    assert status == 200 and REQUEST_ID_HEADER in dict(reply_headers)
    idle(proxy)
    answer = feedback.Feedback(agent_pb2.FeedbackRequest(labels=[
        agent_pb2.Label(request_id="mine", class_label="1"),
        agent_pb2.Label(request_id=dict(reply_headers)[REQUEST_ID_HEADER], class_label="1")]), timeout=HANG_GUARD)
    assert answer.matched == 2
    channel.close()


def test_a_capture_that_fails_never_changes_a_reply(upstream: Upstream):
    class Broken(MonitoredSession):
        def observe(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("a bug in the capture")

    running = start_proxy(upstream, lambda model, version: Broken(
        model, model_name="m", model_version=version, window_seconds=3600, summarizer="thread"))
    try:
        x = examples.tabular_data(3, seed=5)[0]
        for binary in (False, True, False):
            body, headers = infer_body(x, "a", binary=binary, binary_outputs=binary)
            assert call(running.rest.port, "POST", "/v2/models/m/infer", body, headers) == \
                call(upstream.rest.port, "POST", "/v2/models/m/infer", body, headers)
        idle(running)
        assert running.monitor.stats()["capture_failures"] == 3
    finally:
        running.stop()


def test_request_headers_reach_the_upstream_and_its_refusals_come_back(lr_model: Path):
    """The upstream checks bearer tokens: the client's Authorization must pass through, its 401 come back."""
    from agent.tokens import ClientAuth

    auth = ClientAuth.from_toml('[[client]]\nname = "web"\ntoken = "a-long-random-token-0123"\n')
    server = serve(ort.InferenceSession(str(lr_model)), "m", "1", "127.0.0.1:0", auth=auth)
    up = Upstream(server, serve_rest(SwitchBackend(server.servicer.switch), "127.0.0.1:0", auth=auth))
    running = start_proxy(up)
    try:
        body, headers = infer_body(examples.tabular_data(2, seed=10)[0], "t")
        token = {**headers, "Authorization": "Bearer a-long-random-token-0123"}
        results = [call(port, "POST", "/v2/models/m/infer", body, h) for port in (up.rest.port, running.rest.port)
                   for h in (token, headers)]
        assert results[:2] == results[2:]
        assert results[0][0] == 200 and results[1][0] == 401
    finally:
        running.stop()
        up.rest.stop()
        server.stop(grace=0)


def test_a_body_over_the_budget_is_413_and_never_reaches_the_upstream(upstream: Upstream):
    running = start_proxy(upstream, max_body_bytes=1000)
    try:
        body, headers = infer_body(examples.tabular_data(50, seed=2)[0], "big")
        status, _, reply = call(running.rest.port, "POST", "/v2/models/m/infer", body, headers)
        assert status == 413 and "at most 1000" in json.loads(reply)["error"]
        status, _, _ = call(running.rest.port, "POST", "/v2/models/m/infer", *infer_body(
            examples.tabular_data(1, seed=2)[0], "small"))
        assert status == 200
        idle(running)
        stats = running.monitor.stats()  # the refused call was neither forwarded nor offered
        assert stats["captured"] == 1 and stats["upstream_errors"] == 0 and not any(stats["unmonitored"].values())
    finally:
        running.stop()


# ------------------------------------------------------------------ an upstream that is not there


def test_an_unreachable_upstream_is_503_naming_it(upstream: Upstream):
    gone = free_address()
    calls = proxy_calls_counter(CollectorRegistry())
    running = serve_proxy(upstream.grpc.address, "m", in_memory, "127.0.0.1:0", calls=calls)
    rest = serve_proxy_rest(gone, running.monitor, calls, "127.0.0.1:0")
    try:
        for method, path, body in (("POST", "/v2/models/m/infer", infer_body(examples.tabular_data(2)[0], "a")[0]),
                                   ("GET", "/v2/health/ready", None)):
            status, headers, reply = call(rest.port, method, path, body)  # hang guard: HANG_GUARD
            assert status == 503 and f"upstream {gone} is unreachable" in json.loads(reply)["error"]
            assert dict(headers)["content-type"] == "application/json"
        idle(Proxy(running, rest))
        assert running.monitor.stats()["upstream_errors"] == 1  # the model's call: an error in its windows
    finally:
        rest.stop()
        running.stop(grace=0)


def test_an_upstream_that_does_not_answer_is_503_after_the_bound(upstream: Upstream):
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections (the backlog), never answers
    calls = proxy_calls_counter(CollectorRegistry())
    running = serve_proxy(upstream.grpc.address, "m", in_memory, "127.0.0.1:0", calls=calls)
    rest = serve_proxy_rest(f"127.0.0.1:{silent.getsockname()[1]}", running.monitor, calls, "127.0.0.1:0",
                            upstream_timeout=0.5)
    try:
        status, _, reply = call(rest.port, "GET", "/v2/health/live")
        assert status == 503 and "did not answer within 0.5 s" in json.loads(reply)["error"]
    finally:
        rest.stop()
        running.stop(grace=0)
        silent.close()


def test_upstream_answers_are_counted_in_prometheus_with_the_grpc_side(upstream: Upstream):
    from agent.metrics import AgentMetrics

    metrics = AgentMetrics()
    endpoint = metrics.start_http("127.0.0.1:0")
    calls = proxy_calls_counter(metrics.registry)
    running = serve_proxy(upstream.grpc.address, "m", in_memory, "127.0.0.1:0", calls=calls, metrics=metrics)
    rest = serve_proxy_rest(upstream.rest.address, running.monitor, calls, "127.0.0.1:0")
    try:
        x = examples.tabular_data(3, seed=11)[0]
        assert call(rest.port, "POST", "/v2/models/m/infer", *infer_body(x, "ok"))[0] == 200
        assert call(rest.port, "POST", "/v2/models/other/infer", *infer_body(x))[0] == 404
        assert call(rest.port, "GET", "/v2/health/ready")[0] == 200
        idle(Proxy(running, rest))
        page = call(int(endpoint.url.rsplit(":", 1)[1].split("/")[0]), "GET", "/metrics")[2].decode()
    finally:
        rest.stop()
        running.stop(grace=0)
        metrics.close()
    assert 'outrider_proxy_calls_total{code="200",method="ModelInfer"} 1.0' in page
    assert 'outrider_proxy_calls_total{code="404",method="ModelInfer"} 1.0' in page
    assert 'outrider_proxy_calls_total{code="200",method="ServerReady"} 1.0' in page
    assert 'outrider_proxy_unmonitored_calls_total{reason="other_model"} 1.0' in page
    assert "outrider_proxy_captured_calls_total 1.0" in page


# ------------------------------------------------------------------ at the collector


@pytest.mark.slow
@pytest.mark.parametrize("via", ["listen", "relay"])
def test_windows_at_the_collector_hold_every_row_and_the_drift_is_found(tmp_path: Path, lr_model: Path,
                                                                        upstream: Upstream, via: str):
    """Through the proxy's --http-listen, and through its --http-relay-listen (agent.proxy_relay, which
    assigns no id: the client sends its own for labels)."""
    collector = serve_collector(tmp_path / "c.db", "127.0.0.1:0", drift_interval=0, rollup_interval=3600)
    ops = cpb_grpc.OpsServiceStub(grpc.insecure_channel(collector.address))

    def open_session(model: Any, version: str) -> MonitoredSession:
        return MonitoredSession(model, model_name="m", model_version=version, window_seconds=0.5,
                                summarizer="thread", agent_id="proxy-rest", collector=collector.address,
                                spool_dir=tmp_path / "spool")

    running = start_proxy(upstream, open_session)
    relay = serve_relay("127.0.0.1:0", upstream.rest.address, running.monitor,
                        proxy_calls_counter(CollectorRegistry()), protocol="rest") if via == "relay" else None
    port = relay.port if relay is not None else running.rest.port
    try:
        x_ref, y_ref = examples.tabular_data(5000, seed=1)
        np.savez(tmp_path / "ref.npz", X=x_ref, label=y_ref)
        ops.AttachProfile(cpb.AttachProfileRequest(model_name="m", model_version="1",
                                                   profile=build_profile(lr_model, tmp_path / "ref.npz")),
                          timeout=HANG_GUARD)
        feedback = agent_pb2_grpc.FeedbackServiceStub(grpc.insecure_channel(running.grpc.address))
        x, y = examples.tabular_data(3000, seed=7)
        x[:, 3] += 1.0  # one feature moves by a standard deviation
        sent, start_row, i, labeled = 0, 0, 0, 0
        while start_row < len(x):
            batch = 1 + (i * 37) % 64
            chunk = x[start_row:start_row + batch]
            sent_id = f"r{i}" if relay is not None else ""
            status, headers, _ = call(port, "POST", "/v2/models/m/infer",
                                      *infer_body(chunk, sent_id, binary=i % 2 == 0, binary_outputs=i % 3 == 0))
            assert status == 200
            if i % 10 == 9:
                idle(running)
                rid = sent_id or dict(headers)[REQUEST_ID_HEADER]
                labels = [agent_pb2.Label(request_id=rid, row=j, class_label=str(int(y[start_row + j])))
                          for j in range(len(chunk))]
                assert feedback.Feedback(agent_pb2.FeedbackRequest(labels=labels), timeout=HANG_GUARD).matched \
                    == len(chunk)
                labeled += len(chunk)
            sent += len(chunk)
            start_row += batch
            i += 1
        idle(running)
    finally:
        if relay is not None:
            relay.stop(5)
        running.rest.stop()
        running.grpc.stop(grace=5)  # the last window flushed and delivered
    try:
        def stored() -> list[cpb.WindowInfo]:
            return list(ops.ListWindows(cpb.ListWindowsRequest(model_name="m", limit=10_000,
                                                               include_summaries=True), timeout=HANG_GUARD).windows)

        wait_until(lambda: sum(w.rows for w in stored()) >= sent, timeout=HANG_GUARD, what="every row stored")
        windows = stored()
        assert sum(w.rows for w in windows) == sent and sum(w.calls for w in windows) == i
        assert {w.agent_id for w in windows} == {"proxy-rest"}
        assert sum(w.summary.performance.labeled for w in windows) == labeled > 0
        report = ops.EvaluateDrift(cpb.DriftRequest(model_name="m"), timeout=HANG_GUARD).latest[0]
        drifted = {c.name for c in report.columns if c.drifted}
        assert "X[3]" in drifted and not drifted & {f"X[{j}]" for j in range(20) if j != 3}
    finally:
        collector.stop(grace=0)


# ------------------------------------------------------------------ the CLI, as a real process

PROBE = """
import json, sys
import numpy as np
import tritonclient.http as triton
client = triton.InferenceServerClient(sys.argv[1])
x = np.random.default_rng(8).standard_normal((6, 20)).astype(np.float32)
out = {"ready": client.is_model_ready("m"), "metadata": client.get_model_metadata("m")}
for rid, binary in (("t-1", False), ("t-2", True), ("", True)):
    tensor = triton.InferInput("X", [6, 20], "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("label", "probabilities")]
    reply = client.infer("m", [tensor], request_id=rid, outputs=outputs)
    out["reply" + rid] = [reply.get_response(), reply.as_numpy("probabilities").tobytes().hex()]
try:
    bad = triton.InferInput("X", [6, 20], "FP64")
    bad.set_data_from_numpy(x.astype(np.float64))
    client.infer("m", [bad])
except Exception as exc:
    out["bad"] = [exc.status(), exc.message()]
print(json.dumps(out))
"""


def tritonclient(address: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, address], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None, reason="needs the test extra (tritonclient)")
@pytest.mark.parametrize("fronts", ["rest", "grpc+rest"])
def test_the_cli_proxy_answers_tritonclient_http_as_the_upstream_does(tmp_path: Path, lr_model: Path, fronts: str):
    up_grpc = free_address()
    upstream, up_rest = start(["agent", "serve", "--model", str(lr_model), "--model-name", "m",
                               "--listen", up_grpc, "--http-listen", "127.0.0.1:0",
                               "--spool-dir", str(tmp_path / "up")], r"rest on http://(\S+)")
    proxy = None
    try:
        grpc_flags = ["--upstream", up_grpc] if fronts == "grpc+rest" else []
        metrics = free_address()
        proxy, addresses = start(["agent", "proxy", *grpc_flags, "--upstream-http", up_rest, "--http-listen",
                                  "127.0.0.1:0", "--model-name", "m", "--listen", "127.0.0.1:0",
                                  "--metrics", metrics, "--max-message-mb", "0.05"],
                                 r"proxying \S+ on (\S+ \(m: monitoring version 1\); REST \S+ on \S+)")
        grpc_address, rest_url = addresses.split()[0], addresses.split()[-1]
        direct, through = tritonclient(up_rest), tritonclient(rest_url.removeprefix("http://"))
        assert through == direct
        assert through["bad"][0] == "400" and through["replyt-2"][0]["id"] == "t-2"
        # feedback by the id the proxy assigned, on its gRPC port whichever fronts forward
        x, y = examples.tabular_data(3, seed=13)
        status, headers, _ = call(int(rest_url.rsplit(":", 1)[1]), "POST", "/v2/models/m/infer", *infer_body(x))
        assert status == 200
        labels = [agent_pb2.Label(request_id=dict(headers)[REQUEST_ID_HEADER], row=i, class_label=str(int(y[i])))
                  for i in range(3)]
        feedback = agent_pb2_grpc.FeedbackServiceStub(grpc.insecure_channel(grpc_address))
        wait_until(lambda: feedback.Feedback(agent_pb2.FeedbackRequest(labels=labels), timeout=HANG_GUARD).matched == 3,
                   timeout=HANG_GUARD, what="the proxy to keep the call for feedback")
        # a body over --max-message-mb: 413, counted with the agent's refused calls
        big = infer_body(examples.tabular_data(300, seed=14)[0])
        assert call(int(rest_url.rsplit(":", 1)[1]), "POST", "/v2/models/m/infer", *big)[0] == 413
        page = call(int(metrics.rsplit(":", 1)[1]), "GET", "/metrics")[2].decode()
        assert 'outrider_agent_refused_calls_total{reason="too_large"} 1.0' in page
        assert 'outrider_proxy_calls_total{code="200",method="ModelInfer"}' in page
    finally:
        for proc in (proxy, upstream):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
        for proc in (proxy, upstream):
            if proc is not None:
                assert proc.wait(HANG_GUARD) == 0


def test_cli_bad_input_exits_2_in_one_line(upstream: Upstream):
    up = upstream.grpc.address
    alone = run_cli("agent", "proxy", "--upstream", up, "--model-name", "m", "--http-listen", "127.0.0.1:0")
    assert alone.code == 2 and "--http-listen and --upstream-http go together" in alone.one_line()
    neither = run_cli("agent", "proxy", "--model-name", "m")
    assert neither.code == 2 and "--upstream HOST:PORT (gRPC), or --upstream-http" in neither.one_line()
    bad = run_cli("agent", "proxy", "--upstream", up, "--model-name", "m", "--upstream-http", "nowhere",
                  "--http-listen", "127.0.0.1:0")
    assert bad.code == 2 and "is not HOST:PORT" in bad.one_line()
    busy = run_cli("agent", "proxy", "--upstream", up, "--model-name", "m", "--upstream-http", upstream.rest.address,
                   "--http-listen", upstream.rest.address, "--listen", "127.0.0.1:0")
    assert busy.code == 2 and "own --http-listen" in busy.one_line()
    taken = run_cli("agent", "proxy", "--upstream", up, "--model-name", "m", "--upstream-http", "127.0.0.1:1",
                    "--http-listen", upstream.rest.address, "--listen", "127.0.0.1:0")
    assert taken.code == 2 and "--http-listen" in taken.one_line() and upstream.rest.address in taken.one_line()


@pytest.mark.slow
def test_the_overhead_benchmark_measures_rest_both_ways_and_no_request_fails():
    from benchmarks import proxy as bench

    rows = bench.run([2], [3], seconds=0.5, rounds=1, protocols=("rest",), relay=True)
    assert [row["protocol"] for row in rows] == ["rest", "rest-relay"]
    for row in rows:
        assert row["direct"]["failed"] == 0 and row["proxy"]["failed"] == 0
        assert row["direct"]["rps"] > 0 and row["proxy"]["rps"] > 0 and row["proxy"]["proxy_cpu_ms_per_1k"] > 0


def test_a_managed_load_over_rest_from_a_server_without_the_repository_extension_says_so(upstream: Upstream):
    from agent.errors import FailedPrecondition
    from agent.proxy_rest import RestUpstream
    from agent.proxy_rollout import repository_of

    repository = repository_of(RestUpstream(upstream.rest.address, HANG_GUARD))
    with pytest.raises(FailedPrecondition) as refused:
        repository.load("m", HANG_GUARD)
    said = str(refused.value)
    assert f"upstream {upstream.rest.address} could not load model 'm': HTTP 404" in said, said
    assert "without the OIP model-repository extension" in said, said
    assert repository.ready("m", "1") and not repository.ready("m", "2")
    assert repository.listed("m") is None  # no index either
