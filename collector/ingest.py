"""Checks on a window (or a reference profile) before the store will keep it.

A window that fails here is acked REJECTED with the message, and the agent
drops it rather than resending it forever. What is checked is what would
otherwise break later: identifiers that end up in SQL rows and in operators'
terminals, column names that key merges, sketch bytes that the drift engine
must be able to deserialise, and counts that must fit SQLite's signed 64-bit
integers when summed.
"""
from __future__ import annotations

from dataclasses import dataclass

from agent import sketches
from agent.errors import InvalidArgument
from agent.worker import MAX_SAMPLE_ROWS
from protos import collector_pb2, summary_pb2


@dataclass(frozen=True)
class Limits:
    max_id_chars: int = 128  # agent_id, run_id, model_name, model_version
    max_column_name_chars: int = 256
    max_columns: int = 4096
    max_windows_per_batch: int = 256  # for the stream servicer: windows per WindowBatch
    # Per-window rows/calls/dropped/errors: far above any real window, low enough
    # that sums over millions of windows stay inside SQLite's int64.
    max_count: int = 2**40
    max_sample_rows: int = MAX_SAMPLE_ROWS  # rows of one window's reservoir sample
    # A stream that never says hello would hold one of the max_agents handler threads for good;
    # an agent sends its Hello as the first message, at once.
    hello_seconds: float = 30.0


def _check_id(field: str, value: str, limits: Limits, *, required: bool = True) -> None:
    if not value:
        if required:
            raise InvalidArgument(f"{field} is empty")
        return
    if len(value) > limits.max_id_chars:
        raise InvalidArgument(f"{field} is {len(value)} characters, at most {limits.max_id_chars} allowed")
    if not value.isprintable():
        raise InvalidArgument(f"{field} {value!r} contains control or non-printable characters")


def _check_column(where: str, column: summary_pb2.ColumnSummary, limits: Limits) -> None:
    if not column.name:
        raise InvalidArgument(f"{where} has an empty name")
    if len(column.name) > limits.max_column_name_chars:
        raise InvalidArgument(
            f"{where} name is {len(column.name)} characters, at most {limits.max_column_name_chars} allowed")
    try:
        sketches.from_proto(column)  # deserialises the sketches and checks their counts agree
    except InvalidArgument as exc:
        text = str(exc)
        if repr(column.name) not in text:  # some sketch messages do not name their column
            where = f"{where} {column.name!r}"
        raise InvalidArgument(f"{where}: {text}") from None


def validate_window(w: summary_pb2.WindowSummary, limits: Limits = Limits()) -> None:
    """Raise InvalidArgument, naming the field and the problem, unless ``w`` is fit to store."""
    for field in ("agent_id", "run_id", "model_name"):
        _check_id(field, getattr(w, field), limits)
    _check_id("model_version", w.model_version, limits, required=False)
    if w.start_unix_nano <= 0 or w.end_unix_nano <= 0:
        raise InvalidArgument(
            f"window times must be positive Unix nanoseconds, got start {w.start_unix_nano} end {w.end_unix_nano}")
    if w.start_unix_nano > w.end_unix_nano:
        raise InvalidArgument(f"window start {w.start_unix_nano} is after its end {w.end_unix_nano}")
    if w.seq >= 2**63:
        raise InvalidArgument(f"seq {w.seq} does not fit a signed 64-bit integer")
    for field in ("rows", "calls", "dropped_rows", "errors"):
        if getattr(w, field) > limits.max_count:
            raise InvalidArgument(f"{field} {getattr(w, field)} exceeds {limits.max_count}")
    if len(w.columns) > limits.max_columns:
        raise InvalidArgument(f"window has {len(w.columns)} columns, at most {limits.max_columns} allowed")
    seen: set[str] = set()
    for i, column in enumerate(w.columns):
        _check_column(f"columns[{i}]", column, limits)
        if column.name in seen:
            raise InvalidArgument(f"column name {column.name!r} appears more than once")
        seen.add(column.name)
    if w.HasField("latency"):
        _check_column("latency", w.latency, limits)
    if w.HasField("shadow"):
        _check_shadow(w.shadow, limits)
    if w.HasField("sample"):
        from collector import samples  # imports this module's Limits only for its type

        samples.check(w.sample, w.rows, limits)


