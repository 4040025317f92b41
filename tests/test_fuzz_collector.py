"""Fuzzing what the collector receives: windows, Hello, SpoolStatus and ModelState.

Inputs are mutations of valid messages: any field anywhere in the message tree
set to a hostile value (numbers at and past every bound, NaN and infinities,
long, empty and control-character strings, corrupt, truncated or forged sketch
bytes, lists emptied, duplicated or grown past their limits).

- In plain Python, ``validate_window`` / ``validate_hello`` / ``validate_spool``
  / ``validate_model_state`` raise nothing but InvalidArgument, and a window they
  pass can be merged by the rollup.
- On a real collector over real streams, every case ends in OK, a clean status
  (INVALID_ARGUMENT, with a message) or acks (a REJECTED one with its reason):
  never INTERNAL or UNKNOWN, never a traceback in the log; the collector answers
  Status after every case; at the end every stored window body and sample passes
  ``validate_window`` / ``check_sample`` again, and a valid window sent after
  all that is stored.
"""
from __future__ import annotations

import itertools
import logging
import math
import sqlite3
import time

import grpc
import numpy as np
from google.protobuf.descriptor import FieldDescriptor as FD
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_collector_server import REJECTED, STORED, Collector, batch, hello, running, window

from agent.errors import InvalidArgument
from agent.sketches import CategoricalSketch, NumericSketch
from collector.base.ingest import Limits, check_sample, validate_hello, validate_model_state, validate_spool, validate_window
from collector.store.rollup import merge_windows
from protos import collector_pb2 as pb
from protos import summary_pb2

NS = 1_000_000_000
FEATURE = summary_pb2.ColumnSummary.FEATURE
CLEAN_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
               grpc.StatusCode.FAILED_PRECONDITION}
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def valid_window(agent: str = "fuzz", run: str = "run", seq: int = 0) -> summary_pb2.WindowSummary:
    """Every part an agent may send: numeric, categorical, latency, performance, shadow, sample."""
    rng = np.random.default_rng(seq)
    end = time.time_ns() - 60 * NS
    num, cat, lat, diff, shadow_lat = NumericSketch(), CategoricalSketch(), NumericSketch(), NumericSketch(), \
        NumericSketch()
    num.update(np.append(rng.normal(size=9), np.nan))
    cat.update(np.array(["ams", "ber", "", "ams", "cph", "ams", "ber", "dub", "", "ams"], dtype=object))
    lat.update(rng.exponential(100.0, 3))
    diff.update(rng.normal(size=4))
    shadow_lat.update(np.array([90.0, 110.0]))
    w = summary_pb2.WindowSummary(agent_id=agent, run_id=run, seq=seq, model_name="credit", model_version="1",
                                  model_sha256="ab" * 32, start_unix_nano=end - 10 * NS, end_unix_nano=end,
                                  rows=10, calls=3, dropped_rows=1, errors=1)
    w.columns.extend([num.to_proto("x", FEATURE, "X"), cat.to_proto("city", FEATURE, "city")])
    w.latency.CopyFrom(lat.to_proto("latency_us", 0, ""))
    w.performance.CopyFrom(summary_pb2.Performance(labeled=5, unmatched=2, classes=["0", "1"], confusion=[2, 1, 0, 2]))
    w.shadow.CopyFrom(summary_pb2.ShadowSummary(
        model_version="2", model_sha256="cd" * 32, calls=2, rows=4, skipped=1, label_rows=4, label_agree=3,
        score_diff=diff.to_proto("score_diff", 0, "probabilities"), latency=shadow_lat.to_proto("latency_us", 0, "")))
    w.sample.seen = 10
    w.sample.columns.add(name="x", numbers=[0.5, float("nan"), 2.0])
    w.sample.columns.add(name="city", strings=["ams", "", "ber"])
    return w


def valid_hello(agent: str = "fuzz", run: str = "run") -> pb.Hello:
    return pb.Hello(agent_id=agent, run_id=run, host="box", model_name="credit", model_version="1",
                    model_sha256="ab" * 32, agent_version="0.1.0", onnxruntime_version="1.17.3",
                    inputs=[pb.TensorInfo(name="X", type="tensor(float)", shape=[-1, 20])],
                    outputs=[pb.TensorInfo(name="label", type="tensor(int64)", shape=[-1])],
                    started_unix_nano=time.time_ns() - 3600 * NS, spool=pb.SpoolStatus(windows=2, bytes=4000),
                    managed=True, model_state=pb.ModelState(model_version="1", model_sha256="ab" * 32, ok=True),
                    spooled_models=["credit"])


# ------------------------------------------------------------------ mutations

UINTS = st.one_of(st.sampled_from([0, 1, 2, 3, 10, 2**31, 2**32 - 1, 2**40, 2**40 + 1, 2**53 + 1, 2**63 - 1,
                                   2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
INTS = st.one_of(st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63), time.time_ns() + 3600 * NS,
                                  time.time_ns() - 500 * 86400 * NS]), st.integers(-(2**63), 2**63 - 1))
