"""``outrider agent proxy`` in front of a real MLServer 1.7.1 (issue 13).

MLServer runs from its own venv (``benchmarks/mlserver_env.py``; created here when missing, as on
a fresh CI machine) and serves an ONNX model built from scikit-learn in the test through the
custom runtime ``benchmarks/_mlserver_runtime.py``. Clients are ``tritonclient.grpc`` and raw
byte calls; the proxy's replies are compared with MLServer's own answers to the same requests;
windows go to a real collector (SQLite file) and its drift engine.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from agent import MonitoredSession, examples
from agent.profile import build_profile
from agent.proxy_grpc import REQUEST_ID_HEADER, ProxyServer, serve_proxy
from benchmarks import mlserver_env
from collector.api.server import serve_collector
from protos import collector_pb2 as cpb
from protos import collector_pb2_grpc as cpb_grpc
from protos import open_inference_pb2 as pb
from test_delivery import wait_until
from test_proxy import HANG_GUARD, Raw, idle, in_memory, infer_request, labelled_by_id

pytestmark = pytest.mark.slow  # MLServer takes seconds to start (and minutes to install on a fresh machine)


@pytest.fixture(scope="session")
def mlserver_venv() -> Path:
    """MLServer's venv, created when missing: what CI does on a fresh machine."""
    if mlserver_env.missing() is not None:
        started = time.monotonic()
        assert mlserver_env.setup() == 0, "could not install MLServer into its venv (see pip's output)"
        print(f"MLServer venv created in {time.monotonic() - started:.0f} s")
    reason = mlserver_env.missing()
    assert reason is None, reason
    return mlserver_env.venv_path()


