"""The collector's gRPC endpoint: a real server on loopback over a real SQLite file, driven by raw stubs."""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.sketches import NumericSketch
from collector.api.server import CollectorServer, serve_collector
from collector.base.ingest import Limits
from collector.store.rollup import RetentionPolicy
from collector.store.store import Store
from protos import collector_pb2 as pb
from protos import collector_pb2_grpc as pb_grpc
from protos import summary_pb2

STORED, DUPLICATE, REJECTED = pb.WindowAck.STORED, pb.WindowAck.DUPLICATE, pb.WindowAck.REJECTED
HANG_GUARD = 60  # seconds: a deadline so that a bug fails the test instead of hanging it
NS = 1_000_000_000


def window(seq: int, *, agent: str = "edge-1", run: str = "run-1", model: str = "credit", version: str = "1",
           end_ns: int | None = None) -> summary_pb2.WindowSummary:
    """A small valid window: one numeric feature over 0..9."""
    end = end_ns if end_ns is not None else time.time_ns() - (100 - seq) * 10 * NS
    sketch = NumericSketch()
    sketch.update(np.arange(10.0))
    return summary_pb2.WindowSummary(
        agent_id=agent, run_id=run, seq=seq, model_name=model, model_version=version, model_sha256="ab" * 32,
        start_unix_nano=end - 10 * NS, end_unix_nano=end, rows=10, calls=2,
        columns=[sketch.to_proto("x", summary_pb2.ColumnSummary.FEATURE, "X")],
    )


def hello(agent: str = "edge-1", run: str = "run-1", **kw) -> pb.AgentMessage:
    return pb.AgentMessage(hello=pb.Hello(agent_id=agent, run_id=run, host="box", model_name="credit",
                                          model_version="1", started_unix_nano=time.time_ns(), **kw))


def batch(*windows: summary_pb2.WindowSummary) -> pb.AgentMessage:
    return pb.AgentMessage(windows=pb.WindowBatch(windows=windows))


class AgentConn:
    """One agent stream, driven a message at a time."""

    def __init__(self, stub: pb_grpc.AgentServiceStub, metadata: tuple = ()) -> None:
        self._requests: queue.Queue = queue.Queue()
        self.replies = stub.Stream(iter(self._requests.get, None), metadata=metadata, timeout=HANG_GUARD)

    def send(self, *messages: pb.AgentMessage) -> None:
        for message in messages:
            self._requests.put(message)

    def acks(self, n: int) -> list[pb.WindowAck]:
        got: list[pb.WindowAck] = []
        while len(got) < n:
            got.extend(next(self.replies).acks.acks)
        return got

    def close(self) -> list[pb.CollectorMessage]:
        """Half-close; the rest of the replies."""
        self._requests.put(None)
        return list(self.replies)

    def error(self) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            for _ in self.replies:
                pass
        return info.value


@dataclass
class Collector:
    server: CollectorServer
    channel: grpc.Channel
    agents: pb_grpc.AgentServiceStub
    ops: pb_grpc.OpsServiceStub

    def connect(self, *first: pb.AgentMessage) -> AgentConn:
        conn = AgentConn(self.agents)
        conn.send(*first)
        return conn

    def status(self) -> pb.StatusResponse:
        return self.ops.Status(pb.StatusRequest(), timeout=HANG_GUARD)

    def windows(self, **kw) -> list[pb.WindowInfo]:
        return list(self.ops.ListWindows(pb.ListWindowsRequest(**kw), timeout=HANG_GUARD).windows)


@contextmanager
def running(db, **kw) -> Iterator[Collector]:
    kw.setdefault("rollup_interval", 3600)
    server = serve_collector(db, "127.0.0.1:0", **kw)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Collector(server, channel, pb_grpc.AgentServiceStub(channel), pb_grpc.OpsServiceStub(channel))
    finally:
        channel.close()
        server.stop(grace=0)


@pytest.fixture
def collector(db_url) -> Iterator[Collector]:
    with running(db_url) as c:
        yield c


