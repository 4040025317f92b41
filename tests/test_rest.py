"""The Open Inference Protocol over HTTP/REST (agent/rest): a real uvicorn server on loopback, spoken to
as curl would (http.client / urllib), beside the gRPC server on the same data plane."""
from __future__ import annotations

import http.client
import json
import queue
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from agent import MonitoredSession
from agent.errors import HTTP_STATUS, InvalidArgument, NotFound, OutriderError, PayloadTooLarge, http_error
from agent.metrics import AgentMetrics
from agent.rest import RestServer, SwitchBackend, serve_rest
from agent.server import InferenceServer, package_version, serve
from agent.tokens import ClientAuth
from protos import agent_pb2, agent_pb2_grpc
from test_agent_cli import ROOT, cli, cli_env
from test_auth import pki  # noqa: F401  (a fixture: certificates made on the fly)
from test_server import x_rows

PROVIDERS = ["CPUExecutionProvider"]
HANG_GUARD = 60


@dataclass
class Served:
    grpc: InferenceServer
    rest: RestServer
    session: object

    @property
    def port(self) -> int:
        return self.rest.port


@contextmanager
def running(session, name: str, **rest_options) -> Iterator[Served]:
    server = serve(session, name, "1", "127.0.0.1:0")
    rest = serve_rest(SwitchBackend(server.servicer.switch, server.servicer.shutting_down), "127.0.0.1:0",
                      **rest_options)
    try:
        yield Served(server, rest, session)
    finally:
        rest.stop()
        server.stop(grace=0)


def call(port: int, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG_GUARD)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()


def get(port: int, path: str, **kw) -> tuple[int, dict]:
    status, _, body = call(port, "GET", path, **kw)
    return status, json.loads(body)


