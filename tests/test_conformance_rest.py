"""Wire conformance over HTTP: an unmodified ``tritonclient.http`` client talks to the agent's REST endpoint
(as test_conformance_triton.py does over gRPC). Outputs equal onnxruntime's, in JSON and in binary."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from agent.rest import SwitchBackend, serve_rest
from agent.server import package_version, serve

httpclient = pytest.importorskip("tritonclient.http", reason="needs the test extra (tritonclient[http])")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture
def served(request):
    """(client, session) for the model named by the test's parameter: (fixture name, model name)."""
    path_fixture, name = request.param
    path = request.getfixturevalue(path_fixture)
    session = ort.InferenceSession(str(path))
    server = serve(session, name, "1", "127.0.0.1:0")
    rest = serve_rest(SwitchBackend(server.servicer.switch, server.servicer.shutting_down), "127.0.0.1:0")
    client = httpclient.InferenceServerClient(f"127.0.0.1:{rest.port}", network_timeout=60)
    try:
        yield client, session, name
    finally:
        client.close()
        rest.stop()
        server.stop(grace=0)


def check_common(client, name: str) -> None:
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
    assert client.is_model_ready(name, "1") and not client.is_model_ready(name, "2")
    assert not client.is_model_ready("other")
    meta = client.get_server_metadata()
    assert (meta["name"], meta["version"]) == ("outrider", package_version())
    assert "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata(name)
    assert (model["name"], model["platform"], model["versions"]) == (name, "onnx_onnxv1", ["1"])


def infer(client, name: str, feeds: dict[str, np.ndarray], outputs: list[str], binary: bool, **kw):
    inputs = []
    for key, value in feeds.items():
        tensor = httpclient.InferInput(key, list(value.shape), "BYTES" if value.dtype == object else "FP32")
        tensor.set_data_from_numpy(value, binary_data=binary)
        inputs.append(tensor)
    wanted = [httpclient.InferRequestedOutput(out, binary_data=binary) for out in outputs]
    return client.infer(name, inputs, outputs=wanted, **kw)


@pytest.mark.parametrize("served", [("lr_model", "lr")], indirect=True)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_http_logistic_regression(served, binary):
    client, session, name = served
    check_common(client, name)
    model = client.get_model_metadata(name)
    assert model["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 20]}]
    x = np.random.default_rng(3).standard_normal((6, 20)).astype(np.float32)
    labels, probabilities = session.run(["label", "probabilities"], {"X": x})
    result = infer(client, name, {"X": x}, ["label", "probabilities"], binary, request_id="triton-1")
    assert result.get_response()["id"] == "triton-1"
    assert result.get_output("label")["datatype"] == "INT64"
    np.testing.assert_array_equal(result.as_numpy("label"), labels)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
    # a bad request is an exception with the server's message; the server keeps serving
    bad = httpclient.InferInput("X", [6, 20], "FP64")
    bad.set_data_from_numpy(x.astype(np.float64), binary_data=binary)
    with pytest.raises(InferenceServerException, match="datatype FP64 does not match the model"):
        client.infer(name, [bad])
    with pytest.raises(InferenceServerException, match="model 'other' is not served here"):
        infer(client, "other", {"X": x}, ["label"], binary)
    assert client.is_model_ready(name)
    np.testing.assert_array_equal(infer(client, name, {"X": x}, ["label"], binary).as_numpy("label"), labels)


@pytest.mark.parametrize("served", [("mixed_model", "mixed")], indirect=True)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_http_bytes_input(served, binary):
    client, session, name = served
    check_common(client, name)
    feeds = {"num": np.array([[0.1, 0.2, 0.3], [1, -1, 2], [0, 0, 0]], np.float32),
             "city": np.array([["paris"], ["lille"], ["atlantis"]], dtype=object)}
    labels, probabilities = session.run(["label", "probabilities"], feeds)
    result = infer(client, name, feeds, ["label", "probabilities"], binary)
    got = result.as_numpy("label")
    if got.dtype == object:  # string labels come back as bytes
        got = np.array([v.decode() if isinstance(v, bytes) else v for v in got.ravel()],
                       dtype=object).reshape(got.shape)
    np.testing.assert_array_equal(got, labels)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)


@pytest.mark.parametrize("served", [("lr_zipmap_model", "lr")], indirect=True)
def test_tritonclient_http_zipmap_probabilities(served):
    client, session, name = served
    x = np.random.default_rng(4).standard_normal((3, 20)).astype(np.float32)
    labels, maps = session.run(None, {"X": x})
    result = infer(client, name, {"X": x}, ["output_label", "output_probability"], True)
    np.testing.assert_array_equal(result.as_numpy("output_label"), labels)
    expected = np.array([[row[k] for k in row] for row in maps], dtype=np.float32)
    np.testing.assert_array_equal(result.as_numpy("output_probability"), expected)
