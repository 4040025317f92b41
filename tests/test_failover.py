"""Agents that fail over: ``--collector A,B`` streams to one collector and, when it dies (kill -9),
moves to the other with its spool. Real processes, real signals.

Each collector here has its own SQLite file, so the books are kept across both files: every window
the agent made is stored by at least one collector (none lost), and only windows the dead one had
stored without acknowledging them may be stored twice (resent, as at-least-once delivery must).
Behind one PostgreSQL database, the shared ``(agent_id, run_id, seq)`` key makes them DUPLICATE.
"""
from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import pytest

from faults_support import reap  # noqa: F401  (kills what a failed test left running)
from faults_support import Load, agent, collector, status, stop, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")]


def _connected(address: str) -> bool:
    try:
        return any(a.connected for a in status(address).agents)
    except Exception:  # noqa: BLE001  (down, or not up yet)
        return False


def _windows(db: Path) -> dict[tuple[str, int], int]:
    """(run_id, seq) -> rows of every window in a collector's database file (read directly: the
    collector may be dead)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return {(run, seq): rows for run, seq, rows in conn.execute("SELECT run_id, seq, rows FROM windows")}


def test_an_agent_whose_collector_is_killed_moves_to_the_next_with_its_spool(tmp_path: Path, lr_model: Path):
    dbs = [tmp_path / "a.db", tmp_path / "b.db"]
    procs, addresses = zip(*(collector(db, log=tmp_path / f"{db.stem}.log") for db in dbs))
    ag, agent_address = agent(lr_model, ",".join(addresses), tmp_path / "spool", log=tmp_path / "agent.log")
    load = Load(agent_address)
    wait_until(lambda: any(_connected(a) for a in addresses), what="the agent connected to a collector")
    first = next(i for i, a in enumerate(addresses) if _connected(a))
    other = 1 - first
    wait_until(lambda: len(_windows(dbs[first])) >= 5, what="windows stored by the first collector")
    procs[first].send_signal(signal.SIGKILL)
    procs[first].wait()
    stored_before = _windows(dbs[first])
    wait_until(lambda: _connected(addresses[other]), what="the agent moved to the other collector")
    wait_until(lambda: len(_windows(dbs[other])) >= 5, what="windows stored by the second collector")
    served = load.stop()
    stop(ag)  # flushes its last window and delivers it to the live collector
    first_windows, second_windows = _windows(dbs[first]), _windows(dbs[other])
    assert first_windows == stored_before  # nothing reached the dead one afterwards
    both = {**first_windows, **second_windows}
    assert sum(both.values()) == served, "every row served is in a window stored somewhere, once counted"
    seqs = sorted(seq for _, seq in both)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "no window missing in the sequence"
    # Stored twice only when the dead collector committed a window but its ack never reached the agent.
    assert len(first_windows.keys() & second_windows.keys()) <= 64  # at most the in-flight limit
    assert all(a.spool.dropped_windows == 0 for a in status(addresses[other]).agents)