def results(acks: list[pb.WindowAck]) -> dict[int, int]:
    return {ack.seq: ack.result for ack in acks}


def test_windows_are_acked_after_commit_and_then_queryable(collector):
    conn = collector.connect(hello(), batch(window(0), window(1), window(2)))
    acks = conn.acks(3)
    assert results(acks) == {0: STORED, 1: STORED, 2: STORED}
    assert {ack.run_id for ack in acks} == {"run-1"}

    status = collector.status()
    [agent] = status.agents
    assert (agent.agent_id, agent.run_id, agent.host, agent.model_name) == ("edge-1", "run-1", "box", "credit")
    assert agent.connected and agent.windows == 3 and agent.rows == 30
    [model] = status.models
    assert (model.model_name, model.model_version, model.windows, model.rows) == ("credit", "1", 3, 30)
    assert status.counters.windows_stored == 3 and status.counters.windows_rejected == 0
    assert status.collector_version

    listed = collector.windows(model_name="credit")
    assert [w.seq for w in listed] == [2, 1, 0]  # newest first
    assert {(w.level, w.rows, w.calls) for w in listed} == {("raw", 10, 2)}
    [full] = collector.windows(model_name="credit", limit=1, include_summaries=True)
    assert full.summary.columns[0].name == "x" and full.summary.columns[0].count == 10
    assert conn.close() == []


def test_a_resent_window_is_acked_duplicate(collector):
    conn = collector.connect(hello(), batch(window(0), window(1)))
    assert results(conn.acks(2)) == {0: STORED, 1: STORED}
    conn.send(batch(window(1), window(2)))
    assert results(conn.acks(2)) == {1: DUPLICATE, 2: STORED}
    conn.close()
    again = collector.connect(hello(), batch(window(0)))  # reconnected: the spool resends
    assert results(again.acks(1)) == {0: DUPLICATE}
    again.close()
    counters = collector.status().counters
    assert (counters.windows_stored, counters.windows_duplicate) == (3, 2)
    assert len(collector.windows(model_name="credit")) == 3


def test_a_bad_window_is_rejected_with_its_reason_and_changes_nothing(collector):
    bad_times = window(1)
    bad_times.start_unix_nano = bad_times.end_unix_nano + 1
    corrupt = window(2)
    corrupt.columns[0].kll = b"\x00garbage"
    conn = collector.connect(hello(), batch(window(0), bad_times, corrupt))
    acks = {ack.seq: ack for ack in conn.acks(3)}
    assert acks[0].result == STORED
    assert acks[1].result == REJECTED and "after its end" in acks[1].reason
    assert acks[2].result == REJECTED and "sketch" in acks[2].reason
    conn.close()
    assert [w.seq for w in collector.windows(model_name="credit")] == [0]
    status = collector.status()
    assert status.counters.windows_rejected == 2 and status.counters.windows_stored == 1
    assert status.agents[0].windows == 1


def test_a_window_of_another_agent_is_rejected(collector):
    # (a window of another run of the same agent is fine: tests/test_delivery.py)
    conn = collector.connect(hello(), batch(window(0, agent="someone-else"), window(1, model="other")))
    acks = conn.acks(2)
    assert {ack.result for ack in acks} == {REJECTED}
    assert "window of agent 'someone-else' sent on the stream of agent 'edge-1'" in acks[0].reason
    assert "window of model 'other' sent on a stream whose hello names 'credit'" in acks[1].reason
    conn.close()
    assert collector.windows(model_name="credit") == []


@pytest.mark.parametrize("first", [
    [batch(window(0))],
    [pb.AgentMessage(status=pb.SpoolStatus())],
    [],
])
def test_the_first_message_must_be_hello(collector, first):
    conn = collector.connect(*first)
    conn.send(None)  # half-close
    error = conn.error()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "first message must be hello"
    assert collector.status().agents == []


