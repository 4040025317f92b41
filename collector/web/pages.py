"""The fleet overview (``/``) and the governance pages: ``/approvals`` (with rollbacks),
``/retraining`` and ``/audit`` (paged), and the login form."""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from collector.monitoring import alerts
from collector.store.store import Store
from collector.web import data, svg
from collector.web.html import Markup, ago, el, href, num, table, when
from collector.web.model_page import rollouts_table

AUDIT_PAGE = 50


def local_path(text: str) -> str:
    """Where to go after logging in: a path on this server only (no open redirect), fit for a
    Location header (printable ASCII)."""
    local = text.startswith("/") and not text.startswith("//") and "\\" not in text
    return text if local and text.isascii() and text.isprintable() else "/"


def login_form(message: str, next_path: str) -> Markup:
    return el("form", el("p", message, class_="bad" if message else None),
              el("label", "Operator token (role viewer or above)", for_="token"),
              el("input", type="password", id="token", name="token", autocomplete="current-password",
                 required=True, autofocus=True),
              el("input", type="hidden", name="next", value=local_path(next_path)),
              el("button", "log in", type="submit"), method="post", action="/login", class_="login")


def fleet_page(store: Store, now_ns: int, counters: dict[str, int],
               connected: Callable[[str, str], bool] | None,
               members: list[dict[str, Any]] | None = None) -> tuple[str, Markup]:
    db = store.read()
    agents = data.latest_agents(db)
    for a in agents:  # the stream registry knows better than the table, which a crash leaves stale
        if connected is not None:
            a["connected"] = connected(a["agent_id"], a["run_id"])
    models = data.fleet(store, now_ns, agents)
    model_rows = [[el("a", m.name, href=href("models", m.name)), m.production or "-",
                   ", ".join(sorted(m.versions_served)) or "-", m.agents_connected, num(m.rows_per_second),
                   num(m.rows_total), num(m.dropped_recent),
                   el("span", num(m.dropped_total), class_="bad" if m.dropped_total else None),
                   el("span", m.open_alerts, class_="bad" if m.open_alerts else None)] for m in models]
    agent_rows = []
    for a in agents:
        serving = f"{a['model_name']} v{a['model_version'] or '-'}"
        if a.get("desired_version") and a["desired_version"] != a["model_version"]:
            serving += f" (asked for v{a['desired_version']})"
        if a.get("shadow_version"):
            serving += f", shadow v{a['shadow_version']} on {num(a['shadow_share'] * 100)} %"
        dropped = a["dropped_rows"] + a["spool_dropped_rows"]
        agent_rows.append([a["agent_id"], a["host"] or "-", el("a", serving, href=href("models", a["model_name"])),
                           a["agent_version"] or "-",
                           el("span", "connected", class_="good") if a["connected"] else el("span", "gone",
                                                                                            class_="muted"),
                           ago(a["last_window_end_ns"], now_ns), num(a["rows"]),
                           el("span", num(dropped), class_="bad" if dropped else None), a["spool_windows"],
                           a["restarts"], el("span", a.get("model_error") or "", class_="bad")])
    open_alerts = [[a.id, el("a", a.model_name, href=href("models", a.model_name)), a.model_version, a.column,
                    a.kind, a.state, ago(a.opened_unix_nano, now_ns), a.summary] for a in alerts.alerts(db)]
    chart = (el("div", el("div", el("h3", f"rows per second (last {data.RATE_SECONDS // 60} minutes)"),
                        svg.bars("fleet-rows", "rows per second per model", [m.name for m in models],
                                 [("rows/s", [m.rows_per_second for m in models])],
                                 width=max(320, 80 * len(models))), class_="plot"), class_="plots")
             if models else "")
    body = [
        el("h2", "Models"),
        table(["MODEL", "PRODUCTION", "SERVED NOW", "AGENTS", "ROWS/S", "ROWS STORED", "DROPPED (5 MIN)",
               "DROPPED (ALL)", "OPEN ALERTS"], model_rows, numeric=(3, 4, 5, 6, 7, 8),
              empty="no models yet: register one (outrider models register) or start an agent"),
        chart,
        el("h2", "Agents"),
        table(["AGENT", "HOST", "SERVING", "AGENT VERSION", "STREAM", "LAST WINDOW", "ROWS", "DROPPED", "SPOOL",
               "RESTARTS", "MODEL ERROR"], agent_rows, numeric=(6, 7, 8, 9), empty="no agent has connected yet"),
        el("h2", "Open alerts"),
        table(["ID", "MODEL", "VERSION", "COLUMN", "KIND", "STATE", "OPENED", "SUMMARY"], open_alerts,
              empty="no open alerts"),
        *_collectors(members or [], now_ns),
        el("p", "this collector: windows stored ", num(counters.get("windows_stored", 0)), ", duplicate ",
           num(counters.get("windows_duplicate", 0)), ", rejected ", num(counters.get("windows_rejected", 0)),
           "; auth failures ", num(counters.get("auth_failures", 0)), "; write queue ",
           num(counters.get("write_queue_depth", 0)), class_="muted"),
    ]
    return "Fleet", el("div", *body)


