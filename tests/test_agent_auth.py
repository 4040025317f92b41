"""Tokens and TLS on the agent's own port: the auth file, real servers, tritonclient, the CLI (plain and managed)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent import MonitoredSession
from agent.errors import InvalidArgument
from agent.metrics import AgentMetrics
from agent.server import serve
from agent.tokens import ClientAuth, Client, TLSFiles, token_digest
from protos import agent_pb2, agent_pb2_grpc, collector_pb2_grpc
from protos import open_inference_pb2 as pb
from protos import open_inference_pb2_grpc as pb_grpc
from test_agent_cli import ROOT, cli, cli_env, read_line
from test_auth import pki  # noqa: F401  (a fixture: certificates made on the fly)
from test_server import decode, raw_request, x_rows

HANG_GUARD = 60
WEB, LABELER, BOTH = "web-token-0123456789", "labeler-token-0123456789", "both-token-0123456789"
AUTH_TOML = f"""
[[client]]
name = "web"
token = "{WEB}"
calls = ["inference"]

[[client]]
name = "labeler"
token_sha256 = "{hashlib.sha256(LABELER.encode()).hexdigest()}"
calls = "feedback"

[[client]]
name = "both"
token = "{BOTH}"
"""


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# ------------------------------------------------------------------ the auth file

def test_clients_get_the_calls_their_entry_names():
    auth = ClientAuth.from_toml(AUTH_TOML)
    assert auth.authenticate(WEB) == Client("web", frozenset({"inference"}))
    assert auth.authenticate(LABELER) == Client("labeler", frozenset({"feedback"}))
    assert auth.authenticate(BOTH) == Client("both", frozenset({"inference", "feedback"}))
    assert auth.authenticate("not-a-token-at-all") is None
    assert auth.authenticate(hashlib.sha256(LABELER.encode()).hexdigest()) is None  # the digest is no token


def test_from_file_reads_toml(tmp_path):
    path = tmp_path / "clients.toml"
    path.write_text(AUTH_TOML)
    assert ClientAuth.from_file(path).authenticate(BOTH).name == "both"
    with pytest.raises(InvalidArgument, match="cannot read auth file"):
        ClientAuth.from_file(tmp_path / "missing.toml")


@pytest.mark.parametrize("text, words", [
    ("[[client]\nname=", "not valid TOML"),
    ("", "defines no [[client]]"),
    ("[[agent]]\nname='a'\ntoken='0123456789abcdefgh'", "unknown section"),
    ("client = 'x'", "[[client]] table"),
    ("[[client]]\ntoken='0123456789abcdefgh'", "needs a name"),
    ("[[client]]\nname='a'", "exactly one of token or token_sha256"),
    ("[[client]]\nname='a'\ntoken='short'", "at least 16 characters"),
    ("[[client]]\nname='a'\ntoken_sha256='xyz'", "64 hex digits"),
    ("[[client]]\nname='a'\ntoken='0123456789abcdefgh'\nrole='admin'", "unknown key"),
    ("[[client]]\nname='a'\ntoken='0123456789abcdefgh'\ncalls=['infer']", "calls must be a non-empty list"),
    ("[[client]]\nname='a'\ntoken='0123456789abcdefgh'\ncalls=[]", "calls must be a non-empty list"),
    ("[[client]]\nname='a'\ntoken='0123456789abcdefgh'\n[[client]]\nname='b'\ntoken='0123456789abcdefgh'",
     "client 'b' has the same token as client 'a'"),
])
def test_a_bad_auth_file_is_refused_with_a_clear_message(text, words):
    with pytest.raises(InvalidArgument) as info:
        ClientAuth.from_toml(text)
    assert words in str(info.value)


def test_token_entries_read_like_the_collectors():
    """The shared reader gives the digest the collector's auth file would (same entry, same token)."""
    from collector.base.auth import AuthConfig

    entry = {"name": "edge-1", "token": "a-long-random-agent-token"}
    config = AuthConfig.from_toml("[[agent]]\nname = 'edge-1'\ntoken = 'a-long-random-agent-token'\n")
    assert config.authenticate("a-long-random-agent-token").name == "edge-1"
    assert token_digest(entry, "x") == hashlib.sha256(b"a-long-random-agent-token").digest()


# ------------------------------------------------------------------ a real server with tokens

