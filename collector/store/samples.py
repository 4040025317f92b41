"""The agents' reservoir samples of rows: stored apart from the windows, exported, expired.

They are checked with the rest of the window (``collector.base.ingest.check_sample``).

A window may carry a ``RowSample`` (agents run with ``--sample-rows``). The
store keeps it in ``row_samples`` (migration 9), not in the window body, so
rollups and window listings never carry rows; it is written in the same
transaction as its window and deleted after the retention (``--sample-retention``)
by the rollup pass. ``export`` reads it back for ``outrider data export``.
"""
from __future__ import annotations

from collections.abc import Iterator

from collector.store.engine import Conn

from agent.errors import InvalidArgument, NotFound
from protos import collector_pb2 as pb
from protos import summary_pb2

DEFAULT_RETENTION_SECONDS = 7 * 86400
EXPORT_PAGE = 64  # windows read per query while exporting: short reads, so the writer's checkpoints go on

_INSERT = ("INSERT INTO row_samples (agent_id, run_id, seq, model_name, model_version, end_ns, rows, body)"
           " VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (agent_id, run_id, seq) DO NOTHING")


def split(w: summary_pb2.WindowSummary) -> tuple[bytes, tuple | None]:
    """The window's body without its sample, and the sample's ``row_samples`` row (None without one).
    Runs in the submitting thread: serialising is the costly part."""
    if not w.HasField("sample"):
        return w.SerializeToString(), None
    bare = summary_pb2.WindowSummary()
    bare.CopyFrom(w)
    bare.ClearField("sample")
    return bare.SerializeToString(), (w.agent_id, w.run_id, w.seq, w.model_name, w.model_version,
                                      w.end_unix_nano, row_count(w.sample), w.sample.SerializeToString())


def row_count(sample: summary_pb2.RowSample) -> int:
    """Rows in the sample (every column has one value per row)."""
    if not sample.columns:
        return 0
    return len(sample.columns[0].numbers) or len(sample.columns[0].strings)


def insert(db: Conn, row: tuple) -> None:
    """Store a window's sample; call in the transaction that stores the window."""
    db.execute(_INSERT, row)


def delete_older(db: Conn, cutoff_ns: int) -> int:
    """Delete samples of windows that ended at or before ``cutoff_ns``; how many went."""
    return db.execute("DELETE FROM row_samples WHERE end_ns <= ?", [cutoff_ns]).rowcount


def model_known(db: Conn, model_name: str) -> bool:
    """Has the collector heard of the model: from an agent, or in the registry."""
    return db.execute("SELECT EXISTS (SELECT 1 FROM agents WHERE model_name = ?)"
                      " OR EXISTS (SELECT 1 FROM model_versions WHERE name = ?)"
                      " OR EXISTS (SELECT 1 FROM row_samples WHERE model_name = ?)",
                      [model_name, model_name, model_name]).fetchone()[0] == 1


def export(db: Conn, model_name: str, model_version: str, since_ns: int,
           until_ns: int) -> Iterator[pb.ExportDataChunk]:
    """The samples of the model's windows (one version, or all with ``""``) that ended in
    ``[since_ns, until_ns]``, oldest first, one chunk per window.

    Raises NotFound for a model the collector never heard of, InvalidArgument for ``since > until``.
    Read a page at a time (each page its own short read), so a slow reader holds no snapshot open."""
    if not model_name:
        raise InvalidArgument("model_name is required (outrider data export NAME)")
    if since_ns > until_ns:
        raise InvalidArgument(f"since ({since_ns}) is after until ({until_ns}): nothing can be in that range")
    if not model_known(db, model_name):
        raise NotFound(f"no model named {model_name!r}: no agent has reported it and it is not registered")
    where = "model_name = ? AND end_ns >= ? AND end_ns <= ?"
    params: list = [model_name, since_ns, until_ns]
    if model_version:
        where += " AND model_version = ?"
        params.append(model_version)
    after: list = []  # keyset: (end_ns, agent_id, run_id, seq) of the last row sent
    while True:
        rows = db.execute(
            f"SELECT end_ns, agent_id, run_id, seq, model_version, body FROM row_samples WHERE {where}"
            + (" AND (end_ns, agent_id, run_id, seq) > (?, ?, ?, ?)" if after else "")
            + " ORDER BY end_ns, agent_id, run_id, seq LIMIT ?", [*params, *after, EXPORT_PAGE]).fetchall()
        for end_ns, agent_id, _, _, version_of_row, body in rows:
            yield pb.ExportDataChunk(sample=summary_pb2.RowSample.FromString(body), model_version=version_of_row,
                                     agent_id=agent_id, window_end_unix_nano=end_ns)
        if len(rows) < EXPORT_PAGE:
            return
        after = list(rows[-1][:4])
