"""What differs in the SQL text of SQLite and PostgreSQL, in one place.

Domain SQL is written once, for both engines, with ``?`` placeholders and the portable subset both
speak (``INSERT ... ON CONFLICT ... DO NOTHING / DO UPDATE``, ``RETURNING``, partial indexes, integers
for booleans). In ``DO UPDATE SET`` name the old row's columns with the table's name
(``windows = agents.windows + 1``): PostgreSQL refuses a bare ``windows`` as ambiguous with
``excluded.windows``. Identifiers are quoted with ``"..."`` (not SQLite's ``[...]``). The few spellings that differ are asked of the connection's dialect
(``conn.dialect.least(a, b)``, ``.greatest``, ``.total``, ``.instr``), and the schema is described by
``Column`` lists that each dialect renders as its own DDL (``collector.store.migrations``).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal

ColumnType = Literal["int", "text", "float", "bytes"]
MAX_INT64 = 2**63 - 1
NO_LIMIT = MAX_INT64  # LIMIT ? for "all rows" on both engines (SQLite\'s -1 is an error on PostgreSQL)


@dataclass(frozen=True)
class Column:
    """One column; ``default`` is SQL text (``"''"``, ``"0"``, ``"'{}'"``), None for no default."""

    name: str
    type: ColumnType
    not_null: bool = False
    default: str | None = None


def quote(name: str) -> str:
    """A double-quoted identifier (both engines; ``column`` is a reserved word on PostgreSQL)."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class Dialect:
    """The SQLite spelling; ``PostgresDialect`` overrides what differs."""

    name = "sqlite"
    _types = {"int": "INTEGER", "text": "TEXT", "float": "REAL", "bytes": "BLOB"}

    # ------------------------------------------------ expressions

    def least(self, a: str, b: str) -> str:
        """The smaller of two values (SQLite's scalar two-argument ``min``)."""
        return f"min({a}, {b})"

    def greatest(self, a: str, b: str) -> str:
        return f"max({a}, {b})"

    def total(self, expr: str) -> str:
        """A float sum that is 0.0 over no rows (SQLite's ``total``)."""
        return f"total({expr})"

    def instr(self, haystack: str, needle: str) -> str:
        """1-based position of ``needle`` in ``haystack``, 0 if absent."""
        return f"instr({haystack}, {needle})"

    def saturating_add(self, a: str, b: str, limit: int = MAX_INT64) -> str:
        """``a + b``, at most ``limit``, without failing past the 64-bit range (a counter that would
        overflow stays at the top; SQLite turns the overflowing sum into a float, which min() caps)."""
        return f"min({a} + {b}, {limit})"

    def notify(self) -> str:
        """A statement taking (channel, payload) that tells the other collectors at commit; "" where
        there are none to tell (SQLite: one collector)."""
        return ""

    def unindexed(self, column: str) -> str:
        """``column`` in a WHERE term the planner must not answer from an index on it (SQLite's unary
        ``+``); PostgreSQL's planner weighs a rowid range by its statistics, so the name alone."""
        return f"+{column}"

    # ------------------------------------------------ DDL

    def column_sql(self, column: Column, *, primary_key: bool = False, identity: bool = False,
                   autoincrement: bool = False) -> str:
        parts = [quote(column.name), self._types[column.type]]
        if primary_key:
            parts.append("PRIMARY KEY AUTOINCREMENT" if autoincrement else "PRIMARY KEY")
        if column.not_null:
            parts.append("NOT NULL")
        if column.default is not None:
            parts.append(f"DEFAULT {column.default}")
        return " ".join(parts)

    def create_table(self, table: str, columns: list[Column], pk: tuple[str, ...] = (), *,
                     rowid: bool = False, autoincrement: bool = False) -> list[str]:
        """``pk``: the primary key's columns; one ``int`` column is the table's generated id (SQLite's
        INTEGER PRIMARY KEY, an identity column on PostgreSQL; ``autoincrement``: never reused).
        ``rowid``: the domain SQL uses the table's ``rowid`` (implicit on SQLite; a real column on
        PostgreSQL)."""
        inline = len(pk) == 1
        lines = []
        for c in columns:
            is_pk = inline and c.name == pk[0]
            lines.append(self.column_sql(c, primary_key=is_pk, identity=is_pk and c.type == "int",
                                         autoincrement=is_pk and autoincrement))
        lines.extend(self._rowid_column() if rowid else [])
        if len(pk) > 1:
            lines.append(f"PRIMARY KEY ({', '.join(quote(c) for c in pk)})")
        return [f"CREATE TABLE {quote(table)} ({', '.join(lines)})"]

    def _rowid_column(self) -> list[str]:
        return []  # SQLite has one

    def create_index(self, name: str, table: str, columns: list[str], *, unique: bool = False,
                     where: str = "") -> str:
        sql = (f"CREATE {'UNIQUE ' if unique else ''}INDEX {quote(name)} ON {quote(table)}"
               f" ({', '.join(quote(c) for c in columns)})")
        return f"{sql} WHERE {where}" if where else sql

    def add_column(self, table: str, column: Column) -> str:
        return f"ALTER TABLE {quote(table)} ADD COLUMN {self.column_sql(column)}"

    def refuse(self, trigger: str, table: str, event: str, message: str, when: str = "") -> list[str]:
        """A trigger that refuses ``event`` (``"DELETE"``, ``"UPDATE OF stage"``) on ``table`` with an
        integrity error carrying ``message``, when ``when`` (SQL over OLD/NEW) holds."""
        cond = f" WHEN {when}" if when else ""
        return [f"CREATE TRIGGER {quote(trigger)} BEFORE {event} ON {quote(table)}{cond}"
                f" BEGIN SELECT RAISE(ABORT, {literal(message)}); END"]

    def autoincrement_high_water(self, table: str) -> str | None:
        """A query for the highest id ever handed out in ``table`` (deleted rows included), when the
        engine keeps one apart from the table: SQLite's ``sqlite_sequence``. None on PostgreSQL, where
        ids are assigned under a lock as max(id) + 1 instead (an identity would leave gaps for rolled
        back transactions, which the audit chain would take for deleted rows)."""
        return f"SELECT seq FROM sqlite_sequence WHERE name = {literal(table)}"

    # ------------------------------------------------ placeholders

    def translate(self, sql: str) -> str:
        """The driver's form of ``sql`` written with ``?`` placeholders (SQLite's own)."""
        return sql


