"""The collector's two database engines behind one small interface.

``open_engine("collector.db")`` (or ``sqlite:///path``) gives a ``SQLiteEngine``, the embedded default;
``open_engine("postgresql://user@host/db")`` a ``PostgresEngine`` (psycopg 3 and its connection pool),
for several collectors on one database. Both hand out ``Conn`` objects that speak the same SQL text
(``?`` placeholders; see ``collector.store.dialect`` for the few spellings that differ), return rows as
tuples (``execute``) or dicts (``query``), bytes as ``bytes``, and raise the store's own errors
(``StoreIntegrityError``, ``StoreUnavailable``), so that no domain module imports sqlite3 or psycopg.

Writes: one writer connection (``Engine.writer()``) in explicit transactions: ``BEGIN IMMEDIATE`` on
SQLite (the write lock taken up front, so a transaction never fails half-way for a busy database),
``BEGIN`` (READ COMMITTED) on PostgreSQL, where ``conn.lock(name)`` serialises what must not interleave
across collectors (the audit chain's appends). Reads: ``Engine.reader()``, a connection per thread on
SQLite (``query_only``), one from the pool on PostgreSQL.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from agent.errors import FailedPrecondition, InvalidArgument, OutriderError, Unavailable
from collector.store.dialect import POSTGRES, SQLITE, Dialect, quote

SYNCHRONOUS = ("NORMAL", "FULL", "EXTRA")
_savepoints = itertools.count(1)


# ------------------------------------------------------------ errors


class StoreError(OutriderError):
    """A database failure that is not one of the kinds below (a bug in our SQL, most likely)."""


class StoreIntegrityError(StoreError, FailedPrecondition):
    """A unique, not-null or check constraint refused the change, or a trigger did (retired versions,
    the append-only audit). Domain code turns it into its own message where it expects one."""


class StoreValueError(StoreError, InvalidArgument):
    """A value the column cannot hold (an integer past the signed 64-bit range); nothing was changed.
    Validation should have refused it first (collector.ingest)."""


class StoreUnavailable(StoreError, Unavailable):
    """The database cannot be reached or is busy past the timeout; the change was not made."""


_SQLITE_UNAVAILABLE = ("locked", "busy", "disk i/o", "unable to open", "readonly", "disk is full")


def _from_sqlite(exc: sqlite3.Error) -> StoreError:
    text = str(exc)
    if isinstance(exc, sqlite3.IntegrityError):
        return StoreIntegrityError(text)
    if text == "integer overflow":  # sum() past 64 bits
        return StoreValueError(f"SQLite: {text}")
    if isinstance(exc, sqlite3.OperationalError) and any(s in text.lower() for s in _SQLITE_UNAVAILABLE):
        return StoreUnavailable(f"SQLite: {text}")
    return StoreError(text)


def _from_psycopg(exc: Exception) -> StoreError:
    import psycopg

    diag = getattr(exc, "diag", None)
    text = (diag.message_primary if diag is not None else None) or str(exc).strip().splitlines()[0]
    if isinstance(exc, psycopg.IntegrityError):
        return StoreIntegrityError(text)
    if isinstance(exc, psycopg.DataError):
        return StoreValueError(text)
    if isinstance(exc, psycopg.OperationalError) or type(exc).__name__ == "PoolTimeout":
        return StoreUnavailable(f"PostgreSQL: {text}")
    return StoreError(text)


# ------------------------------------------------------------ connections


class Cursor:
    """The result of ``Conn.execute``: ``fetchone``/``fetchall``/iteration, ``rowcount``."""

    def __init__(self, raw: Any, conn: Conn) -> None:
        self._raw, self._conn = raw, conn

    @property
    def rowcount(self) -> int:
        return self._raw.rowcount

    @property
    def description(self) -> Any:
        return self._raw.description

    def fetchone(self) -> tuple | None:
        with self._conn._errors():
            return self._raw.fetchone()

    def fetchall(self) -> list[tuple]:
        with self._conn._errors():
            return self._raw.fetchall()

    def __iter__(self) -> Iterator[tuple]:
        with self._conn._errors():
            yield from self._raw


class Conn:
    """One connection to either engine. Not thread-safe: one thread uses it at a time."""

    dialect: Dialect

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    # the driver's own API, per engine
    def _cursor(self, sql: str, params: Sequence[Any] | None) -> Any:
        raise NotImplementedError

    def _errors(self) -> contextlib.AbstractContextManager:
        raise NotImplementedError

    @property
    def in_transaction(self) -> bool:
        raise NotImplementedError

    def _begin_sql(self) -> str:
        raise NotImplementedError

    def lock(self, name: str) -> None:
        """Hold an exclusive lock on ``name`` until this transaction ends (several collectors on one
        PostgreSQL take turns; on SQLite ``BEGIN IMMEDIATE`` already serialises every writer)."""

    def close(self) -> None:
        self.raw.close()

    # ------------------------------------------------ statements

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        """Run one statement written with ``?`` placeholders."""
        with self._errors():
            return Cursor(self._cursor(sql, params), self)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._errors():
            self._executemany(sql, rows)

    def _executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        raise NotImplementedError

    def query(self, sql: str, params: Sequence[Any] = ()) -> Iterator[dict[str, Any]]:
        """The rows as dicts (column name -> value), read lazily."""
        cursor = self.execute(sql, params)
        names = [d[0] for d in cursor.description]
        for row in cursor:
            yield dict(zip(names, row))

    def insert(self, table: str, row: dict[str, Any], *, returning: str = "",
               ignore: bool = False) -> Any:
        """INSERT one row; ``returning``: a column to give back (``"id"``, ``"rowid"``; None when an
        ``ignore``d conflict inserted nothing); ``ignore``: ON CONFLICT DO NOTHING. Else the rowcount."""
        sql = (f"INSERT INTO {quote(table)} ({', '.join(quote(c) for c in row)})"
               f" VALUES ({', '.join('?' * len(row))})" + (" ON CONFLICT DO NOTHING" if ignore else ""))
        if not returning:
            return self.execute(sql, list(row.values())).rowcount
        found = self.execute(f"{sql} RETURNING {quote(returning)}", list(row.values())).fetchone()
        return found[0] if found else None

    def upsert(self, table: str, row: dict[str, Any], key: Sequence[str]) -> None:
        """INSERT the row, or UPDATE the other columns of the row with the same ``key`` (which needs a
        unique index or primary key on exactly those columns)."""
        rest = [c for c in row if c not in key]
        update = (f"DO UPDATE SET {', '.join(f'{quote(c)} = excluded.{quote(c)}' for c in rest)}"
                  if rest else "DO NOTHING")
        self.execute(f"INSERT INTO {quote(table)} ({', '.join(quote(c) for c in row)})"
                     f" VALUES ({', '.join('?' * len(row))})"
                     f" ON CONFLICT ({', '.join(quote(c) for c in key)}) {update}", list(row.values()))

    def update(self, table: str, key: dict[str, Any], fields: dict[str, Any]) -> int:
        """UPDATE ``fields`` of the rows matching ``key``; the number of rows changed."""
        sets = ", ".join(f"{quote(c)} = ?" for c in fields)
        where = " AND ".join(f"{quote(c)} = ?" for c in key)
        return self.execute(f"UPDATE {quote(table)} SET {sets} WHERE {where}",
                            [*fields.values(), *key.values()]).rowcount

    # ------------------------------------------------ transactions

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Conn]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        self.execute(self._begin_sql())
        try:
            yield self
            self.execute("COMMIT")
        except BaseException:
            if self.in_transaction:  # a failed COMMIT must not leave the connection inside a transaction
                with contextlib.suppress(StoreError):
                    self.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Conn]:
        """A read-only transaction: every read of the block sees the same committed state."""
        if self.in_transaction:
            yield self
            return
        self.execute(self._snapshot_sql())
        try:
            yield self
        finally:
            if self.in_transaction:
                with contextlib.suppress(StoreError):
                    self.execute("COMMIT")

    def _snapshot_sql(self) -> str:
        raise NotImplementedError

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[Conn]:
        """Inside a transaction: if the block raises, only its own changes are undone."""
        name = f"sp_{next(_savepoints)}"
        self.execute(f"SAVEPOINT {name}")
        try:
            yield self
        except BaseException:
            if self.in_transaction:
                with contextlib.suppress(StoreError):
                    self.execute(f"ROLLBACK TO SAVEPOINT {name}")
                    self.execute(f"RELEASE SAVEPOINT {name}")
            raise
        self.execute(f"RELEASE SAVEPOINT {name}")


class SQLiteConn(Conn):
    dialect = SQLITE

    def _cursor(self, sql: str, params: Sequence[Any] | None) -> Any:
        return self.raw.execute(sql, params or ())

    def _executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.raw.executemany(sql, rows)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise _from_sqlite(exc) from exc
        except OverflowError as exc:  # the driver's own refusal of an int past 64 bits
            raise StoreValueError(f"SQLite: {exc}") from exc

    @property
    def in_transaction(self) -> bool:
        return self.raw.in_transaction

    def _begin_sql(self) -> str:
        return "BEGIN IMMEDIATE"

    def _snapshot_sql(self) -> str:
        return "BEGIN"


class PostgresConn(Conn):
    dialect = POSTGRES

    def _cursor(self, sql: str, params: Sequence[Any] | None) -> Any:
        if not params:  # no parameters: psycopg leaves the text alone (no % doubling wanted)
            return self.raw.execute(sql)
        return self.raw.execute(POSTGRES.translate(sql), params)

    def _executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self.raw.cursor() as cur:
            cur.executemany(POSTGRES.translate(sql), rows)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        import psycopg

        try:
            yield
        except psycopg.Error as exc:
            raise _from_psycopg(exc) from exc

    @property
    def in_transaction(self) -> bool:
        import psycopg.pq

        return self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    def _begin_sql(self) -> str:
        return "BEGIN"

    def _snapshot_sql(self) -> str:
        return "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"

    def lock(self, name: str) -> None:
        if not self.in_transaction:
            raise RuntimeError("Conn.lock is held until the transaction ends: call it inside conn.transaction()")
        self.execute("SELECT pg_advisory_xact_lock(hashtext(?))", [name])


class _Fetched:
    """A finished statement's rows, read before its connection went back to the pool."""

    def __init__(self, cursor: Any) -> None:
        self.description = cursor.description
        self.rowcount = cursor.rowcount
        self._rows = cursor.fetchall() if cursor.description is not None else []
        self._next = 0

    def fetchone(self) -> tuple | None:
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def fetchall(self) -> list[tuple]:
        rows, self._next = self._rows[self._next:], len(self._rows)
        return rows

    def __iter__(self) -> Iterator[tuple]:
        while (row := self.fetchone()) is not None:
            yield row


