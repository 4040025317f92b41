"""HTML building with escaping by default: every value is escaped unless it is ``Markup``.

Pages are put together from ``el(...)`` calls, never from string formatting of
untrusted values, so a model, feature or actor named ``<script>`` stays text.
"""
from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

NS = 1_000_000_000
_VOID = frozenset({"meta", "link", "input", "br"})

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
header{background:#1d2430;color:#fff;padding:8px 16px;display:flex;gap:16px;align-items:center;flex-wrap:wrap}
header a{color:#fff;text-decoration:none}header a:hover{text-decoration:underline}
header .who{margin-left:auto;opacity:.8}header form{margin:0}
main{padding:12px 16px;max-width:1400px}h1{font-size:20px;margin:8px 0}h2{font-size:16px;margin:20px 0 6px}
table{border-collapse:collapse;background:#fff;margin:4px 0 12px}
th,td{border:1px solid #d9dde3;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef0f3;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.bad{color:#b3261e;font-weight:600}.good{color:#1e7b34}.muted{color:#6b7280}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plot{background:#fff;border:1px solid #d9dde3;padding:6px}
.plot h3{font-size:13px;margin:0 0 4px}svg{display:block;max-width:100%;height:auto}
svg text{font:11px system-ui,sans-serif;fill:#374151}svg .axis{stroke:#9ca3af;stroke-width:1}
svg .threshold{stroke:#b3261e;stroke-dasharray:5 3;stroke-width:1.5}
svg .s0{stroke:#2563eb;fill:#2563eb}svg .s1{stroke:#9ca3af;fill:#9ca3af}svg .s2{stroke:#d97706;fill:#d97706}
svg .s3{stroke:#059669;fill:#059669}svg path.line{fill:none;stroke-width:1.8}
svg .drifted{fill:#b3261e;stroke:#b3261e}svg .cellmark{fill:none;stroke:#111827;stroke-width:1.5}
svg .ref{fill:#9ca3af;fill-opacity:.45;stroke:#6b7280}svg .cur{fill:none;stroke:#2563eb;stroke-width:2}
.nav a{margin-right:10px}form.login{background:#fff;border:1px solid #d9dde3;padding:16px;max-width:420px}
form.login input[type=password]{width:100%;box-sizing:border-box;margin:6px 0 10px;padding:6px}
"""


class Markup(str):
    """Text that is already HTML (built here, escaped): not escaped again."""

    __slots__ = ()


def esc(value: Any) -> Markup:
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


def join(parts: Iterable[Any], sep: str = "") -> Markup:
    return Markup(sep.join(esc(p) for p in parts))


def el(tag: str, *children: Any, **attrs: Any) -> Markup:
    """``<tag attrs>children</tag>``; attribute names: ``class_`` -> class, ``aria_label`` -> aria-label;
    None/False attributes are left out. Children may be nested lists."""
    parts = [tag]
    for name, value in attrs.items():
        if value is None or value is False:
            continue
        name = name.rstrip("_").replace("_", "-") if name not in ("viewBox",) else name
        parts.append(name if value is True else f'{name}="{esc(value)}"')
    if tag in _VOID:
        return Markup(f"<{' '.join(parts)}>")
    return Markup(f"<{' '.join(parts)}>{_children(children)}</{tag}>")


def _children(children: Sequence[Any]) -> str:
    out = []
    for child in children:
        if isinstance(child, (list, tuple)):
            out.append(_children(child))
        elif child is not None:
            out.append(esc(child))
    return "".join(out)


def href(*segments: str, **query: Any) -> str:
    """A local URL whose path segments (model names...) are percent-encoded, '/' included."""
    path = "/" + "/".join(quote(str(s), safe="") for s in segments)
    params = "&".join(f"{quote(k)}={quote(str(v), safe='')}" for k, v in query.items() if v not in (None, ""))
    return path + ("?" + params if params else "")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, numeric: Sequence[int] = (),
          empty: str = "nothing yet") -> Markup:
    body = [el("tr", *(el("td", cell, class_="num" if i in numeric else None) for i, cell in enumerate(row)))
            for row in rows]
    if not body:
        return el("p", empty, class_="muted")
    return el("table", el("thead", el("tr", *(el("th", h) for h in headers))), el("tbody", *body))


def when(ns: int) -> str:
    if not ns:
        return "-"
    return datetime.fromtimestamp(ns / NS, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def clock(ns: float) -> str:
    return datetime.fromtimestamp(ns / NS, timezone.utc).strftime("%H:%M:%S")


def ago(ns: int, now_ns: int) -> str:
    if not ns:
        return "never"
    s = max(0, (now_ns - ns) / NS)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def num(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}g}"


def verdict(ok: bool, yes: str = "passed", no: str = "failed") -> Markup:
    return el("span", yes if ok else no, class_="good" if ok else "bad")


def layout(title: str, body: Any, *, who: str, can_logout: bool, refresh: int | None = 10) -> bytes:
    nav = el("nav", el("a", "Fleet", href="/"), el("a", "Approvals & rollbacks", href="/approvals"),
             el("a", "Retraining", href="/retraining"), el("a", "Audit trail", href="/audit"), class_="nav")
    logout = el("form", el("button", "log out", type="submit"), method="post", action="/logout") if can_logout else ""
    head = [el("meta", charset="utf-8"), el("title", f"{title} · Outrider"),
            el("meta", name="viewport", content="width=device-width, initial-scale=1"),
            # no favicon request: a 404 for it would be a console error in the browser
            el("link", rel="icon", href="data:,"), el("style", Markup(CSS))]
    if refresh:
        head.append(el("meta", http_equiv="refresh", content=str(refresh)))
    page = el("html", el("head", *head), el("body", el("header", el("strong", "Outrider"), nav,
                                                            el("span", who, class_="who"), logout),
                                            el("main", el("h1", title), body)), lang="en")
    return ("<!doctype html>\n" + page).encode("utf-8")
