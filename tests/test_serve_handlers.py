"""The agent port's handlers, wrapped once at registration (agent.handlers): every method still guarded,
ModelInfer's one layer answering and counting every outcome as the interceptors did, each call counted once."""
from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent import tensors
from agent.metrics import AgentMetrics
from agent.server import serve
from agent.tokens import ClientAuth
from protos import open_inference_pb2 as pb
from test_agent_auth import AUTH_TOML, LABELER, WEB, bearer
from test_server import raw_request, x_rows

HANG_GUARD = 60
INFER = "/inference.GRPCInferenceService/ModelInfer"


@contextmanager
def agent(lr_model, **kw) -> Iterator[tuple]:
    metrics = AgentMetrics()
    server = serve(ort.InferenceSession(str(lr_model)), "lr", "1", "127.0.0.1:0", metrics=metrics, **kw)
    channel = grpc.insecure_channel(server.address)
    try:
        yield server, metrics, channel
    finally:
        channel.close()
        server.stop(grace=0)


def counts(metrics: AgentMetrics) -> tuple[float, float, dict[str, float]]:
    """(requests, latency observations, failures by reason) of model lr version 1."""
    get = metrics.registry.get_sample_value
    labels = {"model": "lr", "version": "1"}
    failures = {}
    for reason in ("INVALID_ARGUMENT", "NOT_FOUND", "INTERNAL", "UNAUTHENTICATED", "PERMISSION_DENIED"):
        value = get("outrider_agent_request_failures_total", {**labels, "reason": reason})
        if value:
            failures[reason] = value
    return (get("outrider_agent_requests_total", labels) or 0,
            get("outrider_agent_inference_latency_seconds_count", labels) or 0, failures)


@pytest.fixture(params=[True, False], ids=["asyncio", "threads"])
def asynchronous(request) -> bool:
    """Both servers the port can run (``--grpc-server``): the same handlers, statuses and counts."""
    return request.param


def raw_call(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)


def test_without_tokens_the_port_runs_no_interceptor_and_every_method_is_still_guarded(lr_model, asynchronous):
    with agent(lr_model, asynchronous=asynchronous) as (server, _, channel):
        assert server.interceptors == []  # nothing runs per call before our handlers
        for method, message in (("/inference.GRPCInferenceService/ModelMetadata", "inference.ModelMetadataRequest"),
                                ("/outrider.v1.FeedbackService/Feedback", "outrider.v1.FeedbackRequest"),
                                ("/grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest"),
                                (INFER, "inference.ModelInferRequest")):
            with pytest.raises(grpc.RpcError) as info:
                raw_call(channel, method)(b"\xff\xff\xff", timeout=HANG_GUARD)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert f"not a valid {message}" in info.value.details()
        assert server.refusals()["undecodable"] == 4
        with pytest.raises(grpc.RpcError) as info:  # the Feedback method's own limit, before any decoding
            raw_call(channel, "/outrider.v1.FeedbackService/Feedback")(b"\0" * (9 * 1024 * 1024), timeout=HANG_GUARD)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and server.refusals()["too_large"] == 1
        health = health_pb2_grpc.HealthStub(channel)  # and a body that decodes is served
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=HANG_GUARD).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_model_infer_counts_every_outcome_once_with_its_code(lr_model, monkeypatch, caplog, asynchronous):
    with agent(lr_model, asynchronous=asynchronous) as (server, metrics, channel):
        infer = raw_call(channel, INFER)
        good = raw_request("lr", {"X": x_rows(2)}).SerializeToString()
        for _ in range(3):
            infer(good, timeout=HANG_GUARD)
        with pytest.raises(grpc.RpcError):
            infer(b"\xff\xff\xff", timeout=HANG_GUARD)  # refused by the guard: INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError):
            infer(raw_request("nope", {"X": x_rows(2)}).SerializeToString(), timeout=HANG_GUARD)
        assert counts(metrics) == (5, 5, {"INVALID_ARGUMENT": 1, "NOT_FOUND": 1})

        def broken(array):
            raise RuntimeError("a bug")

        monkeypatch.setattr(tensors, "wire_form", broken)  # a bug in the servicer: INTERNAL, logged as one
        caplog.clear()
        with caplog.at_level("ERROR"), pytest.raises(grpc.RpcError) as info:
            infer(good, timeout=HANG_GUARD)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert info.value.details() == "internal error: RuntimeError: a bug"
        assert [r.getMessage() for r in caplog.records] == ["unhandled error in InferenceServicer.ModelInfer"]
        assert counts(metrics) == (6, 6, {"INVALID_ARGUMENT": 1, "NOT_FOUND": 1, "INTERNAL": 1})


