"""``outrider agent proxy`` in front of a real OIP server (``agent serve``'s, on loopback).

Replies are compared as bytes with the upstream's own answers to the same request; windows
go to a real collector (SQLite file) and its drift engine; the CLI runs as a real process.
"""
from __future__ import annotations

import importlib.util
import json
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from agent import MonitoredSession, examples
from agent.profile import build_profile
from agent.proxy_grpc import REQUEST_ID_HEADER, ProxyServer, proxy_calls_counter, serve_proxy
from agent.proxy_relay import serve_relay
from agent.server import serve
from collector.api.server import serve_collector
from protos import agent_pb2, agent_pb2_grpc
from protos import collector_pb2 as cpb
from protos import collector_pb2_grpc as cpb_grpc
from protos import open_inference_pb2 as pb
from test_cli_contract import run as run_cli
from test_delivery import start, wait_until  # real processes, as the delivery tests start them

ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD = 60
INFER = "/inference.GRPCInferenceService/ModelInfer"


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def labelled_by_id(address: str, request_id: str, y: np.ndarray) -> tuple[int, int]:
    """Labels for every row of ``y`` under ``request_id``, and one under an id never sent, to the FeedbackService
    at ``address``: its (matched, unmatched)."""
    labels = [agent_pb2.Label(request_id=request_id, row=j, class_label=str(int(y[j]))) for j in range(len(y))]
    labels.append(agent_pb2.Label(request_id="never-sent", row=0, class_label="1"))
    with grpc.insecure_channel(address) as channel:
        answer = agent_pb2_grpc.FeedbackServiceStub(channel).Feedback(agent_pb2.FeedbackRequest(labels=labels),
                                                                       timeout=HANG_GUARD)
    return answer.matched, answer.unmatched


