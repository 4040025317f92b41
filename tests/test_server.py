"""The Open Inference Protocol endpoint: real gRPC servers on loopback (the CLI: test_agent_cli.py)."""
from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnx.utils
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.dataplane import DataPlane
from agent.errors import MAX_DETAILS_BYTES, InvalidArgument, clip_details
from agent.guard import DecodeGuard
from agent.server import SERVICE_NAME, InferenceServer, package_version, serve
from agent.tensors import wire_inputs
from protos import open_inference_pb2 as pb
from protos import open_inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# Decoding replies here, independently of agent.tensors.
WIRE = {"BOOL": "?", "UINT8": "u1", "INT8": "i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
        "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
DATATYPE = {np.dtype(v).newbyteorder("=").str: k for k, v in WIRE.items()}


@dataclass
class Served:
    stub: pb_grpc.GRPCInferenceServiceStub
    health: health_pb2_grpc.HealthStub
    session: ort.InferenceSession
    server: InferenceServer
    name: str


@contextmanager
def running(session, name: str, **kw) -> Iterator[Served]:
    server = serve(session, name, "1", "127.0.0.1:0", **kw)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Served(pb_grpc.GRPCInferenceServiceStub(channel), health_pb2_grpc.HealthStub(channel),
                     session, server, name)
    finally:
        channel.close()
        server.stop(grace=0)


def model_fixture(path_fixture: str, name: str):
    @pytest.fixture(scope="module")
    def fixture(request):
        path = request.getfixturevalue(path_fixture)
        with running(ort.InferenceSession(str(path)), name) as served:
            yield served
    return fixture


lr = model_fixture("lr_model", "lr")
lr_zipmap = model_fixture("lr_zipmap_model", "lr_zipmap")
mixed = model_fixture("mixed_model", "mixed")
typed = model_fixture("typed_model", "typed")


@pytest.fixture(scope="module")
def typed_no_fp16(typed_model, tmp_path_factory):
    """typed_identity without FP16, which has no typed form: a request cannot mix raw and typed."""
    names = ["fp32", "fp64", "int8", "int16", "int32", "int64", "uint8", "bool", "bytes"]
    path = tmp_path_factory.mktemp("models") / "typed_no_fp16.onnx"
    onnx.utils.extract_model(str(typed_model), str(path), [f"{n}_in" for n in names], [f"{n}_out" for n in names])
    with running(ort.InferenceSession(str(path)), "typed_no_fp16") as served:
        yield served


def encode(array: np.ndarray) -> tuple[str, bytes]:
    if array.dtype == object:
        data = [s.encode() if isinstance(s, str) else s for s in array.ravel()]
        return "BYTES", b"".join(len(d).to_bytes(4, "little") + d for d in data)
    return DATATYPE[array.dtype.str], array.astype(array.dtype.newbyteorder("<")).tobytes()


def raw_request(model: str, feeds: dict[str, np.ndarray], **kw) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, **kw)
    for name, array in feeds.items():
        datatype, raw = encode(array)
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(raw)
    return request


def decode(reply: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    assert len(reply.raw_output_contents) == len(reply.outputs)  # always raw
    result = {}
    for out, raw in zip(reply.outputs, reply.raw_output_contents):
        if out.datatype == "BYTES":
            items, pos = [], 0
            while pos < len(raw):
                size = int.from_bytes(raw[pos:pos + 4], "little")
                items.append(raw[pos + 4:pos + 4 + size].decode())
                pos += 4 + size
            result[out.name] = np.array(items, dtype=object).reshape(out.shape)
        else:
            result[out.name] = np.frombuffer(raw, WIRE[out.datatype]).reshape(out.shape)
    return result


def assert_matches_onnxruntime(served: Served, reply, feeds) -> None:
    names = [o.name for o in served.session.get_outputs()]
    expected = dict(zip(names, served.session.run(None, feeds)))
    got = decode(reply)
    assert list(got) == names
    for name, value in got.items():
        np.testing.assert_array_equal(value, expected[name])


def x_rows(n: int = 4, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 20)).astype(np.float32)


