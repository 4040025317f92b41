"""Drift evaluation in the collector: profiles vs stored windows, alerts, webhook, ops calls and CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from agent import sketches
from collector.api.server import serve_collector
from collector.monitoring.evaluation import DriftEvaluator
from collector.store.store import Store
from protos import collector_pb2 as pb
from protos import collector_pb2_grpc as pb_grpc
from protos import summary_pb2

ROOT = Path(__file__).resolve().parents[1]
CS = summary_pb2.ColumnSummary
S = 1_000_000_000
CITIES = np.array(["paris", "lyon", "nice"])


def columns(rng: np.random.Generator, n: int, *, shift: float = 0.0, k: int = sketches.DEFAULT_K,
            city_p=(0.3, 0.4, 0.3)) -> list[CS]:
    x = sketches.NumericSketch(k)
    x.update(rng.normal(shift, 1.0, n))
    y = sketches.NumericSketch(k)
    y.update(rng.normal(5.0, 2.0, n))
    city = sketches.CategoricalSketch()
    city.update(rng.choice(CITIES, size=n, p=city_p))
    return [x.to_proto("x", CS.FEATURE, "X"), y.to_proto("y", CS.FEATURE, "X"), city.to_proto("city", CS.FEATURE, "c")]


def profile(rng: np.random.Generator, accuracy: float | None = None) -> summary_pb2.ReferenceProfile:
    p = summary_pb2.ReferenceProfile(model_name="m", rows=100_000, data_sha256="ab" * 32, data_name="ref.csv",
                                     columns=columns(rng, 100_000, k=sketches.REFERENCE_K))
    if accuracy is not None:
        right = int(accuracy * 1000)
        p.performance.CopyFrom(performance(right, 1000))
    return p


def performance(right: int, labeled: int) -> summary_pb2.Performance:
    wrong = labeled - right
    return summary_pb2.Performance(labeled=labeled, classes=["0", "1"],
                                   confusion=[right // 2, wrong // 2, wrong - wrong // 2, right - right // 2])


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000 * S

    def __call__(self) -> int:
        return self.now


class Recorder:
    """A webhook stand-in: collects notified events."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def notify(self, event: dict) -> None:
        self.events.append(event)

    def close(self, timeout: float = 0) -> None:
        pass


@pytest.fixture
def setup(db_url):
    rng = np.random.default_rng(7)
    store = Store(db_url)
    clock, hook = Clock(), Recorder()
    evaluator = DriftEvaluator(store, hook, clock=clock)
    seq = [0]

    def send(shift: float = 0.0, n: int = 1000, perf: summary_pb2.Performance | None = None, city_p=(0.3, 0.4, 0.3)):
        """One agent window ending now, then the clock moves on by 10 s."""
        w = summary_pb2.WindowSummary(agent_id="a", run_id="r", seq=seq[0], model_name="m", model_version="1",
                                      start_unix_nano=clock.now - 10 * S, end_unix_nano=clock.now, rows=n, calls=n,
                                      columns=columns(rng, n, shift=shift, city_p=city_p))
        if perf is not None:
            w.performance.CopyFrom(perf)
        store.submit_windows([w]).result()
        seq[0] += 1
        clock.now += 10 * S

    yield store, evaluator, clock, hook, send, rng
    store.close()


def set_span(store: Store, seconds: float) -> None:
    from collector.monitoring import alerts
    from collector.monitoring.drift import DriftConfig

    store.write(lambda db: alerts.set_config(db, "m", DriftConfig(span_seconds=seconds), "test", 0))


def test_without_a_profile_nothing_is_evaluated(setup):
    store, evaluator, *_ = setup
    e = evaluator.evaluate("m", "1")
    assert not e.evaluated and "outrider attach m 1" in e.reason


def test_too_few_rows_is_not_evaluated_and_says_so(setup):
    store, evaluator, clock, hook, send, rng = setup
    store.attach_profile("m", "1", profile(rng), "test", clock.now)
    send(n=300)
    e = evaluator.evaluate("m", "1")
    assert not e.evaluated and "300 rows" in e.reason and not e.columns


