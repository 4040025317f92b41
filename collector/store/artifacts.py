"""Registered model versions' bytes in the database (``artifacts``, migration 12), for several
collectors on one PostgreSQL: each serves every version without a shared volume.

An artifact is its sha256 and its chunks (``CHUNK_BYTES`` each, numbered from 0), written in one
transaction, so a first chunk means a whole artifact. ``collector.lifecycle.registry`` chooses this or
its directory beside a SQLite file.
"""
from __future__ import annotations

from collections.abc import Iterable

from collector.store.engine import Conn

CHUNK_BYTES = 1 << 20  # a row of ``artifacts``: small enough for one statement, few rows per model


def exists(db: Conn, sha256: str) -> bool:
    return db.execute("SELECT 1 FROM artifacts WHERE sha256 = ? AND chunk = 0", [sha256]).fetchone() is not None


def put(db: Conn, sha256: str, chunks: Iterable[bytes]) -> bool:
    """Store the artifact's chunks (inside the caller's transaction); False if it was stored already
    (the same bytes registered before, or by another collector at the same time)."""
    if exists(db, sha256):
        return False
    for number, data in enumerate(chunks):
        db.insert("artifacts", {"sha256": sha256, "chunk": number, "data": data}, ignore=True)
    return True


def chunk(db: Conn, sha256: str, number: int) -> bytes | None:
    """Chunk ``number`` of the artifact; None past its end (or when it is gone)."""
    row = db.execute("SELECT data FROM artifacts WHERE sha256 = ? AND chunk = ?", [sha256, number]).fetchone()
    return bytes(row[0]) if row else None


def remove_unreferenced(db: Conn, sha256: str) -> int:
    """Delete the artifact unless a model version still needs it (registered and its artifact not
    removed): a failed registration and the retired-artifact cleanup of one collector never take
    bytes another collector's version refers to. The number of chunks deleted."""
    return db.execute("DELETE FROM artifacts WHERE sha256 = ? AND NOT EXISTS (SELECT 1 FROM model_versions"
                      " WHERE sha256 = ? AND artifact_removed_ns = 0)", [sha256, sha256]).rowcount