# --- server, model, metadata ---------------------------------------------------------

def test_live_ready_and_server_metadata(lr):
    assert lr.stub.ServerLive(pb.ServerLiveRequest()).live
    assert lr.stub.ServerReady(pb.ServerReadyRequest()).ready
    meta = lr.stub.ServerMetadata(pb.ServerMetadataRequest())
    assert (meta.name, meta.version) == ("outrider", package_version())


def test_model_ready(lr):
    assert lr.stub.ModelReady(pb.ModelReadyRequest(name="lr")).ready
    assert lr.stub.ModelReady(pb.ModelReadyRequest(name="lr", version="1")).ready
    # like Triton: not-ready, not an error, for a model or version not served
    assert not lr.stub.ModelReady(pb.ModelReadyRequest(name="other")).ready
    assert not lr.stub.ModelReady(pb.ModelReadyRequest(name="lr", version="2")).ready


def test_model_metadata(lr):
    meta = lr.stub.ModelMetadata(pb.ModelMetadataRequest(name="lr"))
    assert (meta.name, list(meta.versions), meta.platform) == ("lr", ["1"], "onnx_onnxv1")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("X", "FP32", [-1, 20])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("label", "INT64", [-1]), ("probabilities", "FP32", [-1, 2])]


def test_health_is_serving(lr):
    for service in ("", SERVICE_NAME):
        assert lr.health.Check(health_pb2.HealthCheckRequest(service=service)).status == SERVING


# --- inference ----------------------------------------------------------------------

def test_infer_logistic_regression_raw(lr):
    feeds = {"X": x_rows()}
    reply = lr.stub.ModelInfer(raw_request("lr", feeds, id="req-42"))
    assert (reply.id, reply.model_name, reply.model_version) == ("req-42", "lr", "1")
    assert [(o.name, o.datatype, list(o.shape)) for o in reply.outputs] == [
        ("label", "INT64", [4]), ("probabilities", "FP32", [4, 2])]
    assert_matches_onnxruntime(lr, reply, feeds)


def test_infer_requested_output_only(lr):
    request = raw_request("lr", {"X": x_rows()}, model_version="1")
    request.outputs.add(name="probabilities")
    reply = lr.stub.ModelInfer(request)
    assert [o.name for o in reply.outputs] == ["probabilities"]
    np.testing.assert_array_equal(decode(reply)["probabilities"],
                                  lr.session.run(["probabilities"], {"X": x_rows()})[0])


def typed_feeds(names) -> dict[str, np.ndarray]:
    values = {
        "fp16": np.array([[0.5, -2.0], [65504, 1e-3]], np.float16),
        "fp32": np.array([[0.5, -2.0], [3.4e38, 1e-3]], np.float32),
        "fp64": np.array([[0.1, -2.0], [1e300, 1e-300]], np.float64),
        "int8": np.array([[-128, 0], [1, 127]], np.int8),
        "int16": np.array([[-32768, 0], [1, 32767]], np.int16),
        "int32": np.array([[-2**31, 0], [1, 2**31 - 1]], np.int32),
        "int64": np.array([[-2**63, 0], [1, 2**63 - 1]], np.int64),
        "uint8": np.array([[0, 1], [128, 255]], np.uint8),
        "bool": np.array([[True, False], [False, True]]),
        "bytes": np.array([["a", ""], ["zürich", "東京"]], dtype=object),
    }
    return {f"{n}_in": values[n] for n in names}


def test_infer_every_dtype_raw(typed):
    feeds = typed_feeds(["fp16", "fp32", "fp64", "int8", "int16", "int32", "int64", "uint8", "bool", "bytes"])
    reply = typed.stub.ModelInfer(raw_request("typed", feeds))
    assert_matches_onnxruntime(typed, reply, feeds)
    got = decode(reply)
    for name, array in feeds.items():
        np.testing.assert_array_equal(got[name.replace("_in", "_out")], array)


