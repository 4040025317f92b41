"""The audit trail: an append-only, hash-chained table of every state change.

Each row says who did what to which object, when, from what to what and why,
and carries the hash of the row before it. ``append`` must run inside the
store writer's transaction (from a function passed to ``Store.write``), next
to the change it records, so the change and its row commit together or not
at all.

Two defences, for two threats:

- SQLite triggers refuse UPDATE and DELETE on the table. They stop accidents
  (a stray statement, a careless migration), not an adversary: anyone who can
  write the file can drop a trigger.
- The hash chain detects deliberate edits: a row's hash covers every other
  field of it, the previous row's hash included, so changing, removing or
  reordering a row breaks the chain at that row (``verify``). Ids are never
  reused (the highest ever given out is kept apart: ``high_water``, and
  SQLite's AUTOINCREMENT counter), so a gap is a deleted row. Removing the
  newest rows *and* those counters cannot be seen from the database alone;
  comparing the latest hash with a copy kept elsewhere closes that gap.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from collector.store.dialect import NO_LIMIT
from collector.store.engine import Conn, StoreError

from agent.errors import OutriderError
from protos import collector_pb2 as pb

log = logging.getLogger(__name__)

GENESIS = "0" * 64  # the prev_hash of the first row
COLLECTOR = "collector"  # the actor of changes the collector makes by itself (alerts opening, resolving)
_FIELDS = ("id", "at_ns", "actor", "action", "object", "model_name", "before", "after", "reason", "prev_hash")


class Verification(NamedTuple):
    ok: bool
    entries: int
    first_broken_id: int  # 0 when ok
    problem: str  # "" when ok


def _json(value: Any) -> str:
    """Canonical JSON (sorted keys, no spaces): the same value always hashes the same."""
    return "" if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"))


def row_hash(row: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of every field but ``hash`` itself."""
    return hashlib.sha256(_json({f: row[f] for f in _FIELDS}).encode("utf-8")).hexdigest()


def take_turn(db: Conn) -> None:
    """Take, until the transaction ends, the lock every audited change takes (``append`` takes it too),
    before reading the state a change depends on -- a governance decision, an alert machine's step: two
    collectors on one PostgreSQL then change things in turn, each seeing what the other committed
    (READ COMMITTED re-reads per statement). One lock for all, not one per model: an evaluation's
    transaction also appends to the chain and runs the retraining and rollback policies, so a second
    lock could be taken in two orders (a deadlock). On SQLite ``BEGIN IMMEDIATE`` already serialises
    every writer, and the lock is a no-op."""
    db.lock("audit")


