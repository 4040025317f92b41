"""Wire conformance: an unmodified ``tritonclient.grpc`` client talks to our endpoint.

The client runs in a child process (``triton_probe.py``): its ``inference``
protos would clash with ours in this process's protobuf pool.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.server import package_version, serve

PROBE = Path(__file__).with_name("triton_probe.py")

# find_spec, not importorskip: importing tritonclient.grpc here would break our own protos.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None,
                                reason="needs the test extra (tritonclient[grpc])")


def probe(url: str, model: str, inputs: list[dict], outputs: list[str]) -> dict:
    case = {"url": url, "model": model, "inputs": inputs, "outputs": outputs}
    result = subprocess.run([sys.executable, str(PROBE), json.dumps(case)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def served_probe(path: Path, name: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> tuple[dict, list]:
    session = ort.InferenceSession(str(path))
    server = serve(session, name, "1", "127.0.0.1:0")
    try:
        inputs = [{"name": key, "datatype": "BYTES" if value.dtype == object else "FP32",
                   "dtype": str(value.dtype), "data": value.tolist()} for key, value in feeds.items()]
        result = probe(f"127.0.0.1:{server.port}", name, inputs, outputs)
    finally:
        server.stop(grace=0)
    return result, session.run(outputs, feeds)


def check_common(result: dict, name: str) -> None:
    assert result["live"] and result["server_ready"] and result["model_ready"]
    assert result["other_model_ready"] is False
    assert result["server_metadata"]["name"] == "outrider"
    assert result["server_metadata"]["version"] == package_version()
    assert result["metadata"]["name"] == name
    assert result["metadata"]["platform"] == "onnx_onnxv1"
    assert result["metadata"]["versions"] == ["1"]
    assert result["id"] == "triton-1"
    assert result["bad"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "datatype FP64" in result["bad"]["message"]
    assert result["after_bad_ready"]


def tensors_of(metadata: dict, key: str) -> list[tuple]:
    # protobuf's JSON form writes int64 as strings
    return [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in metadata[key]]


def test_tritonclient_logistic_regression(lr_model):
    x = np.random.default_rng(3).standard_normal((6, 20)).astype(np.float32)
    result, (labels, probabilities) = served_probe(lr_model, "lr", {"X": x}, ["label", "probabilities"])
    check_common(result, "lr")
    assert tensors_of(result["metadata"], "inputs") == [("X", "FP32", [-1, 20])]
    assert tensors_of(result["metadata"], "outputs") == [("label", "INT64", [-1]),
                                                         ("probabilities", "FP32", [-1, 2])]
    assert result["outputs"]["label"]["datatype"] == "INT64"
    assert result["outputs"]["label"]["data"] == labels.tolist()
    assert np.allclose(result["outputs"]["probabilities"]["data"], probabilities)


def test_tritonclient_bytes_input(mixed_model):
    feeds = {"num": np.array([[0.1, 0.2, 0.3], [1, -1, 2], [0, 0, 0]], np.float32),
             "city": np.array([["paris"], ["lille"], ["atlantis"]], dtype=object)}
    result, (labels, probabilities) = served_probe(mixed_model, "mixed", feeds, ["label", "probabilities"])
    check_common(result, "mixed")
    assert tensors_of(result["metadata"], "inputs") == [("num", "FP32", [-1, 3]), ("city", "BYTES", [-1, 1])]
    assert result["outputs"]["label"]["data"] == labels.tolist()
    assert np.allclose(result["outputs"]["probabilities"]["data"], probabilities)
