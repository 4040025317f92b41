"""onnxruntime's options on the agent (agent.runtime) and serving without monitoring, for A/B measurement."""
from __future__ import annotations

import logging
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from agent import MonitoredSession
from agent.errors import InvalidArgument
from agent.sinks import InMemorySink
from agent.runtime import RuntimeOptions, parse_providers
from protos import open_inference_pb2_grpc as pb_grpc
from test_agent_cli import ROOT, cli, cli_env, read_line
from test_server import decode, raw_request, x_rows


def test_providers_are_named_as_onnxruntime_names_them_in_the_order_given() -> None:
    assert parse_providers("cuda, cpu") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert parse_providers(["OpenVINOExecutionProvider", "tensorrt", "cuda", "TensorRT"]) == [
        "OpenVINOExecutionProvider", "TensorrtExecutionProvider", "CUDAExecutionProvider"]
    with pytest.raises(InvalidArgument, match="unknown execution provider 'gpu'.*cuda"):
        parse_providers("gpu,cpu")
    with pytest.raises(InvalidArgument, match="no execution provider"):
        parse_providers("")


def test_providers_this_build_lacks_fall_back_to_the_cpu_with_a_warning(caplog) -> None:
    missing = next(p for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
                   if p not in ort.get_available_providers())
    with caplog.at_level(logging.WARNING, logger="agent.runtime"):
        assert RuntimeOptions(providers=(missing,)).usable_providers() == ["CPUExecutionProvider"]
    assert f"{missing} is not in this onnxruntime build" in caplog.text


def test_session_options_carry_threads_optimisation_and_no_spinning() -> None:
    options = RuntimeOptions(intra_op_threads=3, inter_op_threads=2, graph_optimization="extended").session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 2)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(InvalidArgument, match="intra_op_threads"):
        RuntimeOptions(intra_op_threads=-1)
    with pytest.raises(InvalidArgument, match="graph optimisation 'max'"):
        RuntimeOptions(graph_optimization="max")


def test_a_session_without_monitoring_serves_the_same_and_summarises_nothing(lr_model: Path) -> None:
    sink = InMemorySink()
    session = MonitoredSession(str(lr_model), monitoring=False, sink=sink, window_rows=1,
                               **RuntimeOptions().session_kwargs())
    feeds = {"X": x_rows(8)}
    expected = ort.InferenceSession(str(lr_model)).run(None, feeds)
    got = session.run(None, feeds, request_id="r1")
    np.testing.assert_array_equal(got[1], expected[1])
    with pytest.raises(ValueError, match="without monitoring"):
        session.feedback("r1", "1")
    session.close()
    assert sink.windows == [] and session.stats()["rows_captured"] == 0
    with pytest.raises(ValueError, match="drop collector"):
        MonitoredSession(str(lr_model), monitoring=False, collector="127.0.0.1:1")


@pytest.mark.parametrize("args, words", [
    (["--providers", "gpu"], "unknown execution provider 'gpu'"),
    (["--intra-op-threads", "-1"], "is not a whole number"),
    (["--graph-optimization", "max"], "invalid choice"),
    (["--no-monitoring", "--collector", "127.0.0.1:1"], "drop --collector"),
])
def test_cli_refuses_bad_runtime_options_in_one_line(lr_model: Path, args: list[str], words: str) -> None:
    result = cli("agent", "serve", "--model", str(lr_model), "--listen", "127.0.0.1:0", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr


def test_cli_serves_without_monitoring_and_with_runtime_options(lr_model: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "agent", "serve", "--model", str(lr_model), "--model-name", "credit",
         "--listen", "127.0.0.1:0", "--no-monitoring", "--intra-op-threads", "2", "--providers", "cuda,cpu",
         "--summarizer", "process"],
        cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = read_line(proc)
        assert line.startswith("serving credit version 1 on 127.0.0.1:"), (line, proc.stderr)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert children == [], "no summary helper without monitoring"
        feeds = {"X": x_rows()}
        with grpc.insecure_channel(line.rsplit(" ", 1)[1].strip()) as channel:
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(raw_request("credit", feeds))
        expected = ort.InferenceSession(str(lr_model)).run(None, feeds)
        np.testing.assert_array_equal(decode(reply)["probabilities"], expected[1])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        err = proc.stderr.read()
        assert "onnxruntime CPUExecutionProvider; intra-op threads 2" in err and "monitoring off" in err, err
        assert "CUDAExecutionProvider is not in this onnxruntime build" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
