"""Why an alert was resolved (Alert.resolved_reason): stored by every resolution, upgraded in place from a
database of the previous schema, listed by ListAlerts, ``outrider alerts`` and the model page."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

import collector.store.migrations as schema_module
from collector.monitoring import alerts
from collector.monitoring.drift import DriftConfig
from collector.store import audit
from collector.store.store import Store
from collector.web.model_page import model_page
from protos import collector_pb2 as pb
from test_evaluation import S, cli, profile, served  # noqa: F401 (a fixture)

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
