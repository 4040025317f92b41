"""MonitoredSession: drop-in behaviour, hot-path capture, windows, drops, threads, helper process."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from agent import MonitoredSession, examples, sketches
from agent.sinks import InMemorySink
from protos import summary_pb2

PROVIDERS = ["CPUExecutionProvider"]


@pytest.fixture(autouse=True, params=["c", "python"])
def copier(request, monkeypatch):
    """Every test runs with the C copier and with the pure-Python closure."""
    import agent.session

    if request.param == "python":
        monkeypatch.setattr(agent.session, "_Capture", None)
    else:
        assert agent.session._Capture is not None, "agent._capture is not built (pip install -e .)"
    return request.param


def monitored(model: bytes, **kw) -> MonitoredSession:
    kw.setdefault("window_seconds", None)
    kw.setdefault("summarizer", "thread")  # fast to start; the helper process has its own tests
    return MonitoredSession(model, providers=PROVIDERS, **kw)


def merged(windows, name: str):
    cols = [c for w in windows for c in w.columns if c.name == name]
    assert cols, f"no column {name!r}"
    total = sketches.from_proto(cols[0])
    for c in cols[1:]:
        total.merge(sketches.from_proto(c))
    return total


def summary_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in ("outrider-summary", "outrider-windows")]


@pytest.fixture(scope="module")
def lr() -> bytes:
    return examples.logistic_regression()


@pytest.mark.parametrize("build", [
    examples.logistic_regression, lambda: examples.logistic_regression(zipmap=True),
    examples.random_forest, examples.linear_regression,
])
def test_outputs_equal_bare_onnxruntime(build):
    model = build()
    bare = ort.InferenceSession(model, providers=PROVIDERS)
    x = examples.tabular_data(n=33, n_features=bare.get_inputs()[0].shape[1], seed=3)[0]
    with monitored(model) as sess:
        got = sess.run(None, {"X": x})
        assert [i.name for i in sess.get_inputs()] == [i.name for i in bare.get_inputs()]
        assert [o.name for o in sess.get_outputs()] == [o.name for o in bare.get_outputs()]
        assert sess.get_modelmeta().producer_name == bare.get_modelmeta().producer_name
    want = bare.run(None, {"X": x})
    for g, w in zip(got, want):
        if isinstance(w, list):
            assert g == w
        else:
            np.testing.assert_array_equal(g, w)


def test_output_names_select_and_unknown_name_raises_like_onnxruntime(lr):
    x = examples.tabular_data(n=4)[0]
    with monitored(lr) as sess:
        (probs,) = sess.run(["probabilities"], {"X": x})
        assert probs.shape == (4, 2)
        with pytest.raises(Exception) as err:
            sess.run(["nope"], {"X": x})
        assert "nope" in str(err.value)


def test_model_errors_are_counted_and_reraised(lr):
    with monitored(lr) as sess:
        with pytest.raises(Exception):
            sess.run(None, {"X": np.zeros((2, 3), np.float32)})
        sess.run(None, {"X": np.zeros((2, 20), np.float32)})
    assert sess.stats()["errors"] == 1
    (window,) = sess.sink.windows
    assert window.errors == 1 and window.rows == 2


def test_windows_by_rows_account_for_every_row_and_close_flushes(lr):
    x, _ = examples.tabular_data(n=1050)
    sink = InMemorySink()
    with monitored(lr, sink=sink, window_rows=200) as sess:
        for i in range(0, 1050, 50):
            sess.run(None, {"X": x[i:i + 50]})
    windows = sink.windows
    assert [w.rows for w in windows] == [200] * 5 + [50]  # the partial last window is flushed
    assert [w.seq for w in windows] == list(range(6))
    assert sum(w.calls for w in windows) == 21
    assert {w.run_id for w in windows} == {sess.identity.run_id}
    assert all(w.dropped_rows == 0 and w.model_sha256 == sess.model_sha256 for w in windows)
    names = [c.name for c in windows[0].columns]
    assert names == [f"X[{i}]" for i in range(20)] + ["label", "probabilities[0]", "probabilities[1]", "@confidence"]
    label = windows[0].columns[20]
    assert label.kind == summary_pb2.ColumnSummary.CATEGORICAL and label.role == summary_pb2.ColumnSummary.PREDICTION
    assert windows[0].columns[0].role == summary_pb2.ColumnSummary.FEATURE
    # the summaries describe the rows that were served
    x0 = merged(windows, "X[0]")
    assert x0.count == 1050
    assert x0.mean == pytest.approx(float(x[:, 0].astype(np.float64).mean()), rel=1e-9)
    assert x0.min == pytest.approx(float(x[:, 0].min())) and x0.max == pytest.approx(float(x[:, 0].max()))
    assert not summary_threads()


def test_latency_sketch_counts_every_call(lr):
    with monitored(lr) as sess:
        for _ in range(7):
            sess.run(None, {"X": np.ones((1, 20), np.float32)})
    (window,) = sess.sink.windows
    lat = sketches.NumericSketch.from_proto(window.latency)
    assert window.calls == 7 and lat.count == 7 and lat.quantiles([0.5])[0] > 0 and lat.min > 0


def test_full_ring_drops_and_counts_never_blocks(lr):
    """A stuck sink stalls the worker; requests keep succeeding and the excess is counted."""
    release = threading.Event()

    class StuckSink(InMemorySink):
        def export(self, window):
            release.wait(30)
            super().export(window)

    sink = StuckSink()
    x = np.ones((4, 20), np.float32)
    sess = monitored(lr, sink=sink, window_rows=16, ring_rows=16)
    served = 0
    for _ in range(200):
        sess.run(None, {"X": x})
        served += 4
    assert sess.stats()["dropped_rows"] > 0
    release.set()
    sess.close()
    windows = sink.windows
    assert sum(w.rows for w in windows) + sum(w.dropped_rows for w in windows) == served
    assert sum(w.dropped_rows for w in windows) == sess.stats()["dropped_rows"]


def test_rows_the_worker_fails_on_are_counted_as_skipped_and_serving_goes_on(lr, monkeypatch):
    """A summary step that raises skips its rows, counted apart from a full ring's, and the next
    rows are summarised as before."""
    from agent import worker

    add_rows, failures = worker.WindowBuilder.add_rows, []

    def fail_once(self, blocks):
        if not failures:
            failures.append(len(blocks[0]))
            raise RuntimeError("a summary step that fails")
        add_rows(self, blocks)

    monkeypatch.setattr(worker.WindowBuilder, "add_rows", fail_once)
    sink = InMemorySink()
    sess = monitored(lr, sink=sink, window_rows=1000)
    x = np.ones((10, 20), np.float32)
    for _ in range(10):
        sess.run(None, {"X": x})
    sess.close()
    stats = sess.stats()
    assert failures and stats["skipped_rows"] > 0 and stats["dropped_rows"] == stats["skipped_rows"]
    assert sum(w.rows for w in sink.windows) + stats["skipped_rows"] == 100
    assert sum(w.dropped_rows for w in sink.windows) == stats["skipped_rows"]


def test_concurrent_runs_lose_nothing(lr):
    x, _ = examples.tabular_data(n=4000, seed=7)
    sink = InMemorySink()
    sess = monitored(lr, sink=sink, window_rows=1000)
    errors = []

    def client(part: np.ndarray) -> None:
        try:
            for i in range(0, len(part), 5):
                out = sess.run(None, {"X": part[i:i + 5]})
                assert out[1].shape == (len(part[i:i + 5]), 2)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(p,)) for p in np.array_split(x, 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sess.close()
    assert not errors
    assert sum(w.rows for w in sink.windows) == 4000 and sess.stats()["dropped_rows"] == 0
    # every row was copied whole: the merged means equal the data's
    for j in (0, 7, 19):
        assert merged(sink.windows, f"X[{j}]").mean == pytest.approx(float(x[:, j].astype(np.float64).mean()), rel=1e-9)


def test_feature_names_from_option_and_from_model_metadata(lr):
    names = [f"f{i}" for i in range(20)]
    with monitored(lr, feature_names=names) as sess:
        sess.run(None, {"X": np.zeros((1, 20), np.float32)})
    assert [c.name for c in sess.sink.windows[0].columns][:20] == names

    model = onnx.load_from_string(lr)
    entry = model.metadata_props.add()
    entry.key, entry.value = "feature_names", json.dumps([f"m{i}" for i in range(20)])
    with monitored(model.SerializeToString()) as sess:
        sess.run(None, {"X": np.zeros((1, 20), np.float32)})
    assert [c.name for c in sess.sink.windows[0].columns][:3] == ["m0", "m1", "m2"]


def test_string_inputs_become_categorical_columns():
    model = examples.mixed_inputs_classifier()
    cities = np.array([["paris"], ["lyon"], ["paris"], ["rome"], [""]] * 20, dtype=object)
    num = np.zeros((100, 3), np.float32)
    with monitored(model) as sess:
        sess.run(None, {"num": num, "city": cities})
    (window,) = sess.sink.windows
    city = next(c for c in window.columns if c.name == "city")
    assert city.kind == summary_pb2.ColumnSummary.CATEGORICAL
    sk = sketches.from_proto(city)
    assert sk.count == 100 and sk.missing == 20
    assert dict(sk.frequent_items())["paris"] == 40
    assert round(sk.distinct_estimate()) == 3


def test_other_shapes_are_summarised_per_sample():
    rng = np.random.default_rng(1)
    images = rng.normal(2.0, 3.0, size=(64, 3, 8, 8)).astype(np.float32)
    with monitored(examples.image_scorer()) as sess:
        sess.run(None, {"image": images})
    (window,) = sess.sink.windows
    names = [c.name for c in window.columns]
    assert names == ["image.mean", "image.std", "image.l2", "score"]
    flat = images.reshape(64, -1).astype(np.float64)
    assert merged([window], "image.mean").mean == pytest.approx(flat.mean(axis=1).mean(), rel=1e-9)
    assert merged([window], "image.std").mean == pytest.approx(flat.std(axis=1).mean(), rel=1e-9)
    assert merged([window], "image.l2").max == pytest.approx(np.linalg.norm(flat, axis=1).max(), rel=1e-6)


def test_failing_sink_is_counted_and_inference_continues(lr):
    class Broken:
        def export(self, window):
            raise RuntimeError("sink down")

    sess = monitored(lr, sink=Broken(), window_rows=2)
    for _ in range(5):
        sess.run(None, {"X": np.zeros((2, 20), np.float32)})
    sess.close()
    assert sess.export_failures == 5


def test_helper_process_summarises_through_shared_memory(lr):
    x, _ = examples.tabular_data(n=3000, seed=11)
    sink = InMemorySink()
    sess = monitored(lr, sink=sink, window_rows=1000, summarizer="process")
    for i in range(0, 3000, 10):
        sess.run(None, {"X": x[i:i + 10]})
    sink.wait_for(3, timeout=60)
    sess.close()
    assert [w.rows for w in sink.windows] == [1000, 1000, 1000]
    assert merged(sink.windows, "X[3]").mean == pytest.approx(float(x[:, 3].astype(np.float64).mean()), rel=1e-9)
    assert sess._summarizer.proc.poll() == 0  # the helper exited cleanly
    assert not summary_threads()


def test_helper_process_runs_with_fixed_malloc_thresholds_unless_the_operator_set_them(lr, monkeypatch):
    from agent.summarizer import HELPER_MALLOC

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")  # an operator's own setting
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    sess = monitored(lr, summarizer="process")
    try:
        raw = Path(f"/proc/{sess._summarizer.proc.pid}/environ").read_bytes()
    finally:
        sess.close()
    env = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
    assert env["MALLOC_MMAP_THRESHOLD_"] == HELPER_MALLOC["MALLOC_MMAP_THRESHOLD_"] == str(32 << 20)
    assert env["MALLOC_TRIM_THRESHOLD_"] == "12345"


def test_wrapping_and_non_contiguous_inputs_are_copied_whole(lr):
    """Batches that straddle the ring's end, and strided (Fortran-order, sliced) feeds."""
    x, _ = examples.tabular_data(n=700, seed=5)
    sink = InMemorySink()
    with monitored(lr, sink=sink, window_rows=100, ring_rows=64) as sess:
        for i in range(0, 700, 7):
            part = x[i:i + 7]
            feed = np.asfortranarray(part) if i % 2 else part
            sess.run(None, {"X": feed})
            # let the worker catch up: this test is about copies, not drops
            while (lambda st: st["rows_captured"] - st["rows_summarised"])(sess.stats()) > 40:
                time.sleep(0.005)
    assert sess.stats()["dropped_rows"] == 0
    assert sum(w.rows for w in sink.windows) == 700
    for j in (0, 19):
        col = merged(sink.windows, f"X[{j}]")
        assert col.mean == pytest.approx(float(x[:, j].astype(np.float64).mean()), rel=1e-9)
        assert col.min == pytest.approx(float(x[:, j].min())) and col.max == pytest.approx(float(x[:, j].max()))


