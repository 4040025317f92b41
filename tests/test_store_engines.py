"""The engine layer (collector.store.engine, .dialect) on SQLite and on a real PostgreSQL, and the test
session's PostgreSQL server itself (tests/pg_support.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.errors import FailedPrecondition, InvalidArgument
from collector.store.dialect import POSTGRES, Column
from collector.store.engine import (Conn, PostgresEngine, SQLiteEngine, StoreError, StoreIntegrityError,
                                    StoreUnavailable, open_engine)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def conn(db_url: str):
    engine = open_engine(db_url)
    c = engine.writer()
    for sql in c.dialect.create_table("things", [Column("id", "int"), Column("name", "text", True),
                                                 Column("n", "int", True, "0"), Column("body", "bytes"),
                                                 Column("x", "float")], pk=("id",)):
        c.execute(sql)
    c.execute(c.dialect.create_index("things_name", "things", ["name"], unique=True))
    for sql in c.dialect.create_table("log", [Column("k", "text", True), Column("v", "int", True)], rowid=True):
        c.execute(sql)
    yield c
    c.close()
    engine.close()


def test_open_engine_picks_the_engine_by_url(db_url: str, tmp_path: Path) -> None:
    engine = open_engine(db_url)
    try:
        assert isinstance(engine, PostgresEngine if db_url.startswith("postgresql://") else SQLiteEngine)
        assert engine.dialect.name == ("postgresql" if db_url.startswith("postgresql://") else "sqlite")
    finally:
        engine.close()
    assert isinstance(open_engine(f"sqlite:///{tmp_path}/a.db"), SQLiteEngine)


def test_placeholders_and_percent_signs_in_literals(conn: Conn) -> None:
    row = conn.execute("SELECT ?, '?', '100%', 'a''?%', ? || '%'", ["x%", "y"]).fetchone()
    assert row == ("x%", "?", "100%", "a'?%", "y%")
    assert conn.execute("SELECT '50%' /* a ? and a % */").fetchone() == ("50%",)  # no parameters at all
    conn.execute('INSERT INTO things (name) VALUES (?)', ["what?"])
    assert conn.execute('SELECT "name" FROM things WHERE name LIKE ?', ["%?"]).fetchall() == [("what?",)]


def test_translation_steps_over_quoted_text() -> None:
    assert POSTGRES.translate("SELECT ? , '?%', \"a?\" -- ?%\n, $$ ? $$, ?") == \
        "SELECT %s , '?%%', \"a?\" -- ?%%\n, $$ ? $$, %s"
    assert POSTGRES.translate("x = 'it''s ?' AND y = ?") == "x = 'it''s ?' AND y = %s"


def test_insert_returning_ids_and_rowids(conn: Conn) -> None:
    with conn.transaction():
        first = conn.execute("INSERT INTO things (name) VALUES (?) RETURNING id", ["a"]).fetchone()[0]
        second = conn.insert("things", {"name": "b"}, returning="id")
        rowid = conn.insert("log", {"k": "a", "v": 1}, returning="rowid")
    assert (first, second) == (1, 2)
    assert conn.execute("SELECT rowid, k FROM log WHERE rowid = ?", [rowid]).fetchall() == [(rowid, "a")]
    assert conn.insert("things", {"name": "a"}, returning="id", ignore=True) is None  # a conflict: nothing


def test_upserts_least_greatest_total_instr(conn: Conn) -> None:
    d = conn.dialect
    ins = "INSERT INTO things (name, n) VALUES (?, ?) ON CONFLICT (name) DO NOTHING"
    assert conn.execute(ins, ["a", 5]).rowcount == 1
    assert conn.execute(ins, ["a", 6]).rowcount == 0
    # In DO UPDATE the old row's columns are named with the table's name: PostgreSQL finds a bare
    # ``n`` ambiguous (``excluded`` has one too); SQLite accepts both spellings.
    bump = (f"INSERT INTO things (name, n) VALUES (?, ?) ON CONFLICT (name) DO UPDATE"
            f" SET n = {d.least('things.n + excluded.n', '100')}, x = {d.greatest('coalesce(things.x, 0)', '2.5')}")
    conn.execute(bump, ["a", 90])
    assert conn.execute("SELECT n, x FROM things WHERE name = 'a'").fetchone() == (95, 2.5)
    conn.execute(bump, ["a", 90])
    assert conn.execute("SELECT n FROM things WHERE name = 'a'").fetchone() == (100,)  # saturated
    conn.upsert("things", {"name": "a", "n": 7}, key=["name"])
    conn.upsert("things", {"name": "b", "n": 8}, key=["name"])
    assert conn.execute("SELECT name, n FROM things ORDER BY name").fetchall() == [("a", 7), ("b", 8)]
    assert conn.update("things", {"name": "b"}, {"n": 9}) == 1
    assert conn.execute(f"SELECT {d.total('n')} FROM things WHERE name = 'nobody'").fetchone() == (0.0,)
    assert conn.execute(f"SELECT {d.total('n')} FROM things").fetchone() == (16.0,)
    assert conn.execute(f"SELECT {d.instr('?', '?')}, {d.instr('?', '?')}", ["abc", "c", "abc", "z"]).fetchone() \
        == (3, 0)


def test_bytes_round_trip_as_bytes(conn: Conn) -> None:
    blobs = [b"", b"\x00\xff\x00", bytes(range(256)) * 40]
    for i, blob in enumerate(blobs):
        conn.insert("things", {"name": str(i), "body": blob})
    got = [r["body"] for r in conn.query("SELECT body FROM things ORDER BY id")]
    assert got == blobs and all(type(b) is bytes for b in got)


def test_a_failing_savepoint_undoes_only_its_own_changes(conn: Conn) -> None:
    with conn.transaction():
        conn.insert("things", {"name": "kept"})
        with pytest.raises(StoreIntegrityError):
            with conn.savepoint():
                conn.insert("things", {"name": "undone"})
                conn.insert("things", {"name": "kept"})  # unique name: fails
        with conn.savepoint():
            conn.insert("things", {"name": "also kept"})
    assert [r[0] for r in conn.execute("SELECT name FROM things ORDER BY id")] == ["kept", "also kept"]


def test_a_failing_transaction_changes_nothing(conn: Conn) -> None:
    with pytest.raises(ZeroDivisionError):
        with conn.transaction():
            conn.insert("things", {"name": "gone"})
            1 / 0
    assert not conn.in_transaction
    assert conn.execute("SELECT count(*) FROM things").fetchone() == (0,)


def test_driver_errors_become_the_stores_own(conn: Conn) -> None:
    conn.insert("things", {"name": "a"})
    with pytest.raises(StoreIntegrityError):
        conn.insert("things", {"name": "a"})
    with pytest.raises(StoreIntegrityError):
        conn.execute("INSERT INTO things (name) VALUES (NULL)")
    with pytest.raises(StoreError) as info:
        conn.execute("SELECT nope FROM things")
    assert not isinstance(info.value, StoreIntegrityError)
    assert isinstance(StoreIntegrityError("x"), FailedPrecondition)  # unmapped, it still reaches callers as one


def test_readers_see_committed_rows(db_url: str) -> None:
    engine = open_engine(db_url)
    try:
        writer = engine.writer()
        for sql in writer.dialect.create_table("t", [Column("v", "int", True)]):
            writer.execute(sql)
        with writer.transaction():
            writer.execute("INSERT INTO t (v) VALUES (?)", [1])
        with engine.reader() as r:
            assert list(r.query("SELECT v FROM t")) == [{"v": 1}]
            with r.snapshot():
                assert r.execute("SELECT count(*) FROM t").fetchone() == (1,)
        writer.close()
    finally:
        engine.close()


def test_readers_cannot_write(db_url: str) -> None:
    engine = open_engine(db_url)
    writer = engine.writer()
    writer.execute("CREATE TABLE t (v INTEGER)")
    with engine.reader() as r, pytest.raises(StoreError):
        r.execute("INSERT INTO t VALUES (1)")
    assert writer.execute("SELECT count(*) FROM t").fetchone() == (0,)
    writer.close()
    engine.close()


def test_lock_makes_a_second_writer_wait_for_the_first_commit(postgres_url: str) -> None:
    engine = open_engine(postgres_url)
    first, second, watcher = engine.connect(), engine.connect(), engine.connect()
    first.execute("CREATE TABLE chain (n BIGINT)")
    seen: list[int] = []

    def append_after_the_lock() -> None:
        with second.transaction():
            second.lock("audit")
            seen.append(second.execute("SELECT count(*) FROM chain").fetchone()[0])

    with first.transaction():
        first.lock("audit")
        first.execute("INSERT INTO chain VALUES (1)")
        thread = threading.Thread(target=append_after_the_lock)
        thread.start()
        deadline = time.monotonic() + 60  # hang guard: wait until the second writer waits on the lock
        while watcher.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                              ).fetchone()[0] == 0:
            assert time.monotonic() < deadline, "the second writer never waited for the lock"
            time.sleep(0.01)
        assert seen == []  # still waiting
    thread.join(60)
    assert seen == [1]  # it went on only after the commit, and saw the first writer's row
    with pytest.raises(RuntimeError):
        first.lock("audit")  # outside a transaction it would hold nothing
    for c in (first, second, watcher):
        c.close()
    engine.close()


def test_bad_urls_and_unreachable_servers_are_one_line_errors(tmp_path: Path, postgres_server) -> None:
    with pytest.raises(InvalidArgument, match="not a PostgreSQL URL"):
        open_engine("postgresql://u@h/d?nonsense_option=1")
    with pytest.raises(InvalidArgument, match="unknown database URL scheme"):
        open_engine("mysql://u:secret@h/d")
    with pytest.raises(StoreUnavailable, match="cannot connect to PostgreSQL") as info:
        open_engine(f"postgresql://postgres:secret@/d?host={tmp_path}", connect_timeout=2)
    assert "\n" not in str(info.value) and "secret" not in str(info.value)
    with pytest.raises(StoreUnavailable, match="does not exist"):
        open_engine(postgres_server.url("no_such_database"))


def test_without_psycopg_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed
    with pytest.raises(FailedPrecondition, match=r"outrider\[postgres\]"):
        open_engine("postgresql://u@/d?host=/nowhere")


def test_each_test_gets_a_fresh_database(postgres_url: str) -> None:
    engine = open_engine(postgres_url)
    with engine.reader() as r:
        assert r.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
                         ).fetchone() == (0,)
    engine.close()


_SESSION = """
import sys, time
sys.path.insert(0, sys.argv[1])
import pg_support
server = pg_support.PostgresServer(pg_support.find_bindir()).start()
pid = int((server.data / "postmaster.pid").read_text().split()[0])
print(server.top, pid, flush=True)
if sys.argv[2] == "end":
    server.stop()
    print("stopped", flush=True)