DOUBLES = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, -0.0, -1.0, 1e308, -1e308, 5e-324]),
                    st.floats())
STRINGS = st.one_of(st.text(max_size=20),
                    st.sampled_from(["", " ", "x" * 129, "x" * 257, "y" * 2**20, "a\nb", "\x1b[2J", "\x00", "\u2028",
                                     "é" * 128, "ab" * 32, "AB" * 32, "<other>", "credit", "fuzz"]))
GROWTH = [2, 50, 1100, 4097]  # list lengths past several limits


def _repeated(fd: FD) -> bool:
    return fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == FD.LABEL_REPEATED


def _paths(msg: Message) -> list[tuple[Message, FD]]:
    """Every (message, field) in the tree under ``msg``: the places a mutation can hit."""
    out = []
    for fd in msg.DESCRIPTOR.fields:
        out.append((msg, fd))
        if fd.type != FD.TYPE_MESSAGE:
            continue
        if _repeated(fd):
            for child in getattr(msg, fd.name):
                out.extend(_paths(child))
        elif msg.HasField(fd.name):
            out.extend(_paths(getattr(msg, fd.name)))
    return out


@st.composite
def _bytes_like(draw: st.DrawFn, current: bytes) -> bytes:
    how = draw(st.sampled_from(["random", "truncate", "flip", "header"]))
    if how == "random" or not current:
        return draw(st.binary(max_size=64))
    data = bytearray(current)
    if how == "truncate":
        return bytes(data[:draw(st.integers(0, len(data) - 1))])
    i = draw(st.integers(0, len(data) - 1) if how == "flip" else st.integers(0, min(len(data), 24) - 1))
    data[i] = draw(st.integers(0, 255))
    return bytes(data)


def _scalar(fd: FD, current) -> st.SearchStrategy:
    if fd.type in (FD.TYPE_UINT64, FD.TYPE_UINT32):
        return UINTS if fd.type == FD.TYPE_UINT64 else st.integers(0, 2**32 - 1)
    if fd.type == FD.TYPE_FIXED32:
        return st.integers(0, 2**32 - 1)
    if fd.type in (FD.TYPE_INT64, FD.TYPE_INT32):
        return INTS if fd.type == FD.TYPE_INT64 else st.integers(-(2**31), 2**31 - 1)
    if fd.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return DOUBLES
    if fd.type == FD.TYPE_STRING:
        return STRINGS
    if fd.type == FD.TYPE_BYTES:
        return _bytes_like(current if isinstance(current, bytes) else b"")
    if fd.type == FD.TYPE_BOOL:
        return st.booleans()
    if fd.type == FD.TYPE_ENUM:
        return st.integers(-3, 5)
    raise AssertionError(f"no strategy for {fd.full_name}")


@st.composite
def mutated(draw: st.DrawFn, base: Message, max_mutations: int = 3) -> Message:
    """``base`` (copied) with 1 to ``max_mutations`` fields anywhere in it set to hostile values."""
    msg = type(base)()
    msg.CopyFrom(base)
    for _ in range(draw(st.integers(1, max_mutations))):
        owner, fd = draw(st.sampled_from(_paths(msg)))
        value = getattr(owner, fd.name)
        if fd.type == FD.TYPE_MESSAGE and _repeated(fd):
            how = draw(st.sampled_from(["clear", "grow", "drop"]))
            if how == "clear" or (how == "drop" and len(value) < 2):
                del value[:]
            elif how == "drop":
                del value[draw(st.integers(0, len(value) - 1))]
            elif len(value):
                template = value[draw(st.integers(0, len(value) - 1))]
                value.extend([template] * draw(st.sampled_from(GROWTH)))
            else:
                value.add()
        elif fd.type == FD.TYPE_MESSAGE:
            owner.ClearField(fd.name) if draw(st.booleans()) else value.SetInParent()
        elif _repeated(fd):
            how = draw(st.sampled_from(["clear", "append", "set", "grow"]))
            if how == "clear":
                del value[:]
            elif how == "set" and len(value):
                value[draw(st.integers(0, len(value) - 1))] = draw(_scalar(fd, None))
            elif how == "grow" and len(value):
                value.extend([value[0]] * draw(st.sampled_from(GROWTH)))
            else:
                value.append(draw(_scalar(fd, None)))
        else:
            setattr(owner, fd.name, draw(_scalar(fd, value)))
    return msg


# ------------------------------------------------------------------ plain Python


@settings(FUZZ, max_examples=400)
@given(w=mutated(valid_window()))
def test_validate_window_raises_only_invalid_argument_and_what_passes_merges(w: summary_pb2.WindowSummary) -> None:
    try:
        validate_window(w)
    except InvalidArgument as exc:
        assert str(exc)
        return
    merged = merge_windows([w, w])  # a valid window is fit for the rollup: merging never fails
    summary_pb2.WindowSummary.FromString(merged.SerializeToString())


@settings(FUZZ, max_examples=150)
@given(data=st.binary(min_size=1, max_size=512))
def test_validate_window_takes_any_bytes_that_parse(data: bytes) -> None:
    try:
        w = summary_pb2.WindowSummary.FromString(data)
    except DecodeError:
        return
    try:
        validate_window(w)
    except InvalidArgument:
        pass


