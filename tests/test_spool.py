"""The on-disk spool: order, bounds (oldest dropped and counted), persistence, damaged files."""
from __future__ import annotations

import json
import threading

import pytest

from agent import checksum
from agent.spool import HEADER_SIZE, Spool, SpoolBusy, encode
from faults_support import damage
from protos import summary_pb2


def window(seq: int, rows: int = 10, run_id: str = "run1", pad: int = 0, model: str = "m",
           dropped: int = 0) -> summary_pb2.WindowSummary:
    return summary_pb2.WindowSummary(agent_id="a", run_id=run_id, seq=seq, rows=rows, dropped_rows=dropped,
                                     model_name=model * (pad or 1))


def on_disk(w: summary_pb2.WindowSummary) -> int:
    """The bytes a window takes in the spool (sealed, with its header)."""
    return len(encode(checksum.seal(w)))


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
    size = on_disk(window(1, pad=100))
    spool = Spool(tmp_path, max_bytes=size * 3)
    for i in range(5):
        spool.put(window(i, rows=7, pad=100))
    assert seqs(spool) == [2, 3, 4]
    status = spool.status()
    assert (status.windows, status.dropped_windows, status.dropped_rows) == (3, 2, 14)
    assert status.bytes <= size * 3


def test_a_window_larger_than_the_spool_is_dropped_and_counted(tmp_path):
    spool = Spool(tmp_path, max_bytes=on_disk(window(0, rows=1)) + 10)
    spool.put(window(0, rows=1))
    assert not spool.put(window(1, rows=5, pad=200))
    assert seqs(spool) == [0]
    assert spool.status().dropped_windows == 1 and spool.status().dropped_rows == 5


def test_windows_and_counts_survive_a_restart(tmp_path):
    size = on_disk(window(1, pad=100))
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
    size = on_disk(window(1, pad=100))
    again = Spool(tmp_path, max_bytes=size)
    assert seqs(again) == [3]
    assert again.status().dropped_windows == 3


def test_damaged_files_at_start_cost_only_themselves_counted_with_their_rows(tmp_path, caplog):
    spool = Spool(tmp_path)
    for i in range(7):
        spool.put(window(i, rows=10 + i, dropped=i, pad=40))
    keys = [k for k, _ in spool.pending(10)]
    spool.close()
    damage(tmp_path / keys[1], "flip")
    damage(tmp_path / keys[2], "truncate")
    damage(tmp_path / keys[4], "body garbage")
    damage(tmp_path / keys[5], "header garbage")   # its rows cannot be known: counted as 0
    (tmp_path / (keys[6] + ".tmp")).write_bytes(encode(window(9, rows=50))[:HEADER_SIZE + 3])  # cut by kill -9
    (tmp_path / "state.json.tmp").write_bytes(b"{")  # the counters' write cut short: not a window
    (tmp_path / "00000000000000000099-run1-7.win").write_bytes(encode(window(8, rows=3)))  # name != content

    again = Spool(tmp_path)
    assert seqs(again) == [0, 3, 6]
    status = again.status()
    assert status.dropped_windows == 6
    # rows each window accounts for: summarised + counted as dropped before summarising
    assert status.dropped_rows == (11 + 1) + (12 + 2) + (14 + 4) + 0 + 50 + 3
    assert not list(tmp_path.glob("*.tmp"))
    assert len(list(tmp_path.glob("*.win"))) == 3
    assert "checksum mismatch" in caplog.text and "counted as a dropped window" in caplog.text


def test_a_file_damaged_while_waiting_is_found_when_read_for_sending(tmp_path, caplog):
    spool = Spool(tmp_path)
    for i in range(4):
        spool.put(window(i, rows=10 + i, pad=40))
    keys = [k for k, _ in spool.pending(10)]
    damage(tmp_path / keys[1], "flip")
    damage(tmp_path / keys[2], "header garbage")  # the spool knew its rows when it wrote it
    assert seqs(spool) == [0, 3]
    status = spool.status()
    assert (status.windows, status.dropped_windows, status.dropped_rows) == (2, 2, 11 + 12)
    assert status.bytes == sum(p.stat().st_size for p in tmp_path.glob("*.win"))
    assert "is damaged" in caplog.text


def test_windows_are_sealed_as_they_enter(tmp_path):
    spool = Spool(tmp_path)
    spool.put(window(0))
    (_, stored), = spool.pending(1)
    assert stored.crc32 and checksum.check(stored) == ""


def test_files_of_the_earlier_format_are_still_read(tmp_path):
    old = window(0, rows=4, run_id="r0")
    (tmp_path / "00000000000000000000-r0-0.win").write_bytes(old.SerializeToString())  # no header
    spool = Spool(tmp_path)
    assert seqs(spool) == [0]
    spool.put(window(1, rows=5, run_id="r1"))
    assert [(w.run_id, w.seq, w.rows) for _, w in spool.pending(10)] == [("r0", 0, 4), ("r1", 1, 5)]


def test_models_of_the_windows_waiting(tmp_path):
    spool = Spool(tmp_path)
    spool.put(window(0, model="old"))
    spool.put(window(1, model="old"))
    spool.put(window(2, model="new"))
    assert spool.models() == ["new", "old"]
    spool.close()
    again = Spool(tmp_path)  # known again after a restart
    assert again.models() == ["new", "old"]
    first, second, _ = (k for k, _ in again.pending(10))
    again.remove(first)
    assert again.models() == ["new", "old"]
    again.mark_rejected(second)
    assert again.models() == ["new"]


def test_counts_that_could_not_be_saved_are_saved_when_room_is_made(tmp_path, caplog):
    spool = Spool(tmp_path, max_bytes=on_disk(window(1)))
    spool.put(window(1, rows=3))
    (tmp_path / "state.json.tmp").mkdir()  # the counters cannot be written (as on a full disk)
    spool.put(window(2, rows=3))  # evicts window 1
    assert spool.status().dropped_rows == 3
    assert "cannot save spool counters" in caplog.text
    assert not (tmp_path / "state.json").exists()
    (tmp_path / "state.json.tmp").rmdir()
    (key, _), = spool.pending(1)
    spool.remove(key)  # an ack: room again
    assert json.loads((tmp_path / "state.json").read_text())["dropped_rows"] == 3


def test_unreadable_state_file_restarts_counts(tmp_path):
    (tmp_path / "state.json").write_text("{broken")
    spool = Spool(tmp_path)
    assert spool.status().dropped_windows == 0
    spool.mark_rejected("no-such-key")  # nothing counted for a window we never had
    assert spool.status().rejected_windows == 0


def test_state_file_is_json_with_the_counts(tmp_path):
    spool = Spool(tmp_path, max_bytes=on_disk(window(0)))
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
