"""Agents' reservoir samples of rows: uniform and bounded on the agent, checked, stored apart, expired and
exported by the collector (``outrider data export``)."""
from __future__ import annotations

import csv
import io
import json
import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from scipy import stats

from agent import MonitoredSession, examples
from agent.capture import FEATURE, PREDICTION, Reduce, Slot
from agent.errors import InvalidArgument
from agent.sinks import InMemorySink
from agent.worker import MAX_SAMPLE_ROWS, Identity, WindowBuilder
from collector.base.auth import AuthConfig
from collector.base.ingest import Limits, validate_window
from collector.store.rollup import RetentionPolicy
from collector.store.store import Store
from protos import collector_pb2 as pb
from protos import summary_pb2
from test_audit import ALICE_TOKEN, AUTH_TOML, VIEWER_TOKEN, bearer  # alice: operator, vera: viewer
from test_collector_cli import cli, one_line_error
from test_collector_server import HANG_GUARD, NS, REJECTED, STORED, batch, hello, results, running, window
from test_exporter import wait_until

AGENT_TOKEN = "agent-token-0123456789"
AUTH = AUTH_TOML + f'\n[[agent]]\nname = "edge-1"\ntoken = "{AGENT_TOKEN}"\n'
IDENTITY = Identity("edge-1", "run", "m", "1", "")
NUMBER = Slot("X", FEATURE, Reduce.NUMERIC, np.dtype(np.float32), (1,), ["x"])
TEXT = Slot("label", PREDICTION, Reduce.CATEGORICAL, np.dtype("<U32"), (), ["label"], is_output=True)


def feed(builder: WindowBuilder, start: int, n: int, sizes=(1, 7, 64, 300)) -> None:
    """Rows start..start+n-1 in blocks of changing size: value i as a number and as the string str(i)."""
    i, k = start, 0
    while i < start + n:
        m = min(sizes[k % len(sizes)], start + n - i)
        values = np.arange(i, i + m)
        builder.add_rows([values.astype(np.float32).reshape(m, 1), values.astype(str).astype("<U32")])
        i, k = i + m, k + 1


def columns(sample: summary_pb2.RowSample) -> dict[str, list]:
    return {c.name: list(c.numbers) if c.numbers else list(c.strings) for c in sample.columns}


# ------------------------------------------------------------------ the reservoir


def test_the_reservoir_is_a_uniform_sample_in_arrival_order_with_rows_kept_whole():
    rows, size, windows = 1000, 50, 400
    builder = WindowBuilder((NUMBER, TEXT), IDENTITY, sample_rows=size, seed=7)
    kept = np.zeros(rows, np.int64)
    for _ in range(windows):
        feed(builder, 0, rows)
        sample = builder.close(time.time_ns(), 0, 0).sample
        got = columns(sample)
        assert sample.seen == rows and len(got["x"]) == size
        assert got["label"] == [str(int(v)) for v in got["x"]]  # the same row in every column
        assert got["x"] == sorted(set(got["x"]))  # distinct rows, in the order they came
        kept[np.array(got["x"], np.int64)] += 1
    # Every row of a window is kept with probability size/rows: flat over positions. A biased sample
    # ("the first 50 rows", "the last 50") puts everything into one of these bins and fails.
    per_bin = kept.reshape(10, -1).sum(axis=1)
    assert stats.chisquare(per_bin).pvalue > 0.001, per_bin
    assert stats.chisquare(kept).pvalue > 0.001
    first_only = np.zeros(rows, np.int64)
    first_only[:size] = windows
    assert stats.chisquare(first_only.reshape(10, -1).sum(axis=1)).pvalue < 1e-9  # what the test rejects


def test_the_sample_is_bounded_and_restarts_with_each_window():
    builder = WindowBuilder((NUMBER, TEXT), IDENTITY, sample_rows=20, seed=1)
    assert [a.shape[0] for a in builder.reservoir.arrays] == [20, 20]  # memory: at most sample_rows rows
    feed(builder, 0, 5)
    first = builder.close(time.time_ns(), 0, 0).sample
    assert first.seen == 5 and columns(first)["x"] == [0, 1, 2, 3, 4]  # fewer rows than the size: all of them
    feed(builder, 100, 50_000, sizes=(8192,))
    second = builder.close(time.time_ns(), 0, 0).sample
    assert second.seen == 50_000 and len(columns(second)["x"]) == 20
    assert all(100 <= v < 50_100 for v in columns(second)["x"])  # nothing left over from the first window
    assert not builder.close(time.time_ns(), 0, 0).HasField("sample")  # a window without rows has no sample


