"""Checks on everything an agent sends (windows, Hello, SpoolStatus, ModelState) and on reference
profiles, before the store keeps any of it.

A window that fails here is acked REJECTED with the message, and the agent
drops it rather than resending it forever; a bad Hello, SpoolStatus or
ModelState ends the stream with INVALID_ARGUMENT and the message. Each message
names the field and the problem.

What is checked is what would otherwise break or mislead later: identifiers
that end up in SQL rows and in operators' terminals (bounded, printable), column
names that key merges, sketch bytes that the drift engine must be able to
deserialise, statistics that must be finite to mean anything, counts that must
agree with each other and fit SQLite's signed 64-bit integers when summed, and
times close enough to the collector's clock to be placed in its retention.

The counts that must agree are the ones a real agent keeps in step
(``agent/worker.py``, ``agent/shadow.py``, ``agent/feedback.py``):

- every column has one value per summarised row, so its ``count`` is the
  window's ``rows`` -- up to ``dropped_rows`` more, because a summary step that
  fails half way has updated some columns before its rows were counted as
  dropped;
- the window's latency has one value per call: ``latency.count == calls``; the
  shadow's latency one per shadow call;
- ``performance`` counts labels, which arrive in later windows than their
  rows, so it is not bounded by the window's rows; for classification the
  confusion matrix holds every labelled row once.

Times: a window may end at most ``max_clock_skew_seconds`` after the collector's
clock, and must start within ``max_window_age_seconds`` before it. The past bound
defaults to the day-bucket retention (400 days; ``collector serve`` passes its
``--day-retention``): an older window would be deleted by the next rollup pass
anyway, so it is refused, and counted, instead of being acked and silently gone.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

from agent import feature_names, sketches
from agent.errors import InvalidArgument
from agent.sketches import joint
from agent.worker import MAX_SAMPLE_ROWS
from protos import collector_pb2, summary_pb2

MAX_INT64 = 2**63 - 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_SAMPLE_STRING_CHARS = 4096  # one sampled string value; agents capture at most 32 characters
_ROLES = frozenset(summary_pb2.ColumnSummary.Role.values())


@dataclass(frozen=True)
class Limits:
    """Every bound on what callers send, in one place (``collector serve`` sets the clock bounds)."""

    max_id_chars: int = 128  # agent_id, run_id, model_name, model_version, host, versions
    max_column_name_chars: int = 256  # column names and sources, tensor names, sample column names
    max_columns: int = 4096
    max_windows_per_batch: int = 256  # for the stream servicer: windows per WindowBatch
    # Per-window rows/calls/dropped/errors and every count inside a window: far above any
    # real window, low enough that sums over millions of windows stay inside SQLite's int64.
    max_count: int = 2**40
    max_sample_rows: int = MAX_SAMPLE_ROWS  # rows of one window's reservoir sample
    # All values of one sample: what fits the collector's 64 MiB message limit as doubles.
    max_sample_values: int = 8 * 1024 * 1024
    max_classes: int = 1024  # classes of a window's confusion matrix (cells: classes squared)
    max_class_chars: int = 256  # one class name
    max_tensors: int = 4096  # TensorInfo entries per side (inputs, outputs) of a Hello
    max_tensor_rank: int = 32  # dimensions of one TensorInfo shape
    max_schema_bytes: int = 1024 * 1024  # a Hello's inputs and outputs together, serialised
    max_spooled_models: int = 1024  # Hello.spooled_models entries
    max_error_chars: int = 2000  # a ModelState error as stored; longer ones are cut
    # A window may end this far after the collector's clock (agents' clocks drift a little).
    max_clock_skew_seconds: float = 600.0
    # A window may start this far before the collector's clock: the day-bucket retention.
    max_window_age_seconds: float = 400 * 86400.0
    # A stream that never says hello would hold one of the max_agents handler threads for good;
    # an agent sends its Hello as the first message, at once.
    hello_seconds: float = 30.0


# ------------------------------------------------------------------ pieces


def _check_text(field: str, value: str, max_chars: int, *, required: bool = False) -> None:
    """Present if ``required``, at most ``max_chars``, printable (no control characters)."""
    if not value:
        if required:
            raise InvalidArgument(f"{field} is empty")
        return
    if len(value) > max_chars:
        raise InvalidArgument(f"{field} is {len(value)} characters, at most {max_chars} allowed")
    if not value.isprintable():
        raise InvalidArgument(f"{field} {value[:80]!r} contains control or non-printable characters")


def _check_id(field: str, value: str, limits: Limits, *, required: bool = True) -> None:
    _check_text(field, value, limits.max_id_chars, required=required)


def _check_sha256(field: str, value: str) -> None:
    if value and not _SHA256.fullmatch(value):
        raise InvalidArgument(f"{field} must be 64 lowercase hex digits, got {value[:80]!r}")


def _check_counts(where: str, message: object, fields: tuple[str, ...], limit: int) -> None:
    for field in fields:
        value = getattr(message, field)
        if value > limit:
            raise InvalidArgument(f"{where}{field} {value} exceeds {limit}")


def clean_text(text: str, max_chars: int) -> str:
    """Free text from an agent (an error message) as stored: cut to ``max_chars``, and every
    control character but newline and tab replaced, so it cannot rewrite an operator's terminal."""
    text = text[:max_chars]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else "\ufffd" for c in text)


