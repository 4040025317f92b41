"""The agents' reservoir samples of rows: checked, stored apart from the windows, exported, expired.

A window may carry a ``RowSample`` (agents run with ``--sample-rows``). The
store keeps it in ``row_samples`` (migration 9), not in the window body, so
rollups and window listings never carry rows; it is written in the same
transaction as its window and deleted after the retention (``--sample-retention``)
by the rollup pass. ``export`` reads it back for ``outrider data export``.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from sqlite_utils import Database

from agent.errors import InvalidArgument, NotFound
from protos import collector_pb2 as pb
from protos import summary_pb2

if TYPE_CHECKING:
    from collector.base.ingest import Limits

DEFAULT_RETENTION_SECONDS = 7 * 86400
MAX_STRING_CHARS = 4096  # one sampled string value; agents capture at most 32 characters
EXPORT_PAGE = 64  # windows read per query while exporting: short reads, so the writer's checkpoints go on

_INSERT = ("INSERT INTO row_samples (agent_id, run_id, seq, model_name, model_version, end_ns, rows, body)"
           " VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (agent_id, run_id, seq) DO NOTHING")


def check(sample: summary_pb2.RowSample, window_rows: int, limits: Limits) -> None:
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
        if column.strings and max(map(len, column.strings)) > MAX_STRING_CHARS:
            raise InvalidArgument(f"sample column {column.name!r} has a value over {MAX_STRING_CHARS} characters")
    length = length or 0
    if length * len(sample.columns) > limits.max_sample_values:
        raise InvalidArgument(f"sample has {length * len(sample.columns)} values ({length} rows of "
                              f"{len(sample.columns)} columns), at most {limits.max_sample_values} allowed")
    if length > min(sample.seen, limits.max_sample_rows):
        raise InvalidArgument(f"sample has {length} rows, more than the {sample.seen} it was drawn from or the "
                              f"limit of {limits.max_sample_rows}")
    if sample.seen and sample.columns and not length:
        raise InvalidArgument(f"sample drawn from {sample.seen} rows has no values")


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


def insert(db: Database, row: tuple) -> None:
    """Store a window's sample; call in the transaction that stores the window."""
    db.conn.execute(_INSERT, row)


def delete_older(db: Database, cutoff_ns: int) -> int:
    """Delete samples of windows that ended at or before ``cutoff_ns``; how many went."""
    return db.execute("DELETE FROM row_samples WHERE end_ns <= ?", [cutoff_ns]).rowcount


def model_known(db: Database, model_name: str) -> bool:
    """Has the collector heard of the model: from an agent, or in the registry."""
    return db.execute("SELECT EXISTS (SELECT 1 FROM agents WHERE model_name = ?)"
                      " OR EXISTS (SELECT 1 FROM model_versions WHERE name = ?)"
                      " OR EXISTS (SELECT 1 FROM row_samples WHERE model_name = ?)",
                      [model_name, model_name, model_name]).fetchone()[0] == 1


def export(db: Database, model_name: str, model_version: str, since_ns: int,
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
