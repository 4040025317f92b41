"""Window validation: every bad field is rejected with a message that names it."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from agent.errors import InvalidArgument
from agent.sketches import CategoricalSketch, NumericSketch
from collector.ingest import Limits, validate_window
from protos import summary_pb2

FEATURE = summary_pb2.ColumnSummary.FEATURE
T = 1_800_000_000_000_000_000


def good() -> summary_pb2.WindowSummary:
    num, cat, lat = NumericSketch(), CategoricalSketch(), NumericSketch()
    num.update(np.array([1.0, 2.0, np.nan, np.inf]))
    cat.update(np.array(["a", "b", ""], dtype=object))
    lat.update(np.array([120.0, 80.0]))
    w = summary_pb2.WindowSummary(agent_id="host-1", run_id="run-1", seq=3, model_name="fraud",
                                  model_version="", start_unix_nano=T, end_unix_nano=T, rows=4, calls=2)
    w.columns.extend([num.to_proto("x", FEATURE, "X"), cat.to_proto("city", FEATURE, "city")])
    w.latency.CopyFrom(lat.to_proto("latency_us", 0, ""))
    w.shadow.CopyFrom(shadow_summary())
    return w


def shadow_summary() -> summary_pb2.ShadowSummary:
    """As agent.shadow.ShadowRunner.take builds it."""
    diff, lat = NumericSketch(), NumericSketch()
    diff.update(np.array([0.1, -0.2, 0.0]))
    lat.update(np.array([150.0]))
    return summary_pb2.ShadowSummary(model_version="3", model_sha256="ab" * 32, calls=1, rows=3, skipped=2,
                                      errors=0, label_rows=3, label_agree=2,
                                      score_diff=diff.to_proto("score_diff", 0, "probabilities"),
                                      latency=lat.to_proto("latency_us", 0, ""))


def test_a_good_window_passes() -> None:
    validate_window(good())
    w = good()
    w.model_version, w.agent_id = "2024-06.1", "é" * 128  # printable unicode, at the limit
    w.ClearField("latency")
    validate_window(w)


def test_a_shadow_may_answer_more_calls_than_its_window_and_send_empty_sketches() -> None:
    w = good()  # requests queued for the shadow in one window may be answered in the next
    w.calls, w.shadow.calls = 0, 40
    w.shadow.latency.Clear()  # an empty column without a kind: nothing to merge
    w.shadow.score_diff.CopyFrom(NumericSketch().to_proto("score_diff", 0, ""))
    validate_window(w)
    w.ClearField("shadow")
    validate_window(w)


def _set(field: str, value) -> Callable[[summary_pb2.WindowSummary], None]:
    return lambda w: setattr(w, field, value)


def _column(i: int, **changes) -> Callable[[summary_pb2.WindowSummary], None]:
    def change(w: summary_pb2.WindowSummary) -> None:
        for field, value in changes.items():
            setattr(w.columns[i], field, value)
    return change


def _truncate_kll(w: summary_pb2.WindowSummary) -> None:
    w.columns[0].kll = w.columns[0].kll[:12]


def _duplicate_name(w: summary_pb2.WindowSummary) -> None:
    w.columns[1].CopyFrom(w.columns[0])


def _too_many_columns(w: summary_pb2.WindowSummary) -> None:
    w.columns.extend([summary_pb2.ColumnSummary(name=f"c{i}", kind=summary_pb2.ColumnSummary.NUMERIC)
                      for i in range(3)])


BAD: dict[str, tuple[Callable[[summary_pb2.WindowSummary], None], str]] = {
    "empty agent_id": (_set("agent_id", ""), "agent_id is empty"),
    "empty run_id": (_set("run_id", ""), "run_id is empty"),
    "empty model_name": (_set("model_name", ""), "model_name is empty"),
    "long agent_id": (_set("agent_id", "a" * 129), "agent_id is 129 characters, at most 128"),
    "long model_version": (_set("model_version", "v" * 200), "model_version is 200 characters"),
    "control char in run_id": (_set("run_id", "run\n1"), "run_id 'run\\n1' contains control"),
    "escape in model_name": (_set("model_name", "m\x1b[31m"), "model_name"),
    "zero start": (_set("start_unix_nano", 0), "must be positive"),
    "negative end": (_set("end_unix_nano", -5), "must be positive"),
    "start after end": (_set("start_unix_nano", T + 1), "is after its end"),
    "huge seq": (_set("seq", 2**63), "seq 9223372036854775808 does not fit"),
    "huge rows": (_set("rows", 2**63), "rows 9223372036854775808 exceeds"),
    "too many columns": (_too_many_columns, "5 columns, at most 4 allowed"),
    "empty column name": (_column(0, name=""), "columns[0] has an empty name"),
    "long column name": (_column(1, name="c" * 257), "columns[1] name is 257 characters, at most 256"),
    "duplicate column name": (_duplicate_name, "column name 'x' appears more than once"),
    "corrupt KLL": (_truncate_kll, "columns[0] 'x': corrupt KLL sketch"),
    "KLL count mismatch": (_column(0, count=9), "columns[0]: column 'x': KLL holds 2 values, counts say 7"),
    "missing > count": (_column(0, missing=10), "missing + infinite exceeds count"),
    "corrupt frequent items": (_column(1, frequent_items=b"\x01\x02\x03"), "columns[1] 'city': corrupt frequent-items sketch"),
    "frequent items weight mismatch": (_column(1, count=7),
                                       "frequent-items weight 2 does not match 6 present values"),
    "no kind": (_column(0, kind=summary_pb2.ColumnSummary.KIND_UNSPECIFIED), "has no kind"),
    "corrupt latency": (lambda w: setattr(w.latency, "kll", b"\xff" * 20), "latency 'latency_us': corrupt KLL"),
    "shadow without version": (lambda w: setattr(w.shadow, "model_version", ""), "shadow model_version is empty"),
    "long shadow version": (lambda w: setattr(w.shadow, "model_version", "9" * 129),
                            "shadow model_version is 129 characters"),
    "control char in shadow version": (lambda w: setattr(w.shadow, "model_version", "3\x1b"),
                                       "shadow model_version '3\\x1b' contains control"),
    "bad shadow sha256": (lambda w: setattr(w.shadow, "model_sha256", "XYZ"), "shadow model_sha256 must be 64"),
    "shadow agree > label rows": (lambda w: setattr(w.shadow, "label_agree", 4),
                                  "shadow label_agree 4 exceeds its label_rows 3"),
    "shadow label rows > rows": (lambda w: setattr(w.shadow, "label_rows", 5), "shadow label_rows 5 exceeds its rows 3"),
    "huge shadow calls": (lambda w: setattr(w.shadow, "calls", 2**63), "shadow calls 9223372036854775808 exceeds"),
    "corrupt shadow score_diff": (lambda w: setattr(w.shadow.score_diff, "kll", b"\xff" * 20),
                                  "shadow score_diff 'score_diff': corrupt KLL"),
    "shadow latency count mismatch": (lambda w: setattr(w.shadow.latency, "count", 5),
                                      "shadow latency: column 'latency_us': KLL holds 1 values"),
    "shadow latency without name": (lambda w: setattr(w.shadow.latency, "name", ""), "shadow latency has an empty name"),
    "categorical shadow score_diff": (lambda w: w.shadow.score_diff.CopyFrom(w.columns[1]),
                                      "shadow score_diff 'city' must be a NUMERIC column"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_each_bad_window_is_rejected_with_a_precise_message(case: str) -> None:
    change, message = BAD[case]
    w = good()
    change(w)
    with pytest.raises(InvalidArgument) as info:
        validate_window(w, Limits(max_columns=4))
    assert message in str(info.value)


def test_limits_defaults() -> None:
    limits = Limits()
    assert (limits.max_columns, limits.max_windows_per_batch, limits.max_id_chars) == (4096, 256, 128)