@pytest.fixture(scope="module")
def secured(lr_model) -> Iterator[tuple]:
    session = MonitoredSession(str(lr_model), window_seconds=None, summarizer="thread")
    metrics = AgentMetrics()
    server = serve(session, "lr", "1", "127.0.0.1:0", auth=ClientAuth.from_toml(AUTH_TOML), metrics=metrics)
    channel = grpc.insecure_channel(server.address)
    try:
        yield server, metrics, channel
    finally:
        channel.close()
        server.stop(grace=0)


def infer(channel: grpc.Channel, metadata: tuple = (), **kw) -> pb.ModelInferResponse:
    return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
        raw_request("lr", {"X": x_rows(2)}, **kw), metadata=metadata, timeout=HANG_GUARD)


def feedback(channel: grpc.Channel, metadata: tuple = ()) -> agent_pb2.FeedbackResponse:
    return agent_pb2_grpc.FeedbackServiceStub(channel).Feedback(agent_pb2.FeedbackRequest(
        labels=[agent_pb2.Label(request_id="req-1", class_label="1")]), metadata=metadata, timeout=HANG_GUARD)


REFUSED = {
    "no token": (infer, (), grpc.StatusCode.UNAUTHENTICATED, "missing token: this agent needs metadata"),
    "not bearer": (infer, (("authorization", f"Basic {WEB}"),), grpc.StatusCode.UNAUTHENTICATED,
                   "expected 'Bearer <token>'"),
    "unknown token": (infer, bearer("x" * 30), grpc.StatusCode.UNAUTHENTICATED, "not in the agent's auth file"),
    "labeler infers": (infer, bearer(LABELER), grpc.StatusCode.PERMISSION_DENIED,
                       "client 'labeler' may call feedback, not inference (ModelInfer); add 'inference'"),
    "web sends labels": (feedback, bearer(WEB), grpc.StatusCode.PERMISSION_DENIED,
                         "client 'web' may call inference, not feedback (Feedback)"),
    "feedback without token": (feedback, (), grpc.StatusCode.UNAUTHENTICATED, "missing token"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_calls_without_a_fitting_token_are_refused_with_a_sentence(secured, case):
    server, _, channel = secured
    call, metadata, code, words = REFUSED[case]
    before = server.refusals()
    with pytest.raises(grpc.RpcError) as info:
        call(channel, metadata)
    assert info.value.code() == code
    assert words in info.value.details()
    after = server.refusals()
    assert after[code.name.lower()] == before[code.name.lower()] + 1


def test_the_tokens_calls_are_answered_and_health_stays_open(secured):
    server, _, channel = secured
    assert infer(channel, bearer(WEB), id="req-1").id == "req-1"
    assert (feedback(channel, bearer(LABELER)).matched, feedback(channel, bearer(BOTH)).matched) == (1, 1)
    assert infer(channel, bearer(BOTH)).model_name == "lr"
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    assert stub.ModelMetadata(pb.ModelMetadataRequest(name="lr"), metadata=bearer(WEB)).name == "lr"
    with pytest.raises(grpc.RpcError) as info:  # the OIP service is closed as a whole, metadata included
        stub.ServerLive(pb.ServerLiveRequest(), timeout=HANG_GUARD)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=HANG_GUARD)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_a_refused_callers_body_is_never_decoded(secured):
    server, _, channel = secured
    before = server.refusals()
    raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as info:
        raw(b"\xff\xff\xff", timeout=HANG_GUARD)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:
        raw(b"\xff\xff\xff", metadata=bearer(WEB), timeout=HANG_GUARD)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = server.refusals()
    assert after["unauthenticated"] == before["unauthenticated"] + 1
    assert after["undecodable"] == before["undecodable"] + 1


def test_refusals_reach_prometheus(secured):
    server, metrics, channel = secured
    with pytest.raises(grpc.RpcError):
        infer(channel)
    with pytest.raises(grpc.RpcError):
        infer(channel, bearer(LABELER))
    get = metrics.registry.get_sample_value
    for reason, count in server.refusals().items():
        assert get("outrider_agent_refused_calls_total", {"reason": reason}) == count
    failures = {"model": "lr", "version": "1"}
    assert get("outrider_agent_request_failures_total", {**failures, "reason": "UNAUTHENTICATED"}) >= 1
    assert get("outrider_agent_request_failures_total", {**failures, "reason": "PERMISSION_DENIED"}) >= 1


def test_without_an_auth_file_anyone_may_call(lr_model):
    server = serve(ort.InferenceSession(str(lr_model)), "lr", "1", "127.0.0.1:0")
    try:
        with grpc.insecure_channel(server.address) as channel:
            assert infer(channel).model_name == "lr"
        assert server.refusals() == {"undecodable": 0, "too_large": 0}
    finally:
        server.stop(grace=0)


# ------------------------------------------------------------------ TLS

def tls_channel(port: int, pki: dict, *, client_cert: bool = False) -> grpc.Channel:
    read = lambda key: pki[key].read_bytes()  # noqa: E731
    credentials = grpc.ssl_channel_credentials(read("server_cert"), read("client_key") if client_cert else None,
                                               read("client_cert") if client_cert else None)
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials)


