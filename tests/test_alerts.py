"""Why an alert was resolved (Alert.resolved_reason): stored by every resolution, upgraded in place from a
database of the previous schema, listed by ListAlerts, ``outrider alerts`` and the model page."""
from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import numpy as np
import pytest

import collector.store.migrations as schema_module
from collector.monitoring import alerts
from collector.monitoring.drift import DriftConfig
from collector.monitoring.evaluation import DriftEvaluator
from collector.store import audit
from collector.store.store import Store
from collector.web.model_page import model_page
from protos import collector_pb2 as pb
from protos import summary_pb2
from test_evaluation import S, cli, columns, profile, served  # noqa: F401 (a fixture)

PREVIOUS = 10  # migrations of the collector before resolved_reason


def evaluation(drifted: bool) -> pb.DriftEvaluation:
    """One evaluation of column x, drifted or clean (``alerts.record`` gives it its id)."""
    e = pb.DriftEvaluation(model_name="m", model_version="1", evaluated=True, evaluated_unix_nano=1)
    e.columns.add(name="x", drifted=drifted, p_adjusted=0.001 if drifted else 0.5, reason="wasserstein 0.3 >= 0.1")
    return e


def test_every_resolution_says_why_and_the_summary_stays_what_was_seen(db_url: str) -> None:
    with Store(db_url) as store:
        k = 2
        for drifted in (True, True, False, False):  # k drifted verdicts open it, k clean ones resolve it
            changed = store.write(lambda db, d=drifted: alerts.record(db, evaluation(d), k, 10))
        (done,) = changed
        assert done.state == "resolved" and done.summary == "wasserstein 0.3 >= 0.1"
        last = alerts.history(store.read(), "m", "1", 1)[0].id
        assert done.resolved_reason == f"x clean for 2 evaluations in a row (the last: evaluation {last})"
        for drifted in (True, True):
            store.write(lambda db, d=drifted: alerts.record(db, evaluation(d), k, 20))
        (gone,) = store.write(lambda db: alerts.record(db, evaluation(True), k, 30, is_served=False))
        assert gone.resolved_reason.startswith("version 1 of m is no longer served")
        assert gone.summary == "wasserstein 0.3 >= 0.1"  # the reason is no longer appended to what was seen
        (listed,) = [a for a in alerts.alerts(store.read(), "m", include_resolved=True) if a.id == gone.id]
        assert listed.resolved_reason == gone.resolved_reason
        trail = {r["object"]: r["reason"] for r in store.read().query(
            "SELECT object, reason FROM audit WHERE action = 'alert.resolve'")}
        assert trail == {f"alert/{done.id}": done.resolved_reason, f"alert/{gone.id}": gone.resolved_reason}
        assert [a.id for a in alerts.resolved(store.read(), "m", 10)] == [gone.id, done.id]  # newest first