def _collectors(members: list[dict[str, Any]], now_ns: int) -> list[Markup]:
    """Several collectors sharing the database (PostgreSQL): which are live and which runs the background
    loops. Nothing for one collector alone."""
    if len(members) < 2:
        return []
    state = {True: el("span", "live", class_="good")}
    rows = [[m["id"], m["address"], state.get(m["live"]) or el("span", "stopped" if m["stopped"] else "silent",
                                                              class_="muted" if m["stopped"] else "bad"),
             ago(m["heartbeat_ns"], now_ns), ago(m["started_ns"], now_ns), ", ".join(m["leases"]) or "-"]
            for m in members]
    return [el("h2", "Collectors"), table(["COLLECTOR", "ADDRESS", "STATE", "HEARTBEAT", "STARTED", "LEASES"], rows)]


def _approval_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    return [[r["id"], r.get("kind", "promote"), el("a", r["model"], href=href("models", r["model"])),
             r["version"], r["requested_by"], when(r["requested_at"]), r["reason"],
             r["gate_override"] or "", r["state"], r["decided_by"] or "-", r["decision_reason"]] for r in rows]


def approvals_page(store: Store) -> tuple[str, Markup]:
    db = store.read()
    headers = ["ID", "KIND", "MODEL", "VERSION", "REQUESTED BY", "AT", "REASON", "GATE OVERRIDE", "STATE",
               "DECIDED BY", "DECISION"]
    body = [el("h2", "Waiting for a second person"),
            el("p", "approve or reject with: outrider approve ID / outrider reject ID --reason ...", class_="muted"),
            table(headers, _approval_rows(data.approvals(db, pending=True)), empty="nothing waits for approval"),
            el("h2", "Rollbacks"), rollouts_table(data.rollouts(db, kind="rollback"), with_model=True),
            el("h2", "Recent promotions and shadows"), rollouts_table(data.rollouts(db), with_model=True),
            el("h2", "Decided"), table(headers, _approval_rows(data.approvals(db, pending=False)))]
    return "Approvals and rollbacks", el("div", *body)


def _evidence(text: str) -> Markup:
    try:
        evidence = json.loads(text or "{}")
    except ValueError:
        return el("span", text)
    if not isinstance(evidence, dict) or not evidence:
        return el("span", "-", class_="muted")
    features = evidence.get("features")
    window = evidence.get("window") if isinstance(evidence.get("window"), dict) else {}
    headline = (f"drifted: {', '.join(map(str, features))}" if isinstance(features, list) and features
                else ", ".join(map(str, evidence)))
    if window.get("end_unix_nano"):
        headline += f"; {num(window.get('rows', 0))} rows to {when(int(window['end_unix_nano']))}"
    return el("details", el("summary", headline),
              el("pre", json.dumps(evidence, indent=1, sort_keys=True)[:4000]))


def _retraining_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    return [[r["id"], el("a", r["model"], href=href("models", r["model"])), r["version"], r["state"],
             r["opened_by"], when(r["opened_ns"]), r["reason"], _evidence(r["evidence"]),
             r["decided_by"] or "-", r["completed_version"] or "-", r["note"]] for r in rows]


def retraining_page(store: Store) -> tuple[str, Markup]:
    db = store.read()
    headers = ["ID", "MODEL", "VERSION", "STATE", "OPENED BY", "AT", "REASON", "EVIDENCE", "DECIDED BY",
               "NEW VERSION", "NOTE"]
    body = [el("h2", "Open and accepted"), table(headers, _retraining_rows(data.retraining(db, active=True)),
                                                 empty="no open retraining requests"),
            el("h2", "Closed"), table(headers, _retraining_rows(data.retraining(db, active=False)))]
    return "Retraining requests", el("div", *body)


def audit_page(store: Store, model: str, before: int) -> tuple[str, Markup]:
    rows = data.audit_page(store.read(), model, before, AUDIT_PAGE)
    lines = [[r["id"], when(r["at_ns"]), r["actor"], r["action"], r["object"],
              el("a", r["model_name"], href=href("models", r["model_name"])) if r["model_name"] else "",
              el("code", r["before"] or "-"), el("code", r["after"] or "-"), r["reason"], r["hash"][:12]]
             for r in rows]
    older = (el("a", "older entries →", href=href("audit", model=model, before=rows[-1]["id"]))
             if len(rows) == AUDIT_PAGE else "")
    body = [el("p", f"about model {model} · " if model else "", el("a", "newest", href=href("audit", model=model)),
               " · check the hash chain with: outrider audit verify", class_="muted"),
            table(["ID", "AT (UTC)", "ACTOR", "ACTION", "OBJECT", "MODEL", "BEFORE", "AFTER", "REASON", "HASH"],
                  lines, empty="no entries"), el("p", older)]
    return "Audit trail", el("div", *body)