def _check_column(where: str, column: summary_pb2.ColumnSummary, limits: Limits) -> sketches.NumericSketch | \
        sketches.CategoricalSketch:
    """A named, bounded column whose sketches deserialise and agree with its counts; the sketch."""
    if not column.name:
        raise InvalidArgument(f"{where} has an empty name")
    _check_text(f"{where} name", column.name, limits.max_column_name_chars)
    _check_text(f"{where} {column.name!r} source", column.source, limits.max_column_name_chars)
    if column.role not in _ROLES:
        raise InvalidArgument(f"{where} {column.name!r} has an unknown role {column.role}")
    if column.count > limits.max_count:
        raise InvalidArgument(f"{where} {column.name!r} count {column.count} exceeds {limits.max_count}")
    try:
        # deserialises the sketches, checks their counts agree and their statistics are finite
        return sketches.from_proto(column)
    except InvalidArgument as exc:
        text = str(exc)
        if repr(column.name) not in text:  # some sketch messages do not name their column
            where = f"{where} {column.name!r}"
        raise InvalidArgument(f"{where}: {text}") from None


# ------------------------------------------------------------------ windows


def validate_window(w: summary_pb2.WindowSummary, limits: Limits = Limits(), *,
                    now_ns: int | None = None) -> list[sketches.NumericSketch | sketches.CategoricalSketch]:
    """Raise InvalidArgument, naming the field and the problem, unless ``w`` is fit to store.
    ``now_ns``: the collector's clock (default: now), for the window's time bounds. Returns the
    sketches of ``w.columns``, in order, as parsed here: the span cache merges them once the window
    is stored (``collector.monitoring.spans.SpanCache.offer``) rather than parse its body again."""
    for field in ("agent_id", "run_id", "model_name"):
        _check_id(field, getattr(w, field), limits)
    _check_id("model_version", w.model_version, limits, required=False)
    _check_sha256("model_sha256", w.model_sha256)
    _check_times(w, limits, time.time_ns() if now_ns is None else now_ns)
    if w.seq > MAX_INT64:
        raise InvalidArgument(f"seq {w.seq} does not fit a signed 64-bit integer")
    _check_counts("", w, ("rows", "calls", "dropped_rows", "errors"), limits.max_count)
    if len(w.columns) > limits.max_columns:
        raise InvalidArgument(f"window has {len(w.columns)} columns, at most {limits.max_columns} allowed")
    seen: set[str] = set()
    parsed = []
    for i, column in enumerate(w.columns):
        parsed.append(_check_column(f"columns[{i}]", column, limits))
        if column.name in seen:
            raise InvalidArgument(f"column name {column.name!r} appears more than once")
        seen.add(column.name)
        if not w.rows <= column.count <= w.rows + w.dropped_rows:
            raise InvalidArgument(f"columns[{i}] {column.name!r} counts {column.count} values but the window "
                                  f"has {w.rows} rows: every column has one value per row")
    if w.HasField("latency"):
        _check_latency("latency", w.latency, w.calls, "calls", limits)
    if w.HasField("performance"):
        check_performance("performance", w.performance, limits)
    if w.HasField("shadow"):
        _check_shadow(w.shadow, limits)
    if w.HasField("sample"):
        check_sample(w.sample, w.rows, limits)
    return parsed


