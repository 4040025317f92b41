"""Two collectors deciding at once on one PostgreSQL: governance changes take turns, and the second sees the first;
and below the lifecycle's checks, both engines' indexes and triggers refuse the same things.

Two ``Store``s on one database stand for two collectors. The first decision is held open (its transaction
not yet committed) until the second is seen waiting on a lock in ``pg_stat_activity``, so the two really
overlap; without the lock the lifecycle takes before reading (``store.governance.take_turn``) both would read
the same state, and both approve one request, or the second trip over the one-production index with
PostgreSQL's own message.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from agent.errors import FailedPrecondition
from collector.lifecycle import approvals, retraining
from collector.store import audit, governance, versions
from collector.store.engine import StoreIntegrityError
from collector.store.store import Store

HANG_GUARD = 60.0
PASSED = json.dumps({"passed": True, "checks": []})


@pytest.fixture
def two_stores(postgres_url: str) -> Iterator[tuple[Store, Store, str]]:
    first = Store(postgres_url)
    second = Store(postgres_url)
    try:
        yield first, second, postgres_url
    finally:
        second.close()
        first.close()


def seed(store: Store, staging: tuple[int, ...]) -> dict[int, int]:
    """Model m: version 1 production, ``staging`` versions with a passed gate and a pending request each
    (by alice); version -> approval id."""
    def write(db) -> dict[int, int]:
        for version in (1, *staging):
            versions.insert(db, {"name": "m", "version": version, "sha256": f"{version:064x}", "size": 1,
                                 "schema": "{}", "registered_by": "alice", "registered_ns": 1, "gate": PASSED,
                                 "gate_passed": 1, "stage": "production" if version == 1 else "staging",
                                 "stage_ns": 1})
        return {v: approvals.request(db, "m", v, "alice", "better", "", 2).id for v in staging}

    return store.write(write)


def waiting_on_a_lock(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                            " AND wait_event_type = 'Lock'").fetchone()[0] > 0


def overlapping(url: str, first: Store, do_first: Callable[[Any], Any], second: Store,
                do_second: Callable[[Any], Any]) -> tuple[Any, Any]:
    """Run ``do_first`` in ``first``'s writer and hold its transaction open until ``do_second``, run in
    ``second``'s writer meanwhile, waits on a lock; then let both finish. Each outcome: a value or the
    exception raised."""
    outcomes: dict[str, Any] = {}

    def held(db) -> Any:
        result = do_first(db)
        go.set()
        deadline = time.monotonic() + HANG_GUARD
        while not waiting_on_a_lock(url):  # a hang guard, not a timing: the second must come to the lock
            assert time.monotonic() < deadline, "the second decision never waited for the first"
            time.sleep(0.02)
        return result

    def run(name: str, store: Store, fn: Callable[[Any], Any]) -> None:
        try:
            outcomes[name] = store.write(fn)
        except Exception as exc:  # the outcome under test
            outcomes[name] = exc

    go = threading.Event()
    one = threading.Thread(target=run, args=("first", first, held))
    one.start()
    assert go.wait(HANG_GUARD)
    two = threading.Thread(target=run, args=("second", second, do_second))
    two.start()
    one.join(HANG_GUARD)
    two.join(HANG_GUARD)
    assert not one.is_alive() and not two.is_alive()
    return outcomes["first"], outcomes["second"]


def test_two_approvers_of_one_request_on_two_collectors_one_wins(two_stores):
    first, second, url = two_stores
    ids = seed(first, (2,))
    won, lost = overlapping(url, first, lambda db: approvals.decide(db, ids[2], "bob", True, "ok", 10),
                            second, lambda db: approvals.decide(db, ids[2], "carol", True, "ok too", 11))
    assert won.state == "approved" and won.decided_by == "bob"
    assert isinstance(lost, FailedPrecondition), lost
    assert str(lost) == f"approval {ids[2]} is already approved (by bob); only pending requests can be decided"
    db = first.read()
    assert versions.stages(db, "m") == {1: "archived", 2: "production"}
    assert approvals.get(db, ids[2]).decided_by == "bob"
    assert [e.actor for e in audit.entries(db, "m") if e.action == "approval.approve"] == ["bob"]
    assert audit.verify(db).ok


def test_approvals_of_two_versions_on_two_collectors_take_turns(two_stores):
    """Each approval sees the one committed before it: version 2 replaces 1, then 3 replaces 2, as on one
    collector; never two production versions, never PostgreSQL's own index message."""
    first, second, url = two_stores
    ids = seed(first, (2, 3))
    a, b = overlapping(url, first, lambda db: approvals.decide(db, ids[2], "bob", True, "ok", 10),
                       second, lambda db: approvals.decide(db, ids[3], "carol", True, "ok", 11))
    assert a.state == "approved" and b.state == "approved", (a, b)
    db = second.read()
    assert versions.stages(db, "m") == {1: "archived", 2: "archived", 3: "production"}
    moves = [(e.object, json.loads(e.before)["stage"], json.loads(e.after)["stage"])
             for e in sorted(audit.entries(db, "m"), key=lambda e: e.id) if e.action == "model.stage"]
    assert audit.verify(db).ok
    assert moves == [("model/m/1", "production", "archived"), ("model/m/2", "staging", "production"),
                     ("model/m/2", "production", "archived"), ("model/m/3", "staging", "production")]


def test_one_retraining_request_per_version_across_collectors(two_stores):
    first, second, url = two_stores
    seed(first, ())
    opened, refused = overlapping(
        url, first, lambda db: retraining.open_request(db, "m", "1", "alice", "drift", {}, 10),
        second, lambda db: retraining.open_request(db, "m", "1", "bob", "drift too", {}, 11))
    assert opened.state == "open"
    assert isinstance(refused, FailedPrecondition), refused
    assert str(refused) == f"m version 1 already has an active retraining request ({opened.id}, open)"


def test_the_database_itself_refuses_what_the_lifecycle_checks_on_both_engines(db_url):
    """Below the lifecycle's own checks, each engine's indexes and triggers refuse the same things:
    a second production version, a second pending request, a second active retraining request, a
    retired version changing stage (with the trigger's words on both)."""
    store = Store(db_url)
    try:
        ids = seed(store, (2,))
        store.write(lambda db: retraining.open_request(db, "m", "1", "alice", "drift", {}, 3))
        attempts = {
            "second production": lambda db: versions.set_stage(db, "m", 2, "production", 4),
            "second pending": lambda db: governance.insert_approval(db, "m", 2, "alice", 4, "again"),
            "second active retraining": lambda db: governance.insert_retraining(db, "m", "1", "bob", 4, "", "{}"),
        }
        for what, attempt in attempts.items():
            with pytest.raises(StoreIntegrityError):
                store.write(attempt)
                pytest.fail(f"{what} was stored")
        store.write(lambda db: (versions.set_stage(db, "m", 1, "archived", 5), versions.retire(db, "m", 1, "old", 6)))
        with pytest.raises(StoreIntegrityError, match="a retired model version cannot change stage"):
            store.write(lambda db: versions.set_stage(db, "m", 1, "archived", 7))
        db = store.read()
        assert versions.stages(db, "m") == {1: "retired", 2: "staging"}
        assert [a.id for a in approvals.listing(db)] == [ids[2]]
        assert len(retraining.listing(db)) == 1
    finally:
        store.close()