else:
    time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # exited, not yet reaped


@pytest.mark.parametrize("how", ["end", "sigkill"])
def test_the_server_is_stopped_when_the_session_ends_or_dies(postgres_server, how: str) -> None:
    """The session's server goes away with it: at its end, and when the session is killed with SIGKILL."""
    proc = subprocess.Popen([sys.executable, "-c", _SESSION, str(ROOT / "tests"), how], stdout=subprocess.PIPE,
                            text=True)
    try:
        top, pid = proc.stdout.readline().split()
        assert Path(top).exists() and not _gone(int(pid))
        if how == "sigkill":
            proc.send_signal(signal.SIGKILL)
        else:
            assert proc.stdout.readline().strip() == "stopped"
        proc.wait(60)
        deadline = time.monotonic() + 60  # hang guard: the watchdog stops it
        while not (_gone(int(pid)) and not Path(top).exists()):
            assert time.monotonic() < deadline, "the server outlived its session"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sums_and_averages_come_back_as_numbers_not_decimals(conn: Conn) -> None:
    for n in (2**40, 2**40, 1):
        conn.insert("log", {"k": "a", "v": n})
    total, average, half, none = conn.execute(
        "SELECT sum(v), avg(v), sum(v) / 2.0, sum(v) FILTER (WHERE v < 0) FROM log").fetchone()
    assert (total, type(total)) == (2**41 + 1, int)
    assert (average, type(average)) == ((2**41 + 1) / 3, float)
    assert (half, type(half)) == ((2**41 + 1) / 2, float) and none is None