def test_a_shift_opens_an_alert_after_k_evaluations_and_clean_traffic_resolves_it(setup):
    store, evaluator, clock, hook, send, rng = setup
    store.attach_profile("m", "1", profile(rng), "test", clock.now)
    set_span(store, 30)  # the last three windows of 1,000 rows
    for _ in range(3):
        send()
    clean = evaluator.evaluate("m", "1")
    assert clean.evaluated and clean.rows == 3000 and not any(c.drifted for c in clean.columns)
    verdicts = []
    for _ in range(6):
        send(shift=0.5)
        e = evaluator.evaluate("m", "1")
        verdicts.append({c.name for c in e.columns if c.drifted})
    assert all(v <= {"x"} for v in verdicts) and verdicts[-1] == {"x"}  # only the shifted column
    (opened,) = [ev for ev in hook.events if ev["event"] == "alert.opened"]
    assert opened["alert"]["column"] == "x" and opened["alert"]["state"] == "open"
    from collector.monitoring import alerts

    (alert,) = alerts.alerts(store.read(), "m")
    assert alert.column == "x" and alert.kind == "drift"
    for _ in range(8):
        send()
        evaluator.evaluate("m", "1")
    assert [ev["event"] for ev in hook.events] == ["alert.opened", "alert.resolved"]
    assert alerts.alerts(store.read(), "m") == []
    assert len(alerts.history(store.read(), "m", "1", 100)) == 1 + 6 + 8  # every evaluation is kept


def test_a_category_share_change_is_flagged(setup):
    store, evaluator, clock, hook, send, rng = setup
    store.attach_profile("m", "1", profile(rng), "test", clock.now)
    set_span(store, 30)
    for _ in range(3):
        send(city_p=(0.45, 0.31, 0.24))
    e = evaluator.evaluate("m", "1")
    assert {c.name for c in e.columns if c.drifted} == {"city"}


def test_realised_accuracy_drop_opens_a_performance_alert(setup):
    store, evaluator, clock, hook, send, rng = setup
    store.attach_profile("m", "1", profile(rng, accuracy=0.9), "test", clock.now)
    set_span(store, 30)
    for _ in range(6):
        send(perf=performance(600, 1000))  # 60 % against 90 %
        e = evaluator.evaluate("m", "1")
    assert e.accuracy == pytest.approx(0.6) and e.reference_accuracy == pytest.approx(0.9)
    perf = next(c for c in e.columns if c.name == "performance")
    assert perf.drifted and "accuracy 0.600" in perf.reason
    assert any(ev["alert"]["kind"] == "performance" for ev in hook.events)


# --- over gRPC and through the CLI ---------------------------------------------------------

@pytest.fixture
def served(db_url):
    running = serve_collector(db_url, "127.0.0.1:0", drift_interval=0)
    channel = grpc.insecure_channel(running.address)
    yield running, pb_grpc.OpsServiceStub(channel)
    channel.close()
    running.stop(grace=1)