@pytest.mark.parametrize("fields, words", [
    ({"agent": "", "run": " "}, "needs a non-empty agent_id and run_id"),
    ({"agent": "a" * 129}, "129 characters, at most 128 allowed"),
    ({"run": "run\x1b[2J"}, "non-printable"),
])
def test_a_bad_hello_is_invalid_argument_and_records_nothing(collector, fields, words):
    conn = collector.connect(hello(**fields))
    error = conn.error()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and words in error.details(), error.details()
    assert collector.status().agents == []


def test_a_second_hello_ends_the_stream(collector):
    conn = collector.connect(hello(), hello())
    error = conn.error()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "only once" in error.details()


def test_a_stream_without_hello_is_cancelled_and_frees_its_slot(tmp_path):
    with running(tmp_path / "c.db", limits=Limits(hello_seconds=0.5), max_agents=1) as collector:
        silent = collector.connect()  # opens the stream, never says hello
        assert silent.error().code() == grpc.StatusCode.CANCELLED
        for _ in range(100):  # the only slot is free again once the cancelled handler has returned
            conn = collector.connect(hello(), batch(window(0)))
            try:
                assert [a.result for a in conn.acks(1)] == [STORED]
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                time.sleep(0.1)
        else:
            raise AssertionError("the silent stream kept the collector's only agent slot")
        assert [a.agent_id for a in collector.status().agents] == ["edge-1"]


def test_a_batch_over_the_limit_is_invalid_argument(tmp_path):
    with running(tmp_path / "c.db", limits=Limits(max_windows_per_batch=2)) as collector:
        conn = collector.connect(hello(), batch(window(0), window(1), window(2)))
        error = conn.error()
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "over the limit of 2" in error.details()
        assert collector.windows(model_name="credit") == []


def test_a_full_write_queue_ends_the_stream_with_resource_exhausted_and_retry_after(db_url):
    store = Store(db_url, queue_max=1)  # a batch of two windows can never fit
    with running(db_url, store=store, retry_after_ms=250) as collector:
        conn = collector.connect(hello(), batch(window(0), window(1)))
        error = conn.error()
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "write queue full" in error.details()
        assert ("retry-after-ms", "250") in tuple(error.trailing_metadata())
        # The windows were not taken: the agent resends them once there is room.
        conn = collector.connect(hello(), batch(window(0)))
        assert results(conn.acks(1)) == {0: STORED}
        conn.close()


def test_status_messages_update_the_spool_and_disconnect_is_seen(collector):
    conn = collector.connect(hello(spool=pb.SpoolStatus(windows=9)),
                             pb.AgentMessage(status=pb.SpoolStatus(windows=4, bytes=4096, dropped_windows=2,
                                                                   dropped_rows=20)),
                             batch(window(0)))
    conn.acks(1)  # the stream is read in order: the status before it is committed too
    [agent] = collector.status().agents
    assert agent.connected
    assert (agent.spool.windows, agent.spool.bytes, agent.spool.dropped_windows, agent.spool.dropped_rows) == \
        (4, 4096, 2, 20)
    assert conn.close() == []
    [agent] = collector.status().agents
    assert not agent.connected


def test_a_new_run_of_the_same_agent_counts_as_a_restart(collector):
    first = collector.connect(hello(run="run-1"), batch(window(0, run="run-1")))
    first.acks(1)
    first.close()
    second = collector.connect(hello(run="run-2"), batch(window(0, run="run-2")))
    second.acks(1)
    agents = {a.run_id: a for a in collector.status().agents}
    assert not agents["run-1"].connected and agents["run-2"].connected
    assert agents["run-2"].restarts == 1
    second.close()


def test_list_windows_checks_its_arguments(collector):
    for request, words in [(pb.ListWindowsRequest(), "model_name is required"),
                           (pb.ListWindowsRequest(model_name="credit", limit=10_001), "maximum of 10000")]:
        with pytest.raises(grpc.RpcError) as info:
            collector.ops.ListWindows(request, timeout=HANG_GUARD)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in info.value.details()


