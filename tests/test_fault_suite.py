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

from agent.spool import decode
from faults_support import reap  # noqa: F401  (kills what a failed test left running)
from faults_support import (Load, agent, assert_balanced, children, collector, damage, free_port, reap_processes,
                            spool_files, status, stop, stored_rows, wait_until, windows)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")]


def test_agent_restarted_while_the_collector_is_down_delivers_both_runs(tmp_path: Path, lr_model: Path):
    """The issue's item 1: before, every window of the first run was REJECTED and deleted."""
    address, spool = f"127.0.0.1:{free_port()}", tmp_path / "spool"
    ag, agent_address = agent(lr_model, address, spool)  # the collector is down all along
    load = Load(agent_address)
    wait_until(lambda: len(spool_files(spool)) >= 3, what="windows spooled")
    served = load.stop()
    stop(ag)
    first_run = len(spool_files(spool))
    ag, agent_address = agent(lr_model, address, spool)  # the same spool
    load = Load(agent_address)
    wait_until(lambda: len(spool_files(spool)) >= first_run + 3, what="windows of the second run spooled")
    col, _ = collector(tmp_path / "c.db", listen=address)
    wait_until(lambda: stored_rows(address) >= served, what="the first run delivered")
    served += load.stop()
    stop(ag)

    books = assert_balanced(address, served)
    assert books.spool_dropped_windows == 0
    runs: dict[str, list[int]] = {}
    for w in windows(address):
        runs.setdefault(w.run_id, []).append(w.seq)
    assert len(runs) == 2, "both runs are stored"
    for seqs in runs.values():
        assert sorted(seqs) == list(range(len(seqs))), "each window stored once, none missing"
    assert status(address).counters.windows_rejected == 0
    stop(col)


def test_damaged_spool_files_cost_only_themselves_and_are_counted_with_their_rows(tmp_path: Path, lr_model: Path):
    address, spool = f"127.0.0.1:{free_port()}", tmp_path / "spool"
    ag, agent_address = agent(lr_model, address, spool)  # the collector is down: windows stay spooled
    load = Load(agent_address)
    wait_until(lambda: len(spool_files(spool)) >= 6, what="windows spooled")
    served = load.stop()
    stop(ag)
    files = spool_files(spool)
    run = decode(files[0].read_bytes()).run_id
    victims = dict(zip(("flip", "truncate", "body garbage"), (files[1], files[2], files[4])))
    lost = {}
    for how, path in victims.items():  # damaged while the agent is stopped
        window = decode(path.read_bytes())
        lost[window.seq] = window.rows + window.dropped_rows
        damage(path, how)
    assert all(lost.values())

    col, _ = collector(tmp_path / "c.db", listen=address)
    ag, _ = agent(lr_model, address, spool)  # finds the damage as it opens the spool
    wait_until(lambda: not spool_files(spool), what="the spool emptied")
    stop(ag)

    books = assert_balanced(address, served)
    assert (books.spool_dropped_windows, books.spool_dropped) == (3, sum(lost.values()))
    stored = sorted(w.seq for w in windows(address) if w.run_id == run)  # (the idle second run may send empty ones)
    assert stored == sorted(set(range(len(files))) - set(lost)), "every other window stored, once"
    assert status(address).counters.windows_rejected == 0
    stop(col)


def test_collector_stopped_mid_load_then_continued(tmp_path: Path, lr_model: Path):
    spool = tmp_path / "spool"
    col, address = collector(tmp_path / "c.db")
    ag, agent_address = agent(lr_model, address, spool)
    load = Load(agent_address)
    wait_until(lambda: stored_rows(address) > 0, what="first windows stored")
    col.send_signal(signal.SIGSTOP)  # alive, connected, answering nothing
    try:
        before = len(spool_files(spool))
        wait_until(lambda: len(spool_files(spool)) >= before + 5, what="windows waiting in the spool")
    finally:
        col.send_signal(signal.SIGCONT)
    wait_until(lambda: len(spool_files(spool)) <= 2, what="the collector catching up")
    served = load.stop()
    stop(ag)
    books = assert_balanced(address, served)
    assert books.spool_dropped_windows == 0
    stop(col)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 128 KiB tmpfs (a few windows' worth), unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for the spool ({made.stderr.strip() or made.returncode}); "
                    "this scenario needs root (CAP_SYS_ADMIN)")
    try:
        yield mount
    finally:
        reap_processes()  # a failed test's agent must not keep the mount busy
        subprocess.run(["umount", str(mount)], check=False)


def test_agent_spool_disk_full_drops_and_counts_what_it_cannot_keep(tmp_path: Path, lr_model: Path, small_disk):
    address, spool, log = f"127.0.0.1:{free_port()}", small_disk / "spool", tmp_path / "agent.log"
    ag, agent_address = agent(lr_model, address, spool, log=log)  # the collector is down: the spool fills
    load = Load(agent_address)
    wait_until(lambda: log.read_text().count("cannot spool window") >= 2, what="the disk full")
    col, _ = collector(tmp_path / "c.db", listen=address)
    wait_until(lambda: stored_rows(address) > 0, what="the spool delivered")
    served = load.stop()
    stop(ag)  # its last window has room again
    books = assert_balanced(address, served)
    assert books.spool_dropped_windows >= 2 and books.spool_dropped > 0
    stop(col)


def test_summary_helper_killed_mid_load_counts_its_open_window_as_dropped(tmp_path: Path, lr_model: Path):
    log = tmp_path / "agent.log"
    col, address = collector(tmp_path / "c.db")
    # The helper drains the ring every 2-100 ms, so right after a window closes its new one may still be empty:
    # kill it half a window after the first one was stored, when the open window has held rows for ~1.5 s.
    window = 3.0
    ag, agent_address = agent(lr_model, address, tmp_path / "spool", log=log, window_seconds=window)
    load = Load(agent_address)
    wait_until(lambda: stored_rows(address) > 0, what="first windows stored")
    time.sleep(window / 2)
    (helper,) = [pid for pid in children(ag.pid)
                 if b"agent.summary_process" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    os.kill(helper, signal.SIGKILL)
    wait_until(lambda: "summarising in a thread from now on" in log.read_text(), what="the thread taking over")
    at_takeover = stored_rows(address)
    wait_until(lambda: stored_rows(address) > at_takeover, what="windows summarised by the thread")
    served = load.stop()
    stop(ag)
    books = assert_balanced(address, served)
    assert books.window_dropped > 0, "the rows the helper held are counted, in the next window"
    stop(col)