def test_ops_calls(served):
    running, ops = served
    rng = np.random.default_rng(3)
    with pytest.raises(grpc.RpcError) as err:
        ops.Drift(pb.DriftRequest(model_name="m"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "outrider attach m" in err.value.details()
    ops.AttachProfile(pb.AttachProfileRequest(model_name="m", model_version="1", profile=profile(rng)), timeout=10)
    reply = ops.Drift(pb.DriftRequest(model_name="m"), timeout=10)
    assert len(reply.latest) == 1 and not reply.latest[0].evaluated and "0 rows" in reply.latest[0].reason
    reply = ops.EvaluateDrift(pb.DriftRequest(model_name="m"), timeout=10)
    assert reply.latest[0].model_version == "1"
    assert ops.ListAlerts(pb.ListAlertsRequest(), timeout=10).alerts == []
    with pytest.raises(grpc.RpcError) as err:
        ops.AckAlert(pb.AckAlertRequest(id=99), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    config = json.loads(ops.GetDriftConfig(pb.DriftConfigRequest(model_name="m"), timeout=10).config_json)
    assert config["consecutive"] == 2
    ops.SetDriftConfig(pb.DriftConfigRequest(model_name="m", config_json='{"consecutive": 3}'), timeout=10)
    got = ops.GetDriftConfig(pb.DriftConfigRequest(model_name="m"), timeout=10)
    assert json.loads(got.config_json)["consecutive"] == 3 and not got.is_default
    for bad in ('{"consecutve": 2}', '{"q": 7}', "not json"):
        with pytest.raises(grpc.RpcError) as err:
            ops.SetDriftConfig(pb.DriftConfigRequest(model_name="m", config_json=bad), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert json.loads(ops.GetDriftConfig(pb.DriftConfigRequest(model_name="m"), timeout=10)
                      .config_json)["consecutive"] == 3  # a refused change changes nothing


def cli(*args: str, address: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    env.update(OUTRIDER_COLLECTOR=address, PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          encoding="utf-8", timeout=60)


def test_cli_drift_alerts_and_config(served):
    running, ops = served
    rng = np.random.default_rng(5)
    ops.AttachProfile(pb.AttachProfileRequest(model_name="m", model_version="1", profile=profile(rng)), timeout=10)
    now = time.time_ns()
    windows = [summary_pb2.WindowSummary(agent_id="a", run_id="r", seq=i, model_name="m", model_version="1",
                                         start_unix_nano=now - (i + 2) * S, end_unix_nano=now - (i + 1) * S,
                                         rows=1000, calls=10, columns=columns(rng, 1000, shift=1.0))
               for i in range(3)]
    running.store.submit_windows(windows).result()
    result = cli("drift-config", "m", "--set", '{"consecutive": 1}', address=running.address)
    assert result.returncode == 0, result.stderr
    result = cli("drift", "m", "--now", address=running.address)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.split()}
    assert "DRIFT" in lines["x"] and "DRIFT" not in lines["y"]
    result = cli("alerts", "--json", address=running.address)
    (alert,) = json.loads(result.stdout)["alerts"]
    assert alert["column"] == "x" and alert["state"] == "open"
    result = cli("alerts", "ack", str(alert["id"]), "--note", "looking", address=running.address)
    assert result.returncode == 0 and "acknowledged" in result.stdout
    again = cli("alerts", "ack", str(alert["id"]), address=running.address)
    assert again.returncode != 0 and len(again.stderr.strip().splitlines()) == 1
    bad = cli("drift-config", "m", "--set", "{nope", address=running.address)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_performance_survives_merges_and_rollups_exactly():
    from collector.store.rollup import merge_windows

    a = summary_pb2.WindowSummary(model_name="m", start_unix_nano=1, end_unix_nano=2, performance=summary_pb2.Performance(
        labeled=5, unmatched=1, classes=["0", "1"], confusion=[2, 1, 0, 2]))
    b = summary_pb2.WindowSummary(model_name="m", start_unix_nano=2, end_unix_nano=3, performance=summary_pb2.Performance(
        labeled=4, classes=["1", "2"], confusion=[1, 1, 0, 2]))
    merged = merge_windows([a, b]).performance
    assert merged.labeled == 9 and merged.unmatched == 1 and list(merged.classes) == ["0", "1", "2"]
    assert list(merged.confusion) == [2, 1, 0,
                                      0, 3, 1,
                                      0, 0, 2]


# --- spans, loud "not compared", and alerts across versions (issue 11) ------------------------------------------


def summary(end_s: int, rows: int, shift: float = 0.0, rng=None) -> summary_pb2.WindowSummary:
    rng = rng or np.random.default_rng(end_s)
    return summary_pb2.WindowSummary(model_name="m", model_version="1", start_unix_nano=(end_s - 10) * S,
                                     end_unix_nano=end_s * S, rows=rows, calls=rows,
                                     columns=columns(rng, rows, shift=shift))


def test_merge_spans_merges_each_window_once_into_every_span_it_belongs_to():
    from collector.monitoring.evaluation import merge_spans
    from collector.store.rollup import merge_windows

    windows = [summary(t, 100 + t) for t in (1000, 990, 980, 700, 400)]  # newest first, as the store lists them
    spans = merge_spans(windows, 1000 * S, [25, 310, 599, 700])
    assert [s.rows for s in spans] == [3270, 4070, 4070, 4570]  # windows ending at or after now - span
    assert spans[1] is spans[2]  # nothing between 310 s and 599 s: the same merge, compared once
    for got, upto in zip(spans, (3, 4, 4, 5)):
        alone = merge_windows(windows[:upto])
        assert (got.start_unix_nano, got.end_unix_nano) == (alone.start_unix_nano, alone.end_unix_nano)
        assert [(c.name, c.count, c.mean) for c in got.columns] == [(c.name, c.count, c.mean) for c in alone.columns]
    assert merge_spans(windows, 2000 * S, [60, 3600])[0] is None  # no window in the last minute
    assert merge_spans([], 1000 * S, [60]) == [None]


def test_a_recent_shift_is_flagged_by_the_short_span_before_the_long_one_would(setup):
    from collector.monitoring import alerts
    from collector.monitoring.drift import DriftConfig

    store, evaluator, clock, hook, send, rng = setup
    store.attach_profile("m", "1", profile(rng), "test", clock.now)
    store.write(lambda db: alerts.set_config(db, "m", DriftConfig(span_seconds=600, short_span_seconds=60), "t", 0))
    for _ in range(54):
        send()
    for _ in range(6):  # the last minute: x moved by half a sigma
        send(shift=0.5)
    e = evaluator.evaluate("m", "1")
    assert e.rows == 60_000 and e.evaluated  # the evaluation's rows and window: the longest span
    by = {c.name: c for c in e.columns}
    assert by["x"].drifted and by["x"].span_seconds == 60 and by["x"].reason.endswith("(last 1 min)")
    assert by["x"].rows == 6000  # its statistics are the short span's
    assert not by["y"].drifted and by["y"].span_seconds == 600 and by["y"].rows == 60_000
    assert e.reason == "drift in x" and e.not_compared == 0
    alone = DriftConfig(span_seconds=600, short_span_seconds=0)  # the hour alone (here: 10 min) misses it
    store.write(lambda db: alerts.set_config(db, "m", alone, "t", 0))
    assert not any(c.drifted for c in evaluator.evaluate("m", "1").columns)


def named_profile(rng: np.random.Generator) -> summary_pb2.ReferenceProfile:
    p = profile(rng)
    p.columns[0].name, p.columns[1].name = "age", "income"  # the reference names its features...
    return p


def test_reference_columns_missing_from_traffic_are_loudly_not_compared(setup):
    store, evaluator, clock, hook, send, rng = setup
    store.attach_profile("m", "1", named_profile(rng), "test", clock.now)  # ... the agents send x and y
    set_span(store, 30)
    for _ in range(3):
        send()
    e = evaluator.evaluate("m", "1")
    assert e.evaluated and e.not_compared == 2
    assert e.reason == ("NOT COMPARED: 2 reference columns (no such column in traffic: age, income); "
                        "none of the 1 compared column drifted")
    by = {c.name: c for c in e.columns}
    assert by["age"].reason == "not compared: no such column in traffic" and by["x"].reason == (
        "not in the reference profile")


def test_cli_drift_never_says_no_drift_when_reference_columns_were_not_compared(served):
    running, ops = served
    rng = np.random.default_rng(6)
    ops.AttachProfile(pb.AttachProfileRequest(model_name="m", model_version="1", profile=named_profile(rng)),
                      timeout=10)
    now = time.time_ns()
    running.store.submit_windows([summary_pb2.WindowSummary(
        agent_id="a", run_id="r", seq=i, model_name="m", model_version="1", start_unix_nano=now - (i + 2) * S,
        end_unix_nano=now - (i + 1) * S, rows=1000, calls=10, columns=columns(rng, 1000)) for i in range(3)]).result()
    shown = cli("drift", "m", "--now", address=running.address)
    assert shown.returncode == 0, shown.stderr
    assert "no drift" not in shown.stdout.lower()
    assert "NOT COMPARED: 2 reference columns (no such column in traffic: age, income)" in shown.stdout
    rows = {line.split()[0]: line for line in shown.stdout.splitlines() if line.split()}
    assert rows["age"].split()[1:3] == ["NOT", "COMPARED"] and rows["city"].split()[1:3] == ["ok", "categorical"]
    assert "  age: not compared: no such column in traffic" in shown.stdout
    data = json.loads(cli("drift", "m", "--json", address=running.address).stdout)
    (latest,) = data["latest"]
    assert latest["not_compared"] == 2 and "no drift" not in latest["reason"]
    assert {c["name"]: c["method"] for c in latest["columns"]}["city"] == "categorical"


def drift_until_alert(setup) -> None:
    """Version 1 of m with a profile and a 30-s span, drifted for 6 evaluations: its alert is open."""
    store, evaluator, clock, _, send, rng = setup
    store.attach_profile("m", "1", profile(rng), "test", clock.now)
    set_span(store, 30)
    for _ in range(6):
        send(shift=0.8)
        evaluator.evaluate("m", "1")


def test_alerts_of_a_version_no_longer_served_are_resolved_and_kept(setup):
    from collector.monitoring import alerts
    from collector.monitoring.drift import DriftConfig
    from collector.web.model_page import model_page

    store, evaluator, clock, hook, send, rng = setup
    drift_until_alert(setup)
    (opened,) = alerts.alerts(store.read(), "m")
    assert opened.model_version == "1" and opened.column == "x"
    # Version 2 replaces version 1: no window of version 1 any more. Within 15 minutes it still counts as served.
    clock.now += 14 * 60 * S
    evaluator.evaluate("m", "1")
    assert [a.id for a in alerts.alerts(store.read(), "m")] == [opened.id]
    clock.now += 2 * 60 * S
    evaluator.evaluate("m", "1")
    assert alerts.alerts(store.read(), "m") == []  # the page's and the CLI's open alerts
    (kept,) = alerts.alerts(store.read(), "m", include_resolved=True)
    assert kept.state == "resolved" and kept.resolved_reason.startswith("version 1 of m is no longer served")
    assert kept.summary == opened.summary  # what was seen; why it ended has a field of its own
    assert hook.events[-1]["event"] == "alert.resolved"
    trail = [r for r in store.read().query("SELECT action, reason FROM audit WHERE object = ?", [f"alert/{kept.id}"])]
    assert [r["action"] for r in trail] == ["alert.open", "alert.resolve"] and "no longer served" in trail[-1]["reason"]
    _, page = model_page(store, "m", "1", clock.now)
    open_section = page.split("Open alerts")[1].split("Latest verdicts")[0]
    assert "no open alerts" in open_section
    # Served again with the same drift: a fresh alert machine, so k verdicts open a new alert.
    k = DriftConfig().consecutive
    for i in range(k):
        send(shift=0.8)
        evaluator.evaluate("m", "1")
        assert len(alerts.alerts(store.read(), "m")) == (1 if i == k - 1 else 0)


def test_a_connected_agent_keeps_its_version_served_without_windows(setup):
    from collector.monitoring import alerts

    store, evaluator, clock, hook, send, rng = setup
    drift_until_alert(setup)
    store.record_hello(pb.Hello(agent_id="a", run_id="r2", model_name="m", model_version="1"), clock.now)
    clock.now += 3600 * S  # an idle agent (windows by rows only) that stays connected
    evaluator.evaluate("m", "1")
    assert len(alerts.alerts(store.read(), "m")) == 1
    evaluator.connected = lambda agent_id, run_id: False  # the table says connected; the open streams do not
    evaluator.evaluate("m", "1")
    assert alerts.alerts(store.read(), "m") == []
