"""``outrider collector serve``, ``outrider status`` and ``outrider windows`` through the real entry point."""
from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from agent.sketches import NumericSketch
from protos import collector_pb2 as pb
from protos import collector_pb2_grpc as pb_grpc
from protos import summary_pb2

ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD = 60
NS = 1_000_000_000
AGENT_TOKEN = "agent-token-0123456789"
VIEWER_TOKEN = "viewer-token-0123456789"


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, env=cli_env(**env),
                          capture_output=True, text=True, timeout=HANG_GUARD)


def one_line_error(result: subprocess.CompletedProcess, code: int = 2) -> str:
    """The one line on stderr of a command that exited with ``code`` (2: usage, 1: refused, 3: unreachable)."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@dataclass
class Served:
    proc: subprocess.Popen
    address: str


@contextmanager
def collector_process(*args: str, **env: str) -> Iterator[Served]:
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "collector", "serve", "--listen", "127.0.0.1:0", *args],
                            cwd=ROOT, env=cli_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            if not selector.select(HANG_GUARD):  # a hang guard only
                pytest.fail("no output from outrider collector serve")
        line = proc.stdout.readline()
        assert line.startswith("collector listening on 127.0.0.1:"), (line, proc.poll())
        yield Served(proc, line.split()[3])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def window(seq: int, end_ns: int) -> summary_pb2.WindowSummary:
    sketch = NumericSketch()
    sketch.update(np.arange(10.0))
    return summary_pb2.WindowSummary(
        agent_id="edge-1", run_id="run-1", seq=seq, model_name="credit", model_version="1",
        start_unix_nano=end_ns - 10 * NS, end_unix_nano=end_ns, rows=10, calls=2, errors=seq,
        columns=[sketch.to_proto("x", summary_pb2.ColumnSummary.FEATURE, "X")])


def send_windows(address: str, windows: list[summary_pb2.WindowSummary], token: str | None = None) -> None:
    """An agent's stream: hello, one batch, wait for every ack, half-close."""
    messages = [pb.AgentMessage(hello=pb.Hello(agent_id="edge-1", run_id="run-1", host="box", model_name="credit",
                                               model_version="1")),
                pb.AgentMessage(windows=pb.WindowBatch(windows=windows))]
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as channel:
        requests = iter(messages)
        replies = pb_grpc.AgentServiceStub(channel).Stream(requests, metadata=metadata, timeout=HANG_GUARD)
        acks = [ack for reply in replies for ack in reply.acks.acks]
    assert [a.result for a in acks] == [pb.WindowAck.STORED] * len(windows)


def test_serve_then_status_and_windows_then_sigterm(tmp_path):
    db = tmp_path / "collector.db"
    with collector_process("--db", str(db)) as served:
        now = time.time_ns()
        send_windows(served.address, [window(0, now - 7200 * NS), window(1, now - 120 * NS), window(2, now - 60 * NS)])

        status = cli("status", "--json", OUTRIDER_COLLECTOR=served.address)
        assert status.returncode == 0, status.stderr
        data = json.loads(status.stdout)
        [agent] = data["agents"]
        assert agent["agent_id"] == "edge-1" and agent["windows"] == 3 and agent["rows"] == 30
        assert agent["connected"] is False  # the stream above has ended
        assert data["models"][0]["windows"] == 3 and data["models"][0]["errors"] == 3
        assert data["counters"]["windows_stored"] == 3 and data["counters"]["auth_failures"] == 0

        table = cli("status", "--collector", served.address)
        assert table.returncode == 0, table.stderr
        assert "AGENT" in table.stdout and "edge-1" in table.stdout and "credit@1" in table.stdout
        assert "windows stored 3" in table.stdout

        listed = cli("windows", "--model", "credit", "--since", "1h", "--json", "--collector", served.address)
        assert listed.returncode == 0, listed.stderr
        assert [w["seq"] for w in json.loads(listed.stdout)["windows"]] == [2, 1]
        since_iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((now - 90 * NS) / NS))
        listed = cli("windows", "--model", "credit", "--since", since_iso, "--limit", "5", "--json",
                     "--collector", served.address)
        assert [w["seq"] for w in json.loads(listed.stdout)["windows"]] == [2]

        rows = cli("windows", "--model", "credit", "--collector", served.address)
        assert rows.returncode == 0, rows.stderr
        header, *lines = rows.stdout.strip().splitlines()
        assert header.split() == ["END", "AGENT", "SEQ", "LEVEL", "ROWS", "CALLS", "DROPPED", "ERRORS"]
        assert len(lines) == 3 and all("edge-1" in line and " raw " in line for line in lines)

        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=HANG_GUARD) == 0
        assert "unauthenticated, on loopback only" in served.proc.stderr.read()
    assert db.exists()