def check_sample(sample: summary_pb2.RowSample, window_rows: int, limits: Limits) -> None:
    """Raise InvalidArgument unless ``sample`` is a well-formed sample of a window of ``window_rows`` rows."""
    if sample.seen > window_rows:
        raise InvalidArgument(f"sample drawn from {sample.seen} rows but the window has {window_rows}")
    if len(sample.columns) > limits.max_columns:
        raise InvalidArgument(f"sample has {len(sample.columns)} columns, at most {limits.max_columns} allowed")
    names: set[str] = set()
    length = None
    for i, column in enumerate(sample.columns):
        where = f"sample column {i}"
        if not column.name or len(column.name) > limits.max_column_name_chars or not column.name.isprintable():
            raise InvalidArgument(f"{where} needs a printable name of 1 to {limits.max_column_name_chars} characters")
        if column.name in names:
            raise InvalidArgument(f"sample column name {column.name!r} appears more than once")
        names.add(column.name)
        if column.numbers and column.strings:
            raise InvalidArgument(f"sample column {column.name!r} has both numbers and strings; it must have one kind")
        n = len(column.numbers) or len(column.strings)
        if length is not None and n != length:
            raise InvalidArgument(f"sample column {column.name!r} has {n} values but the columns before it "
                                  f"have {length}: every column needs one value per sampled row")
        length = n
        if column.strings and max(map(len, column.strings)) > MAX_SAMPLE_STRING_CHARS:
            raise InvalidArgument(f"sample column {column.name!r} has a value over {MAX_SAMPLE_STRING_CHARS} "
                                  "characters")
    length = length or 0
    if length * len(sample.columns) > limits.max_sample_values:
        raise InvalidArgument(f"sample has {length * len(sample.columns)} values ({length} rows of "
                              f"{len(sample.columns)} columns), at most {limits.max_sample_values} allowed")
    if length > min(sample.seen, limits.max_sample_rows):
        raise InvalidArgument(f"sample has {length} rows, more than the {sample.seen} it was drawn from or the "
                              f"limit of {limits.max_sample_rows}")
    if sample.seen and sample.columns and not length:
        raise InvalidArgument(f"sample drawn from {sample.seen} rows has no values")


def _check_times(w: summary_pb2.WindowSummary, limits: Limits, now_ns: int) -> None:
    if w.start_unix_nano <= 0 or w.end_unix_nano <= 0:
        raise InvalidArgument(
            f"window times must be positive Unix nanoseconds, got start {w.start_unix_nano} end {w.end_unix_nano}")
    if w.start_unix_nano > w.end_unix_nano:
        raise InvalidArgument(f"window start {w.start_unix_nano} is after its end {w.end_unix_nano}")
    ahead = (w.end_unix_nano - now_ns) / 1e9
    if ahead > limits.max_clock_skew_seconds:
        raise InvalidArgument(f"window end {w.end_unix_nano} is {ahead:.0f} s ahead of the collector's clock, "
                              f"more than the {limits.max_clock_skew_seconds:.0f} s allowed: check the agent's clock")
    age = (now_ns - w.start_unix_nano) / 1e9
    if age > limits.max_window_age_seconds:
        raise InvalidArgument(f"window start {w.start_unix_nano} is {age / 86400:.1f} days before the collector's "
                              f"clock, more than the {limits.max_window_age_seconds / 86400:.1f} days it keeps "
                              "anything (--day-retention)")


def _check_latency(where: str, column: summary_pb2.ColumnSummary, calls: int, calls_field: str,
                   limits: Limits) -> None:
    """One value per call, in microseconds (never negative)."""
    sketch = _check_column(where, column, limits)
    if not isinstance(sketch, sketches.NumericSketch):
        raise InvalidArgument(f"{where} {column.name!r} must be a NUMERIC column")
    if column.count != calls:
        raise InvalidArgument(f"{where} {column.name!r} counts {column.count} values but {calls_field} is "
                              f"{calls}: there is one latency per call")
    if sketch.finite_count and sketch.min < 0:
        raise InvalidArgument(f"{where} {column.name!r} has a negative latency ({sketch.min})")


def check_performance(where: str, perf: summary_pb2.Performance, limits: Limits) -> None:
    """Consistent realised performance: a square confusion matrix over distinct, named classes that
    holds every labelled row once (classification), finite error sums (regression)."""
    _check_counts(f"{where} ", perf, ("labeled", "unmatched"), limits.max_count)
    n = len(perf.classes)
    if n > limits.max_classes:
        raise InvalidArgument(f"{where} has {n} classes, at most {limits.max_classes} allowed")
    if len(perf.confusion) != n * n:
        raise InvalidArgument(f"{where} has {n} classes but {len(perf.confusion)} confusion counts; "
                              f"expected {n * n}")
    for i, name in enumerate(perf.classes):
        _check_text(f"{where} classes[{i}]", name, limits.max_class_chars)
    if len(set(perf.classes)) != n:
        raise InvalidArgument(f"{where} classes must be distinct")
    if n:
        biggest = max(perf.confusion)
        if biggest > limits.max_count:
            raise InvalidArgument(f"{where} confusion count {biggest} exceeds {limits.max_count}")
        total = sum(perf.confusion)
        if total != perf.labeled:
            raise InvalidArgument(f"{where} confusion counts sum to {total}, labeled says {perf.labeled}")
    for field in ("error_sum", "abs_error_sum", "sq_error_sum"):
        value = getattr(perf, field)
        if not math.isfinite(value):
            raise InvalidArgument(f"{where} {field} must be finite, got {value}")
        if field != "error_sum" and value < 0:
            raise InvalidArgument(f"{where} {field} must not be negative, got {value}")