class PooledReader(PostgresConn):
    """``Store.read()`` on PostgreSQL: one object for every reading thread. Each statement borrows a
    connection from the engine's pool and gives it back with the rows read (so results are fetched
    whole: callers bound them with LIMIT); a ``snapshot`` block keeps one connection, for reads that
    must see one committed state."""

    def __init__(self, engine: PostgresEngine) -> None:
        super().__init__(None)
        self._engine = engine
        self._pinned = threading.local()

    def _cursor(self, sql: str, params: Sequence[Any] | None) -> Any:
        pinned = getattr(self._pinned, "conn", None)
        if pinned is not None:
            return pinned._cursor(sql, params)
        with self._engine.reader() as conn:
            return _Fetched(conn._cursor(sql, params))

    @property
    def in_transaction(self) -> bool:
        pinned = getattr(self._pinned, "conn", None)
        return pinned is not None and pinned.in_transaction

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Conn]:
        if getattr(self._pinned, "conn", None) is not None:
            yield self
            return
        with self._engine.reader() as conn, conn.snapshot():
            self._pinned.conn = conn
            try:
                yield self
            finally:
                self._pinned.conn = None

    def transaction(self) -> contextlib.AbstractContextManager:
        raise RuntimeError("Store.read() is for reads: write through Store.write")

    def close(self) -> None:
        """Nothing of its own to close: the engine's pool is closed with the engine."""


