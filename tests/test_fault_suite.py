"""The fault suite: real collector and agent processes, real signals, real file damage.

Each scenario ends with the books balanced exactly (``faults_support.Books``):
rows served == rows stored + rows counted as dropped (in the windows and in
the agent's spool). The collector killed with -9 mid-load and the agent killed
and restarted are in tests/test_delivery.py; the collector's database on a
file system that fails is in tests/test_durability.py.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from faults_support import (Books, Load, agent, assert_balanced, collector, free_port, spool_files, status, stop,
                            stored_rows, wait_until, windows)

pytestmark = pytest.mark.slow


def test_agent_restarted_while_the_collector_is_down_delivers_both_runs(tmp_path: Path, lr_model: Path):
    """The issue's item 1: before, every window of the first run was REJECTED and deleted."""
    address, spool = f"127.0.0.1:{free_port()}", tmp_path / "spool"
    served = 0
    for _ in range(2):  # two runs of the agent on one spool, the collector down all along
        ag, agent_address = agent(lr_model, address, spool)
        load = Load(agent_address)
        before = len(spool_files(spool))
        wait_until(lambda: len(spool_files(spool)) >= before + 3, what="windows spooled")
        served += load.stop()
        stop(ag)
    ag, _ = agent(lr_model, address, spool)  # a third run, idle: it only has to deliver
    col, _ = collector(tmp_path / "c.db", listen=address)
    wait_until(lambda: not spool_files(spool), what="the spool emptied")
    stop(ag)

    books = assert_balanced(address, served)
    assert books.spool_dropped_windows == 0
    runs: dict[str, list[int]] = {}
    rows: dict[str, int] = {}
    for w in windows(address):
        runs.setdefault(w.run_id, []).append(w.seq)
        rows[w.run_id] = rows.get(w.run_id, 0) + w.rows
    assert len(runs) == 3 and sorted(n > 0 for n in rows.values()) == [False, True, True], \
        "the two runs that served traffic are stored (the third sent only empty windows)"
    for seqs in runs.values():
        assert sorted(seqs) == list(range(len(seqs))), "each window stored once, none missing"
    assert status(address).counters.windows_rejected == 0
    stop(col)