def _check_shadow(shadow: summary_pb2.ShadowSummary, limits: Limits) -> None:
    """The shadow's comparison: named, counts that fit and agree, numeric sketches that deserialise.

    Its calls are not bounded by the window's: the shadow answers from a queue, so calls offered
    in one window may be answered (and counted) in the next, and the counts of a stopped shadow
    travel in whichever window is exported next."""
    _check_id("shadow model_version", shadow.model_version, limits)
    _check_sha256("shadow model_sha256", shadow.model_sha256)
    _check_counts("shadow ", shadow, ("calls", "rows", "skipped", "errors", "label_rows", "label_agree"),
                  limits.max_count)
    if shadow.label_agree > shadow.label_rows:
        raise InvalidArgument(f"shadow label_agree {shadow.label_agree} exceeds its label_rows {shadow.label_rows}")
    if shadow.label_rows > shadow.rows:
        raise InvalidArgument(f"shadow label_rows {shadow.label_rows} exceeds its rows {shadow.rows}")
    for field in ("score_diff", "latency"):
        if not shadow.HasField(field):
            continue
        column = getattr(shadow, field)
        if column.kind == summary_pb2.ColumnSummary.KIND_UNSPECIFIED and not column.count:
            continue  # an empty column sent without a kind: nothing to merge (as collector.store.shadow_merge reads it)
        if field == "latency":
            _check_latency("shadow latency", column, shadow.calls, "shadow calls", limits)
        elif not isinstance(_check_column(f"shadow {field}", column, limits), sketches.NumericSketch):
            raise InvalidArgument(f"shadow {field} {column.name!r} must be a NUMERIC column")


# ------------------------------------------------------------------ the stream's other messages


def validate_hello(hello: collector_pb2.Hello, limits: Limits = Limits(), *, now_ns: int | None = None) -> None:
    """What a Hello puts into the agents table: identifiers present, printable, not too long; a bounded
    schema; a start time not in the future; its spool status and model state (``validate_spool``,
    ``validate_model_state``)."""
    missing = [name for name in ("agent_id", "run_id") if not getattr(hello, name).strip()]
    if missing:
        raise InvalidArgument(f"hello needs a non-empty {' and '.join(missing)}")
    for name in ("agent_id", "run_id", "host", "model_name", "model_version", "agent_version",
                 "onnxruntime_version"):
        _check_id(f"hello {name}", getattr(hello, name), limits, required=False)
    _check_sha256("hello model_sha256", hello.model_sha256)
    for side in ("inputs", "outputs"):
        tensors = getattr(hello, side)
        if len(tensors) > limits.max_tensors:
            raise InvalidArgument(f"hello has {len(tensors)} {side}, at most {limits.max_tensors} allowed")
        for i, tensor in enumerate(tensors):
            where = f"hello {side}[{i}]"
            _check_text(f"{where} name", tensor.name, limits.max_column_name_chars)
            _check_text(f"{where} type", tensor.type, limits.max_id_chars)
            if len(tensor.shape) > limits.max_tensor_rank:
                raise InvalidArgument(f"{where} shape has {len(tensor.shape)} dimensions, at most "
                                      f"{limits.max_tensor_rank} allowed")
            if any(d < -1 for d in tensor.shape):
                raise InvalidArgument(f"{where} shape {list(tensor.shape)[:8]} has a dimension below -1 "
                                      "(-1 stands for a symbolic one)")
    schema_bytes = sum(t.ByteSize() for t in hello.inputs) + sum(t.ByteSize() for t in hello.outputs)
    if schema_bytes > limits.max_schema_bytes:
        raise InvalidArgument(f"hello inputs and outputs take {schema_bytes} bytes, at most "
                              f"{limits.max_schema_bytes} allowed")
    now_ns = time.time_ns() if now_ns is None else now_ns
    if hello.started_unix_nano < 0 or (hello.started_unix_nano - now_ns) / 1e9 > limits.max_clock_skew_seconds:
        raise InvalidArgument(f"hello started_unix_nano {hello.started_unix_nano} is not a time up to "
                              f"{limits.max_clock_skew_seconds:.0f} s ahead of the collector's clock: "
                              "check the agent's clock")
    if len(hello.spooled_models) > limits.max_spooled_models:
        raise InvalidArgument(f"hello names {len(hello.spooled_models)} spooled_models, at most "
                              f"{limits.max_spooled_models} allowed")
    for i, name in enumerate(hello.spooled_models):
        _check_id(f"hello spooled_models[{i}]", name, limits)
    if hello.HasField("spool"):
        validate_spool(hello.spool, "hello spool")
    if hello.HasField("model_state"):
        validate_model_state(hello.model_state, limits, "hello model_state")