def infer_request(x: np.ndarray, request_id: str = "", model: str = "m", outputs: tuple[str, ...] = (),
                  typed: bool = False) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    tensor = request.inputs.add(name="X", datatype="FP32", shape=list(x.shape))
    if typed:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    else:
        request.raw_input_contents.append(x.astype("<f4").tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request


class Raw:
    """Calls as bytes on a channel: what the proxy must return is exactly what the upstream returned."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)

    def call(self, method: str, request: Any) -> tuple[str, bytes | str, tuple, tuple]:
        """(code, reply bytes or details, initial metadata, trailing metadata)."""
        caller = self.channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        body = request.SerializeToString()
        try:
            reply, call = caller.with_call(body, timeout=HANG_GUARD)
            return "OK", reply, tuple(call.initial_metadata()), tuple(call.trailing_metadata())
        except grpc.RpcError as err:
            return err.code().name, err.details(), tuple(err.initial_metadata() or ()), \
                tuple(err.trailing_metadata() or ())


def in_memory(model: Any, version: str) -> MonitoredSession:
    return MonitoredSession(model, model_name="m", model_version=version, window_seconds=3600, summarizer="thread")


@pytest.fixture
def upstream(lr_model: Path) -> Iterator[Any]:
    server = serve(ort.InferenceSession(str(lr_model)), "m", "1", "127.0.0.1:0")
    yield server
    server.stop(grace=0)


@pytest.fixture
def proxy(upstream: Any) -> Iterator[ProxyServer]:
    running = serve_proxy(upstream.address, "m", in_memory, "127.0.0.1:0")
    yield running
    running.stop(grace=0)


def idle(running: ProxyServer) -> None:
    wait_until(running.monitor.idle, timeout=HANG_GUARD, what="the proxy's monitor to catch up")


# ------------------------------------------------------------------ pass-through


def pass_through_cases() -> list[tuple[str, Any]]:
    """Calls every front must pass on as the upstream answers them: 2 summarised, 1 partial, 1 of another
    model, 2 the model's own errors, and the other OIP methods."""
    x = examples.tabular_data(7, seed=3)[0]
    return [
        ("ModelInfer", infer_request(x, "with-id")),
        ("ModelInfer", infer_request(x, "typed", typed=True)),
        ("ModelInfer", infer_request(x, "subset", outputs=("label",))),
        ("ModelInfer", infer_request(x, model="nope")),                       # NOT_FOUND
        ("ModelInfer", infer_request(x.astype(np.float64)[:, :3], "bad")),    # INVALID_ARGUMENT
        ("ModelInfer", pb.ModelInferRequest(model_name="m", id="empty")),
        ("ModelMetadata", pb.ModelMetadataRequest(name="m")),
        ("ModelMetadata", pb.ModelMetadataRequest(name="m", version="9")),
        ("ModelReady", pb.ModelReadyRequest(name="m")),
        ("ServerMetadata", pb.ServerMetadataRequest()),
        ("ServerLive", pb.ServerLiveRequest()),
        ("ServerReady", pb.ServerReadyRequest()),
    ]


def test_replies_and_errors_are_the_upstreams_bytes(upstream: Any, proxy: ProxyServer):
    direct, through = Raw(upstream.address), Raw(proxy.address)
    x = examples.tabular_data(7, seed=3)[0]
    cases = pass_through_cases()
    for method, request in cases:
        assert through.call(method, request) == direct.call(method, request), (method, request.ListFields()[:2])
    code, details, _, _ = through.call("ModelInfer", infer_request(x, model="nope"))
    assert code == "NOT_FOUND" and "'nope' is not served here" in details
    idle(proxy)
    stats = proxy.monitor.stats()
    assert stats["captured"] == 2  # with-id and typed; the subset lacks an output
    assert stats["unmonitored"]["partial_outputs"] == 1 and stats["unmonitored"]["other_model"] == 2
    assert stats["upstream_errors"] == 2 and stats["capture_failures"] == 0
    assert proxy.monitor.session.stats()["errors"] == 2  # the model's own failures are in its windows


def test_a_request_without_an_id_keeps_its_reply_and_gets_the_proxys_id_for_feedback(upstream: Any,
                                                                                   proxy: ProxyServer):
    x, y = examples.tabular_data(5, seed=4)
    direct = Raw(upstream.address).call("ModelInfer", infer_request(x))
    code, reply, initial, _ = Raw(proxy.address).call("ModelInfer", infer_request(x))
    assert code == "OK" and reply == direct[1]  # no id added to the reply
    assert pb.ModelInferResponse.FromString(reply).id == ""
    assigned = dict(initial)[REQUEST_ID_HEADER]
    idle(proxy)
    assert labelled_by_id(proxy.address, assigned, y) == (5, 1)
    channel = grpc.insecure_channel(proxy.address)
    feedback = agent_pb2_grpc.FeedbackServiceStub(channel)
    # a client's own id is the one labels use, and no header is added
    code, _, initial, _ = Raw(proxy.address).call("ModelInfer", infer_request(x, "mine"))
    assert code == "OK" and REQUEST_ID_HEADER not in dict(initial)
    idle(proxy)
    answer = feedback.Feedback(agent_pb2.FeedbackRequest(labels=[agent_pb2.Label(request_id="mine", class_label="1")]),
                               timeout=HANG_GUARD)
    assert answer.matched == 1
    channel.close()


def test_a_capture_that_fails_never_changes_a_reply(upstream: Any):
    class Broken(MonitoredSession):
        def observe(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("a bug in the capture")

    running = serve_proxy(upstream.address, "m", lambda model, version: Broken(
        model, model_name="m", model_version=version, window_seconds=3600, summarizer="thread"), "127.0.0.1:0")
    try:
        x = examples.tabular_data(3, seed=5)[0]
        for _ in range(3):
            assert Raw(running.address).call("ModelInfer", infer_request(x, "a")) == \
                Raw(upstream.address).call("ModelInfer", infer_request(x, "a"))
        idle(running)
        assert running.monitor.stats()["capture_failures"] == 3
    finally:
        running.stop(grace=0)


# ------------------------------------------------------------------ an upstream that is not there


def test_an_unreachable_upstream_is_unavailable_naming_it_and_the_proxy_is_not_serving():
    gone = free_address()
    running = serve_proxy(gone, "m", in_memory, "127.0.0.1:0")
    try:
        x = examples.tabular_data(2, seed=6)[0]
        code, details, _, _ = Raw(running.address).call("ModelInfer", infer_request(x, "a"))  # hang guard: HANG_GUARD
        assert code == "UNAVAILABLE" and f"upstream {gone} is unreachable" in details
        code, details, _, _ = Raw(running.address).call("ServerLive", pb.ServerLiveRequest())
        assert code == "UNAVAILABLE" and gone in details
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(running.address))
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=HANG_GUARD).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert running.monitor.session is None  # no schema yet: nothing to summarise
        with pytest.raises(grpc.RpcError) as refused:
            agent_pb2_grpc.FeedbackServiceStub(grpc.insecure_channel(running.address)).Feedback(
                agent_pb2.FeedbackRequest(labels=[agent_pb2.Label(request_id="a", class_label="1")]), timeout=HANG_GUARD)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "waits for the upstream's metadata" in refused.value.details()
    finally:
        running.stop(grace=0)