def infer(port: int, doc: dict, model: str = "lr", binary: bytes = b"",
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    head = json.dumps(doc).encode()
    headers = dict(headers or {})
    if binary:
        headers["Inference-Header-Content-Length"] = str(len(head))
    return call(port, "POST", f"/v2/models/{model}/infer", head + binary, headers)


def outputs_of(headers: dict[str, str], body: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """The reply document, and each output decoded from JSON data or binary data (independently of agent/rest)."""
    size = int(headers.get("inference-header-content-length", len(body)))
    doc = json.loads(body[:size])
    pos, arrays = size, {}
    wire = {"BOOL": "?", "UINT8": "u1", "INT8": "i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
            "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
    for out in doc["outputs"]:
        if "data" in out:
            arrays[out["name"]] = np.array(out["data"], dtype=object if out["datatype"] == "BYTES"
                                           else wire[out["datatype"]]).reshape(out["shape"])
            continue
        raw = body[pos:pos + out["parameters"]["binary_data_size"]]
        pos += len(raw)
        if out["datatype"] == "BYTES":
            items, at = [], 0
            while at < len(raw):
                n = int.from_bytes(raw[at:at + 4], "little")
                items.append(raw[at + 4:at + 4 + n].decode())
                at += 4 + n
            arrays[out["name"]] = np.array(items, dtype=object).reshape(out["shape"])
        else:
            arrays[out["name"]] = np.frombuffer(raw, wire[out["datatype"]]).reshape(out["shape"])
    assert pos == len(body)
    return doc, arrays


@pytest.fixture(scope="module")
def lr(lr_model):
    with running(ort.InferenceSession(str(lr_model)), "lr") as served:
        yield served


@pytest.fixture(scope="module")
def typed(typed_model):
    with running(ort.InferenceSession(str(typed_model)), "typed") as served:
        yield served


# --- the endpoints --------------------------------------------------------------------

def test_health_server_and_model_metadata(lr):
    assert get(lr.port, "/v2/health/live") == (200, {"live": True})
    assert get(lr.port, "/v2/health/ready") == (200, {"ready": True})
    assert get(lr.port, "/v2") == (200, {"name": "outrider", "version": package_version(),
                                         "extensions": ["binary_tensor_data"]})
    meta = {"name": "lr", "versions": ["1"], "platform": "onnx_onnxv1",
            "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 20]}],
            "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]},
                        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}]}
    assert get(lr.port, "/v2/models/lr") == (200, meta)
    assert get(lr.port, "/v2/models/lr/versions/1") == (200, meta)
    assert get(lr.port, "/v2/models/lr/ready") == (200, {"name": "lr", "ready": True})
    assert get(lr.port, "/v2/models/lr/versions/1/ready") == (200, {"name": "lr", "ready": True})


@pytest.mark.parametrize("method, path, status, words", [
    ("GET", "/v2/models/other", 404, "model 'other' is not served here; this server serves 'lr'"),
    ("GET", "/v2/models/other/ready", 404, "not served here"),
    ("GET", "/v2/models/lr/versions/7", 404, "has no version '7'"),
    ("GET", "/v2/models/lr/versions/7/ready", 404, "has no version '7'"),
    ("POST", "/v2/models/other/infer", 404, "not served here"),
    ("GET", "/v2/models/lr/config", 404, "no endpoint /v2/models/lr/config"),
    ("GET", "/v1/models/lr", 404, "POST /v2/models/NAME[/versions/V]/infer"),
    ("GET", "/v2/models/lr/infer", 400, "GET is not served here; use POST"),
    ("POST", "/v2/models/lr", 400, "use GET"),
    ("DELETE", "/v2/health/live", 400, "use GET"),
])
def test_unknown_models_paths_and_methods_are_json_errors(lr, method, path, status, words):
    body = json.dumps({"inputs": [{"name": "X", "shape": [1, 20], "datatype": "FP32", "data": [0.0] * 20}]})
    got, headers, reply = call(lr.port, method, path, body.encode() if method == "POST" else None)
    assert got == status and headers["content-type"] == "application/json"
    assert words in json.loads(reply)["error"]


def test_a_percent_encoded_model_name_is_decoded(lr_model):
    with running(ort.InferenceSession(str(lr_model)), "team/lr v2") as served:
        assert get(served.port, "/v2/models/team%2Flr%20v2/ready") == (200, {"name": "team/lr v2", "ready": True})


# --- inference ------------------------------------------------------------------------

def test_json_infer_equals_onnxruntime_flat_or_nested_and_echoes_the_id(lr):
    x = x_rows(n=5, seed=4)
    expected = lr.session.run(None, {"X": x})
    for data in (x.tolist(), x.ravel().tolist()):
        doc = {"id": "req-7", "inputs": [{"name": "X", "shape": [5, 20], "datatype": "FP32", "data": data}]}
        status, headers, body = infer(lr.port, doc)
        assert status == 200 and headers["content-type"] == "application/json", body
        reply, out = outputs_of(headers, body)
        assert (reply["model_name"], reply["model_version"], reply["id"]) == ("lr", "1", "req-7")
        assert [(o["name"], o["datatype"], o["shape"]) for o in reply["outputs"]] == [
            ("label", "INT64", [5]), ("probabilities", "FP32", [5, 2])]
        np.testing.assert_array_equal(out["label"], expected[0])
        np.testing.assert_array_equal(out["probabilities"], expected[1])  # FP32 values survive JSON exactly


def test_binary_inputs_and_outputs_and_output_selection(lr):
    x = x_rows(n=3, seed=5)
    expected = lr.session.run(None, {"X": x})
    doc = {"inputs": [{"name": "X", "shape": [3, 20], "datatype": "FP32",
                       "parameters": {"binary_data_size": x.nbytes}}],
           "parameters": {"binary_data_output": True}}
    status, headers, body = infer(lr.port, doc, binary=x.tobytes())
    assert status == 200 and headers["content-type"] == "application/octet-stream", body
    reply, out = outputs_of(headers, body)
    assert all("data" not in o for o in reply["outputs"]) and "id" not in reply
    np.testing.assert_array_equal(out["label"], expected[0])
    np.testing.assert_array_equal(out["probabilities"], expected[1])
    # one output asked for, JSON despite binary_data_output: the output's own parameter wins
    doc["outputs"] = [{"name": "probabilities", "parameters": {"binary_data": False}}]
    status, headers, body = infer(lr.port, doc, binary=x.tobytes())
    reply, out = outputs_of(headers, body)
    assert status == 200 and list(out) == ["probabilities"] and "data" in reply["outputs"][0]
    np.testing.assert_array_equal(out["probabilities"], expected[1])
    doc = {"inputs": [{"name": "X", "shape": [3, 20], "datatype": "FP32", "data": x.tolist()}],
           "outputs": [{"name": "label", "parameters": {"binary_data": True}}]}
    status, headers, body = infer(lr.port, doc)
    reply, out = outputs_of(headers, body)
    assert status == 200 and list(out) == ["label"] and reply["outputs"][0]["parameters"] == {"binary_data_size": 24}
    np.testing.assert_array_equal(out["label"], expected[0])


TYPED = {"fp16": ("FP16", np.float16, [[0.5, -2.0], [1e4, 0.0]]),
         "fp32": ("FP32", np.float32, [[0.1, -2.5], [3.0, 1e30]]),
         "fp64": ("FP64", np.float64, [[0.1, -2.5], [1e300, 7.0]]),
         "int8": ("INT8", np.int8, [[-128, 127], [0, 5]]),
         "int16": ("INT16", np.int16, [[-32768, 32767], [0, 5]]),
         "int32": ("INT32", np.int32, [[-2**31, 2**31 - 1], [0, 5]]),
         "int64": ("INT64", np.int64, [[-2**63, 2**63 - 1], [0, 5]]),
         "uint8": ("UINT8", np.uint8, [[0, 255], [1, 2]]),
         "bool": ("BOOL", np.bool_, [[True, False], [False, True]]),
         "bytes": ("BYTES", object, [["été", ""], ["a b", "日本"]])}


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_every_datatype_round_trips(typed, binary):
    inputs, blobs, feeds = [], [], {}
    for key, (datatype, dtype, values) in TYPED.items():
        array = np.array(values, dtype=dtype)
        feeds[f"{key}_in"] = array
        entry = {"name": f"{key}_in", "shape": [2, 2], "datatype": datatype}
        if binary:
            raw = (b"".join(len(s.encode()).to_bytes(4, "little") + s.encode() for s in array.ravel())
                   if dtype is object else array.astype(array.dtype.newbyteorder("<")).tobytes())
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = values
        inputs.append(entry)
    status, headers, body = infer(typed.port, {"inputs": inputs, "parameters": {"binary_data_output": binary}},
                                  model="typed", binary=b"".join(blobs))
    assert status == 200, body
    reply, out = outputs_of(headers, body)
    for key, (datatype, dtype, values) in TYPED.items():
        assert [o["datatype"] for o in reply["outputs"] if o["name"] == f"{key}_out"] == [datatype]
        np.testing.assert_array_equal(out[f"{key}_out"], feeds[f"{key}_in"])


def test_nan_and_infinity_travel_as_null_in_json_and_as_themselves_in_binary(typed):
    values = np.array([[np.nan, np.inf], [-np.inf, 1.5]], np.float32)
    inputs = typed_inputs(fp32_in={"data": None, "parameters": {"binary_data_size": values.nbytes}})
    del inputs[1]["data"]
    for binary in (False, True):
        doc = {"inputs": inputs, "outputs": [{"name": "fp32_out", "parameters": {"binary_data": binary}}]}
        status, headers, body = infer(typed.port, doc, model="typed", binary=values.tobytes())
        assert status == 200, body
        reply, out = outputs_of(headers, body) if binary else (json.loads(body), None)
        if binary:
            np.testing.assert_array_equal(out["fp32_out"], values)
        else:
            assert reply["outputs"][0]["data"] == [None, None, None, 1.5]


def typed_inputs(**override) -> list[dict]:
    inputs = [{"name": f"{k}_in", "shape": [2, 2], "datatype": d, "data": v} for k, (d, _, v) in TYPED.items()]
    for entry in inputs:
        entry.update(override.get(entry["name"], {}))
    return inputs


X20 = [[0.0] * 20]

BAD = {  # what is sent -> words of the 400's error
    "not json": ("{", None, "not valid JSON"),
    "not an object": ("[1]", None, "must be a JSON object"),
    "no inputs": ({"inputs": []}, None, "'inputs' must be a non-empty list"),
    "NaN is not JSON": ('{"inputs": [{"name": "X", "shape": [1, 1], "datatype": "FP32", "data": [NaN]}]}', None,
                        "not valid JSON"),
    "unknown input": ({"inputs": [{"name": "Y", "shape": [1, 20], "datatype": "FP32", "data": X20}]}, None,
                      "unknown input 'Y'; the model's inputs are: X"),
    "wrong datatype": ({"inputs": [{"name": "X", "shape": [1, 20], "datatype": "FP64", "data": X20}]}, None,
                       "datatype FP64 does not match the model, which expects FP32"),
    "unknown datatype": ({"inputs": [{"name": "X", "shape": [1, 20], "datatype": "FLOAT", "data": X20}]}, None,
                         "unknown datatype 'FLOAT'"),
    "wrong shape": ({"inputs": [{"name": "X", "shape": [1, 19], "datatype": "FP32", "data": X20}]}, None,
                    "does not match the model's [N, 20]"),
    "shape not ints": ({"inputs": [{"name": "X", "shape": ["1", 20], "datatype": "FP32", "data": X20}]}, None,
                       "'shape' must be a list of integers"),
    "count": ({"inputs": [{"name": "X", "shape": [2, 20], "datatype": "FP32", "data": X20}]}, None,
              "raw contents are 80 bytes, expected 160"),
    "strings as numbers": ({"inputs": [{"name": "X", "shape": [1, 2], "datatype": "FP32", "data": ["1", "2"]}]},
                           None, "FP32 data must be numbers"),
    "ragged": ({"inputs": [{"name": "X", "shape": [2, 20], "datatype": "FP32", "data": [[0.0] * 20, [0.0]]}]},
               None, "nested unevenly"),
    "no data": ({"inputs": [{"name": "X", "shape": [1, 20], "datatype": "FP32"}]}, None, "no 'data'"),
    "header longer than body": ({"inputs": [{"name": "X", "shape": [1, 20], "datatype": "FP32", "data": X20}]},
                                {"Inference-Header-Content-Length": "99999"}, "the body has only"),
    "header not a number": ({"inputs": [{"name": "X", "shape": [1, 20], "datatype": "FP32", "data": X20}]},
                            {"Inference-Header-Content-Length": "-3"}, "is not a number of bytes"),
    "binary size over the body": ({"inputs": [{"name": "X", "shape": [1, 20], "datatype": "FP32",
                                               "parameters": {"binary_data_size": 80}}]},
                                  {"Inference-Header-Content-Length": "{len}"}, "only 0 bytes of binary data"),
    "unknown output": ({"inputs": [{"name": "X", "shape": [1, 20], "datatype": "FP32", "data": X20}],
                        "outputs": [{"name": "score"}]}, None, "unknown output(s) 'score'"),
    "classification": ({"inputs": [{"name": "X", "shape": [1, 20], "datatype": "FP32", "data": X20}],
                        "outputs": [{"name": "label", "parameters": {"classification": 2}}]}, None,
                       "classification extension is not supported"),
    "id not a string": ({"id": 5, "inputs": [{"name": "X", "shape": [1, 20], "datatype": "FP32", "data": X20}]},
                        None, "'id' must be a string"),
    "binary flag not a bool": ({"inputs": [{"name": "X", "shape": [1, 20], "datatype": "FP32", "data": X20}],
                                "parameters": {"binary_data_output": "yes"}}, None, "must be true or false"),
    "compressed": ({"inputs": [{"name": "X", "shape": [1, 20], "datatype": "FP32", "data": X20}]},
                   {"Content-Encoding": "gzip"}, "Content-Encoding"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_requests_are_400_with_a_json_error_and_the_server_keeps_serving(lr, case):
    doc, headers, words = BAD[case]
    body = doc.encode() if isinstance(doc, str) else json.dumps(doc).encode()
    headers = {k: v.replace("{len}", str(len(body))) for k, v in (headers or {}).items()}
    status, reply_headers, reply = call(lr.port, "POST", "/v2/models/lr/infer", body, headers)
    assert status == 400 and reply_headers["content-type"] == "application/json", reply
    assert words in json.loads(reply)["error"]
    x = x_rows(n=1)
    good = {"inputs": [{"name": "X", "shape": [1, 20], "datatype": "FP32", "data": x.tolist()}]}
    assert infer(lr.port, good)[0] == 200


@pytest.mark.parametrize("name, override, words", [
    ("int8_in", {"data": [[-129, 0], [0, 0]]}, "outside the INT8 range [-128, 127]"),
    ("uint8_in", {"data": [[-1, 0], [0, 0]]}, "outside the UINT8 range"),
    ("int32_in", {"data": [[1.5, 0], [0, 0]]}, "INT32 data must be integers"),
    ("bool_in", {"data": [[1, 0], [0, 1]]}, "BOOL data must be true or false"),
    ("fp32_in", {"data": [[True, False], [True, True]]}, "FP32 data must be numbers"),
    ("bytes_in", {"data": [[1, 2], [3, 4]]}, "BYTES data must be strings"),
    ("bool_in", {"data": None, "parameters": {"binary_data_size": 4}}, "raw BOOL bytes must be 0 or 1"),
    ("bytes_in", {"data": None, "parameters": {"binary_data_size": 4}}, "truncated length prefix"),
])
def test_json_values_must_be_of_the_inputs_datatype(typed, name, override, words):
    inputs = typed_inputs(**{name: override})
    binary = b""
    for entry in inputs:
        if entry.get("data", 0) is None:
            del entry["data"]
            binary = b"\x02\x00\x00\x00" if name == "bool_in" else b"\x09\x00\x00"
            entry["parameters"]["binary_data_size"] = len(binary)
    status, _, reply = infer(typed.port, {"inputs": inputs}, model="typed", binary=binary)
    assert status == 400 and words in json.loads(reply)["error"], reply


# --- budgets ----------------------------------------------------------------------------

def test_a_body_over_the_budget_is_413_before_it_is_read_and_the_server_keeps_serving(lr_model):
    with running(ort.InferenceSession(str(lr_model)), "lr", max_body_bytes=10_000) as served:
        # only the headers are sent: the answer comes without the 1 GB body
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=HANG_GUARD)
        conn.putrequest("POST", "/v2/models/lr/infer")
        conn.putheader("Content-Length", str(1 << 30))
        conn.endheaders()
        reply = conn.getresponse()
        assert reply.status == 413 and "at most 10000" in json.loads(reply.read())["error"]
        conn.close()
        # a chunked body (no length given) is cut off as soon as it passes the budget
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=HANG_GUARD)
        conn.putrequest("POST", "/v2/models/lr/infer")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        try:
            for _ in range(1000):  # 4 MB offered; the server stops reading after 10 kB
                conn.send(b"1000\r\n" + b"x" * 4096 + b"\r\n")
        except ConnectionError:
            pass
        reply = conn.getresponse()
        assert reply.status == 413 and reply.getheader("connection") == "close"
        assert "over 10000 bytes" in json.loads(reply.read())["error"]
        conn.close()
        assert served.rest.refusals()["too_large"] == 2
        x = x_rows(n=1)
        good = {"inputs": [{"name": "X", "shape": [1, 20], "datatype": "FP32", "data": x.tolist()}]}
        assert infer(served.port, good)[0] == 200


# --- one data plane: monitoring, feedback, metrics, auth ----------------------------------

def test_rest_requests_are_captured_kept_for_feedback_and_counted(lr_model):
    session = MonitoredSession(str(lr_model), providers=PROVIDERS, window_seconds=None, window_rows=50,
                               summarizer="thread")
    metrics = AgentMetrics()
    server = serve(session, "lr", "1", "127.0.0.1:0", metrics=metrics)
    rest = serve_rest(SwitchBackend(server.servicer.switch, server.servicer.shutting_down), "127.0.0.1:0",
                      metrics=metrics)
    try:
        x = x_rows(n=5, seed=9)
        doc = {"id": "rest-1", "inputs": [{"name": "X", "shape": [5, 20], "datatype": "FP32", "data": x.tolist()}]}
        status, headers, body = infer(rest.port, doc)
        assert status == 200
        labels = outputs_of(headers, body)[1]["label"]
        assert infer(rest.port, {"inputs": [{"name": "X", "shape": [1, 2], "datatype": "FP32",
                                             "data": [1.0, 2.0]}]})[0] == 400
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:  # ground truth by the REST id
            reply = agent_pb2_grpc.FeedbackServiceStub(channel).Feedback(agent_pb2.FeedbackRequest(labels=[
                agent_pb2.Label(request_id="rest-1", class_label=str(label), row=i) for i, label in enumerate(labels)]))
        assert (reply.matched, reply.unmatched) == (5, 0)
        assert session.stats()["rows_captured"] == 5  # the bad request reached no model
        sample = metrics.registry.get_sample_value
        assert sample("outrider_agent_requests_total", {"model": "lr", "version": "1"}) == 2
        assert sample("outrider_agent_request_failures_total",
                      {"model": "lr", "version": "1", "reason": "INVALID_ARGUMENT"}) == 1
    finally:
        rest.stop()
        server.stop(grace=0)


def test_with_an_auth_file_every_call_but_the_probes_needs_a_token(lr_model):
    auth = ClientAuth.from_toml('[[client]]\nname = "web"\ntoken = "a-long-token-for-web"\ncalls = ["inference"]\n'
                                '[[client]]\nname = "labels"\ntoken = "a-long-token-for-labels"\ncalls = ["feedback"]\n')
    with running(ort.InferenceSession(str(lr_model)), "lr", auth=auth) as served:
        assert get(served.port, "/v2/health/ready") == (200, {"ready": True})
        status, body = get(served.port, "/v2/models/lr")
        assert status == 401 and "Authorization: Bearer <token>" in body["error"]
        status, body = get(served.port, "/v2/models/lr", headers={"Authorization": "Bearer wrong-token-123456"})
        assert status == 401 and "unknown token" in body["error"]
        status, body = get(served.port, "/v2/models/lr", headers={"Authorization": "Bearer a-long-token-for-labels"})
        assert status == 403 and "'labels' may call feedback, not inference" in body["error"]
        assert get(served.port, "/v2/models/lr", headers={"Authorization": "Bearer a-long-token-for-web"})[0] == 200
        assert served.rest.refusals() == {"too_large": 0, "busy": 0, "unauthenticated": 2, "permission_denied": 1}


def test_not_ready_while_draining(lr_model):
    with running(ort.InferenceSession(str(lr_model)), "lr") as served:
        served.grpc.servicer.shutting_down.set()
        assert get(served.port, "/v2/health/ready") == (503, {"ready": False})
        assert get(served.port, "/v2/models/lr/ready") == (503, {"name": "lr", "ready": False})
        assert get(served.port, "/v2/health/live") == (200, {"live": True})


def test_one_error_table_maps_every_error_class():
    assert http_error(InvalidArgument("bad"))[:2] == (400, b'{"error": "bad"}')
    assert http_error(NotFound("x"))[0] == 404 and http_error(PayloadTooLarge("x"))[0] == 413
    assert http_error(OutriderError("x"))[0] == 500
    status, body, _ = http_error(KeyError("k"))
    assert status == 500 and json.loads(body)["error"].startswith("internal error: KeyError")
    # an error class with a gRPC code of its own needs its HTTP status (else it would answer 500)
    unmapped = [cls for cls in _subclasses(OutriderError)
                if cls.code is not grpc.StatusCode.INTERNAL and http_error(cls("x"))[0] == 500]
    assert not unmapped and set(HTTP_STATUS) <= {OutriderError, *_subclasses(OutriderError)}


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


# --- the CLI ------------------------------------------------------------------------------

def lines_until_serving(proc: subprocess.Popen) -> list[str]:
    """What ``agent serve`` printed up to its "serving ..." line (a reader thread: the timeout is a hang guard)."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen: list[str] = []
    while not seen or not seen[-1].startswith("serving "):
        try:
            seen.append(lines.get(timeout=HANG_GUARD))
        except queue.Empty:
            proc.kill()
            pytest.fail(f"no 'serving' line from outrider agent serve: {seen}")
    return seen


def test_agent_serve_http_listen_serves_rest_beside_grpc(lr_model):
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "serve", "--model", str(lr_model),
                             "--model-name", "credit", "--listen", "127.0.0.1:0"],
                            cwd=ROOT, env=cli_env(OUTRIDER_AGENT_HTTP_LISTEN="127.0.0.1:0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first, second = lines_until_serving(proc)
        assert first.startswith("rest on http://127.0.0.1:"), (first, second)
        assert second.startswith("serving credit version 1 on 127.0.0.1:"), second
        url = first.split()[-1]
        x = x_rows(n=2)
        request = urllib.request.Request(f"{url}/v2/models/credit/infer", method="POST", data=json.dumps(
            {"inputs": [{"name": "X", "shape": [2, 20], "datatype": "FP32", "data": x.tolist()}]}).encode())
        with urllib.request.urlopen(request, timeout=HANG_GUARD) as reply:
            out = json.loads(reply.read())["outputs"]
        expected = ort.InferenceSession(str(lr_model)).run(None, {"X": x})
        assert out[0]["data"] == expected[0].tolist()
        proc.terminate()
        assert proc.wait(timeout=HANG_GUARD) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_a_busy_http_port_is_one_line_exit_2(lr_model):
    with running(ort.InferenceSession(str(lr_model)), "lr") as served:
        result = cli("agent", "serve", "--model", str(lr_model), "--listen", "127.0.0.1:0",
                     "--http-listen", f"127.0.0.1:{served.port}")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "Address already in use" in result.stderr and "--http-listen" in result.stderr


@pytest.mark.slow
def test_processes_share_the_http_port(lr_model, tmp_path):
    from test_processes import requests_by_process, wait_for

    with open(tmp_path / "agent.log", "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "serve", "--model", str(lr_model),
                                 "--model-name", "lr", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                                 "--processes", "2", "--metrics", "127.0.0.1:0", "--summarizer", "thread",
                                 "--spool-dir", str(tmp_path / "spool")],
                                cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        lines = lines_until_serving(proc)
        assert len(lines) == 3, lines
        assert lines[0].startswith("metrics on ") and lines[2].startswith("serving lr version 1 on "), lines
        assert lines[1].startswith("rest on http://127.0.0.1:") and not lines[1].endswith(":0\n"), lines
        url, metrics_url = lines[1].split()[-1], lines[0].split()[-1]
        x = x_rows(n=1)
        body = json.dumps({"inputs": [{"name": "X", "shape": [1, 20], "datatype": "FP32", "data": x.tolist()}]})
        for _ in range(40):  # urllib opens a connection per request: the kernel spreads them over both
            request = urllib.request.Request(f"{url}/v2/models/lr/infer", data=body.encode(), method="POST")
            with urllib.request.urlopen(request, timeout=HANG_GUARD) as reply:
                assert reply.status == 200
        by_process = wait_for(lambda: (counts := requests_by_process(metrics_url)) and sum(counts.values()) == 40
                              and counts, "both processes' counts")
        assert set(by_process) == {"0", "1"} and all(n > 0 for n in by_process.values()), by_process
        proc.terminate()
        assert proc.wait(timeout=HANG_GUARD) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["grpc", "json", "binary"])
def test_the_rest_benchmark_runs_its_clients_against_a_real_agent(lr_model, protocol):
    from benchmarks import rest as bench

    result = bench.one(lr_model, protocol, clients=1, threads=2, seconds=1.0, batch=3)
    assert result["protocol"] == protocol and result["requests"] > 0 and result["agent_cpu_us_per_request"] > 0
    assert result["failed"] == 0


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_a_benchmark_client_whose_first_request_fails_stops_at_once_saying_why(lr_model, protocol):
    """The benchmarks' clients ask for model "bench": against a server of "lr" their warm-up call fails,
    and every thread stops (not a wait for a barrier that never fills)."""
    from benchmarks.proxy import clients

    with running(ort.InferenceSession(str(lr_model)), "lr") as served:
        address = served.rest.url if protocol == "rest" else served.grpc.address
        with pytest.raises(RuntimeError, match="the first request to .* failed: (HTTP 404|NOT_FOUND)"):
            clients(address, 3, 1.0, 1, protocol)


# --- TLS, and a managed agent before its first version ------------------------------------


def test_tls_as_on_the_grpc_port_with_client_certificates_when_a_ca_is_given(lr_model, pki):  # noqa: F811
    import ssl

    from agent.tokens import TLSFiles

    tls = TLSFiles(pki["server_cert"], pki["server_key"], pki["ca"])
    with running(ort.InferenceSession(str(lr_model)), "lr", tls=tls) as served:
        assert served.rest.url.startswith("https://")
        context = ssl.create_default_context(cafile=str(pki["server_cert"]))
        context.check_hostname = False
        context.load_cert_chain(pki["client_cert"], pki["client_key"])
        conn = http.client.HTTPSConnection("127.0.0.1", served.port, context=context, timeout=HANG_GUARD)
        conn.request("GET", "/v2/models/lr/ready")
        assert conn.getresponse().status == 200
        conn.close()
        without = ssl.create_default_context(cafile=str(pki["server_cert"]))
        without.check_hostname = False
        with pytest.raises((ssl.SSLError, ConnectionError)):  # no client certificate: the handshake fails
            conn = http.client.HTTPSConnection("127.0.0.1", served.port, context=without, timeout=HANG_GUARD)
            conn.request("GET", "/v2/models/lr/ready")
            conn.getresponse()
        with pytest.raises((http.client.HTTPException, ConnectionError)):  # plaintext is not served
            call(served.port, "GET", "/v2/health/live")


def test_a_switch_with_no_version_yet_is_not_ready_and_answers_503():
    from agent.switch import ModelSwitch

    rest = serve_rest(SwitchBackend(ModelSwitch("churn")), "127.0.0.1:0")
    try:
        assert get(rest.port, "/v2/health/live") == (200, {"live": True})
        assert get(rest.port, "/v2/health/ready") == (503, {"ready": False})
        status, body = get(rest.port, "/v2/models/churn/ready")
        assert status == 503 and "is not loaded yet" in body["error"]
        status, _, reply = infer(rest.port, {"inputs": [{"name": "X", "shape": [1, 1], "datatype": "FP32",
                                                         "data": [0.0]}]}, model="churn")
        assert status == 503 and "waits for the collector" in json.loads(reply)["error"]
        assert get(rest.port, "/v2/models/other")[0] == 404
    finally:
        rest.stop()
