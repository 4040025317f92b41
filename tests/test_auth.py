"""Tokens, roles and TLS: the auth file, the interceptor on a real server, and certificates made on the fly."""
from __future__ import annotations

import datetime
import hashlib
import ipaddress
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.cli import client_credentials
from agent.errors import InvalidArgument
from collector.api.server import serve_collector
from collector.base.auth import (LOCAL, AuthConfig, AuthInterceptor, Identity, TLSFiles,
                                 current_identity, is_loopback, peer_address, role_at_least)
from protos import collector_pb2 as pb
from protos import collector_pb2_grpc as pb_grpc

HANG_GUARD = 60
AGENT_TOKEN = "agent-token-0123456789"
VIEWER_TOKEN = "viewer-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789"

AUTH_TOML = f"""
[[agent]]
name = "edge-1"
token = "{AGENT_TOKEN}"

[[operator]]
name = "vera"
token = "{VIEWER_TOKEN}"
role = "viewer"

[[operator]]
name = "ada"
token_sha256 = "{hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}"
role = "admin"
"""


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# ------------------------------------------------------------------ the auth file


def test_tokens_and_digests_identify_their_owner():
    config = AuthConfig.from_toml(AUTH_TOML)
    assert config.authenticate(AGENT_TOKEN) == Identity("edge-1", "agent", "", ("edge-1",), ("*",))
    assert config.authenticate(VIEWER_TOKEN) == Identity("vera", "operator", "viewer")
    assert config.authenticate(ADMIN_TOKEN) == Identity("ada", "operator", "admin")
    assert config.authenticate("not-a-token-at-all") is None
    assert config.authenticate(hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()) is None  # the digest is no token


def test_from_file_reads_toml(tmp_path):
    path = tmp_path / "auth.toml"
    path.write_text(AUTH_TOML)
    assert AuthConfig.from_file(path).authenticate(AGENT_TOKEN).name == "edge-1"
    with pytest.raises(InvalidArgument, match="cannot read auth file"):
        AuthConfig.from_file(tmp_path / "missing.toml")


@pytest.mark.parametrize("text, words", [
    ("[[agent]\nname=", "not valid TOML"),
    ("", "defines no [[agent]] or [[operator]]"),
    ("[[robot]]\nname='r'", "unknown section"),
    ("[[agent]]\ntoken='0123456789abcdefgh'", "needs a name"),
    ("[[agent]]\nname='a'", "exactly one of token or token_sha256"),
    ("[[agent]]\nname='a'\ntoken='0123456789abcdefgh'\ntoken_sha256='00'", "exactly one of token or token_sha256"),
    ("[[agent]]\nname='a'\ntoken='short'", "at least 16 characters"),
    ("[[agent]]\nname='a'\ntoken_sha256='xyz'", "64 hex digits"),
    ("[[agent]]\nname='a'\ntokn='0123456789abcdefgh'", "unknown key"),
    ("[[agent]]\nname='a'\ntoken='0123456789abcdefgh'\nrole='admin'", "unknown key"),
    ("[[operator]]\nname='o'\ntoken='0123456789abcdefgh'\nrole='root'", "is not one of viewer, operator"),
    ("agent = 'x'", "[[agent]] table"),
    ("[[agent]]\nname='a'\ntoken='0123456789abcdefgh'\n[[operator]]\nname='o'\ntoken='0123456789abcdefgh'",
     "same token"),
])
def test_a_bad_auth_file_is_refused_with_a_clear_message(text, words):
    with pytest.raises(InvalidArgument) as info:
        AuthConfig.from_toml(text)
    assert words in str(info.value)


def test_roles_are_ordered():
    assert role_at_least("admin", "viewer") and role_at_least("approver", "operator")
    assert role_at_least("viewer", "viewer")
    assert not role_at_least("operator", "approver") and not role_at_least("", "viewer")


@pytest.mark.parametrize("listen, loopback", [
    ("127.0.0.1:50051", True), ("127.1.2.3:0", True), ("[::1]:50051", True), ("localhost:50051", True),
    ("0.0.0.0:50051", False), ("[::]:50051", False), ("10.1.2.3:50051", False), (":50051", False),
])
def test_is_loopback(listen, loopback):
    assert is_loopback(listen) is loopback


# ------------------------------------------------------------------ the interceptor on a real collector


@pytest.fixture
def secured(tmp_path) -> Iterator[tuple[pb_grpc.OpsServiceStub, pb_grpc.AgentServiceStub, grpc.Channel]]:
    server = serve_collector(tmp_path / "c.db", "127.0.0.1:0", auth=AuthConfig.from_toml(AUTH_TOML),
                             rollup_interval=3600)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield pb_grpc.OpsServiceStub(channel), pb_grpc.AgentServiceStub(channel), channel
    finally:
        channel.close()
        server.stop(grace=0)


