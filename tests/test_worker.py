"""The summary worker's pace: it sleeps long when the ring is quiet and drains often when it is busy."""
from __future__ import annotations

import time

import numpy as np
import pytest

from agent.capture import Reduce, Slot
from agent.ring import CALLS_HEAD, ROWS_HEAD, Ring, RingLayout
from agent.worker import BURST_ROWS_PER_S, Drainer, Identity, WindowBuilder, WindowPolicy
from protos import summary_pb2

FEATURE = summary_pb2.ColumnSummary.FEATURE
SLOT = Slot("X", FEATURE, Reduce.NUMERIC, np.dtype(np.float32), (2,), ["a", "b"])


def drainer(rows: int = 1 << 16, seconds: float | None = None, start_ns: int | None = None,
            emit: list | None = None) -> Drainer:
    ring = Ring(RingLayout.fit([SLOT], rows, 64 << 20))
    builder = WindowBuilder(ring.layout.slots, Identity("a", "r", "m", "1", ""),
                            start_ns=time.time_ns() if start_ns is None else start_ns)
    out = emit if emit is not None else []
    return Drainer(ring, builder, WindowPolicy(seconds=seconds), out.append)


def test_an_idle_ring_is_checked_at_the_longest_pause_a_busy_one_often() -> None:
    d = drainer()
    policy = d.policy
    assert d.ring.layout.rows == 1 << 16
    assert d.pause(0, 1.0) == policy.max_poll_seconds  # idle: 20 wake-ups a second, not 500
    assert d.pause(1_500, 1.0) == policy.max_poll_seconds  # 1,500 rows/s: a quarter of the ring is 11 s away
    # 1 M rows/s: woken before a quarter of the ring fills
    assert d.pause(1_000_000, 1.0) == pytest.approx((1 << 16) / 4 / 1e6)
    assert d.pause(10**9, 1.0) == policy.poll_seconds  # never busier than the shortest pause


def test_a_small_ring_is_checked_often_enough_to_absorb_a_burst() -> None:
    d = drainer(rows=4096)
    assert d.ring.layout.rows == 4096
    assert d.pause(0, 1.0) == pytest.approx(max(d.policy.poll_seconds, 4096 / BURST_ROWS_PER_S))
    assert d.pause(0, 1.0) < d.policy.max_poll_seconds


def test_the_pause_ends_when_the_open_window_is_due() -> None:
    d = drainer(seconds=10.0, start_ns=time.time_ns() - 9_990_000_000)
    assert d.pause(0, 1.0) <= 0.011
    assert drainer(seconds=10.0).pause(0, 1.0) == d.policy.max_poll_seconds


def test_the_loop_sleeps_long_while_idle_then_short_under_load_and_loses_no_row() -> None:
    windows: list[summary_pb2.WindowSummary] = []
    d = drainer(emit=windows)
    pauses: list[float] = []

    def wait(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 2:  # a burst of 50,000 rows arrives while the worker sleeps
            d.ring.hdr[ROWS_HEAD] += 50_000
            d.ring.hdr[CALLS_HEAD] += 50_000

    d.loop(lambda: len(pauses) >= 4, wait)
    assert pauses[0] == pauses[1] == d.policy.max_poll_seconds
    assert pauses[2] < d.policy.max_poll_seconds  # it saw the rate and wakes sooner
    assert sum(w.rows for w in windows) == 50_000 and not any(w.dropped_rows for w in windows)
