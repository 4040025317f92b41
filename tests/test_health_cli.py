"""``outrider health``: the gRPC health question a container HEALTHCHECK asks, in the CLI's contract."""
from __future__ import annotations

import json

import onnxruntime as ort
import pytest

from agent.cli import main
from agent.server import SERVICE_NAME, serve, serve_switch
from agent.switch import ModelSwitch
from collector.api.server import serve_collector


@pytest.fixture(scope="module")
def agent_address(lr_model):
    server = serve(ort.InferenceSession(str(lr_model)), "m", "1", "127.0.0.1:0")
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop(grace=0)


def health(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["health", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_serving_agent_is_serving(agent_address, capsys):
    assert health(capsys, "--address", agent_address) == (0, "SERVING\n", "")
    assert health(capsys, "--address", agent_address, "--service", SERVICE_NAME)[:2] == (0, "SERVING\n")
    code, out, _ = health(capsys, "--address", agent_address, "--json")
    assert code == 0 and json.loads(out) == {"address": agent_address, "service": "", "status": "SERVING"}


def test_a_collector_is_serving(tmp_path, capsys):
    server = serve_collector(tmp_path / "c.db", "127.0.0.1:0", drift_interval=0, rollup_interval=3600)
    try:
        assert health(capsys, "--address", f"127.0.0.1:{server.port}") == (0, "SERVING\n", "")
    finally:
        server.stop(grace=0)


def test_an_agent_without_a_model_is_not_serving_exit_1(capsys):
    """A managed agent before its first version: it answers, but NOT_SERVING, so a probe must fail."""
    server = serve_switch(ModelSwitch("m"), "127.0.0.1:0")
    try:
        code, out, err = health(capsys, "--address", f"127.0.0.1:{server.port}")
    finally:
        server.stop(grace=0)
    assert code == 1 and out == "NOT_SERVING\n"
    assert err.count("\n") == 1 and "NOT_SERVING" in err


def test_an_unknown_service_exits_1_in_one_line(agent_address, capsys):
    code, out, err = health(capsys, "--address", agent_address, "--service", "nope")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "'nope'" in err and "--service" in err


def test_nothing_listening_exits_3_in_one_line(capsys):
    code, out, err = health(capsys, "--address", "127.0.0.1:1", "--timeout", "2")
    assert code == 3 and out == ""
    assert err.count("\n") == 1 and "127.0.0.1:1" in err and "--address" in err


@pytest.mark.parametrize("args", [("--address", "nowhere"), ("--timeout", "0"), ("--tls-client-cert", "x.pem")])
def test_bad_input_exits_2_in_one_line(args, capsys):
    try:
        code = main(["health", *args])
    except SystemExit as stop:  # argparse's own usage errors
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1
