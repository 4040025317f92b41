"""The on-disk spool: order, bounds (oldest dropped and counted), persistence, damaged files."""
from __future__ import annotations

import json
import threading

import pytest

from agent.spool import Spool, SpoolBusy
from protos import summary_pb2


def window(seq: int, rows: int = 10, run_id: str = "run1", pad: int = 0) -> summary_pb2.WindowSummary:
    return summary_pb2.WindowSummary(agent_id="a", run_id=run_id, seq=seq, rows=rows, model_name="m" * (pad or 1))


def seqs(spool: Spool, limit: int = 1000) -> list[int]:
    return [w.seq for _, w in spool.pending(limit)]


def test_pending_is_oldest_first_and_remove_deletes(tmp_path):
    spool = Spool(tmp_path)
    for i in range(5):
        assert spool.put(window(i))
    assert seqs(spool) == [0, 1, 2, 3, 4]
    assert seqs(spool, 2) == [0, 1]
    first, second = spool.pending(2)
    assert [w.seq for _, w in spool.pending(10, after=second[0])] == [2, 3, 4]
    spool.remove(first[0])
    spool.remove(first[0])  # already gone: fine
    assert seqs(spool) == [1, 2, 3, 4]
    status = spool.status()
    assert status.windows == 4
    assert status.bytes == sum(p.stat().st_size for p in tmp_path.glob("*.win"))
    assert len(list(tmp_path.glob("*.win"))) == 4


def test_over_max_bytes_drops_the_oldest_and_counts_them(tmp_path):
    size = len(window(1, pad=100).SerializeToString())
    spool = Spool(tmp_path, max_bytes=size * 3)
    for i in range(5):
        spool.put(window(i, rows=7, pad=100))
    assert seqs(spool) == [2, 3, 4]
    status = spool.status()
    assert (status.windows, status.dropped_windows, status.dropped_rows) == (3, 2, 14)
    assert status.bytes <= size * 3


def test_a_window_larger_than_the_spool_is_dropped_and_counted(tmp_path):
    spool = Spool(tmp_path, max_bytes=50)
    spool.put(window(0, rows=1))
    assert not spool.put(window(1, rows=5, pad=200))
    assert seqs(spool) == [0]
    assert spool.status().dropped_windows == 1 and spool.status().dropped_rows == 5


def test_windows_and_counts_survive_a_restart(tmp_path):
    size = len(window(1, pad=100).SerializeToString())
    spool = Spool(tmp_path, max_bytes=size * 2)
    for i in range(4):
        spool.put(window(i, pad=100))
    key, _ = spool.pending(1)[0]
    spool.mark_rejected(key)
    spool.close()

    again = Spool(tmp_path, max_bytes=size * 2)
    assert seqs(again) == [3]
    status = again.status()
    assert (status.dropped_windows, status.dropped_rows, status.rejected_windows) == (2, 20, 1)
    again.put(window(4, pad=100))  # new keys sort after the old ones
    assert seqs(again) == [3, 4]


def test_a_smaller_limit_at_restart_drops_the_oldest(tmp_path):
    spool = Spool(tmp_path)
    for i in range(4):
        spool.put(window(i, pad=100))
    spool.close()
    size = len(window(1, pad=100).SerializeToString())
    again = Spool(tmp_path, max_bytes=size)
    assert seqs(again) == [3]
    assert again.status().dropped_windows == 3


def test_damaged_files_at_start_are_removed_and_counted(tmp_path, caplog):
    spool = Spool(tmp_path)
    for i in range(3):
        spool.put(window(i))
    keys = [k for k, _ in spool.pending(10)]
    spool.close()
    (tmp_path / keys[1]).write_bytes(b"\xff\xff\xff not a window")        # unparseable
    (tmp_path / (keys[2] + ".tmp")).write_bytes(b"half a wind")            # a write cut short by kill -9
    (tmp_path / "00000000000000000099-run1-7.win").write_bytes(window(8).SerializeToString())  # name != content

    again = Spool(tmp_path)
    assert seqs(again) == [0, 2]
    assert again.status().dropped_windows == 3
    assert not list(tmp_path.glob("*.tmp"))
    assert "counted as a dropped window" in caplog.text


def test_unreadable_state_file_restarts_counts(tmp_path):
    (tmp_path / "state.json").write_text("{broken")
    spool = Spool(tmp_path)
    assert spool.status().dropped_windows == 0
    spool.mark_rejected("no-such-key")  # nothing counted for a window we never had
    assert spool.status().rejected_windows == 0


def test_state_file_is_json_with_the_counts(tmp_path):
    spool = Spool(tmp_path, max_bytes=len(window(0).SerializeToString()))
    spool.put(window(0, rows=3))
    spool.put(window(1, rows=3))
    assert json.loads((tmp_path / "state.json").read_text()) == {
        "dropped_windows": 1, "dropped_rows": 3, "rejected_windows": 0}


def test_one_owner_per_directory(tmp_path):
    spool = Spool(tmp_path)
    with pytest.raises(SpoolBusy, match="in use"):
        Spool(tmp_path)
    spool.close()
    Spool(tmp_path).close()


def test_concurrent_puts_and_removes(tmp_path):
    spool = Spool(tmp_path)
    removed: list[str] = []

    def producer(run: str) -> None:
        for i in range(30):
            spool.put(window(i, run_id=run))

    def consumer() -> None:
        while len(removed) < 90:
            for key, _ in spool.pending(10):
                spool.remove(key)
                removed.append(key)

    threads = [threading.Thread(target=producer, args=(f"r{n}",)) for n in range(3)]
    threads.append(threading.Thread(target=consumer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(set(removed)) == 90
    assert spool.status().windows == 0 and spool.status().bytes == 0
    assert not list(tmp_path.glob("*.win"))
