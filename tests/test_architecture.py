"""The collector's rooms and the arrows between them (docs/architecture.md), read from the source with ``ast``.

Every import counts: at the top of a module, inside a function, under ``if TYPE_CHECKING:``. A room
that needs something from a room above it takes it as a Protocol or a callable that the room above
passes in; it never imports upward, not even for a type.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Which rooms each room of collector/ may import (besides itself, agent and protos). "collector" is the
# package's own __init__. The arrows: api / cli / web -> lifecycle / monitoring -> store -> base;
# monitoring may use lifecycle (the evaluation loop opens rollbacks), never the reverse; the gRPC
# server starts the web page (api -> web); the CLI starts the server (cli -> api).
ALLOWED: dict[str, set[str]] = {
    "collector": set(),
    "base": set(),
    "store": {"base"},
    "lifecycle": {"store", "base"},
    "monitoring": {"lifecycle", "store", "base"},
    "web": {"monitoring", "lifecycle", "store", "base"},
    "api": {"web", "monitoring", "lifecycle", "store", "base"},
    "cli": {"api", "web", "monitoring", "lifecycle", "store", "base"},
}

# agent/ never imports collector/ (the collector may import the agent's shared pieces), except:
AGENT_EXCEPTIONS: dict[str, str] = {
    "agent.cli_reference": "the docs generator writes docs/cli.md for the whole CLI, collector commands and "
                           "the collector's RPC outcome table (collector.cli.cli.RPC_OUTCOMES) included",
}


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file of every module of ``package`` under ``root`` (packages by their __init__)."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> dict[str, int]:
    """The modules in ``known`` that ``name`` imports anywhere in its file -> the line of the first import."""
    is_package = path.name == "__init__.py"
    out: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        while target and target not in known:  # `import collector.x.y` of a name inside a module
            target = target.rpartition(".")[0]
        if target and target != name:
            out.setdefault(target, line)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                here = here[:len(here) - node.level + 1]
                base = ".".join(here + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in known else base, node.lineno)
    return out


def graph(root: Path, package: str, known: set[str] | None = None) -> dict[str, dict[str, int]]:
    mods = modules(root, package)
    known = set(mods) | (known or set())
    return {name: imports(name, path, known) for name, path in mods.items()}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def upward_imports(root: Path) -> list[str]:
    edges = graph(root, "collector")
    wrong = []
    for source, targets in sorted(edges.items()):
        mine = room(source)
        if mine not in ALLOWED:
            rooms = sorted(set(ALLOWED) - {"collector"})
            wrong.append(f"{source} is in no room: put it in one of {rooms} (docs/architecture.md)")
            continue
        for target, line in sorted(targets.items()):
            theirs = room(target)
            if theirs != mine and theirs not in ALLOWED[mine]:
                wrong.append(f"{source} (line {line}) imports {target}: room {mine} may import only "
                             f"{sorted(ALLOWED[mine]) or 'agent and protos'}")
    return wrong


def find_cycle(edges: dict[str, dict[str, int]]) -> list[str]:
    """One import cycle among ``edges`` as [a, b, ..., a]; [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def agent_imports_of_collector(root: Path) -> list[str]:
    collector = set(modules(root, "collector"))
    wrong = []
    for source, targets in sorted(graph(root, "agent", collector).items()):
        if source in AGENT_EXCEPTIONS:
            continue
        wrong += [f"{source} (line {line}) imports {target}: the agent never imports the collector; move what "
                  "both use to the agent side" for target, line in sorted(targets.items()) if target in collector]
    return wrong


# Rooms whose modules hold no SQL: they call the store room's functions (docs/architecture.md).
NO_SQL_ROOMS = ("lifecycle", "monitoring", "api", "web")
_SQL_WORDS = ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "SAVEPOINT", "ROLLBACK", "RELEASE", "CREATE", "DROP")
_CONN_METHODS = ("execute", "executemany", "query", "upsert")  # Conn's statements (insert/update: by table name)


