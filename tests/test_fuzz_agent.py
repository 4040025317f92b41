"""Fuzzing the agent's port: ModelInfer and Feedback requests built by hypothesis, sent to real servers.

Each server is ``serve(MonitoredSession(...))`` on loopback, with small
feedback budgets so that the bounds are reached. Every request must end in OK
or a clean status with a message (never INTERNAL or UNKNOWN, never a
traceback in the log), the server must stay up, what callers made the agent
keep must stay within its budgets, every window's performance must be
consistent, and a valid request afterwards must get onnxruntime's answer.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import MonitoredSession, examples
from agent.errors import MAX_DETAILS_BYTES
from agent.feedback import OTHER_CLASS, FeedbackLimits
from agent.server import InferenceServer, serve
from agent.tensors import DATATYPES
from protos import agent_pb2, agent_pb2_grpc
from protos import open_inference_pb2 as pb
from protos import open_inference_pb2_grpc as pb_grpc
from test_server import decode, raw_request

CLEAN = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
         grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED}
LIMITS = FeedbackLimits(max_requests=50, max_bytes=256 * 1024, max_request_id_chars=64, max_classes=6,
                        max_class_chars=16)
MAX_RECEIVE = 4 * 1024 * 1024
HANG_GUARD = 60
FUZZ = settings(max_examples=250, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


@dataclass
class Target:
    name: str
    session: MonitoredSession
    server: InferenceServer
    channel: grpc.Channel

    @property
    def infer(self) -> pb_grpc.GRPCInferenceServiceStub:
        return pb_grpc.GRPCInferenceServiceStub(self.channel)

    @property
    def feedback(self) -> agent_pb2_grpc.FeedbackServiceStub:
        return agent_pb2_grpc.FeedbackServiceStub(self.channel)


class Problems(logging.Handler):
    """Errors logged anywhere while the fuzz runs: a traceback means a request ended badly."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def problems() -> Iterator[Problems]:
    handler = Problems()
    logging.getLogger().addHandler(handler)
    yield handler
    logging.getLogger().removeHandler(handler)


MODELS = {"lr": examples.logistic_regression, "lrz": lambda: examples.logistic_regression(zipmap=True),
          "mixed": examples.mixed_inputs_classifier, "typed": examples.typed_identity,
          "reg": lambda: examples.linear_regression(n_features=3)}


@pytest.fixture(scope="module")
def targets(problems) -> Iterator[dict[str, Target]]:
    running = {}
    try:
        for name, build in MODELS.items():
            session = MonitoredSession(build(), model_name=name, model_version="1", window_seconds=None,
                                       window_rows=200, summarizer="thread", feedback_limits=LIMITS)
            server = serve(session, name, "1", "127.0.0.1:0", workers=4, max_receive_bytes=MAX_RECEIVE)
            channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", -1)])
            running[name] = Target(name, session, server, channel)
        yield running
    finally:
        for target in running.values():
            target.channel.close()
            target.server.stop(grace=0)


def assert_clean(call, size: int = 0) -> object | None:
    """The reply, or None for a clean refusal; anything else fails the test. ``size``: of the request,
    which only a request over the server's limit may be refused for (RESOURCE_EXHAUSTED)."""
    try:
        return call()
    except grpc.RpcError as exc:
        assert exc.code() in CLEAN, (exc.code(), exc.details())
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # not a status too large for its trailer
            assert size > MAX_RECEIVE, exc.details()
        assert exc.details(), "a refusal says why"
        assert len(exc.details().encode()) <= MAX_DETAILS_BYTES
        return None


# ------------------------------------------------------------------ ModelInfer requests

HUGE = [2**31, 2**32 + 1, 2**62, 2**63 - 1, -1, -2**63]
dims = st.one_of(st.integers(0, 5), st.sampled_from(HUGE))
request_ids = st.one_of(st.text(max_size=80), st.sampled_from([64, 65, 10_000, 1 << 20]).map(lambda n: "i" * n))
names = st.text(max_size=12) | st.sampled_from(["X", "num", "city", "fp32_in", "bytes_in"]) | \
        st.integers(1000, 30_000).map(lambda n: "n" * n)