def test_tls_with_a_self_signed_certificate(lr_model, pki):
    server = serve(ort.InferenceSession(str(lr_model)), "lr", "1", "127.0.0.1:0",
                   tls=TLSFiles(pki["server_cert"], pki["server_key"]))
    try:
        with tls_channel(server.port, pki) as channel:
            assert infer(channel).model_name == "lr"
        with grpc.insecure_channel(server.address) as plaintext:
            with pytest.raises(grpc.RpcError) as info:
                infer(plaintext)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=0)


def test_mutual_tls_requires_a_client_certificate_and_tokens_still_apply(lr_model, pki):
    server = serve(ort.InferenceSession(str(lr_model)), "lr", "1", "127.0.0.1:0",
                   tls=TLSFiles(pki["server_cert"], pki["server_key"], pki["ca"]),
                   auth=ClientAuth.from_toml(AUTH_TOML))
    try:
        with tls_channel(server.port, pki, client_cert=True) as channel:
            assert infer(channel, bearer(WEB)).model_name == "lr"
            with pytest.raises(grpc.RpcError) as info:
                infer(channel)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with tls_channel(server.port, pki) as channel:
            with pytest.raises(grpc.RpcError) as info:
                infer(channel, bearer(WEB))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=0)


@pytest.mark.parametrize("files, words", [
    (("server_cert", None, None), "--tls-cert and --tls-key go together"),
    (("server_cert", "missing", None), "missing: No such file"),
    (("server_key", "server_key", None), "--tls-cert"),  # a key where the certificate should be
    (("server_cert", "server_cert", None), "--tls-key"),
    (("server_cert", "server_key", "server_key"), "--tls-client-ca"),
])
def test_tls_files_are_checked_before_serving(pki, tmp_path, files, words):
    paths = [pki.get(f, tmp_path / f) if f else None for f in files]
    with pytest.raises(InvalidArgument) as info:
        TLSFiles.from_paths(*paths)
    assert words in str(info.value)


# ------------------------------------------------------------------ tritonclient

TRITON = """
import json, sys
import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException
case = json.loads(sys.argv[1])
client = triton.InferenceServerClient(case["url"], ssl=case["ssl"], root_certificates=case["ca"])
headers = {"authorization": "Bearer " + case["token"]} if case["token"] else None
x = triton.InferInput("X", [1, 20], "FP32")
x.set_data_from_numpy(np.zeros((1, 20), np.float32))
try:
    reply = client.infer("lr", [x], headers=headers, request_id="t-1")
    print(json.dumps({"id": reply.get_response().id, "proba": reply.as_numpy("probabilities").tolist()}))
except InferenceServerException as exc:
    print(json.dumps({"status": exc.status(), "message": exc.message()}))
"""


@pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None, reason="needs the test extra (tritonclient)")
def test_tritonclient_sends_its_token_over_tls(lr_model, pki):
    session = ort.InferenceSession(str(lr_model))
    server = serve(session, "lr", "1", "127.0.0.1:0", auth=ClientAuth.from_toml(AUTH_TOML),
                   tls=TLSFiles(pki["server_cert"], pki["server_key"]))

    def triton(token: str) -> dict:
        case = {"url": f"127.0.0.1:{server.port}", "ssl": True, "ca": str(pki["server_cert"]), "token": token}
        done = subprocess.run([sys.executable, "-c", TRITON, json.dumps(case)], capture_output=True, text=True,
                              timeout=120)  # tritonclient's protos clash with ours: its own process
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    try:
        answered = triton(WEB)
        assert answered["id"] == "t-1"
        expected = session.run(None, {"X": np.zeros((1, 20), np.float32)})[1]
        np.testing.assert_allclose(answered["proba"], expected)
        refused = triton("")
        assert refused["status"] == "StatusCode.UNAUTHENTICATED" and "missing token" in refused["message"]
    finally:
        server.stop(grace=0)


