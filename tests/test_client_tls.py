"""TLS on the agent's own connections, set with the CLI's flags: an agent (``agent serve``, ``agent proxy``)
to a collector that requires mutual TLS (``--collector-tls-*``), and a proxy to an upstream serving gRPC and
REST over TLS (``--upstream-tls-*``). Real processes, a real collector, certificates made on the fly
(``test_auth.pki``: a self-signed server certificate, a CA and a client certificate it signed)."""
from __future__ import annotations

import http.client
import json
import signal
import ssl
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from agent import examples
from agent.rest import SwitchBackend, serve_rest
from agent.server import serve
from agent.tokens import TLSFiles
from collector.api.server import serve_collector
from protos import open_inference_pb2_grpc as pb_grpc
from test_auth import pki  # noqa: F401  (a fixture: certificates made on the fly)
from test_cli_contract import run as run_cli
from test_delivery import reap, start, wait_until  # noqa: F401  (reap: processes left by a failed test)
from test_proxy import infer_request

HANG_GUARD = 60


def tls_channel(address: str, pki: dict[str, Path]) -> grpc.Channel:
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(pki["server_cert"].read_bytes()))


def stop(*procs) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        assert proc.wait(HANG_GUARD) == 0


@pytest.fixture
def mtls_collector(tmp_path: Path, pki: dict[str, Path]):  # noqa: F811
    """A collector whose port requires TLS and a client certificate signed by the test CA (the tests read
    what it stored from its store)."""
    server = serve_collector(tmp_path / "c.db", "127.0.0.1:0", rollup_interval=3600, drift_interval=0,
                             tls=TLSFiles(pki["server_cert"], pki["server_key"], pki["ca"]))
    yield server
    server.stop(grace=0)


def rows_in(collector) -> int:
    return sum(m.rows for m in collector.store.model_totals())


def test_agent_serve_sends_its_windows_to_a_collector_that_requires_mutual_tls(tmp_path, lr_model, pki,  # noqa: F811
                                                                               mtls_collector):
    address = f"127.0.0.1:{mtls_collector.port}"
    agent, listen = start(["agent", "serve", "--model", str(lr_model), "--model-name", "m", "--listen", "127.0.0.1:0",
                           "--collector", address, "--collector-tls-ca", str(pki["server_cert"]),
                           "--collector-tls-cert", str(pki["client_cert"]), "--collector-tls-key", str(pki["client_key"]),
                           "--window-seconds", "1", "--spool-dir", str(tmp_path / "spool")],
                          r"serving m version 1 on (\S+)")
    try:
        x, _ = examples.tabular_data(7, seed=3)
        with grpc.insecure_channel(listen) as channel:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(x), timeout=HANG_GUARD)
        wait_until(lambda: rows_in(mtls_collector) == 7, timeout=HANG_GUARD, what="the rows stored over mutual TLS")
    finally:
        stop(agent)


def test_the_proxy_reaches_an_upstream_serving_grpc_and_rest_over_tls(tmp_path, lr_model, pki,  # noqa: F811
                                                                      mtls_collector):
    tls = TLSFiles(pki["server_cert"], pki["server_key"])
    upstream = serve(ort.InferenceSession(str(lr_model)), "m", "1", "127.0.0.1:0", tls=tls)
    rest = serve_rest(SwitchBackend(upstream.servicer.switch, upstream.servicer.shutting_down), "127.0.0.1:0",
                      tls=tls)
    try:
        proxy, addresses = start(
            ["agent", "proxy", "--upstream", upstream.address, "--upstream-http", rest.address,
             "--upstream-tls-ca", str(pki["server_cert"]), "--http-listen", "127.0.0.1:0", "--model-name", "m",
             "--listen", "127.0.0.1:0", "--collector", f"127.0.0.1:{mtls_collector.port}",
             "--collector-tls-ca", str(pki["server_cert"]), "--collector-tls-cert", str(pki["client_cert"]),
             "--collector-tls-key", str(pki["client_key"]), "--window-seconds", "1",
             "--spool-dir", str(tmp_path / "spool")],
            r"proxying \S+ on (\S+ \(m: monitoring version 1\); REST \S+ on \S+)")
        try:
            grpc_address, rest_url = addresses.split()[0], addresses.split()[-1]
            x, _ = examples.tabular_data(4, seed=5)
            request = infer_request(x, request_id="r-1")
            with tls_channel(upstream.address, pki) as channel:
                direct = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=HANG_GUARD)
            with grpc.insecure_channel(grpc_address) as channel:  # the proxy's own port: plaintext here
                through = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=HANG_GUARD)
            assert through.SerializeToString() == direct.SerializeToString()
            body = json.dumps({"id": "r-2", "inputs": [{"name": "X", "datatype": "FP32", "shape": [3, 20],
                                                        "data": np.ones(60).tolist()}]}).encode()
            host, port = rest.address.rsplit(":", 1)
            upstream_https = http.client.HTTPSConnection(
                host, int(port), timeout=HANG_GUARD,
                context=ssl.create_default_context(cafile=str(pki["server_cert"])))
            upstream_https.request("POST", "/v2/models/m/infer", body=body)
            direct_reply = upstream_https.getresponse().read()
            upstream_https.close()
            plain = http.client.HTTPConnection(*rest_url.removeprefix("http://").rsplit(":", 1), timeout=HANG_GUARD)
            plain.request("POST", "/v2/models/m/infer", body=body)
            reply = plain.getresponse()
            assert reply.status == 200 and reply.read() == direct_reply
            plain.close()
            wait_until(lambda: rows_in(mtls_collector) == 4 + 3, timeout=HANG_GUARD,
                       what="the proxied rows at the collector, over mutual TLS")
        finally:
            stop(proxy)
    finally:
        rest.stop()
        upstream.stop(grace=0)


@pytest.mark.parametrize("flags, says", [
    (["--collector-tls-cert", "{client_cert}"], "--collector-tls-cert and --collector-tls-key go together"),
    (["--collector-tls-cert", "{client_cert}", "--collector-tls-key", "{client_key}"],
     "--collector-tls-cert needs --collector-tls-ca"),
    (["--collector-tls-ca", "/nonexistent/ca.pem"], "cannot read --collector-tls-ca"),
    (["--collector-tls-ca", "{client_key}", "--collector-tls-cert", "{client_cert}", "--collector-tls-key",
      "{server_key}"], "do not load as TLS files"),
])
def test_bad_collector_tls_flags_exit_2_in_one_line(lr_model, pki, flags, says):  # noqa: F811
    args = [pki[a[1:-1]].as_posix() if a.startswith("{") else a for a in flags]
    done = run_cli("agent", "serve", "--model", str(lr_model), "--collector", "127.0.0.1:1", *args)
    assert done.code == 2 and says in done.one_line(), done.err


def test_tls_flags_without_their_peer_exit_2(lr_model):  # noqa: F811
    done = run_cli("agent", "serve", "--model", str(lr_model), "--collector-tls-ca", "system")
    assert done.code == 2 and "--collector-tls-ca goes with --collector" in done.one_line()