@pytest.mark.parametrize("level, logged", [("info", True), ("warning", False)])
def test_the_server_logs_events_with_time_and_level(tmp_path, level, logged):
    with collector_process("--db", str(tmp_path / "c.db"), OUTRIDER_COLLECTOR_LOG_LEVEL=level) as served:
        served.proc.send_signal(signal.SIGTERM)
        _, stderr = served.proc.communicate(timeout=HANG_GUARD)
    assert served.proc.returncode == 0, stderr
    event = re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO collector.api.server: collector listening on ", stderr,
                      re.MULTILINE)
    assert bool(event) == logged, stderr


def test_with_an_auth_file_status_needs_an_operator_token(tmp_path):
    auth = tmp_path / "auth.toml"
    auth.write_text(f'[[agent]]\nname = "edge-1"\ntoken = "{AGENT_TOKEN}"\n'
                    f'[[operator]]\nname = "vera"\ntoken = "{VIEWER_TOKEN}"\nrole = "viewer"\n')
    with collector_process("--db", str(tmp_path / "c.db"), OUTRIDER_COLLECTOR_AUTH_FILE=str(auth)) as served:
        send_windows(served.address, [window(0, time.time_ns())], token=AGENT_TOKEN)
        refused = cli("status", "--collector", served.address)
        assert "--token" in one_line_error(refused, 3) and "missing token" in refused.stderr
        wrong = cli("windows", "--model", "credit", "--collector", served.address, "--token", AGENT_TOKEN)
        assert "needs an operator token" in one_line_error(wrong, 1)
        ok = cli("windows", "--model", "credit", "--json", OUTRIDER_COLLECTOR=served.address,
                 OUTRIDER_TOKEN=VIEWER_TOKEN)
        assert ok.returncode == 0, ok.stderr
        assert len(json.loads(ok.stdout)["windows"]) == 1
        served.proc.send_signal(signal.SIGINT)
        assert served.proc.wait(timeout=HANG_GUARD) == 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, words", [
    (["collector", "serve", "--listen", "0.0.0.0:0"], "without --auth-file"),
    (["collector", "serve", "--listen", "nowhere"], "is not HOST:PORT"),
    (["collector", "serve", "--auth-file", "/nonexistent/auth.toml"], "cannot read auth file"),
    (["collector", "serve", "--auth-file", "{bad_auth}"], "not valid TOML"),
    (["collector", "serve", "--tls-cert", "{bad_auth}"], "--tls-cert and --tls-key go together"),
    (["collector", "serve", "--tls-cert", "{bad_auth}", "--tls-key", "{bad_auth}"], "is not a PEM file"),
    (["collector", "serve", "--db", "/nonexistent/dir/c.db"], "does not exist"),
    (["collector", "serve", "--db", "{not_db}", "--listen", "127.0.0.1:0"], "cannot use"),
    (["collector", "serve", "--raw-retention", "0"], "must be greater than 0"),
    (["collector", "serve", "--lease-ttl", "60"], "must be longer than the longest loop interval"),
    (["collector", "serve", "--heartbeat-interval", "5", "--heartbeat-timeout", "4"], "must be longer than"),
    (["windows"], "--model"),
    (["windows", "--model", "credit", "--since", "yesterday"], "neither a duration"),
    (["status", "--collector", "localhost"], "is not HOST:PORT"),
    (["status", "--tls-ca", "/nonexistent/ca.pem"], "cannot read --tls-ca"),
])
def test_bad_arguments_exit_2_with_one_line(args, words, tmp_path):
    bad_auth = tmp_path / "auth.toml"
    bad_auth.write_text("[[agent]\n")
    not_db = tmp_path / "not.db"
    not_db.write_bytes(b"this is not a SQLite database" * 100)
    subs = {"{bad_auth}": str(bad_auth), "{not_db}": str(not_db), "{no_collector}": f"127.0.0.1:{_free_port()}"}
    line = one_line_error(cli(*[subs.get(a, a) for a in args]))
    assert words in line, line


@pytest.mark.parametrize("args", [["windows", "--model", "credit", "--limit", "20000"], ["status"]])
def test_an_unreachable_collector_exits_3_naming_the_flag(args):
    line = one_line_error(cli(*args, "--collector", f"127.0.0.1:{_free_port()}"), 3)
    assert "cannot reach the collector at 127.0.0.1:" in line and "--collector (OUTRIDER_COLLECTOR)" in line
    assert "UNKNOWN" not in line and "UNAVAILABLE" not in line  # words, not gRPC's code names


def test_serve_tls_and_ask_with_tls_ca(tmp_path):
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem, key_pem = tmp_path / "server.pem", tmp_path / "server.key"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    with collector_process("--db", str(tmp_path / "c.db"), "--tls-cert", str(cert_pem),
                           "--tls-key", str(key_pem)) as served:
        ok = cli("status", "--json", "--collector", served.address, "--tls-ca", str(cert_pem))
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["counters"]["windows_stored"] == 0
        plaintext = cli("status", "--collector", served.address)
        assert "cannot reach" in one_line_error(plaintext, 3) and "--tls-ca" in plaintext.stderr
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=HANG_GUARD) == 0
