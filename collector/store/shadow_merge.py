"""How the shadow summaries of windows merge: per shadow version, and per rollup bucket.

Agents attach a ``ShadowSummary`` (its ``model_version`` is the shadow's) to
each production window. Counts add; the score-difference and latency sketches
merge with ``agent.sketches``. The shadow report (``collector.monitoring.shadow``)
merges with ``ShadowTotals``; rollups with ``ShadowMerger``.

Rollups keep one shadow per bucket (``ShadowMerger``): a bucket's windows may
carry two shadow versions only when the shadow was switched inside it, and then
the bucket keeps the version seen latest (by window end; ties go to the higher
version), since that is the one a report asks about by default. The calls of
the other version leave its figures (and are logged); the production totals
of the bucket are untouched.
"""
from __future__ import annotations

import logging

from agent import sketches
from agent.errors import InvalidArgument
from protos import summary_pb2

log = logging.getLogger(__name__)

_COUNTS = ("calls", "rows", "skipped", "errors", "label_rows", "label_agree")


def version_key(version: str) -> tuple:
    return (1, int(version), "") if version.isdigit() else (0, 0, version)


class NamedSketch:
    """A column being merged, with the name/role/source it was first seen with."""

    def __init__(self, msg: summary_pb2.ColumnSummary, sketch: sketches.NumericSketch) -> None:
        self.name, self.role, self.source, self.sketch = msg.name, msg.role, msg.source, sketch

    def to_proto(self) -> summary_pb2.ColumnSummary:
        return self.sketch.to_proto(self.name, self.role, self.source)


def numeric_sketch(msg: summary_pb2.ColumnSummary, what: str) -> sketches.NumericSketch | None:
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
        self.score_diff: NamedSketch | None = None
        self.latency: NamedSketch | None = None

    def add(self, s: summary_pb2.ShadowSummary) -> None:
        """Raises InvalidArgument (changing nothing) when a sketch does not deserialise."""
        parsed = {f: (getattr(s, f), numeric_sketch(getattr(s, f), f))
                  for f in ("score_diff", "latency") if s.HasField(f)}
        parsed = {f: pair for f, pair in parsed.items() if pair[1] is not None}
        self.sha256 = s.model_sha256 if not self.sha256 or self.sha256 == s.model_sha256 else "mixed"
        for field in _COUNTS:
            self.counts[field] += getattr(s, field)
        for field, (msg, sketch) in parsed.items():
            mine = getattr(self, field)
            if mine is None:
                setattr(self, field, NamedSketch(msg, sketch))
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
        kept = max(self._versions, key=lambda v: (self._versions[v][0], version_key(v)))
        for version, (_, totals) in self._versions.items():
            if version != kept:
                log.info("rollup keeps shadow version %s; the %d calls of shadow version %s in the same bucket "
                         "leave its figures", kept, totals.counts["calls"], version)
        return self._versions[kept][1].to_proto()