def sql_outside_store(root: Path, rooms: tuple[str, ...] = NO_SQL_ROOMS) -> list[str]:
    """Where a module of ``rooms`` holds SQL text (a string starting with an SQL keyword, f-strings
    included) or runs a statement itself (``x.execute(...)``, ``.query``, ``.upsert``, or ``.insert`` /
    ``.update`` given a table name)."""
    wrong = []
    for name, path in modules(root, "collector").items():
        if room(name) not in rooms:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                words = node.value.split(None, 1)
                if words and words[0].upper() in _SQL_WORDS and words[0].isupper():
                    wrong.append(f"{name} (line {node.lineno}) holds SQL {node.value[:40]!r}: move it into a "
                                 "function of collector/store/")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                table_call = (node.func.attr in ("insert", "update") and node.args
                              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))
                if node.func.attr in _CONN_METHODS or table_call:
                    wrong.append(f"{name} (line {node.lineno}) runs a statement (.{node.func.attr}): call a "
                                 "function of collector/store/ instead")
    return wrong


def test_rooms_above_the_store_hold_no_sql() -> None:
    wrong = sql_outside_store(ROOT)
    assert not wrong, "\n".join(wrong)


def test_the_sql_check_finds_sql(tmp_path: Path) -> None:
    """Plain and f-string SQL, and statements run on a connection, in a lifecycle module are found."""
    (tmp_path / "collector/lifecycle").mkdir(parents=True)
    (tmp_path / "collector/__init__.py").write_text("")
    (tmp_path / "collector/lifecycle/__init__.py").write_text("")
    (tmp_path / "collector/lifecycle/a.py").write_text(
        "def f(db, t):\n"
        "    db.execute(\"SELECT 1\")\n"
        "    x = f\"DELETE FROM {t}\"\n"
        "    db.insert(\"agents\", {})\n"
        "    return 'Selected versions', {}.update(a=1)\n")
    wrong = sql_outside_store(tmp_path, ("lifecycle",))
    assert sorted(w.split(")")[0] for w in wrong) == ["collector.lifecycle.a (line 2"] * 2 + [
        "collector.lifecycle.a (line 3", "collector.lifecycle.a (line 4"], wrong


def test_rooms_import_only_downward() -> None:
    wrong = upward_imports(ROOT)
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_among_collector_modules() -> None:
    cycle = find_cycle(graph(ROOT, "collector"))
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_agent_never_imports_collector() -> None:
    wrong = agent_imports_of_collector(ROOT)
    assert not wrong, "\n".join(wrong)
    assert set(AGENT_EXCEPTIONS) <= set(modules(ROOT, "agent")), "an exception names a module that is gone"


def test_the_checks_see_every_kind_of_import(tmp_path: Path) -> None:
    """An upward import hidden in a function or under TYPE_CHECKING, and a cycle through one, are found."""
    files = {
        "collector/__init__.py": "",
        "collector/store/__init__.py": "",
        "collector/store/a.py": "def f():\n    from collector.lifecycle import b\n",
        "collector/lifecycle/__init__.py": "",
        "collector/lifecycle/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                    "    from collector.store.a import f\n",
        "collector/loose.py": "",
        "agent/__init__.py": "",
        "agent/x.py": "import collector.store.a\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    wrong = upward_imports(tmp_path)
    assert any(w.startswith("collector.store.a (line 2) imports collector.lifecycle.b") for w in wrong), wrong
    assert any(w.startswith("collector.loose is in no room") for w in wrong), wrong
    assert find_cycle(graph(tmp_path, "collector")) == ["collector.lifecycle.b", "collector.store.a",
                                                        "collector.lifecycle.b"]
    assert agent_imports_of_collector(tmp_path) == [
        "agent.x (line 1) imports collector.store.a: the agent never imports the collector; move what both use "
        "to the agent side"]
