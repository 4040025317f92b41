"""``outrider agent serve`` through its real entry point, as a subprocess."""
from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import onnxruntime as ort

from protos import open_inference_pb2_grpc as pb_grpc
from test_server import decode, raw_request, x_rows  # the wire helpers, written once

ROOT = Path(__file__).resolve().parents[1]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, env=env or cli_env(),
                          capture_output=True, text=True, timeout=60)


def read_line(proc: subprocess.Popen, timeout: float = 60) -> str:
    """One stdout line, or '' if the process ends first (the timeout is a hang guard only)."""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            proc.kill()
            pytest.fail("no output from outrider agent serve")
    return proc.stdout.readline()


def test_cli_serves_and_stops_gracefully_on_sigterm(lr_model):
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "agent", "serve", "--model-name", "credit", "--grace-seconds", "30"],
        cwd=ROOT, env=cli_env(OUTRIDER_AGENT_MODEL=str(lr_model), OUTRIDER_AGENT_LISTEN="127.0.0.1:0"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = read_line(proc)
        assert line.startswith("serving credit version 1 on 127.0.0.1:"), (line, proc.stderr)
        port = int(line.rsplit(":", 1)[1])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            feeds = {"X": x_rows()}
            reply = stub.ModelInfer(raw_request("credit", feeds, id="cli"))
            assert reply.id == "cli"
            expected = ort.InferenceSession(str(lr_model)).run(None, feeds)
            np.testing.assert_array_equal(decode(reply)["probabilities"], expected[1])
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert next(watch).status == SERVING
            proc.send_signal(signal.SIGTERM)
            assert next(watch).status == NOT_SERVING
            watch.cancel()  # the last open call: the server may now stop without using its grace
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize("args, words", [
    (["--model", "/nonexistent/model.onnx"], "does not exist"),
    (["--model", "{bad}", "--listen", "localhost"], "is not HOST:PORT"),
    (["--model", "{bad}", "--listen", "127.0.0.1:99999"], "is not HOST:PORT"),
    (["--model", "{bad}", "--workers", "0"], "must be greater than 0"),
    (["--model", "{bad}"], "cannot load"),
    ([], "--model"),
])
def test_cli_bad_arguments_exit_2_with_one_line(args, words, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    result = cli("agent", "serve", *[a.replace("{bad}", str(bad)) for a in args])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert words in lines[0]


def test_cli_refuses_a_port_in_use(lr_model):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = cli("agent", "serve", "--model", str(lr_model), "--listen", f"127.0.0.1:{busy.getsockname()[1]}")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Address already in use" in result.stderr, result.stderr


def test_cli_reads_flags_from_the_environment(tmp_path):
    result = cli("agent", "serve", env=cli_env(OUTRIDER_AGENT_MODEL=str(tmp_path / "missing.onnx")))
    assert result.returncode == 2 and "missing.onnx does not exist" in result.stderr


def test_cli_prints_its_version():
    from agent.hello import package_version

    result = cli("--version")
    assert result.returncode == 0 and result.stdout == f"outrider {package_version()}\n", result
    assert package_version()[0].isdigit()


def test_every_cli_command_has_help():
    from agent.cli import build_parser

    def walk(parser, path):
        for action in parser._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                helps = {a.dest: a.help for a in action._choices_actions}
                for name, sub in action.choices.items():
                    assert helps.get(name), f"'{' '.join(path + [name])}' has no help text"
                    walk(sub, path + [name])
            elif action.dest != "help":
                assert action.help, f"{' '.join(path)} {action.option_strings} has no help text"

    walk(build_parser(), ["outrider"])
    assert cli("agent", "serve", "--help").returncode == 0


def test_collector_web_page_port_in_use_names_its_flag(tmp_path):
    """The bind check names the flag to change: --http for the web page, not --listen."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = cli("collector", "serve", "--db", str(tmp_path / "c.db"), "--listen", "127.0.0.1:0",
                     "--http", f"127.0.0.1:{busy.getsockname()[1]}")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Address already in use" in result.stderr, result.stderr
    assert "--http" in result.stderr and "--listen" not in result.stderr, result.stderr