@settings(FUZZ, max_examples=300)
@given(hello_=mutated(valid_hello()), spool=mutated(pb.SpoolStatus(windows=1, bytes=10)),
       state=mutated(pb.ModelState(model_version="1", ok=True)))
def test_hello_spool_and_model_state_checks_raise_only_invalid_argument(hello_: pb.Hello, spool: pb.SpoolStatus,
                                                                       state: pb.ModelState) -> None:
    for check, message in ((validate_hello, hello_), (validate_spool, spool), (validate_model_state, state)):
        try:
            check(message)
        except InvalidArgument as exc:
            assert str(exc)


# ------------------------------------------------------------------ a real collector


class Tracebacks(logging.Handler):
    """Every log record that carries an exception: a traceback in the collector's log."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


def _outcome(collector: Collector, *messages: pb.AgentMessage) -> tuple[grpc.StatusCode, str, list[pb.WindowAck]]:
    """Send ``messages`` on a new stream, half-close it: (status code, details, acks)."""
    conn = collector.connect(*messages)
    acks: list[pb.WindowAck] = []
    try:
        for reply in conn.close():
            acks.extend(reply.acks.acks)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", acks
    return grpc.StatusCode.OK, "", acks


def test_a_real_collector_survives_hostile_streams_and_stores_nothing_invalid(tmp_path) -> None:
    runs = itertools.count()
    tracebacks = Tracebacks()
    logging.getLogger().addHandler(tracebacks)
    with running(tmp_path / "fuzz.db", drift_interval=0) as collector:

        @settings(FUZZ, max_examples=120, derandomize=True)  # CI must not depend on the draw
        @given(kind=st.sampled_from(["windows", "hello", "status", "model_state"]), data=st.data())
        def case(kind: str, data: st.DataObject) -> None:
            run = f"run-{next(runs)}"
            if kind == "windows":
                # a valid window leads, so the check below that stored windows are valid is never vacuous
                # and a hostile neighbour must not cost it
                windows = [valid_window("fuzz", run, 0)] + [data.draw(mutated(valid_window("fuzz", run, seq)))
                                                            for seq in range(1, data.draw(st.integers(2, 4)))]
                code, details, acks = _outcome(collector, pb.AgentMessage(hello=valid_hello("fuzz", run)),
                                               batch(*windows))
                if code == grpc.StatusCode.OK:
                    assert len(acks) == len(windows)
                for ack in acks:
                    assert ack.result != REJECTED or ack.reason, "a rejection says why"
                leader = [ack.result for ack in acks if (ack.run_id, ack.seq) == (run, 0)]
                assert not acks or STORED in leader, acks
            elif kind == "hello":
                first = pb.AgentMessage(hello=data.draw(mutated(valid_hello("fuzz", run))))
                code, details, _ = _outcome(collector, first)
            elif kind == "status":
                code, details, _ = _outcome(collector, pb.AgentMessage(hello=valid_hello("fuzz", run)),
                                            pb.AgentMessage(status=data.draw(mutated(pb.SpoolStatus(windows=1)))))
            else:
                state = data.draw(mutated(pb.ModelState(model_version="1", ok=False, error="failed")))
                code, details, _ = _outcome(collector, pb.AgentMessage(hello=valid_hello("fuzz", run)),
                                            pb.AgentMessage(model_state=state))
            assert code == grpc.StatusCode.OK or (code in CLEAN_CODES and details), (code, details)
            assert collector.status().collector_version  # still up and answering

        try:
            case()
        finally:
            logging.getLogger().removeHandler(tracebacks)
        assert not tracebacks.records, [r.getMessage() for r in tracebacks.records[:3]]

        # valid traffic after all that is stored
        conn = collector.connect(hello(agent="after", run="after"), batch(window(0, agent="after", run="after")))
        assert [a.result for a in conn.acks(1)] == [STORED]
        conn.close()

    # nothing invalid was stored
    now = time.time_ns()
    with sqlite3.connect(tmp_path / "fuzz.db") as db:
        bodies = db.execute("SELECT body FROM windows").fetchall()
        sampled = db.execute("SELECT s.body, w.rows FROM row_samples s JOIN windows w USING (agent_id, run_id, seq)"
                             ).fetchall()
        agents = db.execute("SELECT spool_windows, spool_bytes, length(schema), length(model_error) FROM agents"
                            ).fetchall()
    assert len(bodies) > 1
    for (body,) in bodies:
        validate_window(summary_pb2.WindowSummary.FromString(body), now_ns=now)
    for body, rows in sampled:
        check_sample(summary_pb2.RowSample.FromString(body), rows, Limits())
    for spool_windows, spool_bytes, schema_chars, error_chars in agents:
        assert 0 <= spool_windows < 2**63 and 0 <= spool_bytes < 2**63
        assert schema_chars <= 2 * Limits().max_schema_bytes and (error_chars or 0) <= Limits().max_error_chars