def test_off_by_default_and_bad_sizes_are_refused(lr_model):
    builder = WindowBuilder((NUMBER, TEXT), IDENTITY)
    feed(builder, 0, 100)
    assert builder.reservoir is None and not builder.close(time.time_ns(), 0, 0).HasField("sample")
    sess = MonitoredSession(str(lr_model), sink=InMemorySink(), window_rows=10, summarizer="thread")
    sess.run(None, {"X": np.zeros((25, 20), np.float32)})
    sess.close()
    assert sess.sink.windows and not any(w.HasField("sample") for w in sess.sink.windows)
    for bad in (-1, MAX_SAMPLE_ROWS + 1, 2.5, True, "10"):
        with pytest.raises(ValueError, match="sample_rows must be a whole number"):
            MonitoredSession(str(lr_model), sink=InMemorySink(), sample_rows=bad)
    assert "from 0 to 10000" in one_line_error(cli("agent", "serve", "--model", str(lr_model), "--sample-rows", "-1"))
    assert "must be greater than 0" in one_line_error(cli("collector", "serve", "--sample-retention", "0"))


# ------------------------------------------------------------------ checks on the collector


def sampled(seq: int, sample: summary_pb2.RowSample | None = None, **kw) -> summary_pb2.WindowSummary:
    """A valid 10-row window (``test_collector_server.window``) with a sample of 3 of its rows."""
    w = window(seq, **kw)
    if sample is None:
        sample = row_sample(x={"numbers": [1, 4, 8]}, c={"strings": ["a", "", "b"]})
    w.sample.CopyFrom(sample)
    return w


def row_sample(seen: int = 10, **columns: dict) -> summary_pb2.RowSample:
    return summary_pb2.RowSample(seen=seen, columns=[summary_pb2.RowSample.Column(name=n.rstrip("_"), **v)
                                                     for n, v in columns.items()])


BAD_SAMPLES = [
    (row_sample(x={"numbers": [1, 2, 3]}, y={"numbers": [1, 2]}), "has 2 values but the columns before it have 3"),
    (row_sample(seen=2, x={"numbers": [1, 2, 3]}), "more than the 2 it was drawn from"),
    (row_sample(seen=11, x={"numbers": [1]}), "drawn from 11 rows but the window has 10"),
    (row_sample(x={"numbers": [1], "strings": ["a"]}), "both numbers and strings"),
    (row_sample(x={"numbers": [1]}, x_={"numbers": [2]}), "appears more than once"),
    (row_sample(x={}), "has no values"),
    (row_sample(**{"": {"numbers": [1]}}), "needs a printable name"),
    (row_sample(x={"strings": ["a" * 5000]}), "over 4096 characters"),
]


@pytest.mark.parametrize("sample,words", BAD_SAMPLES)
def test_a_malformed_sample_fails_validation(sample, words):
    with pytest.raises(InvalidArgument, match=words):
        validate_window(sampled(0, sample))


def test_bad_windows_are_rejected_whole_and_good_samples_stored_apart(db_url):
    db = db_url
    with running(db, limits=Limits(max_sample_rows=2), drift_interval=0) as c:
        conn = c.connect(hello(), batch(sampled(0, row_sample(x={"numbers": [1, 2]})), sampled(1),
                                        sampled(2, row_sample(x={"numbers": [1]}, y={"strings": []}))))
        acks = conn.acks(3)
        assert results(acks) == {0: STORED, 1: REJECTED, 2: REJECTED}
        reasons = {a.seq: a.reason for a in acks}
        assert "limit of 2" in reasons[1] and "has 0 values" in reasons[2]
        [stored] = c.windows(model_name="credit", include_summaries=True)
        assert stored.seq == 0 and not stored.summary.HasField("sample")  # the body never carries rows
        conn.close()
    with Store(db) as store:
        assert store.read().execute("SELECT seq, rows FROM row_samples").fetchall() == [(0, 2)]
        assert store.read().execute("SELECT count(*) FROM windows").fetchone()[0] == 1


def test_samples_are_deleted_after_their_retention_and_a_resend_is_stored_once(db_url):
    now = time.time_ns()
    with Store(db_url) as store:
        ages = (9 * 86400, 3600, 60)
        store.submit_windows([sampled(i, end_ns=now - age * NS) for i, age in enumerate(ages)]).result()
        store.submit_windows([sampled(2, end_ns=now - 60 * NS)]).result()  # a resend: DUPLICATE, no second sample
        count = "SELECT count(*) FROM row_samples"
        assert store.read().execute(count).fetchone()[0] == 3
        store.rollup(now, RetentionPolicy(raw_seconds=86400 * 30))  # default: samples kept 7 days
        assert [r[0] for r in store.read().execute("SELECT seq FROM row_samples ORDER BY seq")] == [1, 2]
        store.rollup(now, RetentionPolicy(raw_seconds=86400 * 30, sample_seconds=600))
        assert [r[0] for r in store.read().execute("SELECT seq FROM row_samples")] == [2]
        assert store.read().execute("SELECT count(*) FROM windows").fetchone()[0] == 3  # windows keep theirs


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real collector with tokens; an agent (helper process) serving a skl2onnx model with --sample-rows 30
    that sent 5 windows of 200 rows; the rows it was sent and the model's answers to them."""
    tmp = tmp_path_factory.mktemp("samples")
    model = examples.logistic_regression()
    x = np.random.default_rng(3).standard_normal((1000, 20)).astype(np.float32)
    with running(tmp / "c.db", auth=AuthConfig.from_toml(AUTH), drift_interval=0) as c:
        sess = MonitoredSession(model, model_name="churn", model_version="3", agent_id="edge-1", window_rows=200,
                                window_seconds=None, collector=c.server.address, collector_token=AGENT_TOKEN,
                                spool_dir=tmp / "spool", sample_rows=30)
        for i in range(0, len(x), 8):
            sess.run(None, {"X": x[i:i + 8]})
        sess.close(timeout=HANG_GUARD)
        wait_until(lambda: sum(m.rows for m in c.ops.Status(pb.StatusRequest(), metadata=bearer(VIEWER_TOKEN),
                                                               timeout=HANG_GUARD).models) == len(x),
                   HANG_GUARD, "the agent's windows at the collector")
        label, proba = ort.InferenceSession(model).run(None, {"X": x})
        answers = {tuple(row.astype(np.float64)): (int(lab), *map(float, p)) for row, lab, p in zip(x, label, proba)}
        yield c, answers