TYPED_FIELD = {"fp32": "fp32_contents", "fp64": "fp64_contents", "int8": "int_contents",
               "int16": "int_contents", "int32": "int_contents", "int64": "int64_contents",
               "uint8": "uint_contents", "bool": "bool_contents", "bytes": "bytes_contents"}


def test_infer_every_dtype_typed_contents(typed_no_fp16):
    feeds = typed_feeds(TYPED_FIELD)
    request = pb.ModelInferRequest(model_name="typed_no_fp16")
    for name, array in feeds.items():
        field = TYPED_FIELD[name[:-3]]
        values = [s.encode() for s in array.ravel()] if array.dtype == object else array.ravel().tolist()
        request.inputs.add(name=name, datatype=encode(array)[0], shape=array.shape,
                           contents=pb.InferTensorContents(**{field: values}))
    reply = typed_no_fp16.stub.ModelInfer(request)
    assert_matches_onnxruntime(typed_no_fp16, reply, feeds)


def mixed_feeds() -> dict[str, np.ndarray]:
    return {"num": np.array([[0.1, 0.2, 0.3], [1, -1, 2], [0, 0, 0]], np.float32),
            "city": np.array([["paris"], ["nice"], ["atlantis"]], dtype=object)}


def test_infer_bytes_input_raw(mixed):
    feeds = mixed_feeds()
    reply = mixed.stub.ModelInfer(raw_request("mixed", feeds, id="m"))
    assert reply.id == "m"
    assert_matches_onnxruntime(mixed, reply, feeds)


def test_infer_bytes_input_typed(mixed):
    feeds = mixed_feeds()
    request = pb.ModelInferRequest(model_name="mixed")
    request.inputs.add(name="num", datatype="FP32", shape=[3, 3],
                       contents=pb.InferTensorContents(fp32_contents=feeds["num"].ravel().tolist()))
    request.inputs.add(name="city", datatype="BYTES", shape=[3, 1],
                       contents=pb.InferTensorContents(bytes_contents=[b"paris", b"nice", b"atlantis"]))
    assert_matches_onnxruntime(mixed, mixed.stub.ModelInfer(request), feeds)


def test_zipmap_output_is_an_fp32_matrix(lr_zipmap):
    meta = lr_zipmap.stub.ModelMetadata(pb.ModelMetadataRequest(name="lr_zipmap"))
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("output_label", "INT64", [-1]), ("output_probability", "FP32", [-1, -1])]
    feeds = {"X": x_rows(5)}
    got = decode(lr_zipmap.stub.ModelInfer(raw_request("lr_zipmap", feeds)))
    labels, dicts = lr_zipmap.session.run(None, feeds)
    np.testing.assert_array_equal(got["output_label"], labels)
    assert got["output_probability"].shape == (5, 2)
    np.testing.assert_array_equal(got["output_probability"],
                                  np.array([[row[0], row[1]] for row in dicts], np.float32))


# --- bad requests: a clear status, and the server keeps serving ---------------------

def lr_bad(**change) -> pb.ModelInferRequest:
    request = raw_request("lr", {"X": x_rows(2)})
    for key, value in change.items():
        if key == "shape":
            del request.inputs[0].shape[:]
            request.inputs[0].shape.extend(value)
        elif key == "raw":
            request.raw_input_contents[0] = value
        elif key == "extra_raw":
            request.raw_input_contents.append(value)
        elif key in ("name", "datatype"):
            setattr(request.inputs[0], key, value)
        else:
            setattr(request, key, value)
    return request


def mixed_bad_city(raw: bytes) -> pb.ModelInferRequest:
    request = raw_request("mixed", mixed_feeds())
    request.raw_input_contents[1] = raw
    return request


def raw_and_typed() -> pb.ModelInferRequest:
    request = raw_request("mixed", {"num": mixed_feeds()["num"]})
    request.inputs.add(name="city", datatype="BYTES", shape=[3, 1],
                       contents=pb.InferTensorContents(bytes_contents=[b"a", b"b", b"c"]))
    request.raw_input_contents.append(b"")
    return request