def test_with_tokens_refused_and_answered_calls_are_each_counted_once(lr_model, asynchronous):
    with agent(lr_model, auth=ClientAuth.from_toml(AUTH_TOML), asynchronous=asynchronous) as (server, metrics, channel):
        infer = raw_call(channel, INFER)
        good = raw_request("lr", {"X": x_rows(2)}).SerializeToString()
        for _ in range(4):
            infer(good, metadata=bearer(WEB), timeout=HANG_GUARD)
        with pytest.raises(grpc.RpcError):
            infer(good, timeout=HANG_GUARD)  # no token
        with pytest.raises(grpc.RpcError):
            infer(good, metadata=bearer(LABELER), timeout=HANG_GUARD)  # a token that may not infer
        with pytest.raises(grpc.RpcError):
            infer(b"\xff\xff\xff", metadata=bearer(WEB), timeout=HANG_GUARD)
        assert counts(metrics) == (7, 7, {"UNAUTHENTICATED": 1, "PERMISSION_DENIED": 1, "INVALID_ARGUMENT": 1})
        assert server.refusals() == {"undecodable": 1, "too_large": 0, "unauthenticated": 1, "permission_denied": 1}


def test_a_reply_is_the_same_through_the_servicer_called_directly(lr_model, asynchronous):
    with agent(lr_model, asynchronous=asynchronous) as (server, _, channel):
        request = raw_request("lr", {"X": x_rows(3)}, id="r-1")
        over_grpc = pb.ModelInferResponse.FromString(raw_call(channel, INFER)(request.SerializeToString(),
                                                                              timeout=HANG_GUARD))
        assert server.servicer.ModelInfer(request, None) == over_grpc == server.servicer.infer(request)


class Recording:
    """An onnxruntime session that notes which thread runs each call and how many run at once; each call
    is held ``hold`` seconds first, so that calls that can overlap do."""

    def __init__(self, lr_model, hold: float) -> None:
        self.session = ort.InferenceSession(str(lr_model))
        self.hold = hold
        self.threads: set[str] = set()
        self.running = self.most = 0
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, output_names, feed, run_options=None):
        with self.lock:
            self.threads.add(threading.current_thread().name)
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(self.hold)  # what a slow model's run looks like to the server: the GIL is free
            return self.session.run(output_names, feed, run_options)
        finally:
            with self.lock:
                self.running -= 1


