"""Shadow reports: how a shadow version compared with production on the same live requests.

Agents attach a ``ShadowSummary`` (its ``model_version`` is the shadow's) to
each production window. Here those summaries are merged: counts add, the
score-difference and latency sketches merge with ``agent.sketches``.

Rollups keep one shadow per bucket (``ShadowMerger``): a bucket's windows may
carry two shadow versions only when the shadow was switched inside it, and then
the bucket keeps the version seen latest (by window end; ties go to the higher
version), since that is the one a report asks about by default. The calls of
the other version leave its figures (and are logged); the production totals
of the bucket are untouched.

``report`` reads raw windows and rollups (each window lives in exactly one of
them: a rollup deletes the raw rows it merges in the same transaction) in one
read snapshot, newest first, and merges those whose shadow is the requested
version, with production's latency over the same windows. ``figures`` derives
what operators read: agreement rate, score-difference quantiles, latency
p50/p99 of both sides, the skipped share.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

from sqlite_utils import Database

from agent import sketches
from agent.errors import InvalidArgument, NotFound
from protos import collector_pb2 as pb
from protos import summary_pb2

log = logging.getLogger(__name__)

MAX_WINDOWS = 50_000  # bodies read per report: beyond it the oldest windows of the range are left out (logged)
_COUNTS = ("calls", "rows", "skipped", "errors", "label_rows", "label_agree")


def _version_key(version: str) -> tuple:
    return (1, int(version), "") if version.isdigit() else (0, 0, version)


class _Sketch:
    """A column being merged, with the name/role/source it was first seen with."""

    def __init__(self, msg: summary_pb2.ColumnSummary, sketch: sketches.NumericSketch) -> None:
        self.name, self.role, self.source, self.sketch = msg.name, msg.role, msg.source, sketch

    def to_proto(self) -> summary_pb2.ColumnSummary:
        return self.sketch.to_proto(self.name, self.role, self.source)


def _numeric(msg: summary_pb2.ColumnSummary, what: str) -> sketches.NumericSketch | None:
    """The column's sketch; None for an empty column sent without a kind."""
    if msg.kind == summary_pb2.ColumnSummary.KIND_UNSPECIFIED and not msg.count:
        return None
    sketch = sketches.from_proto(msg)
    if not isinstance(sketch, sketches.NumericSketch):
        raise InvalidArgument(f"shadow {what} must be a NUMERIC column")
    return sketch