def test_time_windows_tile_the_timeline(lr):
    sink = InMemorySink()
    sess = monitored(lr, sink=sink, window_seconds=0.05)
    served = 0
    while len(sink.windows) < 3:  # a wait, not a timing assertion
        sess.run(None, {"X": np.ones((3, 20), np.float32)})
        served += 3
        time.sleep(0.005)
    sess.close()
    windows = sink.windows
    assert sum(w.rows for w in windows) == served
    for before, after in zip(windows, windows[1:]):
        assert after.start_unix_nano == before.end_unix_nano  # tumbling: no gap, no overlap
        assert after.seq == before.seq + 1


def test_every_dtype_is_captured_with_the_right_kind():
    model = examples.typed_identity()
    rng = np.random.default_rng(0)
    feed = {f"{t}_in": rng.integers(0, 3, size=(6, 2)).astype(dt) for t, dt in
            [("fp16", np.float16), ("fp32", np.float32), ("fp64", np.float64), ("int8", np.int8),
             ("int16", np.int16), ("int32", np.int32), ("int64", np.int64), ("uint8", np.uint8),
             ("bool", np.bool_)]}
    feed["bytes_in"] = np.array([["a", "b"]] * 6, dtype=object)
    with monitored(model) as sess:
        sess.run(None, feed)
    (window,) = sess.sink.windows
    kinds = {c.name: c.kind for c in window.columns}
    numeric, categorical = summary_pb2.ColumnSummary.NUMERIC, summary_pb2.ColumnSummary.CATEGORICAL
    assert kinds["int64_in[0]"] == numeric and kinds["bool_in[1]"] == numeric and kinds["fp16_in[0]"] == numeric
    assert kinds["bytes_in[0]"] == categorical
    assert kinds["int64_out[0]"] == categorical  # integer outputs are class labels
    assert merged([window], "int32_in[1]").mean == pytest.approx(float(feed["int32_in"][:, 1].mean()))
    assert dict(merged([window], "bytes_in[1]").frequent_items()) == {"b": 6}


@pytest.mark.parametrize("build, feed", [
    (examples.mixed_inputs_classifier,
     lambda: {"num": np.zeros((40, 3), np.float32), "city": np.array([["lyon"], ["nice"]] * 20, dtype=object)}),
    (lambda: examples.logistic_regression(zipmap=True), lambda: {"X": np.ones((40, 20), np.float32)}),
])
def test_helper_process_handles_strings_and_zipmap(build, feed):
    sink = InMemorySink()
    with monitored(build(), sink=sink, summarizer="process") as sess:
        sess.run(None, feed())
    (window,) = sink.windows
    assert window.rows == 40 and window.dropped_rows == 0
    names = [c.name for c in window.columns]
    if "city" in names:
        assert dict(merged([window], "city").frequent_items()) == {"lyon": 20, "nice": 20}
    else:
        assert names[-3:] == ["output_probability[0]", "output_probability[1]", "@confidence"]
        assert merged([window], "output_probability[1]").count == 40