def concurrent_infers(address: str, calls: int) -> list[grpc.StatusCode]:
    request = raw_request("lr", {"X": x_rows(1)})
    with grpc.insecure_channel(address) as channel:
        infer = channel.unary_unary(INFER, request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        futures = [infer.future(request, timeout=HANG_GUARD) for _ in range(calls)]
        return [f.exception().code() if f.exception() else grpc.StatusCode.OK for f in futures]


def test_model_infer_runs_on_the_event_loop_one_at_a_time_and_a_slow_model_is_told_to_use_threads(lr_model, caplog):
    session = Recording(lr_model, hold=0.15)
    running = serve(session, "lr", "1", "127.0.0.1:0")
    try:
        with caplog.at_level(logging.WARNING, logger="agent.handlers"):
            assert concurrent_infers(running.address, 4) == [grpc.StatusCode.OK] * 4
    finally:
        running.stop(grace=0)
    assert session.threads == {"outrider-grpc"} and session.most == 1  # no hand-off, so no overlap
    slow = [r.getMessage() for r in caplog.records if "event loop" in r.getMessage()]
    assert len(slow) == 1 and "--threaded-infer" in slow[0]  # said once, with what to do


def test_threaded_infer_runs_model_infer_side_by_side_on_the_worker_threads(lr_model, caplog):
    session = Recording(lr_model, hold=0.15)
    running = serve(session, "lr", "1", "127.0.0.1:0", workers=4, threaded_infer=True)
    try:
        with caplog.at_level(logging.WARNING, logger="agent.handlers"):
            assert concurrent_infers(running.address, 4) == [grpc.StatusCode.OK] * 4
    finally:
        running.stop(grace=0)
    assert all(name.startswith("outrider-infer") for name in session.threads) and session.most > 1
    assert not [r for r in caplog.records if "event loop" in r.getMessage()]


def test_the_threads_server_runs_every_call_on_a_worker_thread_side_by_side_and_drains_on_stop(lr_model, caplog):
    session = Recording(lr_model, hold=0.3)
    running = serve(session, "lr", "1", "127.0.0.1:0", workers=4, asynchronous=False)
    assert running.loop is None  # no event loop: grpcio's own thread pool
    results: list[list[grpc.StatusCode]] = []
    with caplog.at_level(logging.WARNING, logger="agent.handlers"):
        calling = threading.Thread(target=lambda: results.append(concurrent_infers(running.address, 4)))
        calling.start()
        deadline = time.monotonic() + HANG_GUARD
        while session.running < 2 and time.monotonic() < deadline:  # calls under way, side by side
            time.sleep(0.01)
        assert session.running >= 2
        # a stop now must let them finish
        running.stop(grace=10)
        calling.join(HANG_GUARD)
    assert results == [[grpc.StatusCode.OK] * 4]
    assert all(name.startswith("outrider-infer") for name in session.threads) and session.most > 1
    assert not [r for r in caplog.records if "event loop" in r.getMessage()]  # nothing to warn about
    with grpc.insecure_channel(running.address) as channel, pytest.raises(grpc.RpcError) as info:
        raw_call(channel, INFER)(raw_request("lr", {"X": x_rows(1)}).SerializeToString(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # stopped


def test_stopping_while_calls_fail_leaves_no_pending_task_to_log_errors_later(lr_model, caplog):
    from protos import agent_pb2, agent_pb2_grpc

    too_many = agent_pb2.FeedbackRequest(labels=[agent_pb2.Label(request_id=str(i), class_label="1")
                                                 for i in range(10_002)])  # refused: over the per-call limit
    with caplog.at_level(logging.WARNING):
        for _ in range(5):  # the race is between a call's end and the loop's: give it several chances
            running = serve(ort.InferenceSession(str(lr_model)), "lr", "1", "127.0.0.1:0")
            channel = grpc.insecure_channel(running.address)
            calls = [agent_pb2_grpc.FeedbackServiceStub(channel).Feedback.future(too_many, timeout=HANG_GUARD)
                     for _ in range(8)]
            running.stop(grace=0)
            channel.close()
            for call in calls:
                call.exception()  # each ended, one way or another
            gc.collect()  # a task destroyed while pending would log here, in whatever code runs next
    noise = [r.getMessage() for r in caplog.records if r.name in ("asyncio", "grpc._cython.cygrpc")]
    assert noise == []


@pytest.mark.parametrize("choice, shared, expected", [("auto", False, True), ("auto", True, False),
                                                      ("asyncio", True, True), ("threads", False, False)])
def test_grpc_server_auto_is_asyncio_for_one_process_and_threads_for_each_of_several(choice, shared, expected):
    from argparse import Namespace

    from agent.cli import build_parser
    from agent.serve_cli import _asynchronous

    args = build_parser().parse_args(["agent", "serve", "--model", "m.onnx", "--grpc-server", choice])
    assert args.grpc_server == choice
    assert _asynchronous(args, shared) is expected  # shared: one of --processes N's (agent.supervisor)
    assert _asynchronous(Namespace(), shared) is (not shared)  # a namespace without the flag: auto
