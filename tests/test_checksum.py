"""The window checksum: sealed by the agent, checked by the collector, one home (agent/checksum.py)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent import checksum
from protos import summary_pb2


def window(**fields) -> summary_pb2.WindowSummary:
    w = summary_pb2.WindowSummary(agent_id="a", run_id="r", seq=3, model_name="m", model_version="1",
                                  start_unix_nano=1, end_unix_nano=2, rows=10, calls=2, **fields)
    w.columns.add(name="x", kind=summary_pb2.ColumnSummary.NUMERIC, count=10, mean=0.5, m2=1.0, kll=b"\x01\x02")
    return w


def test_a_sealed_window_checks_after_a_round_trip_and_an_unsealed_one_passes():
    w = checksum.seal(window())
    assert w.crc32 and checksum.check(summary_pb2.WindowSummary.FromString(w.SerializeToString())) == ""
    assert checksum.check(window()) == ""  # crc32 = 0: not sealed (e.g. a window built by hand)


def test_any_damage_is_found():
    data = bytearray(checksum.seal(window()).SerializeToString())
    found = 0
    for i in range(len(data)):
        damaged = bytearray(data)
        damaged[i] ^= 0x10
        try:
            parsed = summary_pb2.WindowSummary.FromString(bytes(damaged))
        except Exception:
            found += 1  # not even a message: refused earlier
            continue
        found += bool(checksum.check(parsed)) or parsed.crc32 == 0  # a zeroed checksum = unsealed
    assert found == len(data)


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(0, 2**40), mean=st.floats(allow_nan=False), names=st.lists(st.text(max_size=20), max_size=5),
       seq=st.integers(0, 2**63 - 1))
def test_seal_then_check_agrees_for_any_window(rows, mean, names, seq):
    w = summary_pb2.WindowSummary(agent_id="a", run_id="r", seq=seq, rows=rows)
    for name in names:
        w.columns.add(name=name, mean=mean)
    checksum.seal(w)
    again = summary_pb2.WindowSummary.FromString(w.SerializeToString())
    assert checksum.check(again) == ""
    assert checksum.window_crc32(again) == w.crc32