def _configure(raw: Any) -> Any:
    """A new psycopg connection, made to load values as sqlite3 does: SUM() and AVG() of integers are
    NUMERIC on PostgreSQL, which psycopg would give as Decimal; here a whole number (no decimal point)
    is an int, anything else a float."""
    raw.adapters.register_loader("numeric", _numeric_loader())
    return raw


def _configure_reader(raw: Any) -> None:
    """A pooled reader: read-only, as SQLite's readers are (query_only)."""
    _configure(raw).execute("SET default_transaction_read_only = on")


@functools.cache
def _numeric_loader() -> type:
    from psycopg.adapt import Loader

    class NumericAsNumber(Loader):
        # Text format: "123" (a sum of integers) or "41.5000" (an average, a division), as sqlite3 gives.
        def load(self, data: Any) -> int | float:
            text = bytes(data)
            return int(text) if text.lstrip(b"-").isdigit() else float(text)

    return NumericAsNumber


# ------------------------------------------------------------ engines


class Engine:
    """Where the database is and how to connect to it; ``open_engine`` makes one."""

    dialect: Dialect
    url: str  # for messages: no password

    def connect(self) -> Conn:
        """A new connection of the caller's own (close it)."""
        raise NotImplementedError

    def writer(self) -> Conn:
        """The connection the store's writer thread owns for its lifetime."""
        return self.connect()

    @contextlib.contextmanager
    def reader(self) -> Iterator[Conn]:
        """A connection for reads; returned for reuse when the block ends."""
        raise NotImplementedError
        yield

    def connect_reader(self) -> Conn:
        """A new read-only connection of the caller's own (close it): a thread that keeps one."""
        raise NotImplementedError

    def close(self) -> None:
        """Close every connection this engine keeps (not those handed out by ``connect``)."""