def test_an_upstream_that_does_not_answer_is_unavailable_after_the_bound():
    release = threading.Event()

    class Silent(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> Any:
            return grpc.unary_unary_rpc_method_handler(lambda request, context: release.wait(HANG_GUARD) and b"")

    silent = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=(Silent(),))
    port = silent.add_insecure_port("127.0.0.1:0")
    silent.start()
    running = serve_proxy(f"127.0.0.1:{port}", "m", in_memory, "127.0.0.1:0", upstream_timeout=0.5)
    try:
        code, details, _, _ = Raw(running.address).call("ServerLive", pb.ServerLiveRequest())
        assert code == "UNAVAILABLE" and "did not answer within 0.5 s" in details
    finally:
        release.set()
        running.stop(grace=0)
        silent.stop(0)


def test_health_follows_the_upstream(lr_model: Path):
    upstream = serve(ort.InferenceSession(str(lr_model)), "m", "1", "127.0.0.1:0")
    running = serve_proxy(upstream.address, "m", in_memory, "127.0.0.1:0")
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(running.address))

    def status() -> int:
        return health.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"),
                            timeout=HANG_GUARD).status

    try:
        assert status() == health_pb2.HealthCheckResponse.SERVING
        upstream.stop(grace=0)
        wait_until(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=HANG_GUARD,
                   what="the proxy to say NOT_SERVING")
    finally:
        running.stop(grace=0)
        upstream.stop(grace=0)


# ------------------------------------------------------------------ at the collector


@pytest.mark.slow
@pytest.mark.parametrize("via", ["listen", "relay"])
def test_windows_at_the_collector_hold_every_row_and_the_drift_is_found(tmp_path: Path, lr_model: Path,
                                                                        upstream: Any, via: str):
    """Through the proxy's --listen, and through its --relay-listen (agent.proxy_relay: the calls are read off
    a copy of the bytes); labels go to the proxy's own port either way."""
    collector = serve_collector(tmp_path / "c.db", "127.0.0.1:0", drift_interval=0, rollup_interval=3600)
    ops = cpb_grpc.OpsServiceStub(grpc.insecure_channel(collector.address))

    def open_session(model: Any, version: str) -> MonitoredSession:
        return MonitoredSession(model, model_name="m", model_version=version, window_seconds=0.5,
                                summarizer="thread", agent_id="proxy-1", collector=collector.address,
                                spool_dir=tmp_path / "spool")

    running = serve_proxy(upstream.address, "m", open_session, "127.0.0.1:0")
    relay = serve_relay("127.0.0.1:0", upstream.address, running.monitor,
                        proxy_calls_counter(CollectorRegistry())) if via == "relay" else None
    try:
        x_ref, y_ref = examples.tabular_data(5000, seed=1)
        np.savez(tmp_path / "ref.npz", X=x_ref, label=y_ref)
        ops.AttachProfile(cpb.AttachProfileRequest(model_name="m", model_version="1",
                                                   profile=build_profile(lr_model, tmp_path / "ref.npz")),
                          timeout=HANG_GUARD)
        through, feedback = Raw(relay.address if relay is not None else running.address), Raw(running.address)
        x, y = examples.tabular_data(3000, seed=7)
        x[:, 3] += 1.0  # one feature moves by a standard deviation
        sent, start_row, i = 0, 0, 0
        while start_row < len(x):
            batch = 1 + (i * 37) % 64
            chunk = x[start_row:start_row + batch]
            code, _, _, _ = through.call("ModelInfer", infer_request(chunk, f"r{i}"))
            assert code == "OK"
            labels = [agent_pb2.Label(request_id=f"r{i}", row=j, class_label=str(int(y[start_row + j])))
                      for j in range(len(chunk))]
            sent += len(chunk)
            start_row += batch
            i += 1
            if i % 10 == 0:
                idle(running)
                agent_pb2_grpc.FeedbackServiceStub(feedback.channel).Feedback(
                    agent_pb2.FeedbackRequest(labels=labels), timeout=HANG_GUARD)
        idle(running)
    finally:
        if relay is not None:
            relay.stop(5)
        running.stop(grace=5)  # the last window flushed and delivered
    try:
        def stored() -> list[cpb.WindowInfo]:
            return list(ops.ListWindows(cpb.ListWindowsRequest(model_name="m", limit=10_000,
                                                               include_summaries=True), timeout=HANG_GUARD).windows)

        wait_until(lambda: sum(w.rows for w in stored()) >= sent, timeout=HANG_GUARD, what="every row stored")
        windows = stored()
        assert sum(w.rows for w in windows) == sent and sum(w.calls for w in windows) == i
        assert {w.agent_id for w in windows} == {"proxy-1"}
        labeled = sum(w.summary.performance.labeled for w in windows)
        assert labeled == sum(min(1 + (k * 37) % 64, len(x) - sum(1 + (m * 37) % 64 for m in range(k)))
                              for k in range(9, i, 10))
        report = ops.EvaluateDrift(cpb.DriftRequest(model_name="m"), timeout=HANG_GUARD).latest[0]
        drifted = {c.name for c in report.columns if c.drifted}
        assert "X[3]" in drifted and not drifted & {f"X[{j}]" for j in range(20) if j != 3}
    finally:
        collector.stop(grace=0)