def with_output(request: pb.ModelInferRequest, name: str) -> pb.ModelInferRequest:
    request.outputs.add(name=name)
    return request


BAD = {
    "unknown model": (lambda: lr_bad(model_name="nope"), grpc.StatusCode.NOT_FOUND, "model 'nope'"),
    "unknown version": (lambda: lr_bad(model_version="7"), grpc.StatusCode.NOT_FOUND, "no version '7'"),
    "wrong input name": (lambda: lr_bad(name="Y"), grpc.StatusCode.INVALID_ARGUMENT, "unknown input 'Y'"),
    "missing input": (lambda: raw_request("mixed", {"num": mixed_feeds()["num"]}),
                      grpc.StatusCode.INVALID_ARGUMENT, "missing input(s) 'city'"),
    "wrong dtype": (lambda: raw_request("lr", {"X": x_rows(2).astype(np.float64)}),
                    grpc.StatusCode.INVALID_ARGUMENT, "input 'X': datatype FP64"),
    "unknown dtype": (lambda: lr_bad(datatype="FLOAT"), grpc.StatusCode.INVALID_ARGUMENT, "unknown datatype"),
    "wrong rank": (lambda: lr_bad(shape=[40]), grpc.StatusCode.INVALID_ARGUMENT, "rank 1"),
    "wrong shape": (lambda: lr_bad(shape=[4, 10]), grpc.StatusCode.INVALID_ARGUMENT, "[N, 20]"),
    "raw length": (lambda: lr_bad(raw=b"\0" * 100), grpc.StatusCode.INVALID_ARGUMENT,
                   "100 bytes, expected 160"),
    "bad BYTES prefix": (lambda: mixed_bad_city(b"\xff\x00\x00\x00paris"), grpc.StatusCode.INVALID_ARGUMENT,
                         "input 'city': BYTES element 0 declares 255 bytes"),
    "raw and typed": (raw_and_typed, grpc.StatusCode.INVALID_ARGUMENT, "not both"),
    "raw count": (lambda: lr_bad(extra_raw=b""), grpc.StatusCode.INVALID_ARGUMENT,
                  "2 raw_input_contents entries for 1 inputs"),
    "unknown output": (lambda: with_output(lr_bad(), "proba"), grpc.StatusCode.INVALID_ARGUMENT,
                       "unknown output(s) 'proba'"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_request_gets_a_clear_error_and_the_server_keeps_serving(case, lr, mixed):
    build, code, words = BAD[case]
    request = build()
    served = mixed if request.model_name == "mixed" else lr
    with pytest.raises(grpc.RpcError) as info:
        served.stub.ModelInfer(request)
    assert info.value.code() == code
    assert words in info.value.details()
    good = {"X": x_rows()} if served is lr else mixed_feeds()
    assert_matches_onnxruntime(served, served.stub.ModelInfer(raw_request(served.name, good)), good)


def test_metadata_of_unknown_model_is_not_found(lr):
    with pytest.raises(grpc.RpcError) as info:
        lr.stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "serves 'lr'" in info.value.details()


def test_oversized_message_is_refused_by_grpc_and_the_server_keeps_serving(lr_model):
    with running(ort.InferenceSession(str(lr_model)), "lr", max_receive_bytes=64 * 1024) as served:
        with pytest.raises(grpc.RpcError) as info:
            served.stub.ModelInfer(raw_request("lr", {"X": x_rows(1000)}))  # 80 kB
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        feeds = {"X": x_rows()}
        assert_matches_onnxruntime(served, served.stub.ModelInfer(raw_request("lr", feeds)), feeds)


def test_session_rejection_becomes_invalid_argument(lr_model):
    class Refusing:
        def __init__(self):
            self.inner = ort.InferenceSession(str(lr_model))
            self.get_inputs, self.get_outputs = self.inner.get_inputs, self.inner.get_outputs

        def run(self, output_names, input_feed):
            raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : no thanks")

    plane = DataPlane(Refusing(), "lr", "1")
    request = raw_request("lr", {"X": x_rows()})
    with pytest.raises(InvalidArgument, match="rejected the input: .*no thanks"):
        plane.infer("lr", "", wire_inputs(request.inputs, request.raw_input_contents))


def test_session_is_asked_for_a_selection_only_when_the_request_makes_one(lr_model):
    class Recording:
        def __init__(self):
            self.inner = ort.InferenceSession(str(lr_model))
            self.get_inputs, self.get_outputs = self.inner.get_inputs, self.inner.get_outputs
            self.asked = []

        def run(self, output_names, input_feed):
            self.asked.append(output_names)
            return self.inner.run(output_names, input_feed)

    session = Recording()
    plane = DataPlane(session, "lr", "1")
    names = [o.name for o in session.get_outputs()]
    request = raw_request("lr", {"X": x_rows()})
    inputs = wire_inputs(request.inputs, request.raw_input_contents)
    expected = dict(zip(names, session.inner.run(None, {"X": x_rows()})))

    for asked_for in ([], names, names[::-1], names[1:]):
        results = plane.infer("lr", "", inputs, asked_for)
        assert [name for name, _ in results] == (asked_for or names)
        for name, value in results:
            np.testing.assert_array_equal(value, expected[name])
    # all outputs in the model's order: run(None), no selection; a reordering or a subset is passed on
    assert session.asked == [None, None, names[::-1], names[1:]]


def outcome(call) -> tuple:
    try:
        return ("answer", [(name, value.dtype, value.shape, value.tobytes()) for name, value in call()])
    except InvalidArgument as exc:
        return (type(exc).__name__, str(exc))
    except Exception as exc:  # NotFound and the rest: the class and message are what the caller sees
        return (type(exc).__name__, str(exc))


ONE_RAW_INPUT = {
    **{case: build for case, (build, _, _) in BAD.items() if case in (
        "unknown version", "wrong input name", "wrong dtype", "unknown dtype", "wrong rank", "wrong shape",
        "raw length", "unknown output")},
    "good": lambda: raw_request("lr", {"X": x_rows(3)}),
    "no rows": lambda: raw_request("lr", {"X": x_rows(0)}),
    "one output": lambda: with_output(raw_request("lr", {"X": x_rows(2)}), "probabilities"),
    "negative rows": lambda: lr_bad(shape=[-2, 20]),
    "first dimension fixed wrong": lambda: lr_bad(shape=[3, 20]),
}


@pytest.mark.parametrize("case", ONE_RAW_INPUT)
def test_one_raw_input_answers_as_the_general_path(lr_model, case):
    plane = DataPlane(ort.InferenceSession(str(lr_model)), "lr", "1")
    request = ONE_RAW_INPUT[case]()
    assert len(request.inputs) == 1 and len(request.raw_input_contents) == 1
    outputs = [out.name for out in request.outputs]
    tensor, raw = request.inputs[0], request.raw_input_contents[0]
    general = outcome(lambda: plane.infer("lr", request.model_version,
                                          wire_inputs(request.inputs, request.raw_input_contents), outputs))
    assert outcome(lambda: plane.infer_raw("lr", request.model_version, tensor, raw, outputs)) == general
    assert (general[0] == "answer") == (case in ("good", "no rows", "one output"))


def test_graceful_stop_goes_not_serving_then_closes_the_session(lr_model):
    class Closing:
        closed = False

        def __init__(self):
            self.inner = ort.InferenceSession(str(lr_model))
            self.run, self.get_inputs, self.get_outputs = self.inner.run, self.inner.get_inputs, self.inner.get_outputs

        def close(self):
            self.closed = True

    session = Closing()
    with running(session, "lr") as served:
        watch = served.health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == SERVING
        assert not session.closed
        served.server.stop(grace=0.5)  # the open Watch keeps the server busy only until the grace ends
        statuses = []
        with pytest.raises(grpc.RpcError):
            for update in watch:
                statuses.append(update.status)
        assert statuses[:1] == [NOT_SERVING]
        assert session.closed
        with pytest.raises(grpc.RpcError) as info:
            served.stub.ServerLive(pb.ServerLiveRequest())
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# --- edge cases that once ended in INTERNAL ------------------------------------------

def test_zero_rows_to_a_zipmap_model_answer_zero_rows(lr_zipmap):
    empty = {"X": x_rows(0)}
    got = decode(lr_zipmap.stub.ModelInfer(raw_request("lr_zipmap", empty)))
    assert got["output_label"].shape == (0,)
    assert got["output_probability"].shape[0] == 0
    lr_zipmap.stub.ModelInfer(raw_request("lr_zipmap", {"X": x_rows(2)}))  # now the class count is known
    got = decode(lr_zipmap.stub.ModelInfer(raw_request("lr_zipmap", empty)))
    assert got["output_probability"].shape == (0, 2)


@pytest.mark.parametrize("body", [b"\xff\xff\xff", b"\x0a\x05\xff\xfe\xfd\xfc\xfb", b"\x12\x02\x0a"])
def test_an_undecodable_body_is_invalid_argument_in_one_log_line(lr, body, caplog):
    channel = grpc.insecure_channel(f"127.0.0.1:{lr.server.port}")
    try:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with caplog.at_level("WARNING"):
            with pytest.raises(grpc.RpcError) as info:
                call(body)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid inference.ModelInferRequest" in info.value.details()
        assert [r.name for r in caplog.records] == ["agent.guard"]  # no traceback from gRPC
        assert caplog.records[0].exc_info is None
    finally:
        channel.close()
    feeds = {"X": x_rows()}
    assert_matches_onnxruntime(lr, lr.stub.ModelInfer(raw_request("lr", feeds)), feeds)


@pytest.mark.parametrize("name", ["n" * 20_000, "é" * 20_000])
def test_a_huge_model_name_is_not_found_with_the_start_of_the_message(lr, name):
    for call in (lambda: lr.stub.ModelInfer(raw_request(name, {"X": x_rows(1)})),
                 lambda: lr.stub.ModelMetadata(pb.ModelMetadataRequest(name=name))):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert info.value.details().startswith(f"model '{name[:100]}")
        assert info.value.details().endswith("more characters cut)")


@pytest.mark.parametrize("text", ["short", "x" * 2048, "é" * 341, "%" * 682])
def test_clip_details_keeps_a_message_that_fits(text):
    assert clip_details(text) == text


@pytest.mark.parametrize("text", ["x" * 2049, "é" * 342, "%" * 683, "model 'n" + "n" * 10**7 + "' is not served"])
def test_clip_details_keeps_the_start_of_one_that_does_not(text):
    clipped = clip_details(text)
    encoded = urllib.parse.quote(clipped.encode(), safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")
    assert len(encoded) <= MAX_DETAILS_BYTES
    kept = clipped.rsplit("... (", 1)[0]
    assert text.startswith(kept) and len(kept) > 100
    assert clipped.endswith(f"({len(text) - len(kept)} more characters cut)")


def test_decode_guard_refuses_a_bad_message_in_a_stream():
    """The collector's agent stream is bidirectional: the guard works for streaming requests too."""
    seen = []

    def echo(requests, context):
        for request in requests:
            seen.append(request.model_name)
            yield request

    handler = grpc.method_handlers_generic_handler("test.Echo", {"Echo": grpc.stream_stream_rpc_method_handler(
        echo, request_deserializer=pb.ModelInferRequest.FromString,
        response_serializer=pb.ModelInferRequest.SerializeToString)})
    guard = DecodeGuard()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler], interceptors=[guard])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream("/test.Echo/Echo", request_serializer=lambda b: b,
                                         response_deserializer=pb.ModelInferRequest.FromString)
            good = pb.ModelInferRequest(model_name="a").SerializeToString()
            with pytest.raises(grpc.RpcError) as info:
                list(call(iter([good, b"\xff\xff", good])))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid inference.ModelInferRequest" in info.value.details()
    finally:
        server.stop(0)
    assert seen == ["a"] and guard.refused == 1