def test_a_database_of_the_previous_schema_upgrades_in_place(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = db_url
    full = list(schema_module.MIGRATIONS)
    monkeypatch.setattr(schema_module, "MIGRATIONS", full[:PREVIOUS])

    def old_collector(db) -> None:
        """What a collector at migration 10 wrote: a reason in the audit trail, and appended to the summary
        when the version was no longer served."""
        row = {"model_name": "m", "model_version": "1", "column": "x", "kind": "drift", "opened_ns": 1,
               "summary": "wasserstein 0.3 >= 0.1"}
        clean = db.insert("alerts", {**row, "state": "resolved", "resolved_ns": 2}, returning="id")
        audit.append(db, audit.COLLECTOR, "alert.resolve", f"alert/{clean}", model_name="m",
                     reason="x no longer drifts (evaluation 7)", now_ns=2)
        why = "version 1 of m is no longer served: no connected agent reports it"
        gone = db.insert("alerts", {**row, "state": "resolved", "resolved_ns": 3,
                                    "summary": f"wasserstein 0.3 >= 0.1 [resolved: {why}]"}, returning="id")
        audit.append(db, audit.COLLECTOR, "alert.resolve", f"alert/{gone}", model_name="m", reason=why, now_ns=3)
        opened = db.insert("alerts", {**row, "column": "z", "state": "open", "summary": "psi 0.4 [resolved: a] of its own"}, returning="id")
        return clean, gone, opened, why

    with Store(path) as store:
        clean, gone, opened, why = store.write(old_collector)
        assert "resolved_reason" not in [d[0] for d in store.read().execute("SELECT * FROM alerts").description]
    monkeypatch.setattr(schema_module, "MIGRATIONS", full)
    with Store(path) as store:
        db = store.read()
        applied = db.execute("SELECT id, name FROM migrations WHERE id > ?", [PREVIOUS]).fetchall()
        assert applied[0] == (PREVIOUS + 1, "alert_resolved_reason")
        got = {a.id: a for a in alerts.alerts(db, "m", include_resolved=True)}
        assert got[clean].resolved_reason == "x no longer drifts (evaluation 7)"  # from its audit entry
        assert (got[gone].resolved_reason, got[gone].summary) == (why, "wasserstein 0.3 >= 0.1")
        assert (got[opened].resolved_reason, got[opened].summary) == ("", "psi 0.4 [resolved: a] of its own")
        assert audit.verify(db).ok  # the trail is read, never rewritten
        # and the upgraded file keeps working: a new resolution fills the new column
        store.write(lambda db: alerts.record(db, evaluation(True), 1, 10))
        (done,) = store.write(lambda db: alerts.record(db, evaluation(False), 1, 11))
        assert done.resolved_reason.startswith("x clean for 1 evaluation (the last: evaluation")


def test_list_alerts_cli_and_page_show_why_an_alert_was_resolved(served) -> None:  # noqa: F811
    running, ops = served
    rng = np.random.default_rng(1)
    ops.AttachProfile(pb.AttachProfileRequest(model_name="m", model_version="1", profile=profile(rng)), timeout=10)
    store, k, now = running.store, DriftConfig().consecutive, time.time_ns()
    for drifted in [True] * k + [False] * k:
        store.write(lambda db, d=drifted: alerts.record(db, evaluation(d), k, now - 60 * S))
    (listed,) = ops.ListAlerts(pb.ListAlertsRequest(include_resolved=True), timeout=10).alerts
    assert listed.state == "resolved" and listed.resolved_reason.startswith(f"x clean for {k} evaluations in a row")
    shown = json.loads(cli("alerts", "--all", "--json", address=running.address).stdout)["alerts"]
    assert shown[0]["resolved_reason"] == listed.resolved_reason
    table = cli("alerts", "--all", address=running.address)
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert "WHY RESOLVED" in header and row.rstrip().endswith(listed.resolved_reason)
    assert "WHY RESOLVED" not in cli("alerts", address=running.address).stdout  # open ones have no reason yet
    _, page = model_page(store, "m", "1", now)
    resolved = page.split("Recently resolved alerts")[1].split("Latest verdicts")[0]
    assert listed.resolved_reason in resolved and "1m ago" in resolved


# ------------------------------------------------------------------ several collectors, one database


def test_two_collectors_recording_the_same_verdict_open_one_alert(db_url: str) -> None:
    """Collector A has stepped the version's alert machine and opened an alert, not committed yet, when
    collector B records the same drifted verdict: B waits for A's turn to end, then reads the machine
    A left (the alert already open) and opens nothing. Without taking turns B read the machine
    as it was before A (READ COMMITTED) and opened a second alert."""
    a_stepped, b_done = threading.Event(), threading.Event()
    with Store(db_url) as first, Store(db_url) as second:
        def turn_a(db) -> tuple[list[pb.Alert], bool]:
            changed = alerts.record(db, evaluation(True), 1, 10)
            a_stepped.set()
            # B gets its chance here; with the lock it cannot finish until this transaction ends
            return changed, b_done.wait(2)

        def turn_b(db) -> list[pb.Alert]:
            changed = alerts.record(db, evaluation(True), 1, 11)
            b_done.set()
            return changed

        a = first.submit(turn_a)
        assert a_stepped.wait(60)
        b = second.submit(turn_b)
        opened_by_a, b_finished_inside_a = a.result(timeout=60)
        opened_by_b = b.result(timeout=60)
        assert not b_finished_inside_a
        assert [x.state for x in opened_by_a] == ["open"] and opened_by_b == []
        (only,) = alerts.alerts(first.read(), "m")
        assert only.id == opened_by_a[0].id
        opens = second.read().execute("SELECT count(*) FROM audit WHERE action = 'alert.open'").fetchone()[0]
        assert opens == 1 and audit.verify(second.read()).ok
        assert len(alerts.history(first.read(), "m", "1", 10)) == 2  # both evaluations are kept


def test_two_collectors_acknowledging_one_alert_at_once_ack_it_once(db_url: str) -> None:
    """Collector A has acknowledged the alert, not committed yet, when collector B acknowledges it
    too: B waits for A's turn, then finds it acknowledged (FailedPrecondition) and changes nothing."""
    from agent.errors import FailedPrecondition

    a_acked, b_done = threading.Event(), threading.Event()
    with Store(db_url) as first, Store(db_url) as second:
        (opened,) = first.write(lambda db: alerts.record(db, evaluation(True), 1, 10))

        def turn_a(db) -> bool:
            alerts.acknowledge(db, opened.id, "alice", "looking", 20)
            a_acked.set()
            return b_done.wait(2)

        def turn_b(db) -> pb.Alert:
            try:
                return alerts.acknowledge(db, opened.id, "bob", "mine", 21)
            finally:
                b_done.set()

        a = first.submit(turn_a)
        assert a_acked.wait(60)
        b = second.submit(turn_b)
        assert a.result(timeout=60) is False  # B could not finish inside A's turn
        with pytest.raises(FailedPrecondition, match="already acknowledged by alice"):
            b.result(timeout=60)
        assert alerts.alert(first.read(), opened.id).acknowledged_by == "alice"
        acks = second.read().execute("SELECT count(*) FROM audit WHERE action = 'alert.ack'").fetchone()[0]
        assert acks == 1


@pytest.mark.slow
def test_two_evaluators_on_one_postgresql_evaluating_the_same_drifted_span_open_one_alert(postgres_url: str) -> None:
    """Two collectors' evaluators over one PostgreSQL database evaluate the same drifted windows at
    the same moment, several rounds: one alert opens, once."""
    rng = np.random.default_rng(5)
    with Store(postgres_url) as first, Store(postgres_url) as second:
        now = time.time_ns()
        first.attach_profile("m", "1", profile(rng), "test", now)
        first.write(lambda db: alerts.set_config(db, "m", DriftConfig(span_seconds=600, consecutive=1), "test", now))
        first.submit_windows([drifted_window(rng, seq, now - (60 - seq) * S) for seq in range(6)]).result()
        evaluators = [DriftEvaluator(first), DriftEvaluator(second)]
        for _ in range(3):
            start = threading.Barrier(2)

            def run(evaluator: DriftEvaluator) -> pb.DriftEvaluation:
                start.wait(60)
                return evaluator.evaluate("m", "1")

            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                verdicts = list(pool.map(run, evaluators))
            assert all(v.evaluated and any(c.drifted for c in v.columns) for v in verdicts)
        (only,) = alerts.alerts(first.read(), "m", include_resolved=True)
        assert only.state == "open" and only.column == "x"
        opens = first.read().execute("SELECT count(*) FROM audit WHERE action = 'alert.open'").fetchone()[0]
        assert opens == 1


def drifted_window(rng: np.random.Generator, seq: int, end_ns: int) -> summary_pb2.WindowSummary:
    """1,000 rows whose x moved by two standard deviations."""
    return summary_pb2.WindowSummary(agent_id="a", run_id="r", seq=seq, model_name="m", model_version="1",
                                     start_unix_nano=end_ns - 10 * S, end_unix_nano=end_ns, rows=1000, calls=1000,
                                     columns=columns(rng, 1000, shift=2.0))