def mostly(value: object, other: st.SearchStrategy, one_in: int = 10) -> st.SearchStrategy:
    """``value`` except about once in ``one_in`` draws, then ``other`` (one_of would pick each half the time).
    The odd one out is a middle number: hypothesis draws the ends of a range more often than the rest."""
    return st.integers(0, one_in - 1).flatmap(lambda i: other if i == one_in // 2 else st.just(value))


def model_inputs(target: Target) -> list[tuple[str, str, tuple[int, ...]]]:
    plane = target.server.servicer.plane
    return [(spec.name, spec.datatype, spec.shape) for spec in plane.inputs]


def encode_bytes(elements: list[bytes]) -> bytes:
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


TYPED = {"BOOL": ("bool_contents", st.booleans()), "UINT8": ("uint_contents", st.integers(0, 2**32 - 1)),
         "UINT16": ("uint_contents", st.integers(0, 2**32 - 1)), "UINT32": ("uint_contents", st.integers(0, 2**32 - 1)),
         "UINT64": ("uint64_contents", st.integers(0, 2**64 - 1)), "INT8": ("int_contents", st.integers(-2**31, 2**31 - 1)),
         "INT16": ("int_contents", st.integers(-2**31, 2**31 - 1)), "INT32": ("int_contents", st.integers(-2**31, 2**31 - 1)),
         "INT64": ("int64_contents", st.integers(-2**63, 2**63 - 1)), "FP32": ("fp32_contents", st.floats(width=32)),
         "FP64": ("fp64_contents", st.floats()), "BYTES": ("bytes_contents", st.binary(max_size=40))}


@st.composite
def tensor(draw, name: str, datatype: str, shape: tuple[int, ...], rows: int, raw_form: bool) -> tuple[dict, bytes | None]:
    """One input, mostly right, sometimes wrong in one or more ways; (InferInputTensor fields, raw or None)."""
    name = draw(mostly(name, names))
    datatype = draw(mostly(datatype, st.sampled_from(list(DATATYPES) + ["FLOAT", ""])))
    shape = [rows if d < 0 else d for d in shape]
    if draw(mostly(False, st.just(True))):
        shape = draw(st.lists(dims, max_size=4))
    count = math.prod(shape) if all(d >= 0 for d in shape) and math.prod(shape) <= 2_000 else draw(st.integers(0, 50))
    count = draw(mostly(count, st.sampled_from([count + 1, max(count - 1, 0), 0])))
    fields = {"name": name, "datatype": datatype, "shape": shape}
    if draw(mostly(raw_form, st.just(not raw_form), 20)):  # one form for the request, now and then not
        if datatype == "BYTES":
            text = mostly(None, st.binary(max_size=40), 20).flatmap(
                lambda b: st.text(max_size=40).map(str.encode) if b is None else st.just(b))
            raw = encode_bytes(draw(st.lists(text, min_size=count, max_size=count)))
        elif datatype == "BOOL":
            raw = bytes(draw(st.lists(mostly(0, st.integers(0, 255), 50) | st.just(1), min_size=count,
                                      max_size=count)))
        elif datatype in DATATYPES:
            raw = draw(st.binary(min_size=count * DATATYPES[datatype].itemsize,
                                 max_size=count * DATATYPES[datatype].itemsize))
        else:
            raw = b""
        raw = draw(mostly(raw, st.sampled_from([raw[:-1], raw + b"\0", b"\xff\xff\xff\xff" + raw])))
        return fields, raw
    field, values = TYPED.get(datatype, ("fp32_contents", st.floats(width=32)))
    if draw(mostly(False, st.just(True))):
        field, values = draw(st.sampled_from(list(TYPED.values())))
    fields["contents"] = pb.InferTensorContents(**{field: draw(st.lists(values, min_size=count, max_size=count))})
    return fields, None


@st.composite
def infer_requests(draw, target: Target) -> pb.ModelInferRequest:
    rows = draw(st.integers(0, 6))
    request = pb.ModelInferRequest(
        model_name=draw(mostly(target.name, names, 20)),
        model_version=draw(mostly("", st.sampled_from(["1", "1", "2", "x" * 5000]), 5)), id=draw(request_ids))
    raw_form = draw(st.booleans())
    inputs = [draw(tensor(*spec, rows, raw_form)) for spec in model_inputs(target)]
    if inputs and draw(mostly(False, st.just(True), 20)):
        del inputs[draw(st.integers(0, len(inputs) - 1))]
    if inputs and draw(mostly(False, st.just(True), 20)):
        inputs.append(inputs[0])
    raw_given = [raw for _, raw in inputs if raw is not None]
    for fields, raw in inputs:
        request.inputs.add(**fields)
    if raw_given:
        request.raw_input_contents.extend(raw if raw is not None else b"" for _, raw in inputs)
    outputs = [spec.name for spec in target.server.servicer.plane.outputs]
    for name in draw(mostly([], st.lists(mostly(outputs[0], st.sampled_from(outputs) | names, 2), max_size=3), 3)):
        request.outputs.add(name=name)
    return request


def check_reply(target: Target, reply: pb.ModelInferResponse, request: pb.ModelInferRequest) -> None:
    assert reply.model_name == target.name and reply.id == request.id
    got = decode(reply)
    assert len({value.shape[0] for value in got.values() if value.ndim}) <= 1  # one row count across outputs


@pytest.mark.parametrize("name", list(MODELS))
def test_any_infer_request_ends_in_ok_or_a_clean_status(targets, problems, name):
    target = targets[name]

    @FUZZ
    @given(request=infer_requests(target))
    def fuzz(request: pb.ModelInferRequest) -> None:
        reply = assert_clean(lambda: target.infer.ModelInfer(request, timeout=HANG_GUARD), request.ByteSize())
        if reply is not None:
            check_reply(target, reply, request)

    fuzz()
    assert_still_serving_correctly(target)
    assert_bounded(target)
    assert not problems.records, [r.getMessage() for r in problems.records][:5]


def valid_feeds(name: str, rows: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    if name in ("lr", "lrz"):
        return {"X": rng.standard_normal((rows, 20)).astype(np.float32)}
    if name == "reg":
        return {"X": rng.standard_normal((rows, 3)).astype(np.float32)}
    if name == "mixed":
        return {"num": rng.standard_normal((rows, 3)).astype(np.float32),
                "city": np.array([["paris"], ["nice"], ["mars"]][:rows], dtype=object)}
    feeds = {}
    for kind, dtype in (("fp16", np.float16), ("fp32", np.float32), ("fp64", np.float64), ("int8", np.int8),
                        ("int16", np.int16), ("int32", np.int32), ("int64", np.int64), ("uint8", np.uint8),
                        ("bool", np.bool_)):
        feeds[f"{kind}_in"] = (rng.standard_normal((rows, 2)) * 10).astype(dtype)
    feeds["bytes_in"] = np.array([["a", "bé"]] * rows, dtype=object)
    return feeds


def assert_still_serving_correctly(target: Target) -> None:
    feeds = valid_feeds(target.name)
    reply = target.infer.ModelInfer(raw_request(target.name, feeds, id="after-the-fuzz"), timeout=HANG_GUARD)
    got = decode(reply)
    bare = target.session.inference_session
    expected = bare.run(None, feeds)
    for out, want in zip(bare.get_outputs(), expected):
        if isinstance(want, list):  # ZipMap: served as [N, classes]
            want = np.array([list(row.values()) for row in want], dtype=np.float32)
        np.testing.assert_array_equal(got[out.name], want)


def assert_bounded(target: Target) -> None:
    predictions = target.session.predictions
    if predictions is None:
        return
    stats = predictions.stats()
    assert stats["held"] <= LIMITS.max_requests and stats["held_bytes"] <= LIMITS.max_bytes
    for window in target.session.sink.windows:
        assert_consistent(window.performance)
    assert_consistent(predictions.take_performance())


def assert_consistent(perf) -> None:
    n = len(perf.classes)
    assert n <= LIMITS.max_classes and len(set(perf.classes)) == n
    assert all(c == OTHER_CLASS or (len(c) <= LIMITS.max_class_chars and c.isprintable()) for c in perf.classes)
    assert len(perf.confusion) == n * n
    if n:
        assert sum(perf.confusion) == perf.labeled
    assert all(map(math.isfinite, (perf.error_sum, perf.abs_error_sum, perf.sq_error_sum)))


# ------------------------------------------------------------------ bodies that are not messages at all

METHODS = ["/inference.GRPCInferenceService/ModelInfer", "/inference.GRPCInferenceService/ModelMetadata",
           "/outrider.v1.FeedbackService/Feedback"]


@st.composite
def bodies(draw) -> bytes:
    """Random bytes, or a valid request with a few bytes changed, cut or added."""
    valid = raw_request("lr", valid_feeds("lr", 2), id="body").SerializeToString()
    body = draw(st.binary(max_size=200) | st.just(valid))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, max(len(body) - 1, 0)))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and body:
            body = body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1:]
        elif action == "cut":
            body = body[:at]
        else:
            body = body[:at] + draw(st.binary(min_size=1, max_size=8)) + body[at:]
    return body


