"""How the operators' commands print: aligned tables, ages, times, and messages and lists as JSON data."""
from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(isinstance(row[i], int) for row in rows) for i in range(len(header))]
    lines = []
    for row in cells:
        parts = [cell.rjust(w) if num else cell.ljust(w) for cell, w, num in zip(row, widths, numeric)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def rollout_state(agent: Any) -> str:
    """How a managed agent stands against what the collector asked it to serve (an AgentState)."""
    if not agent.managed:
        return "-"  # serves the file it was started with
    if agent.model_error:
        return "FAILED"
    if not agent.desired_version:
        return "waiting" if not agent.model_version else "-"  # no production version to ask for yet
    return "ok" if agent.model_version == agent.desired_version else "LAGGING"


def age(unix_nano: int, now_ns: int) -> str:
    if unix_nano <= 0:
        return "-"
    seconds = max(0, (now_ns - unix_nano) // 1_000_000_000)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def iso(unix_nano: int) -> str:
    return datetime.fromtimestamp(unix_nano / 1e9, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def listing(field: str, items: list[Any], next_page_token: str) -> dict[str, Any]:
    """What every list command prints with --json: the List reply's own shape, all pages merged,
    ``next_page_token`` "" unless --limit stopped the listing before the end."""
    return {field: items, "next_page_token": next_page_token}


def plain(message: Any) -> dict[str, Any]:
    """A message as JSON-ready data with every field, 64-bit integers as numbers (not proto3 JSON's strings)."""
    out = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type.fields_by_name["value"]
            out[field.name] = {key: _plain_value(entry, v) for key, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_plain_value(field, v) for v in value]
        elif field.message_type is None or message.HasField(field.name):
            out[field.name] = _plain_value(field, value)
    return out


def _plain_value(field: Any, value: Any) -> Any:
    if field.message_type is not None:
        return plain(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return value