def test_counters_saturate_instead_of_failing(conn: Conn) -> None:
    top = 2**63 - 1
    conn.insert("things", {"name": "a", "n": top - 1})
    grow = f"UPDATE things SET n = {conn.dialect.saturating_add('n', '?')} WHERE name = 'a'"
    conn.execute(grow, [5])
    assert conn.execute("SELECT n FROM things").fetchone() == (top,)
    conn.execute(grow, [top])
    assert conn.execute("SELECT n FROM things").fetchone() == (top,)


def test_out_of_range_integers_are_value_errors(conn: Conn) -> None:
    from collector.store.engine import StoreValueError

    with pytest.raises(StoreValueError):
        conn.insert("things", {"name": "a", "n": 2**63})
    assert conn.execute("SELECT count(*) FROM things").fetchone() == (0,)
    assert isinstance(StoreValueError("x"), InvalidArgument)


def test_a_lost_connection_is_store_unavailable(postgres_url: str) -> None:
    engine = open_engine(postgres_url)
    victim, killer = engine.connect(), engine.connect()
    pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]
    killer.execute("SELECT pg_terminate_backend(?)", [pid])
    with pytest.raises(StoreUnavailable):
        victim.execute("SELECT 1")
    with engine.reader() as r:  # the pool's connections are unaffected
        assert r.execute("SELECT 1").fetchone() == (1,)
    for c in (victim, killer):
        c.close()
    engine.close()