def test_list_windows_filters_by_version_and_time(collector):
    now = time.time_ns()
    conn = collector.connect(hello(), batch(window(0, end_ns=now - 7200 * NS), window(1, end_ns=now - 60 * NS),
                                            window(2, version="2", end_ns=now - 30 * NS)))
    conn.acks(3)
    conn.close()
    assert [w.seq for w in collector.windows(model_name="credit", model_version="1")] == [1, 0]
    assert [w.seq for w in collector.windows(model_name="credit", since_unix_nano=now - 3600 * NS)] == [2, 1]
    assert [w.seq for w in collector.windows(model_name="credit", limit=1)] == [2]
    assert collector.windows(model_name="other") == []


def test_health_is_serving_then_graceful_stop_ends_agent_streams_and_commits(db_url):
    db = db_url
    server = serve_collector(db, "127.0.0.1:0", rollup_interval=3600)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "outrider.v1.AgentService", "outrider.v1.OpsService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=HANG_GUARD)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=HANG_GUARD)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        conn = AgentConn(pb_grpc.AgentServiceStub(channel))
        conn.send(hello(), batch(window(0), window(1)))
        assert results(conn.acks(2)) == {0: STORED, 1: STORED}

        stopping = threading.Thread(target=server.stop, args=(HANG_GUARD,))
        stopping.start()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        # The open stream is told to go (and reconnect elsewhere) rather than held until the grace ends.
        error = conn.error()
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in error.details()
        stopping.join()
    with Store(db) as store:
        assert len(store.windows("credit")) == 2
        [agent] = store.agents()
        assert not agent.connected


def test_the_rollup_loop_merges_old_windows(db_url):
    old = time.time_ns() - 3 * 3600 * NS
    policy = RetentionPolicy(raw_seconds=3600)
    with running(db_url, retention=policy, rollup_interval=0.05) as collector:
        conn = collector.connect(hello(), batch(*[window(i, end_ns=old + i * 10 * NS) for i in range(3)]))
        conn.acks(3)
        conn.close()
        deadline = time.monotonic() + HANG_GUARD  # a hang guard, not a timing assertion
        while (levels := {w.level for w in collector.windows(model_name="credit")}) == {"raw"}:
            assert time.monotonic() < deadline, "the rollup loop never ran"
            time.sleep(0.05)
        assert "raw" not in levels
        assert sum(w.rows for w in collector.windows(model_name="credit")) == 30
        assert collector.status().models[0].rows == 30


def test_undecodable_bodies_are_invalid_argument_in_one_log_line_and_the_stream_keeps_what_it_acked(collector, caplog):
    """A garbage message mid-stream (or a garbage ops request) is INVALID_ARGUMENT naming the message type,
    logged in one line without a traceback; what was acked before it stays stored, the collector serves on."""
    raw = collector.channel.stream_stream("/outrider.v1.AgentService/Stream", request_serializer=lambda b: b,
                                          response_deserializer=pb.CollectorMessage.FromString)
    good = [hello().SerializeToString(), batch(window(0)).SerializeToString()]
    with caplog.at_level("WARNING"):
        with pytest.raises(grpc.RpcError) as info:
            list(raw(iter([*good, b"\xff\xff\xff"]), timeout=HANG_GUARD))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid outrider.v1.AgentMessage" in info.value.details()
        unary = collector.channel.unary_unary("/outrider.v1.OpsService/Status", request_serializer=lambda b: b,
                                              response_deserializer=pb.StatusResponse.FromString)
        with pytest.raises(grpc.RpcError) as info:
            unary(b"\x0a\xff", timeout=HANG_GUARD)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not [r for r in caplog.records if r.exc_info], "no traceback"
    assert [w.seq for w in collector.windows(model_name="credit")] in ([0], [])  # acked or not, never half
    conn = collector.connect(hello(run="run-2"), batch(window(0, run="run-2")))
    assert results(conn.acks(1)) == {0: STORED}
