"""``/models/<name>``: one model's drift, predictions, performance, shadow, registry and rollouts."""
from __future__ import annotations

from typing import Any

from agent.errors import NotFound
from collector.monitoring import alerts
from collector.monitoring.drift import verdict_label
from collector.monitoring.effect import ratio
from collector.store.store import Store
from collector.web import data
from collector.web.html import NS, Markup, ago, el, href, join, num, table, verdict, when
from collector.web.model_plots import drift_plots, performance_plot, prediction_plots, shadow_plots

RESOLVED_SHOWN = 10  # the rest: outrider alerts --all


def _pick_version(db: Any, name: str, asked: str, registry: list[dict[str, Any]]) -> tuple[str, list[str]]:
    monitored = data.monitored_versions(db, name)
    if asked:
        return asked, monitored
    production = next((str(r["version"]) for r in registry if r["stage"] == "production"), "")
    if production and production in monitored:
        return production, monitored
    return (monitored[0] if monitored else production), monitored


def _registry_table(name: str, registry: list[dict[str, Any]], shown: str) -> Markup:
    rows = []
    for r in registry:
        gate = r["gate_result"]
        checks = [el("div", verdict(c.get("passed", False), c.get("name", "?"), c.get("name", "?")), ": ",
                     c.get("detail", "")) for c in gate.get("checks", [])]
        metrics = ", ".join(f"{k} {num(v)}" for k, v in r["metrics_parsed"].items()) or "-"
        version = str(r["version"])
        label = el("strong", version) if version == shown else el("a", version, href=href("models", name,
                                                                                          version=version))
        rows.append([label, r["stage"], when(r["stage_ns"]),
                     verdict(bool(r["gate_passed"])) if r["gated_ns"] else el("span", "not run", class_="muted"),
                     checks or "-", metrics, f"{r['data_name'] or '-'} ({num(r['data_rows'])} rows)",
                     f"{r['registered_by']}, {when(r['registered_ns'])}", r["sha256"][:12],
                     r["retire_reason"] or ""])
    return table(["VERSION", "STAGE", "SINCE", "GATE", "CHECKS", "METRICS", "REFERENCE DATA", "REGISTERED",
                  "SHA256", "RETIRED BECAUSE"], rows, empty="not in the registry (its agents report it by name)")


def rollouts_table(rollouts: list[dict[str, Any]], *, with_model: bool = False) -> Markup:
    rows = []
    for r in rollouts:
        acks = r["acks"]
        ok = sum(a["state"] == "ok" for a in acks)
        failed = [a for a in acks if a["state"] == "failed"]
        state = f"{ok}/{len(acks)} agents acknowledged" if acks else "no agents"
        detail = [el("div", f"{a['agent_id']}: {a['error']}", class_="bad") for a in failed]
        target = f"v{r['from_version']} → v{r['version']}" if r["from_version"] else f"v{r['version']}"
        if r["kind"] in ("shadow", "unshadow"):
            target += f" (share {num(r['share'])})"
        row = [r["id"], r["kind"], target, r["actor"], r["reason"], when(r["started_ns"]), [state, *detail]]
        if with_model:
            row.insert(1, el("a", r["model"], href=href("models", r["model"])))
        rows.append(row)
    headers = ["ID", "KIND", "VERSION", "BY", "REASON", "STARTED", "AGENTS"]
    if with_model:
        headers.insert(1, "MODEL")
    return table(headers, rows, empty="no rollouts yet")


def _alerts_table(db: Any, name: str, now_ns: int) -> Markup:
    rows = [[a.id, a.model_version, a.column, a.kind, a.state, ago(a.opened_unix_nano, now_ns), a.summary]
            for a in alerts.alerts(db, name)]
    return table(["ID", "VERSION", "COLUMN", "KIND", "STATE", "OPENED", "SUMMARY"], rows, empty="no open alerts")


def _resolved_table(db: Any, name: str, now_ns: int) -> Markup:
    rows = [[a.id, a.model_version, a.column, a.kind, ago(a.opened_unix_nano, now_ns),
             ago(a.resolved_unix_nano, now_ns), a.summary, a.resolved_reason or "-"]
            for a in alerts.resolved(db, name, RESOLVED_SHOWN)]
    return table(["ID", "VERSION", "COLUMN", "KIND", "OPENED", "RESOLVED", "SUMMARY", "WHY RESOLVED"], rows,
                  empty="no resolved alerts")


def _rate(value: float) -> str:
    return "-" if value != value else f"{value * 100:.1f} %"