_WITHOUT_BINARIES = """
import sys
sys.path.insert(0, sys.argv[1])
import pg_support
pg_support.find_bindir = lambda: None  # as on a machine without Debian's postgresql package
import pytest
sys.exit(pytest.main([sys.argv[2], "-k", "fresh_database", "-p", "no:cacheprovider", "-q", "-rs", "-n", "0"]))
"""


@pytest.mark.parametrize("ci", ["", "true"])
def test_without_the_server_binaries_tests_skip_saying_how_to_install_but_fail_on_ci(ci: str) -> None:
    done = subprocess.run([sys.executable, "-c", _WITHOUT_BINARIES, str(ROOT / "tests"), __file__], cwd=ROOT,
                          env={**os.environ, "CI": ci}, capture_output=True, text=True, timeout=300)
    assert "apt-get install postgresql" in done.stdout
    assert (done.returncode, "1 skipped" in done.stdout) == ((1, False) if ci else (0, True)), done.stdout


# ------------------------------------------------------------ outrider collector serve --db URL


def _serve(*args: str, prelude: str = "pass", env: dict | None = None) -> subprocess.Popen:
    """``outrider collector serve`` in a process of its own (``prelude``: Python run before the CLI)."""
    code = f"import runpy, sys; {prelude}; sys.argv = ['outrider', *sys.argv[1:]];" \
           " runpy.run_module('agent.cli', run_name='__main__')"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    environ.update(PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.Popen([sys.executable, "-c", code, "collector", "serve", "--listen", "127.0.0.1:0",
                             "--drift-interval", "0", *args], cwd=ROOT, env=environ, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _refused(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, (proc.returncode, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_serve_on_postgresql_says_which_engine_and_stores_windows(postgres_url: str) -> None:
    proc = _serve(env={"OUTRIDER_COLLECTOR_DB": postgres_url})
    try:
        line = proc.stdout.readline()  # the startup line; a hang guard only: the process is killed below
        assert line.startswith("collector listening on 127.0.0.1:"), (line, proc.poll())
        assert f"(db: PostgreSQL {postgres_url})" in line
        engine = open_engine(postgres_url)
        conn = engine.connect()
        try:
            assert conn.execute("SELECT count(*) FROM migrations").fetchone()[0] >= 12  # it migrated that database
        finally:
            conn.close()
            engine.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_serve_refuses_an_unreachable_server_a_bad_url_and_no_driver_in_one_line(tmp_path: Path) -> None:
    unreachable = _refused(_serve("--db", "postgresql://outrider:s3cret@127.0.0.1:1/fleet"))
    assert "cannot connect to PostgreSQL at 127.0.0.1" in unreachable and "--db" in unreachable
    assert "s3cret" not in unreachable and "postgresql://outrider:***@127.0.0.1:1/fleet" in unreachable
    scheme = _refused(_serve("--db", "mysql://u:pw@host/db"))
    assert "unknown database URL scheme" in scheme and "pw" not in scheme
    bad = _refused(_serve("--db", "postgresql://u@host:notaport/db"))
    assert "not a PostgreSQL URL" in bad or "cannot connect" in bad
    driverless = _refused(_serve("--db", "postgresql://u@127.0.0.1:1/db", prelude="sys.modules['psycopg'] = None"))
    assert "needs psycopg" in driverless and "pip install" in driverless
    missing_dir = _refused(_serve("--db", str(tmp_path / "nowhere" / "c.db")))
    assert "does not exist" in missing_dir


def test_the_ingest_benchmark_runs_on_a_postgresql_url(postgres_url: str) -> None:
    """benchmarks/ingest.py --db URL: a smoke test (it stores every window and says which engine)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ingest

    postgres = ingest.Postgres(postgres_url)
    result = ingest.run(120, 2, 16, 2, "FULL", None, "", postgres)
    assert (result["engine"], result["windows"]) == ("postgresql", 120)
    assert result["cpu_us_per_window"] > 0 and result["server_cpu_us_per_window"] is None  # not its server