# ------------------------------------------------------------------ the CLI, as a real process

PROBE = """
import json, sys
import numpy as np
import tritonclient.grpc as triton
client = triton.InferenceServerClient(sys.argv[1])
x = np.random.default_rng(8).standard_normal((6, 20)).astype(np.float32)
out = {"ready": client.is_model_ready("m"), "metadata": client.get_model_metadata("m", as_json=True)}
for rid in ("t-1", ""):
    tensor = triton.InferInput("X", [6, 20], "FP32")
    tensor.set_data_from_numpy(x)
    out["reply" + rid] = client.infer("m", [tensor], request_id=rid).get_response().SerializeToString().hex()
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
def test_the_cli_proxy_answers_tritonclient_as_the_upstream_does(tmp_path: Path, lr_model: Path):
    upstream, upstream_address = start(["agent", "serve", "--model", str(lr_model), "--model-name", "m",
                                        "--listen", "127.0.0.1:0", "--spool-dir", str(tmp_path / "up")],
                                       r"serving m version 1 on (\S+)")
    proxy, proxy_address = start(["agent", "proxy", "--upstream", upstream_address, "--model-name", "m",
                                  "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"],
                                 r"proxying \S+ on (\S+) \(m: monitoring version 1\)")
    try:
        direct, through = tritonclient(upstream_address), tritonclient(proxy_address)
        assert through == direct
        assert through["bad"][0] == "StatusCode.INVALID_ARGUMENT"
    finally:
        for proc in (proxy, upstream):
            proc.send_signal(signal.SIGTERM)
        for proc in (proxy, upstream):
            assert proc.wait(HANG_GUARD) == 0


def test_cli_bad_input_exits_2_in_one_line(upstream: Any, tmp_path: Path):
    missing = run_cli("agent", "proxy", "--model-name", "m")
    assert missing.code == 2 and "--upstream" in missing.one_line()
    bad = run_cli("agent", "proxy", "--upstream", "nowhere", "--model-name", "m")
    assert bad.code == 2 and "is not HOST:PORT" in bad.one_line()
    busy = run_cli("agent", "proxy", "--upstream", "127.0.0.1:1", "--model-name", "m", "--listen", upstream.address)
    assert busy.code == 2 and f"cannot listen on {upstream.address}" in busy.one_line()
    names = run_cli("agent", "proxy", "--upstream", upstream.address, "--model-name", "m", "--listen", "127.0.0.1:0",
                    "--feature-names", "a,b,c", "--summarizer", "thread")
    assert names.code == 2 and "cannot monitor m" in names.one_line() and "3" in names.one_line()
    (tmp_path / "a-file").write_text("")
    spool = run_cli("agent", "proxy", "--upstream", upstream.address, "--model-name", "m", "--listen", "127.0.0.1:0",
                    "--collector", "127.0.0.1:1", "--spool-dir", str(tmp_path / "a-file" / "spool"),
                    "--summarizer", "thread")
    assert spool.code == 2 and "cannot monitor m" in spool.one_line() and "a-file" in spool.one_line()
    loop = run_cli("agent", "proxy", "--upstream", "127.0.0.1:8001", "--model-name", "m", "--listen", "127.0.0.1:8001")
    assert loop.code == 2 and "own --listen" in loop.one_line()


def test_a_model_reloaded_with_other_tensors_is_monitored_afresh(lr_model: Path, tmp_path: Path):
    first = serve(ort.InferenceSession(str(lr_model)), "m", "1", "127.0.0.1:0")
    address = first.address
    running = serve_proxy(address, "m", in_memory, "127.0.0.1:0")
    try:
        assert [a.shape for a in running.monitor.session.get_inputs()] == [[None, 20]]
        first.stop(grace=0)
        narrow = tmp_path / "narrow.onnx"
        narrow.write_bytes(examples.logistic_regression(n_features=5))
        second = serve(ort.InferenceSession(str(narrow)), "m", "2", address)  # the same address, reloaded
        try:
            wait_until(lambda: running.monitor.session.model_version == "2", timeout=HANG_GUARD,
                       what="the proxy to read the new schema")
            assert [a.shape for a in running.monitor.session.get_inputs()] == [[None, 5]]
            x = examples.tabular_data(4, n_features=5, seed=9)[0]
            assert Raw(running.address).call("ModelInfer", infer_request(x, "n"))[0] == "OK"
            idle(running)
            assert running.monitor.session.stats()["calls"] == 1
        finally:
            second.stop(grace=0)
    finally:
        running.stop(grace=0)


def test_request_metadata_reaches_the_upstream_and_its_refusals_come_back(lr_model: Path):
    """The upstream checks bearer tokens: the client's header must pass through the proxy, and the
    upstream's UNAUTHENTICATED come back as it said it."""
    from agent.tokens import ClientAuth

    auth = ClientAuth.from_toml('[[client]]\nname = "web"\ntoken = "a-long-random-token-0123"\n')
    upstream = serve(ort.InferenceSession(str(lr_model)), "m", "1", "127.0.0.1:0", auth=auth)
    running = serve_proxy(upstream.address, "m", in_memory, "127.0.0.1:0")
    try:
        x = examples.tabular_data(2, seed=10)[0]
        body = infer_request(x, "t").SerializeToString()
        results = []
        for address in (upstream.address, running.address):
            caller = grpc.insecure_channel(address).unary_unary(INFER)
            results.append(caller(body, metadata=(("authorization", "Bearer a-long-random-token-0123"),),
                                  timeout=HANG_GUARD))
            with pytest.raises(grpc.RpcError) as refused:
                caller(body, timeout=HANG_GUARD)
            results.append((refused.value.code(), refused.value.details()))
        assert results[:2] == results[2:]
        assert results[1][0] == grpc.StatusCode.UNAUTHENTICATED
    finally:
        running.stop(grace=0)
        upstream.stop(grace=0)