def validate_spool(spool: collector_pb2.SpoolStatus, where: str = "spool status") -> None:
    """Every count fits the agents table's signed 64-bit integers."""
    _check_counts(f"{where} ", spool, ("windows", "bytes", "dropped_windows", "dropped_rows", "rejected_windows"),
                  MAX_INT64)


def validate_model_state(state: collector_pb2.ModelState, limits: Limits = Limits(),
                         where: str = "model_state") -> None:
    """Bounded, printable versions and ids, a shadow share in [0, 1]. The error text is free text:
    it is cut and cleaned when stored (``clean_text``), not refused."""
    for field in ("command_id", "model_version", "shadow_version"):
        _check_id(f"{where} {field}", getattr(state, field), limits, required=False)
    _check_sha256(f"{where} model_sha256", state.model_sha256)
    if not (math.isfinite(state.shadow_share) and 0 <= state.shadow_share <= 1):
        raise InvalidArgument(f"{where} shadow_share must be between 0 and 1, got {state.shadow_share}")


# ------------------------------------------------------------------ operators' input


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
        _check_sha256(f"profile {field}", getattr(profile, field))
    if profile.rows > MAX_INT64:
        raise InvalidArgument(f"profile rows {profile.rows} does not fit a signed 64-bit integer")
    seen: set[str] = set()
    for i, column in enumerate(profile.columns):
        _check_column(f"columns[{i}]", column, limits)
        if column.name in seen:
            raise InvalidArgument(f"column name {column.name!r} appears more than once")
        seen.add(column.name)
    _check_feature_names(profile, limits)
    check_performance("performance", profile.performance, limits)
    _check_joint(profile, limits)


def _check_feature_names(profile: summary_pb2.ReferenceProfile, limits: Limits) -> None:
    """Each input's names are feature columns of the profile that come from that input, in order:
    they become the version's column names, given to the agents."""
    if len(profile.feature_names) > limits.max_tensors:
        raise InvalidArgument(f"the profile names the columns of {len(profile.feature_names)} inputs, at most "
                              f"{limits.max_tensors} allowed")
    features = feature_names.columns_by_input(profile.columns)
    for source, names in sorted(profile.feature_names.items()):
        _check_text("profile feature_names input", source, limits.max_column_name_chars, required=True)
        listed = list(names.names)
        if not listed:
            raise InvalidArgument(f"profile feature_names of input {source!r} is empty")
        columns = features.get(source, [])
        if listed != columns:  # names and columns were checked above: printable, bounded, unique
            raise InvalidArgument(f"profile feature_names of input {source!r} ({len(listed)} names) are not the "
                                  f"{len(columns)} feature columns that come from it, in order; build the profile "
                                  "with 'outrider profile'")


def _check_joint(profile: summary_pb2.ReferenceProfile, limits: Limits) -> None:
    """The projection and the calibration (``agent.sketches.joint``): bounded and consistent; the
    projection reads numeric columns the profile has, the calibration's map goes with a confidence column."""
    numeric = {c.name for c in profile.columns if c.kind == summary_pb2.ColumnSummary.NUMERIC}
    if profile.HasField("projection"):
        projection = profile.projection
        joint.check_projection(projection)  # first: it bounds the number of columns
        for i, name in enumerate(projection.columns):
            _check_text(f"projection columns[{i}]", name, limits.max_column_name_chars)
        absent = [name for name in projection.columns if name not in numeric]
        if absent:
            raise InvalidArgument(f"projection reads {absent[0]!r}, which is not a numeric column of the profile")
    if profile.HasField("calibration"):
        joint.check_calibration(profile.calibration)
        if joint.CONFIDENCE not in numeric:
            raise InvalidArgument(f"the profile has a calibration but no numeric {joint.CONFIDENCE!r} column")