def status_error(ops: pb_grpc.OpsServiceStub, metadata: tuple) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        ops.Status(pb.StatusRequest(), metadata=metadata, timeout=HANG_GUARD)
    return info.value


@pytest.mark.parametrize("metadata, code, words", [
    ((), grpc.StatusCode.UNAUTHENTICATED, "missing token"),
    (bearer("wrong-token-0123456789"), grpc.StatusCode.UNAUTHENTICATED, "unknown token"),
    ((("authorization", VIEWER_TOKEN),), grpc.StatusCode.UNAUTHENTICATED, "expected 'Bearer <token>'"),
    (bearer(AGENT_TOKEN), grpc.StatusCode.PERMISSION_DENIED, "agent 'edge-1' cannot call OpsService/Status"),
])
def test_ops_calls_need_an_operator_token(secured, metadata, code, words):
    ops, _, _ = secured
    error = status_error(ops, metadata)
    assert error.code() == code and words in error.details(), error.details()


def test_a_viewer_can_read_and_refusals_are_counted(secured):
    ops, _, _ = secured
    status_error(ops, ())
    status_error(ops, bearer(AGENT_TOKEN))
    status = ops.Status(pb.StatusRequest(), metadata=bearer(VIEWER_TOKEN), timeout=HANG_GUARD)
    assert status.counters.auth_failures == 2
    reply = ops.ListWindows(pb.ListWindowsRequest(model_name="credit"), metadata=bearer(ADMIN_TOKEN),
                            timeout=HANG_GUARD)
    assert list(reply.windows) == []


def test_agent_streams_need_an_agent_token(secured):
    _, agents, _ = secured
    for metadata, code in [((), grpc.StatusCode.UNAUTHENTICATED),
                           (bearer(VIEWER_TOKEN), grpc.StatusCode.PERMISSION_DENIED)]:
        replies = agents.Stream(iter([pb.AgentMessage(hello=pb.Hello(agent_id="a", run_id="r"))]),
                                metadata=metadata, timeout=HANG_GUARD)
        with pytest.raises(grpc.RpcError) as info:
            list(replies)
        assert info.value.code() == code
    accepted = agents.Stream(iter([pb.AgentMessage(hello=pb.Hello(agent_id="edge-1", run_id="r"))]),
                             metadata=bearer(AGENT_TOKEN), timeout=HANG_GUARD)
    assert list(accepted) == []  # hello, half-close, clean end