def test_upstream_errors_and_unmonitored_calls_are_counted_in_prometheus(upstream: Any):
    from agent.metrics import AgentMetrics

    metrics = AgentMetrics()
    endpoint = metrics.start_http("127.0.0.1:0")
    running = serve_proxy(upstream.address, "m", in_memory, "127.0.0.1:0", metrics=metrics)
    try:
        through = Raw(running.address)
        x = examples.tabular_data(3, seed=11)[0]
        assert through.call("ModelInfer", infer_request(x, "ok"))[0] == "OK"
        assert through.call("ModelInfer", infer_request(x, model="other"))[0] == "NOT_FOUND"
        assert through.call("ModelInfer", infer_request(x, "sub", outputs=("probabilities",)))[0] == "OK"
        idle(running)
        page = urllib.request.urlopen(endpoint.url, timeout=HANG_GUARD).read().decode()
    finally:
        running.stop(grace=0)
        metrics.close()
    assert 'outrider_proxy_calls_total{code="OK",method="ModelInfer"} 2.0' in page
    assert 'outrider_proxy_calls_total{code="NOT_FOUND",method="ModelInfer"} 1.0' in page
    assert 'outrider_proxy_unmonitored_calls_total{reason="other_model"} 1.0' in page
    assert 'outrider_proxy_unmonitored_calls_total{reason="partial_outputs"} 1.0' in page
    assert "outrider_proxy_captured_calls_total 1.0" in page
    assert "outrider_agent_rows_captured_total 3.0" in page  # the agent's own monitoring families, for the proxy
    assert "outrider_proxy_upstream_ready 1.0" in page