class SQLiteEngine(Engine):
    dialect = SQLITE

    def __init__(self, path: str, *, synchronous: str = "FULL", timeout: float = 30) -> None:
        if synchronous.upper() not in SYNCHRONOUS:
            raise InvalidArgument(f"synchronous must be one of {', '.join(SYNCHRONOUS)}, got {synchronous!r}")
        self.path, self.url = path, path
        self._synchronous, self._timeout = synchronous.upper(), timeout
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _raw(self) -> sqlite3.Connection:
        try:
            return sqlite3.connect(self.path, isolation_level=None, timeout=self._timeout,
                                   check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open SQLite database {self.path}: {exc}") from exc

    def connect(self) -> Conn:
        raw = self._raw()
        conn = SQLiteConn(raw)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        return conn

    def connect_reader(self) -> Conn:
        raw = self._raw()
        raw.execute("PRAGMA query_only=1")
        return SQLiteConn(raw)

    @contextlib.contextmanager
    def reader(self) -> Iterator[Conn]:
        # One connection per thread, kept: opening one costs more than most reads.
        conn = getattr(self._local, "conn", None)
        if conn is None:
            raw = self._raw()
            raw.execute("PRAGMA query_only=1")
            conn = self._local.conn = SQLiteConn(raw)
            with self._lock:
                self._readers.append(raw)
        yield conn

    def close(self) -> None:
        with self._lock:
            readers, self._readers = self._readers, []
        for raw in readers:
            raw.close()


class PostgresEngine(Engine):
    dialect = POSTGRES

    def __init__(self, url: str, *, pool_max: int = 8, connect_timeout: float = 10) -> None:
        try:
            import psycopg
            import psycopg_pool
        except ImportError as exc:
            raise FailedPrecondition(f"a PostgreSQL database needs psycopg ({exc.name} is not installed):"
                                     " pip install 'outrider[postgres]'") from exc
        try:
            params = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise InvalidArgument(f"not a PostgreSQL URL ({_one_line(exc)}): expected"
                                  " postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE") from exc
        self.url = _without_password(url)
        self._kwargs = {"autocommit": True, "connect_timeout": max(1, int(connect_timeout))}
        self._conninfo = url
        # Connect once here, so that a wrong host, database or password is told now, in one line.
        try:
            psycopg.connect(url, **self._kwargs).close()
        except psycopg.Error as exc:
            where = params.get("host", "the default socket")
            raise StoreUnavailable(f"cannot connect to PostgreSQL at {where} (database"
                                   f" {params.get('dbname', '?')}): {_one_line(exc)}") from exc
        self._pool = psycopg_pool.ConnectionPool(url, min_size=1, max_size=pool_max, kwargs=self._kwargs,
                                                 timeout=connect_timeout, open=True, configure=_configure_reader,
                                                 name="outrider-readers",
                                                 check=psycopg_pool.ConnectionPool.check_connection)

    def connect(self) -> Conn:
        import psycopg

        try:
            return PostgresConn(_configure(psycopg.connect(self._conninfo, **self._kwargs)))
        except psycopg.Error as exc:
            raise _from_psycopg(exc) from exc

    def connect_reader(self) -> Conn:
        """A reader that borrows a pooled connection per statement (per ``snapshot`` block), so that
        any number of threads reading share the pool's few connections."""
        return PooledReader(self)

    @contextlib.contextmanager
    def reader(self) -> Iterator[Conn]:
        import psycopg_pool

        try:
            raw = self._pool.getconn()
        except psycopg_pool.PoolTimeout as exc:
            raise StoreUnavailable(f"PostgreSQL: no connection free within the timeout ({self.url})") from exc
        try:
            yield PostgresConn(raw)
        finally:
            self._pool.putconn(raw)  # rolled back first if the block left a transaction open

    def close(self) -> None:
        self._pool.close()


def _one_line(exc: BaseException) -> str:
    lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
    return lines[0] if lines else type(exc).__name__


def _without_password(url: str) -> str:
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def is_url(db: str | os.PathLike) -> bool:
    """Whether ``db`` names a database by URL (``postgresql://...``, ``sqlite:///...``) rather than a path."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", os.fspath(db)) is not None


def describe(db: str | os.PathLike) -> str:
    """``db`` for a log line or an error, never with its password: "PostgreSQL postgresql://u:***@h/d",
    "SQLite outrider.db"."""
    text = os.fspath(db)
    if text.startswith(("postgresql://", "postgres://")):
        return f"PostgreSQL {_without_password(text)}"
    if is_url(text) and not text.startswith("sqlite:///"):
        return _without_password(text)
    return f"SQLite {text.removeprefix('sqlite:///')}"


def open_engine(db: str | os.PathLike, **opts: Any) -> Engine:
    """The engine for ``db``: a SQLite path (or ``sqlite:///path``), or a ``postgresql://`` /
    ``postgres://`` URL. ``opts``: ``synchronous`` (SQLite), ``pool_max``, ``connect_timeout`` (PG)."""
    text = os.fspath(db)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresEngine(text, **{k: v for k, v in opts.items() if k != "synchronous"})
    if text.startswith("sqlite:///"):
        text = text.removeprefix("sqlite:///")
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text):
        raise InvalidArgument(f"unknown database URL scheme in {_without_password(text)!r}: give a SQLite"
                              " path or a postgresql://USER@HOST/DATABASE URL")
    return SQLiteEngine(text, **{k: v for k, v in opts.items() if k in ("synchronous", "timeout")})