def export(c, *args: str, token: str = ALICE_TOKEN):
    return cli("data", "export", *args, "--collector", c.server.address, "--token", token)


def test_exported_rows_are_rows_that_were_sent_with_their_predictions(served):
    c, answers = served
    done = export(c, "churn", "--since", "1h")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "wrote 150 rows from 5 windows of model 'churn' to stdout"
    table = list(csv.reader(io.StringIO(done.stdout)))
    header, rows = table[0], table[1:]
    features = [f"X[{i}]" for i in range(20)]
    assert header == ["window_end", "agent_id", "model_version", *features, "label", "probabilities[0]",
                      "probabilities[1]"]
    assert len(rows) == 150
    seen = set()
    for row in rows:
        assert row[0].endswith("Z") and row[1:3] == ["edge-1", "3"]
        key = tuple(float(v) for v in row[3:23])
        assert key in answers, "an exported row that was never sent"
        label, p0, p1 = answers[key]
        assert int(row[23]) == label and float(row[24]) == pytest.approx(p0) and float(row[25]) == pytest.approx(p1)
        seen.add(key)
    assert len(seen) == 150  # a row is sampled once


def test_jsonl_to_a_file_and_the_time_and_version_filters(served, tmp_path):
    c, answers = served
    out = tmp_path / "rows.jsonl"
    done = export(c, "churn", "--version", "3", "--format", "jsonl", "--out", str(out))
    assert done.returncode == 0 and done.stdout == "" and f"to {out}" in done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 150 and rows[0]["model_version"] == "3"
    assert all(tuple(float(r[f"X[{i}]"]) for i in range(20)) in answers for r in rows)
    for args in (("--version", "4"), ("--until", "2000-01-01T00:00:00Z")):
        nothing = export(c, "churn", *args, "--out", str(tmp_path / "none.csv"))
        assert nothing.returncode == 0 and nothing.stdout == "" and not (tmp_path / "none.csv").exists()
        assert "no sampled rows of model 'churn'" in nothing.stderr and "--sample-rows" in nothing.stderr


def test_export_refuses_viewers_unknown_models_and_bad_ranges(served, tmp_path):
    c, _ = served
    assert "vera" in one_line_error(export(c, "churn", token=VIEWER_TOKEN), 1)  # refused by the collector
    assert "no model named 'nope'" in one_line_error(export(c, "nope"), 1)
    assert "since" in one_line_error(export(c, "churn", "--since", "2100-01-01"))  # after now, the default until
    assert "--since is after --until" in one_line_error(export(c, "churn", "--since", "1m", "--until", "2h"))
    assert "neither a duration" in one_line_error(export(c, "churn", "--since", "yesterday"))
    assert "does not exist" in one_line_error(export(c, "churn", "--out", str(tmp_path / "no" / "f.csv")))
    request = pb.ExportDataRequest(model_name="churn")
    for metadata, code in ((bearer(VIEWER_TOKEN), grpc.StatusCode.PERMISSION_DENIED),
                           (bearer(ALICE_TOKEN), None)):
        call = c.ops.ExportData(request, metadata=metadata, timeout=HANG_GUARD)
        if code is None:
            assert sum(1 for _ in call) == 5
            continue
        with pytest.raises(grpc.RpcError) as refused:
            list(call)
        assert refused.value.code() == code
    for request, code in ((pb.ExportDataRequest(model_name="nope"), grpc.StatusCode.NOT_FOUND),
                          (pb.ExportDataRequest(model_name="churn", since_unix_nano=2, until_unix_nano=1),
                           grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as refused:
            list(c.ops.ExportData(request, metadata=bearer(ALICE_TOKEN), timeout=HANG_GUARD))
        assert refused.value.code() == code
