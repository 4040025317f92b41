"""Ground truth by request id: the join (PredictionLog), the library call, the Feedback RPC."""
from __future__ import annotations

import threading

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from agent import MonitoredSession, examples
from agent.feedback import (ENTRY_OVERHEAD, OTHER_CLASS, FeedbackLimits, PredictionLog, class_name,
                            prediction_output)
from agent.server import MAX_FEEDBACK_BYTES, serve
from protos import agent_pb2, agent_pb2_grpc
from protos import open_inference_pb2_grpc as pb_grpc
from test_server import decode, raw_request, x_rows  # the wire helpers, written once

PROVIDERS = ["CPUExecutionProvider"]


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def confusion(perf) -> dict[tuple[str, str], int]:
    """The emitted matrix back as {(true, predicted): count}, zeros left out."""
    n = len(perf.classes)
    assert len(perf.confusion) == n * n
    return {(perf.classes[i // n], perf.classes[i % n]): c for i, c in enumerate(perf.confusion) if c}


def held(log: PredictionLog) -> dict[str, int]:
    stats = log.stats()
    return {key: stats[key] for key in ("held", "evicted", "expired")}


# --- PredictionLog ---------------------------------------------------------------------

def test_classification_join_counts_a_confusion_matrix_in_first_seen_order():
    log = PredictionLog(clock=Clock())
    log.record("a", np.array([1, 0, 1], dtype=np.int64))
    log.record("b", np.array(["cat"], dtype=object))
    assert log.label("a", "1", row=0)          # right
    assert log.label("a", 1, row=1)            # wrong: true 1, predicted 0 (ints and text agree)
    assert log.label("a", 0.0, row=2)          # wrong: true 0, predicted 1
    assert log.label("b", "dog")               # a class only ever seen as the truth
    perf = log.take_performance()
    assert perf.labeled == 4 and perf.unmatched == 0
    assert list(perf.classes) == ["1", "0", "dog", "cat"]
    assert confusion(perf) == {("1", "1"): 1, ("1", "0"): 1, ("0", "1"): 1, ("dog", "cat"): 1}
    assert perf.error_sum == perf.abs_error_sum == perf.sq_error_sum == 0


def test_take_performance_resets_and_the_matrix_grows_with_new_classes():
    log = PredictionLog(clock=Clock())
    log.record("a", np.array([0, 0], dtype=np.int64))
    log.label("a", "0", row=0)
    first = log.take_performance()
    assert list(first.classes) == ["0"] and list(first.confusion) == [1]
    assert log.take_performance() == type(first)()  # nothing since: an empty Performance
    log.label("a", "2", row=1)
    log.record("b", np.array([5], dtype=np.int64))
    log.label("b", "5")
    second = log.take_performance()
    assert list(second.classes) == ["2", "0", "5"]
    assert confusion(second) == {("2", "0"): 1, ("5", "5"): 1}


def test_regression_error_sums_are_exact():
    log = PredictionLog(clock=Clock())
    log.record("r", np.array([[2.5], [-1.0], [4.0]], dtype=np.float32))  # [N, 1], as regressors return
    assert log.label("r", 2.0, row=0)    # error +0.5
    assert log.label("r", 1.0, row=1)    # error -2.0
    assert log.label("r", "4", row=2)    # error 0
    perf = log.take_performance()
    assert perf.labeled == 3 and not perf.classes and not perf.confusion
    assert (perf.error_sum, perf.abs_error_sum, perf.sq_error_sum) == (-1.5, 2.5, 4.25)


def test_unknown_ids_and_rows_are_unmatched_and_bad_values_change_nothing():
    log = PredictionLog(clock=Clock())
    log.record("r", np.array([1.0, float("nan")]))
    log.record("c", np.array([[1, 2]], dtype=np.int64))  # two values in a row: nothing to compare with
    assert not log.label("nope", 1.0)
    assert not log.label("r", 1.0, row=2)
    assert not log.label("r", 1.0, row=1)  # a NaN prediction has no error to add
    assert not log.label("c", "1")
    for bad in ("cat", float("inf"), None):
        with pytest.raises(ValueError, match="regression label"):
            log.label("r", bad)
    with pytest.raises(ValueError, match="row"):
        log.label("r", 1.0, row=-1)
    perf = log.take_performance()
    assert (perf.labeled, perf.unmatched, perf.error_sum) == (0, 4, 0)


def test_a_second_label_for_the_same_row_is_not_counted_twice():
    log = PredictionLog(clock=Clock())
    log.record("a", np.array([1, 1], dtype=np.int64))
    assert log.label("a", "1") and log.label("a", "0")  # a retried call (or a late correction): first wins
    assert log.label("a", "1", row=1)
    perf = log.take_performance()
    assert perf.labeled == 2 and confusion(perf) == {("1", "1"): 2}
    assert log.stats()["duplicate_labels"] == 1


def test_a_reused_request_id_refers_to_the_latest_prediction():
    log = PredictionLog(clock=Clock())
    log.record("a", np.array([1], dtype=np.int64))
    log.record("a", np.array([0], dtype=np.int64))
    log.label("a", "0")
    assert confusion(log.take_performance()) == {("0", "0"): 1}
    assert len(log) == 1


def test_predictions_older_than_the_join_window_do_not_join_and_are_purged():
    clock = Clock()
    log = PredictionLog(join_seconds=60, clock=clock)
    log.record("old", np.array([1], dtype=np.int64))
    clock.now += 30
    log.record("new", np.array([1], dtype=np.int64))
    clock.now += 30  # "old" is exactly join_seconds old: out
    assert not log.label("old", "1")
    assert log.label("new", "1")
    perf = log.take_performance()  # the window thread purges
    assert (perf.labeled, perf.unmatched) == (1, 1)
    assert held(log) == {"held": 1, "evicted": 0, "expired": 1}
    clock.now += 30
    assert log.stats()["held"] == 0 and log.stats()["expired"] == 2


def test_at_most_max_requests_are_kept_oldest_evicted_first_and_counted():
    clock = Clock()
    log = PredictionLog(join_seconds=60, limits=FeedbackLimits(max_requests=3), clock=clock)
    for i in range(5):
        log.record(f"r{i}", np.array([i], dtype=np.int64))
    assert len(log) == 3
    assert [log.label(f"r{i}", str(i)) for i in range(5)] == [False, False, True, True, True]
    assert log.stats()["evicted"] == 2
    clock.now += 60  # all three expired; pushing one out now counts as expired, not evicted
    log.record("r5", np.array([5], dtype=np.int64))
    assert held(log) == {"held": 1, "evicted": 2, "expired": 3}


def test_concurrent_record_label_and_take_lose_nothing():
    log = PredictionLog(clock=Clock())
    taken = []
    stop = threading.Event()

    def worker(t: int) -> None:
        for i in range(500):
            log.record(f"{t}-{i}", np.array([i % 3], dtype=np.int64))
            log.label(f"{t}-{i}", str(i % 2))

    def window_thread() -> None:
        while not stop.is_set():
            taken.append(log.take_performance())

    reader = threading.Thread(target=window_thread)
    reader.start()
    workers = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    reader.join()
    taken.append(log.take_performance())
    assert sum(p.labeled for p in taken) == 2000
    total: dict[tuple[str, str], int] = {}
    for p in taken:
        for key, count in confusion(p).items():
            total[key] = total.get(key, 0) + count
    want: dict[tuple[str, str], int] = {}
    for i in range(500):
        key = (str(i % 2), str(i % 3))
        want[key] = want.get(key, 0) + 4
    assert total == want


def test_class_names_agree_across_types():
    assert class_name(np.int64(3)) == class_name(3) == class_name(3.0) == class_name("3") == "3"
    assert class_name(b"cat") == class_name(np.str_("cat")) == "cat"
    assert class_name(2.5) == "2.5"


def test_which_output_is_compared_with_labels():
    def outputs(build):
        return ort.InferenceSession(build(), providers=PROVIDERS).get_outputs()

    assert prediction_output(outputs(examples.logistic_regression)) == (0, "classification")
    assert prediction_output(outputs(lambda: examples.logistic_regression(zipmap=True))) == (0, "classification")
    assert prediction_output(outputs(examples.linear_regression)) == (0, "regression")
    assert prediction_output(outputs(examples.image_scorer)) == (0, "regression")
    assert prediction_output(outputs(examples.typed_identity)) is None  # two values per row everywhere


# --- budgets: what callers can add is bounded, and what goes past a bound is counted ----

def test_the_byte_budget_evicts_the_oldest_and_the_bytes_held_stay_under_it():
    clock = Clock()
    row_bytes = np.zeros(1000, dtype=np.int64)
    one = PredictionLog(limits=FeedbackLimits(max_bytes=10**9), clock=clock)
    one.record("r0", row_bytes.copy())
    cost = one.stats()["held_bytes"]
    assert cost >= row_bytes.nbytes + ENTRY_OVERHEAD  # an entry costs its array, its id and the overhead
    log = PredictionLog(limits=FeedbackLimits(max_bytes=cost * 3 + 10), clock=clock)
    for i in range(10):
        assert log.record(f"r{i}", row_bytes.copy())
        assert log.stats()["held_bytes"] <= log.limits.max_bytes
    assert held(log) == {"held": 3, "evicted": 7, "expired": 0}
    assert [log.label(f"r{i}", "0") for i in range(10)] == [False] * 7 + [True] * 3


def test_a_prediction_larger_than_the_whole_budget_is_not_kept_and_evicts_nothing():
    log = PredictionLog(limits=FeedbackLimits(max_bytes=100_000), clock=Clock())
    assert log.record("small", np.zeros(10, dtype=np.int64))
    assert not log.record("huge", np.zeros(100_000, dtype=np.int64))
    stats = log.stats()
    assert (stats["held"], stats["too_large"], stats["evicted"]) == (1, 1, 0)
    assert not log.label("huge", "0") and log.label("small", "0")


def test_string_predictions_are_charged_for_their_strings():
    log = PredictionLog(limits=FeedbackLimits(max_bytes=10**9), clock=Clock())
    log.record("a", np.array(["x"] * 10, dtype=object))
    small = log.stats()["held_bytes"]
    log.record("b", np.array(["x" * 100_000] * 10, dtype=object))
    assert log.stats()["held_bytes"] - small >= 10 * 100_000


def test_a_reused_id_releases_the_bytes_of_the_prediction_it_replaces():
    log = PredictionLog(limits=FeedbackLimits(max_bytes=10**9), clock=Clock())
    for _ in range(100):
        log.record("same", np.zeros(10_000, dtype=np.int64))
    assert log.stats()["held_bytes"] < 2 * 80_000 + 100 * (ENTRY_OVERHEAD + 100)
    assert len(log) == 1


def test_labelled_rows_are_charged_to_their_prediction():
    log = PredictionLog(limits=FeedbackLimits(max_bytes=10**9), clock=Clock())
    log.record("batch", np.zeros(50_000, dtype=np.int64))
    before = log.stats()["held_bytes"]
    assert log.label("batch", "0", row=7)
    assert log.stats()["held_bytes"] == before + 50_000  # one byte per row of the request
    assert log.label("batch", "0", row=7) and log.stats()["duplicate_labels"] == 1


def test_a_long_request_id_is_not_kept_and_is_counted():
    log = PredictionLog(limits=FeedbackLimits(max_request_id_chars=8), clock=Clock())
    assert log.record("12345678", np.array([1]))
    assert not log.record("123456789", np.array([1]))
    assert not log.record("x" * 10**6, np.array([1]))
    stats = log.stats()
    assert (stats["held"], stats["ids_too_long"]) == (1, 2)
    assert not log.label("123456789", "1")


def test_classes_beyond_the_bound_are_counted_as_other_in_every_window():
    log = PredictionLog(limits=FeedbackLimits(max_classes=4), clock=Clock())
    n = 1000
    log.record("big", np.zeros(n, dtype=np.int64))  # predicts class "0" for every row
    assert all(log.label("big", f"class-{i}", row=i) for i in range(n))
    perf = log.take_performance()
    assert list(perf.classes) == ["class-0", "0", "class-1", OTHER_CLASS]
    assert len(perf.confusion) == 16 and sum(perf.confusion) == perf.labeled == n
    assert confusion(perf) == {("class-0", "0"): 1, ("class-1", "0"): 1, (OTHER_CLASS, "0"): n - 2}
    assert log.stats()["other_class_labels"] == n - 2
    log.record("next", np.array(["class-1", "class-9"], dtype=object))
    assert log.label("next", "class-1", row=0) and log.label("next", "class-0", row=1)
    perf = log.take_performance()  # the names known stay known: a name means the same in every window
    assert confusion(perf) == {("class-1", "class-1"): 1, ("class-0", OTHER_CLASS): 1}


@pytest.mark.parametrize("name", ["x" * 129, "tab\there", "new\nline", "\x00"])
def test_class_names_too_long_or_unprintable_are_counted_as_other(name):
    log = PredictionLog(clock=Clock())
    log.record("r", np.array([name, "ok"], dtype=object))
    assert log.label("r", name, row=0) and log.label("r", "ok", row=1)
    perf = log.take_performance()
    assert confusion(perf) == {(OTHER_CLASS, OTHER_CLASS): 1, ("ok", "ok"): 1}
    assert all(len(c) <= 128 and c.isprintable() for c in perf.classes)


def test_a_regression_label_that_would_overflow_the_sums_is_unmatched_and_counted():
    log = PredictionLog(clock=Clock())
    log.record("r", np.array([[1.0], [2.0]]))
    assert log.label("r", 1e150, row=0)
    assert not log.label("r", -2e154, row=1)  # its square would make sq_error_sum infinite
    perf = log.take_performance()
    assert (perf.labeled, perf.unmatched) == (1, 1)
    assert np.isfinite([perf.error_sum, perf.abs_error_sum, perf.sq_error_sum]).all()
    assert log.stats()["out_of_range_labels"] == 1


@pytest.mark.parametrize("change", [{"max_requests": 0}, {"max_bytes": 0}, {"max_request_id_chars": 0},
                                    {"max_classes": 1}, {"max_classes": 1001}, {"max_class_chars": 0},
                                    {"max_bytes": 1.5}])
def test_feedback_limits_are_checked(change):
    with pytest.raises(ValueError, match=next(iter(change))):
        FeedbackLimits(**change)


# --- MonitoredSession ------------------------------------------------------------------

@pytest.fixture(scope="module")
def lr() -> bytes:
    return examples.logistic_regression()


def monitored(model: bytes, **kw) -> MonitoredSession:
    kw.setdefault("window_seconds", None)
    kw.setdefault("window_rows", 100)
    kw.setdefault("summarizer", "thread")
    return MonitoredSession(model, providers=PROVIDERS, **kw)


@pytest.mark.parametrize("summarizer", ["thread", "process"])
def test_labels_are_counted_in_the_window_in_which_they_arrive(lr, summarizer):
    x, y = examples.tabular_data(n=100, seed=7)
    with monitored(lr, summarizer=summarizer) as sess:
        predicted = np.concatenate([sess.run(None, {"X": x[i:i + 1]}, request_id=f"r{i}")[0]
                                    for i in range(90)])
        batch = sess.run(["label"], {"X": x[90:]}, request_id="batch")[0]  # 10 rows under one id
        predicted = np.concatenate([predicted, batch])
        first = sess.sink.wait_for(1)[0]  # closed at 100 rows: before any label came
        assert not first.HasField("performance")
        matched = [sess.feedback(f"r{i}", int(y[i])) for i in range(90)]
        matched += [sess.feedback("batch", str(y[90 + j]), row=j) for j in range(10)]
        assert all(matched)
        assert not sess.feedback("never-sent", "1")
        sess.run(None, {"X": x})  # the next 100 rows close the next window
        second = sess.sink.wait_for(2)[1]
    perf = second.performance
    assert (perf.labeled, perf.unmatched) == (100, 1)
    cm = confusion(perf)
    accuracy = sum(c for (t, p), c in cm.items() if t == p) / perf.labeled
    assert accuracy == np.mean(predicted == y)
    want = {}
    for t, p in zip(y, predicted):
        want[str(t), str(p)] = want.get((str(t), str(p)), 0) + 1
    assert cm == want


@pytest.mark.parametrize("summarizer", ["thread", "process"])
def test_labels_after_the_last_window_travel_in_a_final_window_at_close(lr, summarizer):
    x, y = examples.tabular_data(n=100, seed=3)
    sess = monitored(lr, summarizer=summarizer)
    sess.run(None, {"X": x}, request_id="all")
    sess.sink.wait_for(1)  # the 100 rows closed a window before any label came
    assert all(sess.feedback("all", int(y[j]), row=j) for j in range(100))
    sess.close()
    last = sess.sink.windows[-1]
    assert last.rows == 0 and last.performance.labeled == 100 and last.seq == 1


def test_regression_session_reports_error_sums():
    model = examples.linear_regression()
    x, _ = examples.tabular_data(n=100, n_features=5, seed=3)
    truth = x.sum(axis=1).astype(np.float64)  # not the model's target: errors are non-zero
    with monitored(model) as sess:
        predicted = sess.run(None, {"X": x}, request_id="all")[0].ravel().astype(np.float64)
        sess.sink.wait_for(1)
        assert all(sess.feedback("all", float(truth[i]), row=i) for i in range(100))
        sess.run(None, {"X": x})
        perf = sess.sink.wait_for(2)[1].performance
    err = predicted - truth
    assert perf.labeled == 100
    assert perf.error_sum == pytest.approx(err.sum(), rel=1e-12)
    assert perf.abs_error_sum == pytest.approx(np.abs(err).sum(), rel=1e-12)
    assert perf.sq_error_sum == pytest.approx((err ** 2).sum(), rel=1e-12)


def test_run_without_a_request_id_keeps_nothing(lr):
    x = x_rows(8)
    with monitored(lr) as sess:
        bare = ort.InferenceSession(lr, providers=PROVIDERS).run(None, {"X": x})
        for got in (sess.run(None, {"X": x}), sess.run(None, {"X": x}, None), sess.run(None, {"X": x}, request_id=""),
                    sess.run(None, {"X": x}, request_id=None)):
            for g, w in zip(got, bare):
                np.testing.assert_array_equal(g, w)
        assert len(sess.predictions) == 0
        assert not sess.feedback("anything", "1")


def test_a_model_without_a_comparable_output_still_serves_request_ids(typed_model):
    with MonitoredSession(str(typed_model), providers=PROVIDERS, window_seconds=None, summarizer="thread") as sess:
        assert sess.label_kind is None and sess.predictions is None
        dtypes = {"float16": np.float16, "float": np.float32, "double": np.float64, "bool": np.bool_,
                  "string": object}
        feed = {}
        for arg in sess.get_inputs():
            elem = arg.type[len("tensor("):-1]
            feed[arg.name] = np.zeros((1, 2), dtype=dtypes.get(elem) or np.dtype(elem))
        feed["bytes_in"][:] = "a"
        sess.run(None, feed, request_id="x")
        with pytest.raises(ValueError, match="no prediction to compare"):
            sess.feedback("x", "1")


def test_join_seconds_must_be_positive(lr):
    with pytest.raises(ValueError, match="join_seconds"):
        monitored(lr, join_seconds=0)


# --- the Feedback RPC ------------------------------------------------------------------

@pytest.fixture
def served(lr_model):
    session = MonitoredSession(str(lr_model), providers=PROVIDERS, window_seconds=None, window_rows=50,
                               summarizer="thread")
    server = serve(session, "lr", "1", "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield session, pb_grpc.GRPCInferenceServiceStub(channel), agent_pb2_grpc.FeedbackServiceStub(channel)
    finally:
        channel.close()
        server.stop(grace=0)


def test_infer_with_ids_then_feedback_over_grpc(served):
    session, infer, feedback = served
    x, y = examples.tabular_data(n=50, seed=11)
    predicted = []
    for i in range(0, 50, 5):
        reply = infer.ModelInfer(raw_request("lr", {"X": x[i:i + 5]}, id=f"req-{i}"))
        assert reply.id == f"req-{i}"
        predicted.extend(decode(reply)["label"])
    session.sink.wait_for(1)
    labels = [agent_pb2.Label(request_id=f"req-{i - i % 5}", class_label=str(y[i]), row=i % 5) for i in range(50)]
    labels += [agent_pb2.Label(request_id="unknown", class_label="1"),
               agent_pb2.Label(request_id="req-0", class_label="1", row=5)]  # no such row
    reply = feedback.Feedback(agent_pb2.FeedbackRequest(labels=labels))
    assert (reply.matched, reply.unmatched) == (50, 2)
    infer.ModelInfer(raw_request("lr", {"X": x}))  # no id: closes the next window, records nothing
    assert len(session.predictions) == 10
    perf = session.sink.wait_for(2)[1].performance
    assert (perf.labeled, perf.unmatched) == (50, 2)
    cm = confusion(perf)
    assert sum(c for (t, p), c in cm.items() if t == p) / 50 == np.mean(np.array(predicted) == y)


BAD_FEEDBACK = {
    "empty id": ([agent_pb2.Label(class_label="1")], "request_id is empty"),
    "no value": ([agent_pb2.Label(request_id="a")], "exactly one of class_label or target"),
    "wrong kind": ([agent_pb2.Label(request_id="a", target=1.0)], "send its label as class_label"),
    "too many": ([agent_pb2.Label(request_id="a", class_label="1")] * 10_001, "at most 10000"),
}


@pytest.mark.parametrize("case", BAD_FEEDBACK)
def test_bad_feedback_is_invalid_argument_and_changes_nothing(served, case):
    session, infer, feedback = served
    infer.ModelInfer(raw_request("lr", {"X": x_rows(1)}, id="a"))
    labels, words = BAD_FEEDBACK[case]
    good = agent_pb2.Label(request_id="a", class_label="1")
    with pytest.raises(grpc.RpcError) as info:
        feedback.Feedback(agent_pb2.FeedbackRequest(labels=[good, *labels]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in info.value.details()
    assert session.predictions.pending() == (0, 0)  # the good label before the bad one was not applied


def test_feedback_to_a_bare_session_is_unimplemented(lr_model):
    server = serve(ort.InferenceSession(str(lr_model), providers=PROVIDERS), "lr", "1", "127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.ModelInfer(raw_request("lr", {"X": x_rows(1)}, id="a"))  # a bare session ignores the id
            with pytest.raises(grpc.RpcError) as info:
                agent_pb2_grpc.FeedbackServiceStub(channel).Feedback(
                    agent_pb2.FeedbackRequest(labels=[agent_pb2.Label(request_id="a", class_label="1")]))
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "without monitoring" in info.value.details()
    finally:
        server.stop(grace=0)


def test_feedback_for_a_model_without_a_comparable_output_is_failed_precondition(typed_model):
    session = MonitoredSession(str(typed_model), providers=PROVIDERS, window_seconds=None, summarizer="thread")
    server = serve(session, "typed", "1", "127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.RpcError) as info:
                agent_pb2_grpc.FeedbackServiceStub(channel).Feedback(
                    agent_pb2.FeedbackRequest(labels=[agent_pb2.Label(request_id="a", class_label="1")]))
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "no prediction to compare" in info.value.details()
    finally:
        server.stop(grace=0)


def test_cli_serve_passes_join_seconds_to_the_session(lr_model):
    """The real entry point: --join-seconds (here from its environment variable) reaches the session:
    a join window of one microsecond is over before any feedback call can arrive."""
    import subprocess
    import sys

    from test_agent_cli import ROOT, cli, cli_env, read_line

    bad = cli("agent", "serve", "--model", str(lr_model), "--join-seconds", "0")
    assert bad.returncode == 2 and "--join-seconds" in bad.stderr and "greater than 0" in bad.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "agent", "serve", "--summarizer", "thread"], cwd=ROOT,
        env=cli_env(OUTRIDER_AGENT_MODEL=str(lr_model), OUTRIDER_AGENT_LISTEN="127.0.0.1:0",
                    OUTRIDER_AGENT_JOIN_SECONDS="0.000001"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = read_line(proc)
        assert line.startswith("serving lr version 1 on 127.0.0.1:"), (line, proc.stderr)
        with grpc.insecure_channel(line.strip().rsplit(" ", 1)[1]) as channel:
            label = decode(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                raw_request("lr", {"X": x_rows(1)}, id="cli-1")))["label"][0]
            reply = agent_pb2_grpc.FeedbackServiceStub(channel).Feedback(agent_pb2.FeedbackRequest(labels=[
                agent_pb2.Label(request_id="cli-1", class_label=str(label)),
                agent_pb2.Label(request_id="cli-2", class_label=str(label))]))
            assert (reply.matched, reply.unmatched) == (0, 2)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def test_a_request_with_a_megabyte_id_is_served_but_its_prediction_not_kept(served):
    session, infer, feedback = served
    long_id = "i" * (1 << 20)
    feeds = {"X": x_rows(2)}
    reply = infer.ModelInfer(raw_request("lr", feeds, id=long_id))
    assert reply.id == long_id
    np.testing.assert_array_equal(decode(reply)["label"], session.inference_session.run(None, feeds)[0])
    assert len(session.predictions) == 0 and session.predictions.stats()["ids_too_long"] == 1
    reply = feedback.Feedback(agent_pb2.FeedbackRequest(labels=[agent_pb2.Label(request_id=long_id, class_label="1")]))
    assert (reply.matched, reply.unmatched) == (0, 1)


def test_a_feedback_body_over_its_limit_is_refused_before_it_is_parsed(served):
    session, infer, feedback = served
    infer.ModelInfer(raw_request("lr", {"X": x_rows(1)}, id="a"))
    labels = [agent_pb2.Label(request_id="a", class_label="c" * 5000)] * 2000  # 10 MB
    with pytest.raises(grpc.RpcError) as info:
        feedback.Feedback(agent_pb2.FeedbackRequest(labels=labels))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"over this server's limit of {MAX_FEEDBACK_BYTES} bytes" in info.value.details()
    assert session.predictions.pending() == (0, 0)
    reply = feedback.Feedback(agent_pb2.FeedbackRequest(labels=labels[:1000]))  # 5 MB: taken
    assert (reply.matched, reply.unmatched) == (1000, 0)


def test_a_monitored_session_takes_its_feedback_limits(lr):
    with monitored(lr, feedback_limits=FeedbackLimits(max_request_id_chars=4, max_classes=3)) as sess:
        x = x_rows(4)
        served = sess.run(None, {"X": x}, request_id="12345")  # one character too many: served, not kept
        np.testing.assert_array_equal(served[0], ort.InferenceSession(lr, providers=PROVIDERS).run(None, {"X": x})[0])
        assert len(sess.predictions) == 0 and sess.predictions.stats()["ids_too_long"] == 1
        sess.run(None, {"X": x}, request_id="1234")
        assert all(sess.feedback("1234", f"class-{row}", row=row) for row in range(4))
        assert len(sess.predictions.take_performance().classes) == 3