@pytest.fixture(scope="module")
def mlserver(mlserver_venv: Path, lr_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    server = mlserver_env.start(tmp_path_factory.mktemp("mlserver"), lr_model, "m", venv=mlserver_venv)
    yield server
    server.stop()


@pytest.fixture
def proxy(mlserver: Any) -> Iterator[ProxyServer]:
    running = serve_proxy(mlserver.grpc_address, "m", in_memory, "127.0.0.1:0")
    wait_until(lambda: running.monitor.session is not None, timeout=HANG_GUARD,
               what="the proxy to read MLServer's metadata of the model")
    yield running
    running.stop(grace=0)


# tritonclient registers the same OIP message names as our protos: it runs in a process of its own.
TRITON = r"""
import json, sys
import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException
client = triton.InferenceServerClient(sys.argv[1])
out = []
for call in json.loads(sys.stdin.read()):
    x = np.asarray(call["x"], dtype=np.float64 if call["datatype"] == "FP64" else np.float32)
    tensor = triton.InferInput("X", list(x.shape), call["datatype"])
    tensor.set_data_from_numpy(x)
    asked = [triton.InferRequestedOutput(name) for name in call["outputs"]] or None
    try:
        result = client.infer("m", [tensor], request_id=call["id"], outputs=asked)
        out.append(["OK", result.get_response().SerializeToString().hex()])
    except InferenceServerException as exc:
        out.append([str(exc.status()), exc.message()])
print(json.dumps(out))
"""


def triton_infer(address: str, calls: list[tuple[np.ndarray, str, tuple[str, ...], str]]) -> list[list[str]]:
    """Each (x, request id, outputs asked, datatype) sent by tritonclient.grpc: ["OK", reply hex] or
    [status, message]."""
    payload = json.dumps([{"x": x.tolist(), "id": rid, "outputs": list(outputs), "datatype": datatype}
                          for x, rid, outputs, datatype in calls])
    done = subprocess.run([sys.executable, "-c", TRITON, address], input=payload, capture_output=True, text=True,
                          timeout=HANG_GUARD * 4)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def relay_of(proxy: ProxyServer, upstream: str) -> Any:
    """``proxy``'s --relay-listen (agent.proxy_relay) to ``upstream``, its calls summarised by the same monitor."""
    from prometheus_client import CollectorRegistry

    from agent.proxy_grpc import proxy_calls_counter
    from agent.proxy_relay import serve_relay

    return serve_relay("127.0.0.1:0", upstream, proxy.monitor, proxy_calls_counter(CollectorRegistry()))


@pytest.mark.parametrize("via", ["listen", "relay"])
def test_replies_and_errors_through_the_proxy_are_mlservers_own(mlserver: Any, proxy: ProxyServer, via: str):
    relay = relay_of(proxy, mlserver.grpc_address) if via == "relay" else None
    try:
        check_replies_and_errors(mlserver, proxy, relay.address if relay is not None else proxy.address)
    finally:
        if relay is not None:
            relay.stop(0)


def check_replies_and_errors(mlserver: Any, proxy: ProxyServer, address: str) -> None:
    x = examples.tabular_data(7, seed=3)[0]
    calls = [(x, "t-1", (), "FP32"), (x, "t-2", ("label",), "FP32"), (x, "t-3", (), "FP64")]
    direct = triton_infer(mlserver.grpc_address, calls)
    assert [code for code, _ in direct] == ["OK", "OK", "StatusCode.INTERNAL"], direct  # MLServer: the runtime raised
    assert triton_infer(address, calls) == direct

    direct, through = Raw(mlserver.grpc_address), Raw(address)
    cases = [
        ("ModelInfer", infer_request(x, "typed", typed=True)),
        ("ModelInfer", infer_request(x, "nope", model="nope")),            # MLServer: model not found
        ("ModelInfer", infer_request(x.astype(np.float64)[:, :3], "bad")),  # the runtime's own failure
        ("ModelMetadata", pb.ModelMetadataRequest(name="m")),
        ("ModelReady", pb.ModelReadyRequest(name="m")),
        ("ServerMetadata", pb.ServerMetadataRequest()),
        ("ServerLive", pb.ServerLiveRequest()),
        ("ServerReady", pb.ServerReadyRequest()),
    ]
    for method, request in cases:
        assert through.call(method, request)[:2] == direct.call(method, request)[:2], (method, request.id)
    assert direct.call("ModelInfer", infer_request(x, "nope", model="nope"))[0] != "OK"
    idle(proxy)
    stats = proxy.monitor.stats()
    # t-1, t-2 and typed: MLServer answers with every output even when asked for a subset; its 1-D outputs
    # come as [N, 1] (NumpyCodec), summarised all the same
    assert stats["captured"] == 3, stats
    assert stats["unmonitored"]["undecodable"] == 0 and stats["unmonitored"]["other_model"] == 1
    assert stats["upstream_errors"] == 2 and stats["capture_failures"] == 0  # FP64 via tritonclient, and "bad"
    assert proxy.monitor.session.stats()["errors"] == 2


def test_a_request_without_an_id_is_labelled_by_the_proxys_id(mlserver: Any, proxy: ProxyServer):
    x, y = examples.tabular_data(5, seed=4)
    direct = Raw(mlserver.grpc_address).call("ModelInfer", infer_request(x))
    code, reply, initial, _ = Raw(proxy.address).call("ModelInfer", infer_request(x))
    assert code == "OK" and reply == direct[1]  # the proxy's id is not added to MLServer's reply
    assert pb.ModelInferResponse.FromString(reply).id == ""
    assigned = dict(initial)[REQUEST_ID_HEADER]
    idle(proxy)
    assert labelled_by_id(proxy.address, assigned, y) == (len(y), 1)


@pytest.mark.parametrize("via", ["listen", "relay"])
def test_windows_at_the_collector_hold_every_row_and_the_drift_is_found(tmp_path: Path, lr_model: Path,
                                                                        mlserver: Any, via: str):
    collector = serve_collector(tmp_path / "c.db", "127.0.0.1:0", drift_interval=0, rollup_interval=3600)
    ops = cpb_grpc.OpsServiceStub(grpc.insecure_channel(collector.address))

    def open_session(model: Any, version: str) -> MonitoredSession:
        return MonitoredSession(model, model_name="m", model_version=version, window_seconds=0.5,
                                summarizer="thread", agent_id="proxy-ml", collector=collector.address,
                                spool_dir=tmp_path / "spool")

    running = serve_proxy(mlserver.grpc_address, "m", open_session, "127.0.0.1:0")
    relay = relay_of(running, mlserver.grpc_address) if via == "relay" else None
    try:
        wait_until(lambda: running.monitor.session is not None, timeout=HANG_GUARD,
                   what="the proxy to read MLServer's metadata of the model")
        version = running.monitor.session.model_version
        x_ref, y_ref = examples.tabular_data(5000, seed=1)
        np.savez(tmp_path / "ref.npz", X=x_ref, label=y_ref)
        ops.AttachProfile(cpb.AttachProfileRequest(model_name="m", model_version=version,
                                                   profile=build_profile(lr_model, tmp_path / "ref.npz")),
                          timeout=HANG_GUARD)
        x = examples.tabular_data(2000, seed=7)[0]
        x[:, 3] += 1.0  # one feature moves by a standard deviation
        batches, start_row = [], 0
        while start_row < len(x):
            batch = 1 + (len(batches) * 37) % 64
            batches.append((x[start_row:start_row + batch], f"r{len(batches)}", (), "FP32"))
            start_row += batch
        replies = triton_infer(relay.address if relay is not None else running.address, batches)
        assert [code for code, _ in replies] == ["OK"] * len(batches)
        sent, calls = len(x), len(batches)
        idle(running)
        assert running.monitor.stats()["captured"] == calls
    finally:
        if relay is not None:
            relay.stop(5)
        running.stop(grace=5)  # the last window flushed and delivered
    try:
        def stored() -> list[cpb.WindowInfo]:
            return list(ops.ListWindows(cpb.ListWindowsRequest(model_name="m", limit=10_000),
                                        timeout=HANG_GUARD).windows)

        wait_until(lambda: sum(w.rows for w in stored()) >= sent, timeout=HANG_GUARD, what="every row stored")
        windows = stored()
        assert sum(w.rows for w in windows) == sent and sum(w.calls for w in windows) == calls
        assert {w.agent_id for w in windows} == {"proxy-ml"}
        report = ops.EvaluateDrift(cpb.DriftRequest(model_name="m"), timeout=HANG_GUARD).latest[0]
        drifted = {c.name for c in report.columns if c.drifted}
        assert "X[3]" in drifted and not drifted & {f"X[{j}]" for j in range(20) if j != 3}
    finally:
        collector.stop(grace=0)


def test_the_overhead_benchmark_runs_with_mlserver_as_the_upstream(mlserver_venv: Path):
    from benchmarks import proxy as bench

    (row,) = bench.run([2], [3], seconds=0.5, rounds=1, upstream_kind="mlserver")
    assert row["upstream"] == "mlserver" and row["direct"]["failed"] == 0 and row["proxy"]["failed"] == 0
    assert row["direct"]["rps"] > 0 and row["proxy"]["rps"] > 0
    assert row["direct"]["upstream_cpu_ms_per_1k"] > 0 and row["proxy"]["proxy_cpu_ms_per_1k"] > 0


def test_rest_replies_and_errors_through_the_proxy_are_mlservers_own(mlserver: Any):
    """The REST front before MLServer's own REST port: status and body bytes as MLServer gives them,
    the monitored model's calls summarised."""
    from prometheus_client import CollectorRegistry

    from agent.proxy_grpc import proxy_calls_counter
    from agent.proxy_rest import serve_proxy_rest
    from test_proxy_rest import call, infer_body

    calls = proxy_calls_counter(CollectorRegistry())
    running = serve_proxy(mlserver.grpc_address, "m", in_memory, "127.0.0.1:0", calls=calls)
    rest = serve_proxy_rest(mlserver.http_address, running.monitor, calls, "127.0.0.1:0")
    try:
        wait_until(lambda: running.monitor.session is not None, timeout=HANG_GUARD,
                   what="the proxy to read MLServer's metadata of the model")
        direct_port, proxy_port = int(mlserver.http_address.rsplit(":", 1)[1]), rest.port
        x = examples.tabular_data(6, seed=5)[0]
        cases = [("POST", "/v2/models/m/infer", *infer_body(x, "j-1")),
                 ("POST", "/v2/models/m/infer", *infer_body(x[:2], "j-2", outputs=("label",))),
                 ("POST", "/v2/models/nope/infer", *infer_body(x, "j-3")),       # MLServer: unknown model
                 ("POST", "/v2/models/m/infer", b'{"inputs": "not a list"}', {"Content-Type": "application/json"}),
                 ("GET", "/v2/models/m", None, {}),
                 ("GET", "/v2/models/m/ready", None, {}),
                 ("GET", "/v2/health/ready", None, {})]
        for method, path, body, headers in cases:
            status, _, reply = call(proxy_port, method, path, body, headers)
            direct_status, _, direct_reply = call(direct_port, method, path, body, headers)
            assert (status, reply) == (direct_status, direct_reply), (path, body[:60] if body else None)
        assert call(direct_port, *cases[2][:2], cases[2][2], cases[2][3])[0] == 404
        wait_until(running.monitor.idle, timeout=HANG_GUARD, what="the proxy's monitor to catch up")
        stats = running.monitor.stats()
        assert stats["captured"] == 2, stats  # j-1 and j-2 (MLServer answers every output)
        assert stats["unmonitored"]["other_model"] == 1 and stats["capture_failures"] == 0
    finally:
        rest.stop()
        running.stop(grace=0)
