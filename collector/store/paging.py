"""Replies within a byte budget, continued by page tokens: the one home of both for every list call.

gRPC clients refuse replies over 4 MiB by default, and a reply is built whole in
the collector's memory before it is sent: one ``ListWindows(include_summaries,
limit=10000)`` once built a 181 MB reply and took the collector from 67 MB to
904 MB. So a list call adds items while they fit ``max_bytes`` and stops there,
saying where it stopped in ``next_page_token``; it never builds the whole list
and trims it.

A token is a keyset cursor (the sort key of the last item sent), not an offset:
rows that arrive between two pages are neither skipped nor repeated, whatever
their position. It is opaque to clients (base64 of a small JSON list, tagged
with the listing it belongs to) and checked on the way back: a token that is
not one this listing issued is INVALID_ARGUMENT, never a crash.
"""
from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from typing import Any, NamedTuple

from agent.errors import InvalidArgument

DEFAULT_MAX_REPLY_BYTES = 3 * 1024 * 1024  # under the 4 MiB gRPC clients accept by default
RESERVED_BYTES = 4096  # the token and a reply's other fields, besides its items
MAX_TOKEN_CHARS = 2048
_INT64 = (-(2**63), 2**63 - 1)


class Page(NamedTuple):
    items: list[Any]
    next_token: str  # "" when nothing is left


def field_bytes(message: Any) -> int:
    """Bytes ``message`` adds to a reply as one element of a repeated field (tag, length, body)."""
    size = message.ByteSize()
    return 1 + _varint_bytes(size) + size


def _varint_bytes(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def token(kind: str, key: tuple) -> str:
    """The opaque token that continues listing ``kind`` after the item whose sort key is ``key``."""
    raw = json.dumps([kind, *key], separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def cursor(kind: str, page_token: str, types: tuple[type, ...]) -> tuple | None:
    """The sort key a page token of listing ``kind`` carries (None for "", the first page).

    Raises InvalidArgument for anything else; the message never echoes the token,
    which may be long."""
    if not page_token:
        return None
    bad = InvalidArgument(f"page_token is not one this collector's {kind} listing gave out: pass the "
                          "next_page_token of the previous reply unchanged, or none for the first page")
    if len(page_token) > MAX_TOKEN_CHARS:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(page_token + "=" * (-len(page_token) % 4))
        value = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad from None
    if not isinstance(value, list) or len(value) != len(types) + 1 or value[0] != kind:
        raise bad
    key = tuple(value[1:])
    for item, want in zip(key, types):
        # bool is an int to Python but never a key; ints must fit SQLite's INTEGER
        if type(item) is not want or (want is int and not _INT64[0] <= item <= _INT64[1]):
            raise bad
    return key


def take(rows: Iterable[tuple[tuple, Any]], kind: str, *, max_bytes: int, limit: int | None = None,
         used: int = 0, at_least_one: bool = True) -> Page:
    """The items of ``rows`` ((sort key, message) pairs, in listing order, read lazily) that fit
    ``max_bytes`` (less ``used`` by the reply's other fields) and ``limit``, and the token of the rest.

    The first item is taken even past the budget (unless not ``at_least_one``), so that every page
    makes progress; its size is bounded by what the collector accepted when it was stored. ``rows`` is closed
    when this returns (a generator holding a read transaction ends it)."""
    items: list[Any] = []
    budget = max_bytes - RESERVED_BYTES - used
    last: tuple | None = None
    it = iter(rows)
    try:
        for key, item in it:
            if limit is not None and len(items) >= limit:
                return Page(items, token(kind, last or ()))
            size = field_bytes(item)
            if size > budget and (items or not at_least_one):
                return Page(items, token(kind, last or ()))
            items.append(item)
            budget -= size
            last = key
        return Page(items, "")
    finally:
        close = getattr(it, "close", None)  # generators: end their read transaction now, not at GC
        if close is not None:
            close()