def append(db: Conn, actor: str, action: str, obj: str, *, model_name: str = "", before: Any = None,
           after: Any = None, reason: str = "", now_ns: int) -> pb.AuditEntry:
    """Append one row; call it inside the writer's transaction, beside the change it records.

    ``before``/``after`` are JSON-ready values (None: nothing). The id follows the highest ever
    given out (``_high_water``) rather than ``max(id) + 1``, so that a deleted newest row leaves a
    gap that ``verify`` reports."""
    if not db.in_transaction:
        raise RuntimeError("audit.append must run inside the store writer's transaction (Store.write)")
    take_turn(db)  # several collectors on one PostgreSQL append one chain, in turn
    seq = _high_water(db)
    last = db.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
    row = {"id": max(seq, last[0] if last else 0) + 1, "at_ns": now_ns, "actor": actor,
           "action": action, "object": obj, "model_name": model_name, "before": _json(before),
           "after": _json(after), "reason": reason, "prev_hash": last[1] if last else GENESIS}
    row["hash"] = row_hash(row)
    db.execute(f"INSERT INTO audit ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
    with _before_migration_12(db):
        db.upsert("high_water", {"name": "audit", "value": row["id"]}, key=["name"])
    return _entry(row)


def _entry(r: dict[str, Any]) -> pb.AuditEntry:
    return pb.AuditEntry(id=r["id"], at_unix_nano=r["at_ns"], actor=r["actor"], action=r["action"], object=r["object"],
                         before=r["before"], after=r["after"], reason=r["reason"], prev_hash=r["prev_hash"],
                         hash=r["hash"])


def entries(db: Conn, model_name: str = "", limit: int = 1000) -> list[pb.AuditEntry]:
    """The newest ``limit`` rows (about ``model_name`` if given), newest first."""
    return [entry for _, entry in itertools.islice(entry_rows(db, model_name, limit=limit), limit)]


def entry_rows(db: Conn, model_name: str = "", *, before_id: int = 0,
               limit: int | None = None) -> Iterator[tuple[tuple[int], pb.AuditEntry]]:
    """Rows newest first (about ``model_name`` if given), read lazily as ((id,), entry); ``before_id``:
    only rows older than that one (a page token's cursor). ``limit`` only bounds SQLite's read-ahead."""
    where, params = (["model_name = ?"], [model_name]) if model_name else ([], [])
    if before_id:
        where.append("id < ?")
        params.append(before_id)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    ahead = NO_LIMIT if limit is None else limit + 1
    for r in db.query(f"SELECT * FROM audit {clause} ORDER BY id DESC LIMIT ?", [*params, ahead]):
        yield (r["id"],), _entry(r)


def _high_water(db: Conn) -> int:
    """The highest audit id ever given out (0: none): our own record, and on SQLite also its
    AUTOINCREMENT counter (databases written before migration 12 have only that)."""
    kept = None
    with _before_migration_12(db):
        kept = db.execute("SELECT value FROM high_water WHERE name = 'audit'").fetchone()
    sql = db.dialect.autoincrement_high_water("audit")
    found = db.execute(sql).fetchone() if sql else None
    return max(kept[0] if kept else 0, found[0] if found else 0)


@contextlib.contextmanager
def _before_migration_12(db: Conn) -> Iterator[None]:
    """A database not yet at migration 12 has no ``high_water`` table (a migration that audits, a
    test that plays an older collector): the statement is skipped, in a savepoint so that a
    PostgreSQL transaction goes on."""
    try:
        with db.savepoint():
            yield
    except StoreError as exc:
        if "high_water" not in str(exc):
            raise


def verify(db: Conn) -> Verification:
    """Walk the chain in id order; the first row that breaks it, and why.

    A row breaks the chain when its hash does not match its contents (edited),
    when its prev_hash is not the previous row's hash, or when ids are missing
    before it (deleted rows)."""
    count, prev_id, prev_hash = 0, 0, GENESIS
    with db.snapshot():  # one read transaction: a writer appending meanwhile is not seen half-way
        for r in db.query("SELECT * FROM audit ORDER BY id"):
            count += 1
            if r["id"] != prev_id + 1:
                missing = f"row {prev_id + 1}" if r["id"] == prev_id + 2 else f"rows {prev_id + 1}-{r['id'] - 1}"
                return Verification(False, count, r["id"], f"{missing} before it are missing (deleted)")
            if r["prev_hash"] != prev_hash:
                before = f"row {prev_id}'s hash" if prev_id else "the genesis value"
                return Verification(False, count, r["id"], f"its prev_hash does not match {before}")
            if row_hash(r) != r["hash"]:
                return Verification(False, count, r["id"], "its contents do not match its hash (edited)")
            prev_id, prev_hash = r["id"], r["hash"]
        seq = _high_water(db)
    if seq > prev_id:
        missing = f"row {seq}" if seq == prev_id + 1 else f"rows {prev_id + 1}-{seq}"
        return Verification(False, count, prev_id + 1, f"{missing} at the end are missing (deleted)")
    return Verification(True, count, 0, "")


# ------------------------------------------------------------ auth failures

MINUTE_NS = 60 * 1_000_000_000
MAX_OBJECTS = 8  # distinct objects (methods, pages) named per row; more are only counted


@dataclass
class _Refusals:
    """The refusals of one (minute, peer, actor, reason): one audit row."""

    first_ns: int
    last_ns: int
    count: int = 0
    objects: dict[str, None] = field(default_factory=dict)  # insertion-ordered set
    more_objects: int = 0  # refusals of objects past the first MAX_OBJECTS


class AuthFailureLog:
    """Records refused calls in the audit trail, one row per (peer, actor, reason) and minute.

    A flood of refused calls must not grow the audit table (append-only:
    rows are never deleted) or hold the caller: a refusal only adds to a
    count in memory and returns. At the end of each minute (``start``: a
    thread) and on ``close`` each key's row is appended, saying how many
    refusals it stands for, the first and last time, the peer address and
    the objects asked for. At most ``max_keys`` keys are kept; further
    refusals fold into one row per minute ("various"), so memory is bounded
    and every refusal is still counted."""

    def __init__(self, submit: Callable[[Callable[[Conn], Any]], concurrent.futures.Future], *,
                 max_keys: int = 1000, clock: Callable[[], int] = time.time_ns) -> None:
        self._submit = submit
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[tuple[int, str, str, str], _Refusals] = {}
        self._folded: dict[int, _Refusals] = {}  # minute -> refusals past max_keys
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, actor: str, obj: str, reason: str, peer: str = "") -> None:
        now = self._clock()
        key = (now // MINUTE_NS, peer or "unknown", actor or "anonymous", reason)
        with self._lock:
            found = self._keys.get(key)
            new = found is None
            if new and len(self._keys) >= self.max_keys:
                found = self._folded.setdefault(key[0], _Refusals(now, now))
                new = found.count == 0
            elif new:
                found = self._keys[key] = _Refusals(now, now)
            found.count += 1
            found.last_ns = now
            if obj in found.objects:
                pass
            elif len(found.objects) < MAX_OBJECTS:
                found.objects[obj] = None
            else:
                found.more_objects += 1
        if new:  # one line per key and minute: a flood does not flood the log too
            log.warning("refused %s from %s (%s): %s", obj, key[1], key[2], reason)

    def flush(self, everything: bool = False) -> int:
        """Append the rows of every minute that has ended (all of them with ``everything``);
        returns how many rows were queued. Never waits for the commit."""
        minute = self._clock() // MINUTE_NS
        with self._lock:
            due = [k for k in self._keys if everything or k[0] < minute]
            rows = [(*k, self._keys.pop(k)) for k in due]
            for m in [m for m in self._folded if everything or m < minute]:
                rows.append((m, "various", "various",
                             f"more than {self.max_keys} different callers and reasons refused in this minute",
                             self._folded.pop(m)))
        if not rows:
            return 0
        rows.sort(key=lambda row: row[4].first_ns)
        for _, peer, actor, reason, refused in rows:
            if refused.count > 1:
                log.warning("%d refused calls from %s (%s) in the minute from %s: %s", refused.count, peer,
                            actor, time.strftime("%H:%M", time.gmtime(refused.first_ns // 1_000_000_000)), reason)
        now = self._clock()

        def write(db: Conn) -> None:
            for _, peer, actor, reason, refused in rows:
                objects = list(refused.objects)
                after = {"count": refused.count, "peer": peer, "first_unix_nano": refused.first_ns,
                         "last_unix_nano": refused.last_ns, "objects": objects}
                if refused.more_objects:
                    after["refusals_of_other_objects"] = refused.more_objects
                append(db, actor, "auth.failure", objects[0], after=after, reason=reason, now_ns=now)

        total = sum(row[4].count for row in rows)
        try:
            future = self._submit(write)
        except OutriderError as exc:  # the store is closing: say what is lost
            log.error("%d auth failures (%d audit rows) not recorded in the audit trail: %s", total, len(rows), exc)
            return 0

        def done(f: concurrent.futures.Future) -> None:
            if f.exception() is not None:
                log.error("%d auth failures (%d audit rows) not recorded in the audit trail: %s", total, len(rows),
                          f.exception())

        future.add_done_callback(done)
        return len(rows)

    def start(self) -> AuthFailureLog:
        """Flush each minute as it ends, on a thread of its own."""
        self._thread = threading.Thread(target=self._run, name="outrider-auth-failures", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(MINUTE_NS / 1e9 - (self._clock() % MINUTE_NS) / 1e9 + 0.05):
            try:
                self.flush()
            except Exception:  # keep flushing next minute
                log.exception("recording auth failures failed")

    def close(self) -> None:
        """Stop the thread and queue every row held, before the store closes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.flush(everything=True)
