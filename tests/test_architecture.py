"""The collector's rooms and the arrows between them (docs/architecture.md), read from the source with ``ast``.

Every import counts: at the top of a module, inside a function, under ``if TYPE_CHECKING:``. A room
that needs something from a room above it takes it as a Protocol or a callable that the room above
passes in; it never imports upward, not even for a type.
"""
from __future__ import annotations

import ast
import re
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

# SQL lives in collector/store/ (issue 14): these rooms call the store's functions and hold no SQL text.
SQL_FREE_ROOMS = ["monitoring", "api", "web"]
SQL_START = re.compile(r"\s*(SELECT|INSERT|UPDATE|DELETE|WITH)\s")  # upper case: prose ("Update the...") is not SQL

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


def sql_texts(root: Path, rooms: list[str]) -> list[str]:
    """Every string constant (f-strings' text included) in the modules of ``rooms`` that starts like an
    SQL statement, as "module (line n): text"."""
    found = []
    for name, path in modules(root, "collector").items():
        if room(name) not in rooms:
            continue
        lines = {}  # an f-string's text is walked as its own constant too: one report per line
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL_START.match(node.value):
                lines.setdefault(node.lineno, node.value.strip()[:60])
        found += [f"{name} (line {n}): {text!r}: move it to a function in collector/store/"
                  for n, text in sorted(lines.items())]
    return found


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


def test_sql_lives_in_the_store() -> None:
    wrong = sql_texts(ROOT, SQL_FREE_ROOMS)
    assert not wrong, "\n".join(wrong)


def test_the_sql_check_sees_strings_and_f_strings(tmp_path: Path) -> None:
    (tmp_path / "collector/web").mkdir(parents=True)
    (tmp_path / "collector/store").mkdir(parents=True)
    (tmp_path / "collector/web/a.py").write_text(
        '"""Update the page: SELECTs only."""\nQ = "SELECT 1"\n\n\ndef f(t):\n    return f"DELETE FROM {t}"\n'
        'U = ("UPDATE x"\n     " SET y = 1")\nOK = "selected: none"\n')
    (tmp_path / "collector/store/b.py").write_text('Q = "SELECT 1"\n')
    assert [w.split(":")[0] for w in sql_texts(tmp_path, ["web"])] == [
        "collector.web.a (line 2)", "collector.web.a (line 6)", "collector.web.a (line 7)"]


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
