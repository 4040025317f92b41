"""The collectors sharing one database, and which of them holds each agent's stream.

Each collector has a row in ``collectors`` whose ``heartbeat_ns`` it refreshes every few seconds,
and writes its id on an agent run's row (``agents.collector_id``) when the run's stream says hello
there, clearing it when that stream ends. A run is connected when its stream is open on a
collector whose heartbeat is fresh: computed in the query (a join on the heartbeat), so a killed
collector's agents stop counting as connected once its heartbeat is older than the timeout, without
anyone rewriting their rows, and any collector answers for the whole fleet.

Pushes across collectors (``announce``): on PostgreSQL a ``pg_notify`` on CHANNEL in the committing
transaction, heard by every collector's listener (``collector.api.fleet``); nothing on SQLite,
where the one collector pushes in-process.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from collector.store.engine import Conn

CHANNEL = "outrider_rollout"
REFERENCE_PREFIX = "reference "  # a payload naming a profile attached, as JSON [model, version]


def heartbeat(db: Conn, collector_id: str, address: str, started_ns: int, now_ns: int) -> None:
    db.upsert("collectors", {"id": collector_id, "address": address, "started_ns": started_ns,
                             "heartbeat_ns": now_ns}, key=["id"])


def leave(db: Conn, collector_id: str, now_ns: int) -> None:
    """A clean stop: the collector's streams are closed. Its row stays, its heartbeat negated (minus the
    time it stopped): never fresh, so no one waits out the timeout, and ``prune`` still knows its age."""
    db.execute("UPDATE collectors SET heartbeat_ns = ? WHERE id = ?", [-now_ns, collector_id])


def collector_rows(db: Conn, fresh_after_ns: int) -> Iterator[dict[str, Any]]:
    """Every collector known, live ones first, then by last heartbeat: ``live`` (its heartbeat is after
    ``fresh_after_ns``), ``stopped`` (it left cleanly) and ``heartbeat_ns`` (the last one, or when it stopped)."""
    rows = db.query("SELECT id, address, started_ns, heartbeat_ns FROM collectors")
    found = [{**r, "live": r["heartbeat_ns"] > fresh_after_ns, "stopped": r["heartbeat_ns"] < 0,
              "heartbeat_ns": abs(r["heartbeat_ns"])} for r in rows]
    yield from sorted(found, key=lambda r: (not r["live"], -r["heartbeat_ns"], r["id"]))


def prune(db: Conn, before_ns: int) -> int:
    """Forget collectors not heard from (or stopped) before ``before_ns``: each restart with a default id
    adds a row, and Status lists them all. Their agents' rows keep the id; the run is not connected."""
    return db.execute("DELETE FROM collectors WHERE heartbeat_ns BETWEEN ? AND ?",
                      [-before_ns, before_ns]).rowcount


def stream_opened(db: Conn, agent_id: str, run_id: str, collector_id: str) -> None:
    """The run's stream said hello on ``collector_id`` (after ``Store.record_hello`` made its row; connected
    again here too, in case the old collector's ``stream_closed`` came in between)."""
    db.execute("UPDATE agents SET collector_id = ?, connected = 1 WHERE agent_id = ? AND run_id = ?",
               [collector_id, agent_id, run_id])


def stream_closed(db: Conn, agent_id: str, run_id: str, collector_id: str, now_ns: int) -> int:
    """The run's stream on ``collector_id`` ended: disconnected, unless the run has since said hello on
    another collector (an agent that failed over before its old stream's end was noticed)."""
    return db.execute("UPDATE agents SET connected = 0, collector_id = '', last_seen_ns = ?"
                      " WHERE agent_id = ? AND run_id = ? AND collector_id IN (?, '')",
                      [now_ns, agent_id, run_id, collector_id]).rowcount


def connected_runs(db: Conn, fresh_after_ns: int, *, besides: str = "") -> set[tuple[str, str]]:
    """(agent_id, run_id) of the runs whose stream is open on a collector with a fresh heartbeat
    (other than ``besides``, whose own streams its caller knows better)."""
    rows = db.execute("SELECT a.agent_id, a.run_id FROM agents a JOIN collectors c ON c.id = a.collector_id"
                      " WHERE a.connected = 1 AND c.heartbeat_ns > ? AND c.id <> ?",
                      [fresh_after_ns, besides]).fetchall()
    return {(agent_id, run_id) for agent_id, run_id in rows}


def announce(db: Conn, payload: str) -> None:
    """Tell the other collectors (at commit; PostgreSQL only) that ``payload`` changed."""
    sql = db.dialect.notify()
    if sql:
        db.execute(sql, [CHANNEL, payload])


def announce_rollout(db: Conn, rollout_id: int) -> None:
    announce(db, str(rollout_id))


def announce_reference(db: Conn, model: str, version: str) -> None:
    announce(db, REFERENCE_PREFIX + json.dumps([model, version]))


def parse(payload: str) -> tuple[str, Any] | None:
    """("rollout", id) or ("reference", (model, version)); None for a payload this code does not know."""
    if payload.isdigit():
        return "rollout", int(payload)
    if payload.startswith(REFERENCE_PREFIX):
        try:
            model, version = json.loads(payload[len(REFERENCE_PREFIX):])
        except (ValueError, TypeError):
            return None
        return "reference", (str(model), str(version))
    return None


def backend_pid(db: Conn) -> int:
    """The connection's server process on PostgreSQL (announcements name the one they came from), else 0."""
    return db.execute("SELECT pg_backend_pid()").fetchone()[0] if db.dialect.notify() else 0


def rollouts_after(db: Conn, after_id: int) -> list[int]:
    """Rollout ids above ``after_id``, oldest first (the periodic resync)."""
    return [r for (r,) in db.execute("SELECT id FROM rollouts WHERE id > ? ORDER BY id", [after_id]).fetchall()]


def newest_rollout(db: Conn) -> int:
    return db.execute("SELECT max(id) FROM rollouts").fetchone()[0] or 0


def profiles_after(db: Conn, after_ns: int) -> list[tuple[str, str, int]]:
    """(model, version, attached_ns) of profiles attached after ``after_ns`` (the periodic resync)."""
    return [tuple(r) for r in db.execute("SELECT model_name, model_version, attached_ns FROM profiles"
                                         " WHERE attached_ns > ? ORDER BY attached_ns", [after_ns]).fetchall()]