def test_any_request_body_ends_in_ok_or_a_clean_status(targets, problems):
    target = targets["lr"]
    calls = {method: target.channel.unary_unary(method, request_serializer=lambda b: b,
                                                response_deserializer=lambda b: b) for method in METHODS}

    @FUZZ
    @given(method=st.sampled_from(METHODS), body=bodies())
    def fuzz(method: str, body: bytes) -> None:
        assert_clean(lambda: calls[method](body, timeout=HANG_GUARD), len(body))

    fuzz()
    assert_still_serving_correctly(target)
    assert not problems.records, [r.getMessage() for r in problems.records][:5]


# ------------------------------------------------------------------ Feedback requests

labels_text = st.one_of(st.text(max_size=20), st.sampled_from(["0", "1", "2", OTHER_CLASS]),
                        st.integers(17, 5000).map(lambda n: "c" * n), st.text(max_size=3).map(lambda t: t + "\x00\n"))
targets_values = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.floats(),
                           st.sampled_from([0.0, 1e154, -1e154, 1e308]))


@st.composite
def feedback_requests(draw, known_ids: list[str], kind: str) -> agent_pb2.FeedbackRequest:
    labels = []
    usual = draw(mostly(kind, st.just("target" if kind == "class_label" else "class_label"), 5))
    for _ in range(draw(st.integers(0, 12))):
        label = agent_pb2.Label(request_id=draw(mostly(known_ids[0], st.sampled_from(known_ids) | request_ids, 2)),
                                row=draw(mostly(0, st.integers(0, 8) | st.sampled_from([2**31, 2**32 - 1]), 2)))
        kind = draw(mostly(usual, st.sampled_from(["class_label", "target", "none"]), 20))
        if kind == "class_label":
            label.class_label = draw(labels_text)
        elif kind == "target":
            label.target = draw(targets_values)
        labels.append(label)
    return agent_pb2.FeedbackRequest(labels=labels)