def test_health_is_open(secured):
    _, _, channel = secured
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=HANG_GUARD)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@contextmanager
def whoami_server(interceptor: AuthInterceptor) -> Iterator[pb_grpc.OpsServiceStub]:
    """A server whose OpsService/Status answers with the caller's identity, as later servicers will read it."""

    def status(request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        who = current_identity()
        return pb.StatusResponse(collector_version=f"{who.kind}:{who.name}:{who.role}")

    handler = grpc.method_handlers_generic_handler("outrider.v1.OpsService", {
        "Status": grpc.unary_unary_rpc_method_handler(
            status, request_deserializer=pb.StatusRequest.FromString,
            response_serializer=pb.StatusResponse.SerializeToString),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler], interceptors=[interceptor])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.OpsServiceStub(channel)
    finally:
        server.stop(0)


def test_servicers_see_who_called_and_roles_are_enforced():
    interceptor = AuthInterceptor(AuthConfig.from_toml(AUTH_TOML), method_roles={"Status": "approver"})
    with whoami_server(interceptor) as ops:
        reply = ops.Status(pb.StatusRequest(), metadata=bearer(ADMIN_TOKEN), timeout=HANG_GUARD)
        assert reply.collector_version == "operator:ada:admin"
        error = status_error(ops, bearer(VIEWER_TOKEN))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error.details() == "operator 'vera' has role viewer; OpsService/Status needs approver or above"
    assert interceptor.failures == 1


def test_without_an_auth_file_every_caller_is_local():
    with whoami_server(AuthInterceptor(None)) as ops:
        reply = ops.Status(pb.StatusRequest(), timeout=HANG_GUARD)
    assert reply.collector_version == f"{LOCAL.kind}:{LOCAL.name}:{LOCAL.role}"


def test_an_unlisted_ops_method_needs_admin():
    interceptor = AuthInterceptor(AuthConfig.from_toml(AUTH_TOML), method_roles={})
    with whoami_server(interceptor) as ops:
        assert status_error(ops, bearer(VIEWER_TOKEN)).code() == grpc.StatusCode.PERMISSION_DENIED
        assert ops.Status(pb.StatusRequest(), metadata=bearer(ADMIN_TOKEN), timeout=HANG_GUARD).collector_version


def test_a_refusal_is_recorded_with_the_callers_address_once_per_call():
    heard: list[tuple[str, str, str, str]] = []
    interceptor = AuthInterceptor(AuthConfig.from_toml(AUTH_TOML), method_roles={"Status": "admin"},
                                  on_refusal=lambda *refusal: heard.append(refusal))
    with whoami_server(interceptor) as ops:
        status_error(ops, ())
        status_error(ops, bearer(VIEWER_TOKEN))
    assert interceptor.failures == 2
    assert [(actor, obj, reason.split(":")[0], peer) for actor, obj, reason, peer in heard] == [
        ("anonymous", "rpc/outrider.v1.OpsService/Status", "missing token", "127.0.0.1"),
        ("vera", "rpc/outrider.v1.OpsService/Status", "operator 'vera' has role viewer; OpsService/Status needs "
                                                      "admin or above", "127.0.0.1")]


@pytest.mark.parametrize("peer, address", [("ipv4:10.1.2.3:5678", "10.1.2.3"), ("ipv6:[::1]:5678", "::1"),
                                           ("ipv6:[fe80::1%eth0]:80", "fe80::1%eth0"), ("unix:/tmp/s", "unix:/tmp/s"),
                                           ("", "unknown")])
def test_peer_address_drops_the_port(peer, address):
    assert peer_address(peer) == address


# ------------------------------------------------------------------ TLS


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer: tuple[str, object] | None = None, *, ca: bool = False) -> x509.Certificate:
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate | None = None, key=None) -> Path:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A self-signed server certificate, and a CA with one client certificate for mutual TLS."""
    d = tmp_path_factory.mktemp("pki")
    server_key, ca_key, client_key = _key(), _key(), _key()
    ca = _cert("outrider test CA", ca_key, ca=True)
    return {
        "server_cert": _write(d / "server.pem", _cert("localhost", server_key)),
        "server_key": _write(d / "server.key", key=server_key),
        "ca": _write(d / "ca.pem", ca),
        "client_cert": _write(d / "client.pem", _cert("operator", client_key, ("outrider test CA", ca_key))),
        "client_key": _write(d / "client.key", key=client_key),
    }


def _status(port: int, credentials: grpc.ChannelCredentials | None, token: str = VIEWER_TOKEN) -> pb.StatusResponse:
    target = f"127.0.0.1:{port}"
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        return pb_grpc.OpsServiceStub(channel).Status(pb.StatusRequest(), metadata=bearer(token), timeout=HANG_GUARD)


def test_tls_with_a_self_signed_certificate(tmp_path, pki):
    tls = TLSFiles(pki["server_cert"], pki["server_key"])
    server = serve_collector(tmp_path / "c.db", "127.0.0.1:0", auth=AuthConfig.from_toml(AUTH_TOML), tls=tls,
                             rollup_interval=3600)
    try:
        assert _status(server.port, client_credentials(pki["server_cert"])).collector_version
        with pytest.raises(grpc.RpcError) as plaintext:
            _status(server.port, None)
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as untrusted:  # a CA that did not sign the server's certificate
            _status(server.port, client_credentials(pki["ca"]))
        assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=0)


def test_mutual_tls_requires_a_client_certificate(tmp_path, pki):
    tls = TLSFiles(pki["server_cert"], pki["server_key"], client_ca=pki["ca"])
    server = serve_collector(tmp_path / "c.db", "127.0.0.1:0", auth=AuthConfig.from_toml(AUTH_TOML), tls=tls,
                             rollup_interval=3600)
    try:
        with_cert = client_credentials(pki["server_cert"], pki["client_cert"], pki["client_key"])
        assert _status(server.port, with_cert).collector_version
        with pytest.raises(grpc.RpcError) as without_cert:
            _status(server.port, client_credentials(pki["server_cert"]))
        assert without_cert.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=0)


def test_an_agent_token_speaks_only_for_its_agent_ids_and_models():
    config = AuthConfig.from_toml("[[agent]]\nname = 'web'\ntoken = '0123456789abcdefgh'\n"
                                  "agent_ids = ['web-*']\nmodels = ['churn', 'fraud-*']\n"
                                  "[[agent]]\nname = 'edge-1'\ntoken = 'abcdefgh0123456789'\n")
    web, edge = config.authenticate("0123456789abcdefgh"), config.authenticate("abcdefgh0123456789")
    assert web.may_speak_for("web-1") and web.may_speak_for("web-22") and not web.may_speak_for("edge-1")
    assert web.may_send_for("churn") and web.may_send_for("fraud-eu") and not web.may_send_for("churn2")
    # without agent_ids an agent token speaks only as its own name; without models, for any model
    assert edge.may_speak_for("edge-1") and not edge.may_speak_for("edge-2") and edge.may_send_for("anything")
    assert LOCAL.may_speak_for("x") and LOCAL.may_send_for("y")


@pytest.mark.parametrize("line", ["agent_ids = []", "models = ''", "models = [1]", "agent_ids = {a = 1}"])
def test_bad_agent_globs_are_refused_with_the_key(line):
    with pytest.raises(InvalidArgument, match=line.split()[0]):
        AuthConfig.from_toml(f"[[agent]]\nname = 'a'\ntoken = '0123456789abcdefgh'\n{line}\n")