@pytest.mark.slow
@pytest.mark.parametrize("via", ["listen", "relay"])
def test_an_upstream_killed_mid_traffic_is_unavailable_then_served_again_when_back(tmp_path: Path, lr_model: Path,
                                                                                  via: str):
    def upstream_process(listen: str) -> tuple[subprocess.Popen, str]:
        return start(["agent", "serve", "--model", str(lr_model), "--model-name", "m", "--listen", listen,
                      "--spool-dir", str(tmp_path / "up")], r"serving m version 1 on (\S+)")

    first, address = upstream_process("127.0.0.1:0")
    running = serve_proxy(address, "m", in_memory, "127.0.0.1:0")
    relay = serve_relay("127.0.0.1:0", address, running.monitor,
                        proxy_calls_counter(CollectorRegistry())) if via == "relay" else None
    second = None
    try:
        through = Raw(relay.address if relay is not None else running.address)
        x = examples.tabular_data(2, seed=12)[0]
        assert through.call("ModelInfer", infer_request(x, "before"))[0] == "OK"
        first.send_signal(signal.SIGKILL)
        first.wait(HANG_GUARD)
        code, details, _, _ = through.call("ModelInfer", infer_request(x, "down"))  # hang guard: HANG_GUARD
        # the relay closes the connection the upstream's death left: a call racing that close sees it closed
        assert code == "UNAVAILABLE" and (address in details or (relay is not None and "closed" in details))
        second, _ = upstream_process(address)
        wait_until(lambda: through.call("ModelInfer", infer_request(x, "after"))[0] == "OK", timeout=HANG_GUARD,
                   what="the proxy to reach the restarted upstream")
        idle(running)
        assert running.monitor.stats()["captured"] >= 2 and running.monitor.stats()["capture_failures"] == 0
    finally:
        if relay is not None:
            relay.stop(0)
        running.stop(grace=0)
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(HANG_GUARD)


@pytest.mark.slow
def test_the_overhead_benchmark_measures_both_sides_and_no_request_fails():
    from benchmarks import proxy as bench

    rows = bench.run([2], [3], seconds=0.5, rounds=1, relay=True)
    assert [row["protocol"] for row in rows] == ["grpc", "grpc-relay"]
    assert rows[0]["direct"] == rows[1]["direct"]  # one direct figure for both ways through
    for row in rows:
        assert row["direct"]["failed"] == 0 and row["proxy"]["failed"] == 0
        assert row["direct"]["rps"] > 0 and row["proxy"]["rps"] > 0 and row["proxy"]["proxy_cpu_ms_per_1k"] > 0
        assert row["ratio_p50"] > 0 and row["ratio_rps"] > 0


def test_a_streaming_call_passes_through_unmonitored():
    """Triton's ModelStreamInfer (not in our protos): the proxy relays the stream both ways, bytes as they are."""

    class Echo(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> Any:
            if details.method != "/inference.GRPCInferenceService/ModelStreamInfer":
                return None
            return grpc.stream_stream_rpc_method_handler(lambda requests, context: (b"echo:" + r for r in requests))

    echo = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=(Echo(),))
    port = echo.add_insecure_port("127.0.0.1:0")
    echo.start()
    running = serve_proxy(f"127.0.0.1:{port}", "m", in_memory, "127.0.0.1:0")
    try:
        stream = grpc.insecure_channel(running.address).stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        assert list(stream(iter([b"a", b"\x00\x01"]), timeout=HANG_GUARD)) == [b"echo:a", b"echo:\x00\x01"]
        assert running.monitor.stats()["captured"] == 0
    finally:
        running.stop(grace=0)
        echo.stop(0)
