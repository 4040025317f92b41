"""Shadow reports: how a shadow version compared with production on the same live requests.

Agents attach a ``ShadowSummary`` (its ``model_version`` is the shadow's) to
each production window. Here those summaries are merged for a report (with
``collector.store.shadow_merge``, which rollups use too): counts add, the
score-difference and latency sketches merge with ``agent.sketches``.

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

from agent import sketches
from agent.errors import InvalidArgument, NotFound
from collector.store import shadows
from collector.store.engine import Conn
from collector.store.shadow_merge import NamedSketch, ShadowTotals, numeric_sketch, version_key
from protos import collector_pb2 as pb
from protos import summary_pb2

log = logging.getLogger(__name__)

MAX_WINDOWS = 50_000  # bodies read per report: beyond it the oldest windows of the range are left out (logged)


# ------------------------------------------------------------------ the report


def _shadow_start(db: Conn, model: str, version: int) -> tuple[int, int]:
    """(version, started_ns) of the current shadow, else of the latest shadow rollout (of ``version``
    if given); (version, 0) when neither is known."""
    found = shadows.current(db, model)
    if found and (not version or found[0] == version):
        return found
    return shadows.latest_rollout(db, model, version) or (version, 0)


def report(db: Conn, model_name: str, version: int = 0, since_ns: int = 0,
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
    latency: NamedSketch | None = None
    production: set[str] = set()
    with db.snapshot():  # one snapshot: a rollup moving windows meanwhile must not count them twice
        keys = shadows.window_keys(db, model_name, since, max_windows)
        if len(keys) == max_windows:
            log.warning("shadow report of %s: more than %d windows since %d; the oldest are left out", model_name,
                        max_windows, since)
        for table, rowid, _ in keys:
            body = shadows.body(db, table, rowid)
            if body is None:
                continue
            w = summary_pb2.WindowSummary.FromString(body)
            if not w.HasField("shadow") or (wanted and w.shadow.model_version != wanted):
                continue
            wanted = wanted or w.shadow.model_version
            totals = totals or ShadowTotals(wanted)
            try:  # parse first, merge after: a bad window changes nothing
                sketch = numeric_sketch(w.latency, "latency") if w.HasField("latency") else None
                totals.add(w.shadow)
            except InvalidArgument as exc:
                log.warning("shadow report of %s: a window left out: %s", model_name, exc)
                continue
            if sketch is not None:
                if latency is None:
                    latency = NamedSketch(w.latency, sketch)
                else:
                    latency.sketch.merge(sketch)
            production.add(w.model_version)
    if not wanted:
        raise NotFound(f"model {model_name!r} has no shadow version to report on; start one with: "
                       f"outrider shadow start {model_name} VERSION --share 0.1 --reason TEXT")
    reply = pb.ShadowReportResponse(model_name=model_name, shadow_version=wanted,
                                    production_version=",".join(sorted(production, key=version_key)))
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
