"""Leases: which collector runs a background loop now, when several share one database.

A lease is a row ``leases(name, holder, expires_ns)``. ``acquire`` takes it or renews it in one
statement (an upsert that changes the row only when this holder has it already or it has expired),
so two collectors racing for an expired lease cannot both win: the database's unique key decides.
A holder renews it each pass; a holder that dies stops renewing and the lease passes to another
collector once ``expires_ns`` is behind; a holder that stops cleanly ``release``s it at once.

On SQLite there is one collector: it always gets the lease, through the same statements.
Expiry is judged by each collector's own clock: keep the collectors' clocks in sync (NTP) to well
within a lease's ttl.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from collector.store.engine import Conn

log = logging.getLogger(__name__)

# The rollup and the drift evaluation loops share one lease, so they run on the same collector. Rollup
# passes are recorded in the database (rollup_passes), so an evaluator elsewhere would stay correct; on
# one collector its span cache stays warm and offers from its own ingest skip the database read.
BACKGROUND = "background"


def acquire(db: Conn, name: str, holder: str, now_ns: int, ttl_ns: int) -> bool:
    """Take or renew lease ``name`` for ``holder`` until ``now_ns + ttl_ns``; False while another
    holder has it (not expired). Runs in the caller's write transaction."""
    row = db.execute("INSERT INTO leases (name, holder, expires_ns) VALUES (?, ?, ?)"
                     " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_ns = excluded.expires_ns"
                     " WHERE leases.holder = excluded.holder OR leases.expires_ns < ?"
                     " RETURNING holder", [name, holder, now_ns + ttl_ns, now_ns]).fetchone()
    return row is not None and row[0] == holder


def release(db: Conn, name: str, holder: str) -> bool:
    """Give lease ``name`` up if ``holder`` has it (so another collector takes it at its next pass)."""
    return db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", [name, holder]).rowcount > 0


def take_all(db: Conn, holder: str) -> int:
    """Every lease becomes free for ``holder`` (a collector starting on SQLite, where it is the only one: a
    lease left by its crashed predecessor must not hold the loops back until it expires)."""
    return db.execute("DELETE FROM leases WHERE holder <> ?", [holder]).rowcount


def holders(db: Conn, now_ns: int) -> Iterator[dict[str, Any]]:
    """Every lease: name, holder, expires_ns and whether it is live at ``now_ns``."""
    for r in db.query("SELECT name, holder, expires_ns FROM leases ORDER BY name"):
        yield {**r, "live": r["expires_ns"] >= now_ns}


class Lease:
    """One background loop's lease for this collector: ``hold()`` before each pass (takes or renews
    it; False: another collector runs the loop now), ``release()`` on a clean stop. ``held`` is what
    the last ``hold`` found (the Prometheus gauge ``outrider_collector_lease_held``)."""

    def __init__(self, write: Callable[[Callable[[Conn], Any]], Any], name: str, holder: str, ttl: float,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self._write, self.name, self.holder = write, name, holder
        self.ttl_ns, self.clock = int(ttl * 1e9), clock
        self._lock = threading.Lock()
        self.held = False

    def hold(self) -> bool:
        try:
            got = bool(self._write(lambda db: acquire(db, self.name, self.holder, self.clock(), self.ttl_ns)))
        except Exception:  # the database is away: not held, so never two runners at once
            log.exception("cannot renew the %s lease", self.name)
            got = False
        with self._lock:
            changed, self.held = got != self.held, got
        if changed:
            log.info("collector %s %s the %s lease", self.holder, "holds" if got else "does not hold", self.name)
        return got

    def release(self) -> None:
        with self._lock:
            if not self.held:
                return
            self.held = False
        try:
            self._write(lambda db: release(db, self.name, self.holder))
            log.info("collector %s released the %s lease", self.holder, self.name)
        except Exception:  # it expires on its own
            log.exception("cannot release the %s lease; it expires in at most %.0f s", self.name, self.ttl_ns / 1e9)