class ShadowTotals:
    """The ShadowSummaries of one shadow version, merged."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.sha256 = ""
        self.counts = dict.fromkeys(_COUNTS, 0)
        self.score_diff: _Sketch | None = None
        self.latency: _Sketch | None = None

    def add(self, s: summary_pb2.ShadowSummary) -> None:
        """Raises InvalidArgument (changing nothing) when a sketch does not deserialise."""
        parsed = {f: (getattr(s, f), _numeric(getattr(s, f), f)) for f in ("score_diff", "latency") if s.HasField(f)}
        parsed = {f: pair for f, pair in parsed.items() if pair[1] is not None}
        self.sha256 = s.model_sha256 if not self.sha256 or self.sha256 == s.model_sha256 else "mixed"
        for field in _COUNTS:
            self.counts[field] += getattr(s, field)
        for field, (msg, sketch) in parsed.items():
            mine = getattr(self, field)
            if mine is None:
                setattr(self, field, _Sketch(msg, sketch))
            else:
                mine.sketch.merge(sketch)

    def to_proto(self) -> summary_pb2.ShadowSummary:
        out = summary_pb2.ShadowSummary(model_version=self.version,
                                        model_sha256="" if self.sha256 == "mixed" else self.sha256, **self.counts)
        if self.score_diff is not None:
            out.score_diff.CopyFrom(self.score_diff.to_proto())
        if self.latency is not None:
            out.latency.CopyFrom(self.latency.to_proto())
        return out


class ShadowMerger:
    """The shadow of a rollup bucket: merged per version, the latest version kept (see the module doc)."""

    def __init__(self) -> None:
        self._versions: dict[str, tuple[int, ShadowTotals]] = {}  # version -> (latest window end, totals)
        self.invalid = 0  # shadow summaries whose sketches did not deserialise: left out, logged

    def add(self, shadow: summary_pb2.ShadowSummary, end_ns: int) -> None:
        seen_end, totals = self._versions.get(shadow.model_version, (end_ns, ShadowTotals(shadow.model_version)))
        try:
            totals.add(shadow)
        except InvalidArgument as exc:
            self.invalid += 1
            log.warning("a shadow summary of version %s left out of a merge: %s", shadow.model_version, exc)
            return
        self._versions[shadow.model_version] = (max(seen_end, end_ns), totals)

    def result(self) -> summary_pb2.ShadowSummary | None:
        if not self._versions:
            return None
        kept = max(self._versions, key=lambda v: (self._versions[v][0], _version_key(v)))
        for version, (_, totals) in self._versions.items():
            if version != kept:
                log.info("rollup keeps shadow version %s; the %d calls of shadow version %s in the same bucket "
                         "leave its figures", kept, totals.counts["calls"], version)
        return self._versions[kept][1].to_proto()


# ------------------------------------------------------------------ the report


def _shadow_start(db: Database, model: str, version: int) -> tuple[int, int]:
    """(version, started_ns) of the current shadow, else of the latest shadow rollout (of ``version``
    if given); (version, 0) when neither is known."""
    row = db.execute("SELECT version, started_ns FROM shadows WHERE model = ?", [model]).fetchone()
    if row and (not version or row[0] == version):
        return row[0], row[1]
    sql = "SELECT version, started_ns FROM rollouts WHERE model = ? AND kind = 'shadow'"
    params: list[Any] = [model]
    if version:
        sql += " AND version = ?"
        params.append(version)
    row = db.execute(sql + " ORDER BY id DESC LIMIT 1", params).fetchone()
    return (row[0], row[1]) if row else (version, 0)


def report(db: Database, model_name: str, version: int = 0, since_ns: int = 0,
           max_windows: int = MAX_WINDOWS) -> pb.ShadowReportResponse:
    """The shadow ``version`` of ``model_name`` (0: the current shadow, else the latest one set, else the
    latest seen in the windows) against production, over windows ending at or after ``since_ns``
    (0: since that shadow started). ``production_version`` names the production version of those
    windows (comma-separated when it changed within the range). ``db`` is a read connection
    (``Store.read()``)."""
    if not model_name:
        raise InvalidArgument("model_name is required (outrider shadow report NAME)")
    version, started_ns = _shadow_start(db, model_name, version)
    since = since_ns or started_ns
    wanted = str(version) if version else ""  # "": the first shadow met, newest first, decides
    totals: ShadowTotals | None = None
    latency: _Sketch | None = None
    production: set[str] = set()
    db.conn.execute("BEGIN")  # one snapshot: a rollup moving windows meanwhile must not count them twice
    try:
        keys = db.execute(
            "SELECT * FROM (SELECT 'windows' AS t, rowid, end_ns FROM windows WHERE model_name = ? AND end_ns >= ?"
            " UNION ALL SELECT 'rollups', rowid, end_ns FROM rollups WHERE model_name = ? AND end_ns >= ?)"
            " ORDER BY end_ns DESC LIMIT ?", [model_name, since, model_name, since, max_windows]).fetchall()
        if len(keys) == max_windows:
            log.warning("shadow report of %s: more than %d windows since %d; the oldest are left out", model_name,
                        max_windows, since)
        for table, rowid, _ in keys:
            body = db.execute(f"SELECT body FROM {table} WHERE rowid = ?", [rowid]).fetchone()
            if body is None:
                continue
            w = summary_pb2.WindowSummary.FromString(body[0])
            if not w.HasField("shadow") or (wanted and w.shadow.model_version != wanted):
                continue
            wanted = wanted or w.shadow.model_version
            totals = totals or ShadowTotals(wanted)
            try:  # parse first, merge after: a bad window changes nothing
                sketch = _numeric(w.latency, "latency") if w.HasField("latency") else None
                totals.add(w.shadow)
            except InvalidArgument as exc:
                log.warning("shadow report of %s: a window left out: %s", model_name, exc)
                continue
            if sketch is not None:
                if latency is None:
                    latency = _Sketch(w.latency, sketch)
                else:
                    latency.sketch.merge(sketch)
            production.add(w.model_version)
    finally:
        db.conn.execute("COMMIT")
    if not wanted:
        raise NotFound(f"model {model_name!r} has no shadow version to report on; start one with: "
                       f"outrider shadow start {model_name} VERSION --share 0.1 --reason TEXT")
    reply = pb.ShadowReportResponse(model_name=model_name, shadow_version=wanted,
                                    production_version=",".join(sorted(production, key=_version_key)))
    reply.summary.CopyFrom(totals.to_proto() if totals else summary_pb2.ShadowSummary(model_version=wanted))
    if latency is not None:
        reply.production_latency.CopyFrom(latency.to_proto())
    return reply


# ------------------------------------------------------------------ derived figures


@dataclass(frozen=True)
class ShadowFigures:
    """What operators compare, from a ``ShadowReportResponse``; NaN where there is nothing to say."""

    production_calls: int
    shadow_calls: int
    shadow_share: float          # shadow calls / production calls
    shadow_errors: int
    skipped: int
    skipped_share: float         # of the requests chosen for the shadow, the share dropped (its queue was full)
    label_rows: int
    agreement: float             # rows where both predicted the same label / rows with both labels
    score_diff_p5: float         # shadow minus production score per row
    score_diff_p50: float
    score_diff_p95: float
    score_diff_mean: float
    production_latency_p50_us: float
    production_latency_p99_us: float
    shadow_latency_p50_us: float
    shadow_latency_p99_us: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN becomes None."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}


def _quantiles(msg: summary_pb2.ColumnSummary, qs: list[float]) -> list[float]:
    if not msg.count or msg.kind != summary_pb2.ColumnSummary.NUMERIC:
        return [math.nan] * len(qs)
    return [float(q) for q in sketches.NumericSketch.from_proto(msg).quantiles(qs)]


def _ratio(a: int, b: int) -> float:
    return a / b if b else math.nan


def figures(reply: pb.ShadowReportResponse) -> ShadowFigures:
    s = reply.summary
    prod_calls = reply.production_latency.count  # one latency value per production call
    diff = _quantiles(s.score_diff, [0.05, 0.5, 0.95])
    finite_diff = s.score_diff.count - s.score_diff.missing - s.score_diff.infinite
    prod_lat = _quantiles(reply.production_latency, [0.5, 0.99])
    shadow_lat = _quantiles(s.latency, [0.5, 0.99])
    return ShadowFigures(
        production_calls=prod_calls, shadow_calls=s.calls, shadow_share=_ratio(s.calls, prod_calls),
        shadow_errors=s.errors, skipped=s.skipped, skipped_share=_ratio(s.skipped, s.calls + s.errors + s.skipped),
        label_rows=s.label_rows, agreement=_ratio(s.label_agree, s.label_rows),
        score_diff_p5=diff[0], score_diff_p50=diff[1], score_diff_p95=diff[2],
        score_diff_mean=s.score_diff.mean if finite_diff > 0 else math.nan,
        production_latency_p50_us=prod_lat[0], production_latency_p99_us=prod_lat[1],
        shadow_latency_p50_us=shadow_lat[0], shadow_latency_p99_us=shadow_lat[1])
