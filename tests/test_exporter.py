"""CollectorExporter against an in-process fake collector on loopback.

The fake records what arrives, acks after "storing" (by the idempotency key),
and can be told to reject windows, refuse streams, drop a stream mid-way, or
stop acking. Waits are wait-until loops with generous deadlines, never timings.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from agent import MonitoredSession, examples
from agent.exporter import CollectorExporter
from agent.hello import hello_for
from protos import collector_pb2, collector_pb2_grpc, summary_pb2

Ack = collector_pb2.WindowAck
FAST = {"initial_backoff": 0.05, "max_backoff": 0.5}  # our own backoff, kept short for tests


def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def window(seq: int, rows: int = 5, run_id: str = "run1") -> summary_pb2.WindowSummary:
    return summary_pb2.WindowSummary(agent_id="agent1", run_id=run_id, seq=seq, rows=rows, model_name="m",
                                     model_version="1")


class FakeCollector(collector_pb2_grpc.AgentServiceServicer):
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.hellos: list[collector_pb2.Hello] = []
        self.statuses: list[collector_pb2.SpoolStatus] = []
        self.metadata: list[dict] = []
        self.received: list[summary_pb2.WindowSummary] = []  # every arrival, resends included
        self.batches: list[int] = []
        self.stored: set[tuple[str, str, int]] = set()
        self.results: list[int] = []
        self.acking = True
        self.reject_seqs: set[int] = set()
        self.token: str | None = None            # required bearer token, if set
        self.refuse: list[tuple] = []            # (code, details, trailing metadata) for the next streams
        self.drop_after: int | None = None       # abort the stream (UNAVAILABLE) after this many arrivals
        self.max_unacked = 0

    def set(self, **changes) -> None:
        with self.cond:
            for name, value in changes.items():
                setattr(self, name, value)
            self.cond.notify_all()

    def unique(self) -> int:
        with self.cond:
            return len(self.stored)

    def Stream(self, request_iterator, context):
        metadata = dict(context.invocation_metadata())
        with self.cond:
            self.metadata.append(metadata)
            refusal = self.refuse.pop(0) if self.refuse else None
            if refusal is None and self.token is not None and metadata.get("authorization") != f"Bearer {self.token}":
                refusal = (grpc.StatusCode.UNAUTHENTICATED, "bad token", ())
        if refusal:
            code, details, trailing = refusal
            context.set_trailing_metadata(trailing)
            context.abort(code, details)
        stream = {"unacked": [], "done": False, "fail": False}
        threading.Thread(target=self._read, args=(request_iterator, stream), daemon=True).start()
        while context.is_active():
            with self.cond:
                self.cond.wait_for(lambda: stream["done"] or stream["fail"] or (self.acking and stream["unacked"]),
                                   timeout=0.1)
                if stream["fail"]:
                    break
                acks = []
                if self.acking:
                    acks = [self._store(w) for w in stream["unacked"]]
                    stream["unacked"] = []
                finished = stream["done"] and not stream["unacked"]
            if acks:
                yield collector_pb2.CollectorMessage(acks=collector_pb2.Acks(acks=acks))
            if finished:
                return
        if stream["fail"]:
            context.abort(grpc.StatusCode.UNAVAILABLE, "collector going away")

    def _store(self, w: summary_pb2.WindowSummary) -> collector_pb2.WindowAck:
        key = (w.agent_id, w.run_id, w.seq)
        if w.seq in self.reject_seqs:
            result = Ack.REJECTED
        elif key in self.stored:
            result = Ack.DUPLICATE
        else:
            self.stored.add(key)
            result = Ack.STORED
        self.results.append(result)
        return Ack(run_id=w.run_id, seq=w.seq, result=result,
                   reason="bad window" if result == Ack.REJECTED else "")

    def _read(self, request_iterator, stream) -> None:
        try:
            for message in request_iterator:
                with self.cond:
                    kind = message.WhichOneof("kind")
                    if kind == "hello":
                        self.hellos.append(message.hello)
                    elif kind == "status":
                        self.statuses.append(message.status)
                    else:
                        windows = list(message.windows.windows)
                        self.batches.append(len(windows))
                        self.received.extend(windows)
                        stream["unacked"].extend(windows)
                        self.max_unacked = max(self.max_unacked, len(stream["unacked"]))
                        if self.drop_after is not None and len(self.received) >= self.drop_after:
                            self.drop_after = None
                            stream["fail"] = True
                    self.cond.notify_all()
        except Exception:  # the stream was cancelled
            pass
        finally:
            with self.cond:
                stream["done"] = True
                self.cond.notify_all()


class Collector:
    """The fake behind a real gRPC server on 127.0.0.1; can be stopped and started on the same port."""

    def __init__(self, port: int = 0) -> None:
        self.fake = FakeCollector()
        self.server: grpc.Server | None = None
        self.port = port
        self.start()

    def start(self) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        collector_pb2_grpc.add_AgentServiceServicer_to_server(self.fake, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        server.start()
        self.server = server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0).wait()
            self.server = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HELLO = collector_pb2.Hello(agent_id="agent1", run_id="run1", model_name="m", model_version="1")


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.stop()


@pytest.fixture
def make_exporter(tmp_path):
    made: list[CollectorExporter] = []

    def make(target: str, spool_dir=None, **kw) -> CollectorExporter:
        kw = {**FAST, **kw}
        exporter = CollectorExporter(target, hello=HELLO, spool_dir=spool_dir or tmp_path / "spool", **kw)
        made.append(exporter)
        return exporter

    yield make
    for exporter in made:
        exporter.close(timeout=1)


def test_windows_are_delivered_and_acked(collector, make_exporter):
    exporter = make_exporter(collector.target)
    for i in range(10):
        exporter.export(window(i))
    wait_until(lambda: exporter.stats()["spool_windows"] == 0, what="all acked")
    fake = collector.fake
    assert fake.unique() == 10
    assert [w.seq for w in fake.received] == list(range(10))  # oldest first
    assert fake.hellos[0].agent_id == "agent1" and fake.hellos[0].model_name == "m"
    stats = exporter.stats()
    assert stats["windows_acked"] == 10 and stats["windows_sent"] >= 10
    assert stats["connected"] is True
    assert not list((exporter.spool.directory).glob("*.win"))


def test_agent_started_before_the_collector(make_exporter):
    port = free_port()
    exporter = make_exporter(f"127.0.0.1:{port}")
    for i in range(5):
        exporter.export(window(i))
    wait_until(lambda: exporter.stats()["retries"] >= 2, what="failed attempts")
    stats = exporter.stats()
    assert stats["spool_windows"] == 5 and stats["connected"] is False
    collector = Collector(port)
    try:
        wait_until(lambda: collector.fake.unique() == 5, what="delivery once the collector is up")
        wait_until(lambda: exporter.stats()["spool_windows"] == 0, what="spool emptied")
        assert collector.fake.hellos[0].spool.windows == 5  # the Hello tells what is waiting
    finally:
        collector.stop()


def test_collector_restarted_mid_stream(collector, make_exporter):
    exporter = make_exporter(collector.target)
    for i in range(10):
        exporter.export(window(i))
    wait_until(lambda: collector.fake.unique() == 10)
    collector.stop()
    for i in range(10, 20):
        exporter.export(window(i))  # the collector is down: these wait in the spool
    wait_until(lambda: exporter.stats()["retries"] >= 1, what="a retry")
    assert exporter.stats()["spool_windows"] == 10
    collector.start()  # same port, same (fake) store
    wait_until(lambda: collector.fake.unique() == 20, what="everything delivered after the restart")
    wait_until(lambda: exporter.stats()["spool_windows"] == 0)
    assert len(collector.fake.hellos) >= 2


def test_stream_dropped_mid_batch_resends_and_duplicates_are_fine(collector, make_exporter):
    collector.fake.set(acking=False, drop_after=6)  # takes 6 windows, acks none, then aborts UNAVAILABLE
    exporter = make_exporter(collector.target)
    for i in range(10):
        exporter.export(window(i))
    wait_until(lambda: len(collector.fake.hellos) >= 2, what="a reconnect")
    collector.fake.set(acking=True)
    wait_until(lambda: collector.fake.unique() == 10)
    wait_until(lambda: exporter.stats()["spool_windows"] == 0)
    assert len(collector.fake.received) > 10  # the unacked ones were sent again
    assert exporter.stats()["windows_sent"] >= len(collector.fake.received)


def test_duplicate_acks_remove_the_window(collector, make_exporter):
    exporter = make_exporter(collector.target)
    collector.fake.stored.add(("agent1", "run1", 0))  # stored by an earlier connection
    exporter.export(window(0))
    exporter.export(window(1))
    wait_until(lambda: exporter.stats()["spool_windows"] == 0)
    assert sorted(collector.fake.results) == [Ack.STORED, Ack.DUPLICATE]
    assert exporter.stats()["windows_acked"] == 2


def test_rejected_windows_are_removed_counted_and_reported(collector, make_exporter, caplog):
    collector.fake.set(reject_seqs={2, 5})
    exporter = make_exporter(collector.target)
    for i in range(8):
        exporter.export(window(i))
    wait_until(lambda: exporter.stats()["spool_windows"] == 0)
    stats = exporter.stats()
    assert stats["windows_rejected"] == 2 and stats["spool_rejected_windows"] == 2
    assert stats["windows_acked"] == 6
    assert "rejected window run1/2: bad window" in caplog.text
    # the change in counts goes to the collector at once, not at the next periodic status
    wait_until(lambda: any(s.rejected_windows == 2 for s in collector.fake.statuses), what="a status message")
    assert collector.fake.unique() == 6


def test_back_pressure_limits_in_flight_and_export_never_blocks(collector, make_exporter):
    collector.fake.set(acking=False)
    exporter = make_exporter(collector.target, max_in_flight=8, batch_max=3)
    for i in range(10):
        exporter.export(window(i))
    wait_until(lambda: len(collector.fake.received) == 8, what="the in-flight limit reached")
    assert exporter.stats()["in_flight"] == 8
    # the collector is stuck: export() still returns, from another thread, for many more windows
    more = threading.Thread(target=lambda: [exporter.export(window(i)) for i in range(10, 40)])
    more.start()
    more.join(30)
    assert not more.is_alive()
    assert exporter.stats()["spool_windows"] == 40
    time.sleep(0.3)  # room for a misbehaving sender to overshoot (not a timing assertion)
    assert len(collector.fake.received) == 8
    collector.fake.set(acking=True)
    wait_until(lambda: collector.fake.unique() == 40)
    wait_until(lambda: exporter.stats()["spool_windows"] == 0)
    assert collector.fake.max_unacked <= 8
    assert max(collector.fake.batches) > 1 and max(collector.fake.batches) <= 3  # batched when behind


def test_close_delivers_what_is_pending(collector, make_exporter):
    collector.fake.set(acking=False)
    exporter = make_exporter(collector.target)
    for i in range(10):
        exporter.export(window(i))
    wait_until(lambda: len(collector.fake.received) == 10)
    threading.Timer(0.3, lambda: collector.fake.set(acking=True)).start()
    exporter.close(timeout=30)
    assert collector.fake.unique() == 10
    assert exporter.stats()["spool_windows"] == 0
    assert not exporter._thread.is_alive()


def test_close_with_collector_down_keeps_windows_and_next_start_sends_them(tmp_path, make_exporter):
    port = free_port()
    spool = tmp_path / "spool"
    first = make_exporter(f"127.0.0.1:{port}", spool_dir=spool)
    for i in range(4):
        first.export(window(i))
    first.close(timeout=30)  # one more attempt, then gives up: the windows stay on disk
    assert not first._thread.is_alive()
    assert len(list(spool.glob("*.win"))) == 4

    collector = Collector(port)
    try:
        second = make_exporter(collector.target, spool_dir=spool)
        wait_until(lambda: collector.fake.unique() == 4)
        wait_until(lambda: second.stats()["spool_windows"] == 0)
    finally:
        collector.stop()


def test_restarted_exporter_resends_what_was_not_acked(collector, tmp_path, make_exporter):
    spool = tmp_path / "spool"
    collector.fake.set(acking=False)
    first = make_exporter(collector.target, spool_dir=spool)
    for i in range(5):
        first.export(window(i))
    wait_until(lambda: len(collector.fake.received) == 5, what="sent, never acked")
    first.close(timeout=0.5)
    assert len(list(spool.glob("*.win"))) == 5

    collector.fake.set(acking=True)
    second = make_exporter(collector.target, spool_dir=spool)
    wait_until(lambda: collector.fake.unique() == 5)
    wait_until(lambda: second.stats()["spool_windows"] == 0)
    assert collector.fake.hellos[-1].spool.windows == 5
    assert len(collector.fake.received) == 10


def test_bearer_token_is_sent(collector, make_exporter):
    collector.fake.set(token="s3cret")
    exporter = make_exporter(collector.target, token="s3cret")
    exporter.export(window(0))
    wait_until(lambda: collector.fake.unique() == 1)
    assert collector.fake.metadata[0]["authorization"] == "Bearer s3cret"


def test_refused_token_is_logged_once_and_retried_until_fixed(collector, make_exporter, caplog):
    collector.fake.set(token="new-token")
    exporter = make_exporter(collector.target, token="old-token")
    exporter.export(window(0))
    wait_until(lambda: len(collector.fake.metadata) >= 3, what="several refused attempts")
    assert caplog.text.count("UNAUTHENTICATED") == 1
    assert exporter.stats()["spool_windows"] == 1
    collector.fake.set(token="old-token")  # the operator fixes the collector; the agent is not restarted
    wait_until(lambda: collector.fake.unique() == 1)
    wait_until(lambda: exporter.stats()["spool_windows"] == 0)


def test_retry_after_on_resource_exhausted_is_honoured(collector, make_exporter, caplog):
    caplog.set_level(logging.DEBUG, logger="agent.exporter")
    collector.fake.set(refuse=[(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", (("retry-after-ms", "300"),))])
    exporter = make_exporter(collector.target)
    exporter.export(window(0))
    wait_until(lambda: collector.fake.unique() == 1)
    assert "RESOURCE_EXHAUSTED: busy); retrying in 0.3 s" in caplog.text


def test_export_never_raises(collector, make_exporter):
    exporter = make_exporter(collector.target)
    exporter.export("not a window")  # type: ignore[arg-type]
    assert exporter.stats()["export_errors"] == 1


def test_monitored_session_sends_its_windows_to_the_collector(collector, tmp_path):
    model = examples.logistic_regression()
    sess = MonitoredSession(model, providers=["CPUExecutionProvider"], window_seconds=None, window_rows=50,
                            summarizer="thread", agent_id="host-a", collector=collector.target,
                            spool_dir=tmp_path / "spool", collector_token="t")
    served = 0
    rng = np.random.default_rng(0)
    for _ in range(12):
        x = rng.standard_normal((17, 20)).astype(np.float32)
        sess.run(None, {"X": x})
        served += len(x)
    sess.close()  # the last partial window goes through the spool to the collector
    fake = collector.fake
    assert sum(w.rows for w in fake.received) == served
    assert not list((tmp_path / "spool").glob("*.win"))
    hello = fake.hellos[0]
    assert (hello.agent_id, hello.run_id) == ("host-a", sess.identity.run_id)
    assert hello.model_sha256 == sess.model_sha256 and hello.onnxruntime_version
    assert hello.inputs[0].name == "X" and list(hello.inputs[0].shape) == [-1, 20]
    assert [o.name for o in hello.outputs] == [o.name for o in sess.get_outputs()]
    assert fake.metadata[0]["authorization"] == "Bearer t"


def test_hello_for_marks_symbolic_dims(lr_model):
    with MonitoredSession(str(lr_model), providers=["CPUExecutionProvider"], summarizer="thread") as sess:
        hello = hello_for(sess)
    assert hello.model_name == "lr" and hello.agent_version
    assert all(d == -1 or d > 0 for t in (*hello.inputs, *hello.outputs) for d in t.shape)


def test_session_rejects_both_sink_and_collector():
    from agent.sinks import InMemorySink

    with pytest.raises(ValueError, match="either sink or collector"):
        MonitoredSession(examples.logistic_regression(), sink=InMemorySink(), collector="127.0.0.1:1")


def test_hello_names_the_models_of_earlier_runs_waiting_in_the_spool(tmp_path, make_exporter):
    port = free_port()
    spool = tmp_path / "spool"
    first = make_exporter(f"127.0.0.1:{port}", spool_dir=spool)  # the collector is down
    first.export(summary_pb2.WindowSummary(agent_id="agent1", run_id="run0", seq=0, rows=3, model_name="old"))
    first.export(window(1, run_id="run0"))
    first.close(timeout=5)

    collector = Collector(port)
    try:
        second = make_exporter(collector.target, spool_dir=spool)
        wait_until(lambda: collector.fake.unique() == 2)
        hello = collector.fake.hellos[0]
        assert (hello.run_id, hello.model_name, list(hello.spooled_models)) == ("run1", "m", ["old"])
        wait_until(lambda: second.stats()["spool_windows"] == 0)
        second.export(window(1))
        wait_until(lambda: collector.fake.unique() == 3)
        second.close(timeout=5)
        third = make_exporter(collector.target, spool_dir=spool)
        third.export(window(2))
        wait_until(lambda: collector.fake.unique() == 4)
        assert list(collector.fake.hellos[-1].spooled_models) == []  # nothing of another model waits now
    finally:
        collector.stop()