@pytest.mark.parametrize("name", ["lr", "reg", "typed"])
def test_any_feedback_request_ends_in_ok_or_a_clean_status(targets, problems, name):
    target = targets[name]
    known = [f"fb-{i}" for i in range(8)]

    @FUZZ
    @given(request=feedback_requests(known, "target" if name == "reg" else "class_label"), refresh=st.integers(0, 9))
    def fuzz(request: agent_pb2.FeedbackRequest, refresh: int) -> None:
        if refresh == 0:  # new predictions under the ids labels are sent for (some rows at least exist)
            for request_id in known:
                target.infer.ModelInfer(raw_request(name, valid_feeds(name), id=request_id), timeout=HANG_GUARD)
        reply = assert_clean(lambda: target.feedback.Feedback(request, timeout=HANG_GUARD), request.ByteSize())
        if reply is not None:
            assert reply.matched + reply.unmatched == len(request.labels)

    fuzz()
    assert_still_serving_correctly(target)
    assert_bounded(target)
    assert not problems.records, [r.getMessage() for r in problems.records][:5]


def test_a_flood_of_distinct_classes_and_ids_stays_within_the_budgets(targets):
    """What the fuzz reaches by chance, on purpose: many classes, many ids, ids over the limit."""
    target = targets["lr"]
    feeds = valid_feeds("lr", rows=3)
    for i in range(200):
        target.infer.ModelInfer(raw_request("lr", feeds, id=f"flood-{i}"), timeout=HANG_GUARD)
        target.infer.ModelInfer(raw_request("lr", feeds, id=f"flood-{i}-" + "x" * 64), timeout=HANG_GUARD)
    labels = [agent_pb2.Label(request_id=f"flood-{i}", class_label=f"class-{i}-{row}", row=row)
              for i in range(150, 200) for row in range(3)]
    reply = target.feedback.Feedback(agent_pb2.FeedbackRequest(labels=labels), timeout=HANG_GUARD)
    assert reply.matched == len(labels)
    stats = target.session.predictions.stats()
    assert stats["held"] <= LIMITS.max_requests and stats["ids_too_long"] >= 200 and stats["evicted"] >= 150
    assert stats["other_class_labels"] >= len(labels) - LIMITS.max_classes
    perf = target.session.predictions.take_performance()
    assert_consistent(perf)
    assert OTHER_CLASS in perf.classes