def _check_shadow(shadow: summary_pb2.ShadowSummary, limits: Limits) -> None:
    """The shadow's comparison: named, counts that fit and agree, numeric sketches that deserialise.

    Its calls are not bounded by the window's: the shadow answers from a queue, so calls offered
    in one window may be answered (and counted) in the next, and the counts of a stopped shadow
    travel in whichever window is exported next."""
    _check_id("shadow model_version", shadow.model_version, limits)
    sha = shadow.model_sha256
    if sha and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
        raise InvalidArgument(f"shadow model_sha256 must be 64 lowercase hex digits, got {sha[:80]!r}")
    for field in ("calls", "rows", "skipped", "errors", "label_rows", "label_agree"):
        if getattr(shadow, field) > limits.max_count:
            raise InvalidArgument(f"shadow {field} {getattr(shadow, field)} exceeds {limits.max_count}")
    if shadow.label_agree > shadow.label_rows:
        raise InvalidArgument(f"shadow label_agree {shadow.label_agree} exceeds its label_rows {shadow.label_rows}")
    if shadow.label_rows > shadow.rows:
        raise InvalidArgument(f"shadow label_rows {shadow.label_rows} exceeds its rows {shadow.rows}")
    for field in ("score_diff", "latency"):
        if not shadow.HasField(field):
            continue
        column = getattr(shadow, field)
        if column.kind == summary_pb2.ColumnSummary.KIND_UNSPECIFIED and not column.count:
            continue  # an empty column sent without a kind: nothing to merge (as collector.shadow reads it)
        _check_column(f"shadow {field}", column, limits)
        if column.kind != summary_pb2.ColumnSummary.NUMERIC:
            raise InvalidArgument(f"shadow {field} {column.name!r} must be a NUMERIC column")


def validate_hello(hello: collector_pb2.Hello, limits: Limits = Limits()) -> None:
    """The identifiers a Hello puts into the agents table: present, printable, not too long."""
    missing = [name for name in ("agent_id", "run_id") if not getattr(hello, name).strip()]
    if missing:
        raise InvalidArgument(f"hello needs a non-empty {' and '.join(missing)}")
    for name in ("agent_id", "run_id", "host", "model_name", "model_version"):
        value = getattr(hello, name)
        if len(value) > limits.max_id_chars:
            raise InvalidArgument(f"hello {name} is {len(value)} characters, at most {limits.max_id_chars} allowed")
        if not value.isprintable():
            raise InvalidArgument(f"hello {name} {value!r} contains control or non-printable characters")


def validate_model_key(model_name: str, model_version: str, limits: Limits = Limits()) -> None:
    """A model version named by an operator: both parts present, printable, not too long."""
    _check_id("model_name", model_name, limits)
    _check_id("model_version", model_version, limits)


def validate_profile(profile: summary_pb2.ReferenceProfile, limits: Limits = Limits()) -> None:
    """Raise InvalidArgument unless ``profile`` is fit to be a drift reference:
    named columns whose sketches deserialise, each name once (the drift engine
    matches columns by name), and consistent performance counts."""
    if not profile.columns:
        raise InvalidArgument("the profile has no columns; build it with 'outrider profile'")
    if len(profile.columns) > limits.max_columns:
        raise InvalidArgument(f"the profile has {len(profile.columns)} columns, at most {limits.max_columns} allowed")
    _check_id("profile model_name", profile.model_name, limits, required=False)
    if len(profile.data_name) > limits.max_column_name_chars or not profile.data_name.isprintable():
        raise InvalidArgument("profile data_name must be printable and at most "
                              f"{limits.max_column_name_chars} characters")
    for field in ("model_sha256", "data_sha256"):
        value = getattr(profile, field)
        if value and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value)):
            raise InvalidArgument(f"profile {field} must be 64 lowercase hex digits, got {value[:80]!r}")
    if profile.rows >= 2**63:
        raise InvalidArgument(f"profile rows {profile.rows} does not fit a signed 64-bit integer")
    seen: set[str] = set()
    for i, column in enumerate(profile.columns):
        _check_column(f"columns[{i}]", column, limits)
        if column.name in seen:
            raise InvalidArgument(f"column name {column.name!r} appears more than once")
        seen.add(column.name)
    perf = profile.performance
    if len(perf.confusion) != len(perf.classes) ** 2:
        raise InvalidArgument(f"performance has {len(perf.classes)} classes but {len(perf.confusion)} confusion "
                              f"counts; expected {len(perf.classes) ** 2}")
    if len(set(perf.classes)) != len(perf.classes):
        raise InvalidArgument("performance classes must be distinct")
    if perf.classes and sum(perf.confusion) != perf.labeled:
        raise InvalidArgument(f"performance confusion counts sum to {sum(perf.confusion)}, labeled says {perf.labeled}")