# ------------------------------------------------------------------ the CLI

def write_auth(tmp_path: Path) -> Path:
    path = tmp_path / "clients.toml"
    path.write_text(AUTH_TOML)
    return path


def start(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, list[str]]:
    """``outrider agent serve`` with ``args``; the lines it printed up to 'serving ...'."""
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "serve", "--summarizer", "thread", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    while not lines or not lines[-1].startswith("serving "):
        line = read_line(proc)
        if not line:
            proc.kill()
            pytest.fail(f"agent serve ended: {proc.communicate()[1]}")
        lines.append(line.strip())
    return proc, lines


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.communicate(timeout=HANG_GUARD)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def test_cli_serves_with_an_auth_file_and_tls_from_the_environment(lr_model, pki, tmp_path):
    env = cli_env(OUTRIDER_AGENT_AUTH_FILE=str(write_auth(tmp_path)), OUTRIDER_AGENT_TLS_CERT=str(pki["server_cert"]),
                  OUTRIDER_AGENT_TLS_KEY=str(pki["server_key"]))
    proc, lines = start(["--model", str(lr_model), "--listen", "127.0.0.1:0"], env)
    try:
        port = int(lines[-1].rsplit(":", 1)[1])
        with tls_channel(port, pki) as channel:
            assert infer(channel, bearer(WEB)).model_name == "lr"
            with pytest.raises(grpc.RpcError) as info:
                infer(channel)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        stop(proc)


@pytest.mark.parametrize("flags, words", [
    (["--auth-file", "{missing}"], "cannot read auth file"),
    (["--auth-file", "{bad}"], "calls must be a non-empty list"),
    (["--tls-cert", "{cert}"], "--tls-cert and --tls-key go together"),
    (["--tls-cert", "{cert}", "--tls-key", "{cert}"], "--tls-key"),
    (["--max-classes", "1"], "whole number from 2 to 1000"),
    (["--max-prediction-mb", "0"], "must be greater than 0"),
])
def test_cli_refuses_bad_access_and_budget_flags_in_one_line(lr_model, pki, tmp_path, flags, words):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[client]]\nname='a'\ntoken='0123456789abcdefgh'\ncalls=['everything']\n")
    values = {"{missing}": str(tmp_path / "missing.toml"), "{bad}": str(bad), "{cert}": str(pki["server_cert"])}
    done = cli("agent", "serve", "--model", str(lr_model), "--listen", "127.0.0.1:0",
               *[values.get(f, f) for f in flags])
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and words in done.stderr, done.stderr


def test_a_managed_agent_gets_the_same_options(lr_model, tmp_path):
    """No model file: the port is guarded from the start, and the budgets reach each version it loads."""
    from test_rollout_agent import NAME, FakeCollector, serve_args

    fake = FakeCollector()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    collector_pb2_grpc.add_AgentServiceServicer_to_server(fake, grpc_server)
    target = f"127.0.0.1:{grpc_server.add_insecure_port('127.0.0.1:0')}"
    grpc_server.start()
    env = cli_env(OUTRIDER_AGENT_AUTH_FILE=str(write_auth(tmp_path)))
    proc, lines = start(["--model-name", NAME, "--collector", target, "--spool-dir", str(tmp_path / "spool"),
                         "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--max-request-id-chars", "4"], env)
    try:
        metrics_url = next(line.split()[-1] for line in lines if line.startswith("metrics on "))
        with grpc.insecure_channel(lines[-1].rsplit(" ", 1)[1]) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = raw_request(NAME, {"X": x_rows(1)}, id="12345")  # one character over the limit
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=HANG_GUARD)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, metadata=bearer(WEB), timeout=HANG_GUARD)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # let in; nothing is served yet
            model = Path(lr_model).read_bytes()
            fake.files[1] = model
            assert fake.state(fake.command("serve", **serve_args(1, model))).ok
            reply = stub.ModelInfer(request, metadata=bearer(WEB), timeout=HANG_GUARD)
            assert reply.id == "12345" and decode(reply)["label"].shape == (1,)
        import urllib.request

        text = urllib.request.urlopen(metrics_url, timeout=HANG_GUARD).read().decode()
        assert 'outrider_agent_predictions_dropped_total{reason="id_too_long"} 1.0' in text
        assert 'outrider_agent_refused_calls_total{reason="unauthenticated"} 1.0' in text
    finally:
        stop(proc)
        grpc_server.stop(0).wait()