class PostgresDialect(Dialect):
    name = "postgresql"
    _types = {"int": "BIGINT", "text": "TEXT", "float": "DOUBLE PRECISION", "bytes": "BYTEA"}

    def least(self, a: str, b: str) -> str:
        return f"LEAST({a}, {b})"

    def autoincrement_high_water(self, table: str) -> str | None:
        return None

    def greatest(self, a: str, b: str) -> str:
        return f"GREATEST({a}, {b})"

    def total(self, expr: str) -> str:
        return f"COALESCE(SUM({expr}), 0)::DOUBLE PRECISION"

    def instr(self, haystack: str, needle: str) -> str:
        return f"strpos({haystack}, {needle})"

    def unindexed(self, column: str) -> str:
        return column

    def saturating_add(self, a: str, b: str, limit: int = MAX_INT64) -> str:
        return f"LEAST({a}::NUMERIC + {b}, {limit})::BIGINT"  # BIGINT + BIGINT raises on overflow

    def notify(self) -> str:
        return "SELECT pg_notify(?, ?)"

    def column_sql(self, column: Column, *, primary_key: bool = False, identity: bool = False,
                   autoincrement: bool = False) -> str:
        parts = [quote(column.name), self._types[column.type]]
        if identity:  # BY DEFAULT: explicit ids (the audit chain's, the migrations') are still accepted
            parts.append("GENERATED BY DEFAULT AS IDENTITY")
        if primary_key:
            parts.append("PRIMARY KEY")
        if column.not_null:
            parts.append("NOT NULL")
        if column.default is not None:
            parts.append(f"DEFAULT {column.default}")
        return " ".join(parts)

    def _rowid_column(self) -> list[str]:
        return ['"rowid" BIGINT GENERATED BY DEFAULT AS IDENTITY UNIQUE']

    def refuse(self, trigger: str, table: str, event: str, message: str, when: str = "") -> list[str]:
        # 23000 integrity_constraint_violation: the driver raises an IntegrityError, as SQLite's RAISE(ABORT).
        function = quote(f"{trigger}_refuse")
        cond = f" WHEN ({when})" if when else ""
        return [f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                f" RAISE EXCEPTION USING ERRCODE = 'integrity_constraint_violation', MESSAGE = {literal(message)};"
                " END $$",
                f"CREATE TRIGGER {quote(trigger)} BEFORE {event} ON {quote(table)} FOR EACH ROW{cond}"
                f" EXECUTE FUNCTION {function}()"]

    def translate(self, sql: str) -> str:
        return _to_pyformat(sql)


# Quoted text the translation must step over: '...' literals ('' escapes), "..." identifiers,
# $tag$...$tag$ bodies, -- and /* */ comments. Outside them ? is a placeholder; % is psycopg's own
# marker everywhere (literals included), so it is doubled everywhere.
_TOKENS = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|(\$[A-Za-z_0-9]*\$).*?\1|--[^\n]*|/\*.*?\*/|[?%]""",
                     re.DOTALL)


@functools.lru_cache(maxsize=4096)
def _to_pyformat(sql: str) -> str:
    """``?`` -> ``%s`` and ``%`` -> ``%%``, once per distinct text (cached)."""
    def sub(m: re.Match) -> str:
        token = m.group(0)
        if token == "?":
            return "%s"
        return token.replace("%", "%%")

    return _TOKENS.sub(sub, sql)


SQLITE = Dialect()
POSTGRES = PostgresDialect()