def _verdicts_table(latest: Any, config: Any) -> Markup:
    """The latest evaluation's verdict per column: how it was judged, over which span, its missing
    rates and why (a drift, or loudly a column that could not be compared)."""
    if latest is None or not latest.columns:
        return el("p", "no evaluation with enough rows yet", class_="muted")
    rows = []
    for c in latest.columns:
        word = verdict_label(c)
        shown = el("span", word, class_="bad" if word in ("DRIFT", "NOT COMPARED") else
                   ("good" if word == "ok" else "muted"))
        span = f"{c.span_seconds / 60:g} min" if c.span_seconds else "-"
        rows.append([c.name, shown, c.method or "-", span, num(ratio(c, config)),
                     f"{_rate(c.reference_missing_rate)} → {_rate(c.missing_rate)}", num(c.p_adjusted), c.reason])
    notice = []
    if latest.not_compared:
        notice.append(el("p", f"{latest.not_compared} reference column{'s' if latest.not_compared != 1 else ''} "
                              "not compared: no verdict, drift or not, is given for them", class_="bad"))
    return el("div", *notice, table(["COLUMN", "VERDICT", "METHOD", "SPAN", "EFFECT / THRESHOLD",
                                     "MISSING (REFERENCE → NOW)", "P ADJUSTED", "WHY"], rows))


def _shadow_section(db: Any, name: str, windows: list) -> list[Markup]:
    running = data.shadow(db, name)
    totals, plots = shadow_plots(windows)
    if running is None and not totals:
        return [el("p", "no shadow version runs for this model", class_="muted")]
    out = []
    if running is not None:
        out.append(el("p", f"version {running['version']} shadows production on {num(running['share'] * 100)} % "
                           f"of requests since {when(running['started_ns'])} (started by {running['actor']})"))
    if totals:
        out.append(table(["CALLS", "ROWS", "SKIPPED", "ERRORS", "LABELS COMPARED", "LABEL AGREEMENT"],
                         [[num(int(totals["calls"])), num(int(totals["rows"])), num(int(totals["skipped"])),
                           num(int(totals["errors"])), num(int(totals["label_rows"])), num(totals["agreement"])]],
                         numeric=range(6)))
        out.append(el("div", *plots, class_="plots"))
    return out


def model_page(store: Store, name: str, asked_version: str, now_ns: int) -> tuple[str, Markup]:
    if not name.isprintable():  # no stored name is (ingest refuses them), and PostgreSQL cannot compare a NUL
        raise NotFound(f"no model named {name!r}")
    db = store.read()
    registry = data.versions(db, name)
    if not registry and name not in data.model_names(db):
        raise NotFound(f"no model named {name!r}")
    version, monitored = _pick_version(db, name, asked_version, registry)
    readable = version if version.isprintable() else ""  # as with names: a version with data is printable
    config, _ = alerts.get_config(db, name)
    history = data.evaluations(db, name, readable) if readable else []
    latest = history[-1] if history else None
    # "now" is what the latest evaluation compared (the policy's span up to then), so the plots agree
    since = latest.window_start_unix_nano if latest and latest.evaluated else now_ns - int(config.span_seconds * NS)
    windows = data.recent_windows(store, name, readable, since) if readable else []
    profile = store.profile(name, readable) if readable else None
    heat, series = drift_plots(history, config)
    others = [el("a", v, href=href("models", name, version=v)) if v != version else el("strong", v)
              for v in monitored]
    summary = (f"latest evaluation {ago(latest.evaluated_unix_nano, now_ns)}: {latest.reason} "
               f"({num(latest.rows)} rows)" if latest else "not evaluated yet")
    body = [
        el("p", "version ", el("strong", version or "-"), " · versions with data: ",
           join(others, " ") if others else "-", " · ", summary),
        el("p", "thresholds: Wasserstein/std ", num(config.wasserstein_threshold), ", numeric PSI ",
           num(config.numeric_psi_threshold), ", Jensen-Shannon ", num(config.js_threshold), ", categorical PSI ",
           num(config.categorical_psi_threshold), ", missing rate (Cohen's h) ", num(config.missing_threshold),
           f"; q {num(config.q)}, {config.consecutive} evaluations in a row open or clear an alert, spans "
           f"{' and '.join(f'{s:g} s' for s in config.spans())}", class_="muted"),
        el("h2", "Open alerts"), _alerts_table(db, name, now_ns),
        el("h2", "Recently resolved alerts"), _resolved_table(db, name, now_ns),
        el("h2", "Latest verdicts"), _verdicts_table(latest if latest and latest.evaluated else None, config),
        el("h2", "Drift heat map"), el("div", heat, class_="plot"),
        el("h2", "Drift per column"), el("div", *series, class_="plots"),
        el("h2", "Predictions now vs reference"), el("div", *prediction_plots(profile, windows), class_="plots"),
        el("h2", "Performance: realised, and estimated without labels"), performance_plot(history, windows, config),
        el("h2", "Shadow comparison"), *_shadow_section(db, name, windows),
        el("h2", "Registry: versions, stages and gate results"), _registry_table(name, registry, version),
        el("h2", "Rollouts"), rollouts_table(data.rollouts(db, name)),
        el("p", el("a", "audit trail of this model", href=href("audit", model=name))),
    ]
    return f"model {name}", el("div", *body)

