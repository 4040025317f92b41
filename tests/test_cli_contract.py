"""The CLI contract (docs/cli.md, "The contract"), checked for every command the parser knows.

A real collector in this process (with an auth file, and its state made over gRPC) answers
``agent.cli.main([...])``; closed pipes need a real process and go through ``python -m agent.cli``.
A new command fails ``test_every_command_is_in_the_table`` until it is given a row in ``CASES``,
and from then on every check below covers it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import grpc
import numpy as np
import pytest

from agent import examples
from agent.cli import build_parser, main
from agent.cli_reference import commands
from collector.api.server import serve_collector
from collector.base.auth import AuthConfig
from protos import collector_pb2 as pb
from protos import collector_pb2_grpc as pb_grpc
from protos import summary_pb2
from test_approvals import AUTH_TOML, MODEL, TOKENS, call, promote, reference_profile
from test_approvals import register as register_version
from test_evaluation import columns
from test_evaluation import profile as drift_profile

ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD = 60
S = 1_000_000_000
AGENT_TOKEN = "agent-token-0123456789"
AUTH = AUTH_TOML + f'[[agent]]\nname = "edge-1"\ntoken = "{AGENT_TOKEN}"\n'
CODE_NAMES = re.compile(r"\b(%s)\b" % "|".join(c.name for c in grpc.StatusCode if c.name != "OK"))


def no_constants(name: str) -> float:
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def strict_json(text: str) -> Any:
    return json.loads(text, parse_constant=no_constants)


# ------------------------------------------------------------------ running the CLI in this process


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def one_line(self) -> str:
        lines = self.err.strip().splitlines()
        assert len(lines) == 1, (self.code, self.err)
        assert "Traceback" not in self.err
        return lines[0]


def run(*args: str, token: str | None = None, collector: str | None = None) -> Ran:
    """``outrider ARGS`` through the real entry point, with no OUTRIDER_* variable but the two given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    env.update({k: v for k, v in (("OUTRIDER_TOKEN", token), ("OUTRIDER_COLLECTOR", collector)) if v})
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, env, clear=True), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse: --help, usage errors
            code = exc.code
    return Ran(code, out.getvalue(), err.getvalue())


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


# ------------------------------------------------------------------ a collector with something in it


@dataclass
class World:
    ops: pb_grpc.OpsServiceStub
    address: str
    files: dict[str, Path]
    server: Any
    made: int = 0

    def fresh(self, versions: int = 1) -> str:
        """A new model with ``versions`` registered versions (candidates)."""
        self.made += 1
        name = f"m{self.made}"
        for _ in range(versions):
            register_version(self.ops, 0.9, name=name)
        return name

    def production(self, name: str, version: int) -> pb.Approval:
        return call(self.ops, "bob", "Approve", pb.DecisionRequest(id=promote(self.ops, "alice", version, name=name).id))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("contract")
    files = {"model": tmp / "lr.onnx", "profile": tmp / "lr.pb", "drift_profile": tmp / "m.pb", "data": tmp / "ref.npz",
             "out": tmp / "out.pb"}
    files["model"].write_bytes(MODEL)
    files["profile"].write_bytes(reference_profile().SerializeToString())
    x, y = examples.tabular_data(300, seed=1)
    np.savez(files["data"], X=x, label=y)
    rng = np.random.default_rng(5)
    files["drift_profile"].write_bytes(drift_profile(rng).SerializeToString())
    server = serve_collector(tmp / "c.db", "127.0.0.1:0", auth=AuthConfig.from_toml(AUTH), drift_interval=0,
                             rollup_interval=3600)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        w = World(pb_grpc.OpsServiceStub(channel), f"127.0.0.1:{server.port}", files, server)
        # model "m": windows whose x drifted (an alert opens), one with a sampled row holding NaN and inf
        call(w.ops, "alice", "AttachProfile", pb.AttachProfileRequest(model_name="m", model_version="1",
                                                                      profile=drift_profile(rng)))
        now = time.time_ns()
        windows = [summary_pb2.WindowSummary(agent_id="edge-1", run_id="r", seq=i, model_name="m", model_version="1",
                                             start_unix_nano=now - (i + 2) * S, end_unix_nano=now - (i + 1) * S,
                                             rows=1000, calls=10, columns=columns(rng, 1000, shift=1.0))
                   for i in range(3)]
        windows[0].sample.CopyFrom(summary_pb2.RowSample(seen=1000, columns=[
            summary_pb2.RowSample.Column(name="x", numbers=[1.5, math.nan, math.inf])]))
        server.store.submit_windows(windows).result(HANG_GUARD)
        call(w.ops, "alice", "SetDriftConfig", pb.DriftConfigRequest(model_name="m", config_json='{"consecutive": 1}'))
        call(w.ops, "alice", "EvaluateDrift", pb.DriftRequest(model_name="m"))
        # model "credit": version 1 production, version 2 a candidate
        for _ in range(2):
            register_version(w.ops, 0.9, name="credit")
        w.production("credit", 1)
        yield w
    finally:
        channel.close()
        server.stop(grace=0)


# ------------------------------------------------------------------ every command, and how to run it


@dataclass
class Case:
    args: tuple[str, ...]  # with {placeholders} filled by ``setup`` (or "1" where no state is needed)
    who: str | None = "dave"  # whose token; None: the command does not talk to the collector
    lists: str = ""  # a list command: the key of its items in --json
    jsonl: bool = False  # --json writes JSON lines
    setup: Callable[[World], dict[str, str]] | None = None
    fills: dict[str, str] = field(default_factory=dict)

    def argv(self, world: World | None, fills: dict[str, str] | None = None) -> list[str]:
        values = {"model": "", "profile": "", "drift_profile": "", "data": "", "out": "", "name": "credit", "id": "1"}
        if world is not None:
            values.update({k: str(v) for k, v in world.files.items()})
        values.update(fills or {})
        return [re.sub(r"\{(\w+)\}", lambda m: values[m[1]], a) for a in self.args]


def _pending(w: World) -> dict[str, str]:
    name = w.fresh()
    return {"name": name, "id": str(promote(w.ops, "alice", 1, name=name).id)}


def _archived(w: World) -> dict[str, str]:
    name = w.fresh(2)
    w.production(name, 1)
    w.production(name, 2)
    return {"name": name}


def _staging(w: World) -> dict[str, str]:
    name = w.fresh(2)
    w.production(name, 1)
    call(w.ops, "alice", "SetStage", pb.SetStageRequest(name=name, version=2, stage="staging", reason="try"))
    return {"name": name}


def _shadowed(w: World) -> dict[str, str]:
    fills = _staging(w)
    call(w.ops, "alice", "SetShadow", pb.SetShadowRequest(model_name=fills["name"], version=2, share=0.5, reason="x"))
    return fills


def _retraining(w: World, accepted: bool = False) -> dict[str, str]:
    name = w.fresh(2)
    made = call(w.ops, "alice", "OpenRetraining", pb.OpenRetrainingRequest(model_name=name, model_version="1",
                                                                            reason="drift"))
    if accepted:
        call(w.ops, "alice", "AcceptRetraining", pb.RetrainingChange(id=made.id))
    return {"name": name, "id": str(made.id)}


def _rollout(w: World) -> dict[str, str]:
    w.production(w.fresh(), 1)
    return {"id": str(call(w.ops, "dave", "ListRollouts", pb.ListRolloutsRequest(limit=1)).rollouts[0].id)}


def _alert(w: World) -> dict[str, str]:
    alerts = call(w.ops, "dave", "ListAlerts", pb.ListAlertsRequest(model_name="m")).alerts
    return {"id": str(next(a.id for a in alerts if a.state == "open"))}


CASES: dict[str, Case] = {
    "outrider agent serve": Case(("agent", "serve", "--model", "{model}"), who=None),
    "outrider agent proxy": Case(("agent", "proxy", "--upstream", "127.0.0.1:1", "--model-name", "m"), who=None),
    "outrider collector serve": Case(("collector", "serve"), who=None),
    "outrider demo": Case(("demo",), who=None),
    "outrider health": Case(("health",), who=None),
    "outrider profile": Case(("profile", "--model", "{model}", "--data", "{data}", "--out", "{out}"), who=None),
    "outrider status": Case(("status",)),
    "outrider windows": Case(("windows", "--model", "m"), lists="windows"),
    "outrider attach": Case(("attach", "m", "1", "{drift_profile}"), who="alice"),
    "outrider drift": Case(("drift", "m", "--now"), who="alice"),
    "outrider alerts": Case(("alerts", "--all"), lists="alerts"),
    "outrider alerts ack": Case(("alerts", "ack", "{id}"), who="alice", setup=_alert),
    "outrider drift-config": Case(("drift-config", "m")),
    "outrider audit": Case(("audit",), lists="entries"),
    "outrider audit verify": Case(("audit", "verify")),
    "outrider models register": Case(("models", "register", "{name}", "--file", "{model}", "--profile", "{profile}"),
                                     who="alice"),
    "outrider models list": Case(("models", "list"), lists="versions"),
    "outrider models show": Case(("models", "show", "credit")),
    "outrider models gate": Case(("models", "gate", "credit", "1"), who="alice"),
    "outrider models stage": Case(("models", "stage", "{name}", "1", "staging", "--reason", "try"), who="alice",
                                  setup=lambda w: {"name": w.fresh()}),
    "outrider models promote": Case(("models", "promote", "{name}", "1", "--reason", "ship"), who="alice",
                                    setup=lambda w: {"name": w.fresh()}),
    "outrider models retire": Case(("models", "retire", "{name}", "1", "--reason", "old"), who="alice",
                                   setup=_archived),
    "outrider approvals list": Case(("approvals", "list", "--all"), lists="approvals"),
    "outrider approvals cancel": Case(("approvals", "cancel", "{id}", "--reason", "no"), who="alice", setup=_pending),
    "outrider approve": Case(("approve", "{id}"), who="bob", setup=_pending),
    "outrider reject": Case(("reject", "{id}", "--reason", "no"), who="bob", setup=_pending),
    "outrider retrain open": Case(("retrain", "open", "{name}", "1", "--reason", "drift"), who="alice",
                                  setup=lambda w: {"name": w.fresh()}),
    "outrider retrain list": Case(("retrain", "list", "--all"), lists="requests"),
    "outrider retrain show": Case(("retrain", "show", "{id}"), setup=_retraining),
    "outrider retrain accept": Case(("retrain", "accept", "{id}"), who="alice", setup=_retraining),
    "outrider retrain complete": Case(("retrain", "complete", "{id}", "--version", "2"), who="alice",
                                      setup=lambda w: _retraining(w, accepted=True)),
    "outrider retrain reject": Case(("retrain", "reject", "{id}", "--reason", "no"), who="alice", setup=_retraining),
    "outrider retrain cancel": Case(("retrain", "cancel", "{id}"), who="alice", setup=_retraining),
    "outrider rollback": Case(("rollback", "{name}", "--reason", "p99"), who="alice", setup=_archived),
    "outrider rollouts": Case(("rollouts",), lists="rollouts"),
    "outrider rollout show": Case(("rollout", "show", "{id}"), setup=_rollout),
    "outrider shadow start": Case(("shadow", "start", "{name}", "2", "--reason", "compare"), who="alice",
                                  setup=_staging),
    "outrider shadow stop": Case(("shadow", "stop", "{name}", "--reason", "seen"), who="alice", setup=_shadowed),
    "outrider shadow report": Case(("shadow", "report", "{name}"), setup=_shadowed),
    "outrider data export": Case(("data", "export", "m"), who="alice", jsonl=True),
}
CLIENTS = sorted(name for name, case in CASES.items() if case.who)


def parsers() -> dict[str, argparse.ArgumentParser]:
    return dict(commands(build_parser()))


def test_every_command_is_in_the_table():
    """Walk the parser: a new command must say here how to run it, so that every check covers it."""
    found = parsers()
    assert set(found) == set(CASES), f"add to CASES: {sorted(set(found) - set(CASES))}; " \
                                     f"remove: {sorted(set(CASES) - set(found))}"
    for name, parser in found.items():
        flags = {o for a in parser._actions for o in a.option_strings}
        talks = {"--collector", "--json"} <= flags  # agent serve has --collector but sends windows, not questions
        assert talks == bool(CASES[name].who), name
        assert (parser.get_default("json_list") or "") == CASES[name].lists, f"{name}: its parser declares " \
                                                                              "json_list for docs/cli.md"


# ------------------------------------------------------------------ exit 0 and strict JSON of one shape


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.who or n == "outrider profile"))
def test_json_is_strict_and_lists_have_one_shape(world: World, name: str):
    case = CASES[name]
    fills = case.setup(world) if case.setup else {}
    if name == "outrider models register":
        fills = {"name": world.fresh()}
    ran = run(*case.argv(world, fills), "--json", token=TOKENS.get(case.who or "") or None,
              collector=world.address if case.who else None)
    assert ran.code == 0, ran.err
    assert "NaN" not in ran.out and "Infinity" not in ran.out
    if case.jsonl:
        rows = [strict_json(line) for line in ran.out.splitlines()]
        assert rows and all(isinstance(r, dict) for r in rows)
        assert [r["x"] for r in rows] == [1.5, None, "inf"]  # a missing value is null, as the module says
        return
    data = strict_json(ran.out)
    assert isinstance(data, dict), f"{name} --json must print one object, not {type(data).__name__}"
    if case.lists:
        assert set(data) == {case.lists, "next_page_token"} and isinstance(data[case.lists], list), data.keys()
        assert data[case.lists], f"{name}: the world should have something to list"
        assert data["next_page_token"] == ""  # everything was listed
    else:
        assert "next_page_token" not in data


def test_drift_json_says_null_where_a_number_is_missing(world: World):
    """Before the contract `drift --json` printed bare NaN (no labels: no accuracy), which no JSON parser takes."""
    data = strict_json(run("drift", "m", "--json", token=TOKENS["dave"], collector=world.address).out)
    latest = data["latest"][0]
    assert latest["accuracy"] is None and latest["mae"] is None
    assert any(c["drifted"] for c in latest["columns"])


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.who and not c.setup))
def test_tables_exit_0(world: World, name: str):
    case = CASES[name]
    ran = run(*case.argv(world, {"name": world.fresh()} if "{name}" in case.args else {}),
              token=TOKENS[case.who], collector=world.address)
    assert ran.code == 0 and ran.out.strip(), ran.err


# ------------------------------------------------------------------ exit 1, 2, 3: one line each


@pytest.mark.parametrize("name", CLIENTS)
def test_a_refusal_exits_1_in_words(world: World, name: str):
    """An agent's token may not ask operators' questions: the collector refuses every command alike."""
    ran = run(*CASES[name].argv(world), token=AGENT_TOKEN, collector=world.address)
    line = ran.one_line()
    assert ran.code == 1, (ran.code, ran.err)
    assert "refused" in line and "needs an operator token" in line
    assert not CODE_NAMES.search(line), line


@pytest.mark.parametrize("args, who, says", [
    (("models", "show", "nope"), "dave", "is not registered"),  # NOT_FOUND
    (("models", "promote", "credit", "1", "--reason", "again"), "alice", "production"),  # FAILED_PRECONDITION
    (("drift-config", "m", "--set", '{"q": 7}'), "alice", "q"),  # INVALID_ARGUMENT, from the collector
    (("models", "register", "credit", "--file", "{model}"), "dave", "has role viewer"),  # PERMISSION_DENIED
    (("approve", "999"), "bob", "there is no approval 999"),
])
def test_the_collectors_refusals_exit_1_in_words(world: World, args, who, says):
    ran = run(*Case(args).argv(world), token=TOKENS[who], collector=world.address)
    line = ran.one_line()
    assert ran.code == 1 and says in line, (ran.code, line)
    assert not CODE_NAMES.search(line), line


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_flags_exit_2(world: World, name: str):
    ran = run(*CASES[name].argv(world), "--no-such-flag")
    assert ran.code == 2 and "unrecognized arguments: --no-such-flag" in ran.one_line()


@pytest.mark.parametrize("name", CLIENTS)
def test_bad_local_input_exits_2(world: World, name: str):
    bad_address = run(*CASES[name].argv(world), collector="nowhere")
    assert bad_address.code == 2 and "is not HOST:PORT" in bad_address.one_line()
    unreadable = run(*CASES[name].argv(world), "--tls-ca", str(world.files["data"].parent / "missing.pem"),
                     collector=world.address, token=TOKENS["dave"])
    assert unreadable.code == 2 and "cannot read --tls-ca" in unreadable.one_line()
    unsendable = run(*CASES[name].argv(world), collector=world.address, token="two words")
    assert unsendable.code == 2 and "--token" in unsendable.one_line()


@pytest.mark.parametrize("name", CLIENTS)
def test_an_unreachable_collector_exits_3_naming_the_flag(world: World, name: str):
    ran = run(*CASES[name].argv(world), token=TOKENS["dave"], collector=free_address())
    line = ran.one_line()
    assert ran.code == 3 and "cannot reach the collector" in line and "--collector (OUTRIDER_COLLECTOR)" in line
    assert not CODE_NAMES.search(line), line


@pytest.mark.parametrize("name", CLIENTS)
def test_no_valid_token_exits_3_naming_the_flag(world: World, name: str):
    for token in (None, "not-a-token-0123456789"):
        ran = run(*CASES[name].argv(world), token=token, collector=world.address)
        line = ran.one_line()
        assert ran.code == 3 and "--token (or set OUTRIDER_TOKEN)" in line, (ran.code, line)
        assert not CODE_NAMES.search(line), line


# ------------------------------------------------------------------ closed pipes


def outrider(*args: str, **env: str) -> subprocess.Popen:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    return subprocess.Popen([sys.executable, "-m", "agent.cli", *args], cwd=ROOT,
                            env={**clean, "PYTHONPATH": str(ROOT), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("args", [("audit", "--json"), ("audit",), ("status",), ("data", "export", "m", "--json"),
                                  ("--help",)])
def test_a_closed_pipe_ends_quietly(world: World, args):
    """The reader is gone before the command writes (the end of `| head -1`, made certain)."""
    proc = outrider(*args, OUTRIDER_COLLECTOR=world.address, OUTRIDER_TOKEN=TOKENS["alice"])
    proc.stdout.close()
    try:
        stderr = proc.stderr.read().decode()
        code = proc.wait(HANG_GUARD)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 141, (code, stderr)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr and "Exception ignored" not in stderr, stderr


def test_head_of_a_listing_in_a_shell(world: World):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}, "PYTHONPATH": str(ROOT),
           "OUTRIDER_COLLECTOR": world.address, "OUTRIDER_TOKEN": TOKENS["dave"]}
    shell = subprocess.run(["sh", "-c", f"'{sys.executable}' -m agent.cli audit --json --limit 1000 | head -1"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD)
    assert shell.stdout == "{\n" and shell.stderr == "", shell.stderr


# ------------------------------------------------------------------ pages


class PagingOps(pb_grpc.OpsServiceServicer):
    """An OpsService that answers each List call with ``total`` items, ``page`` at a time (the real
    collector pages by bytes; here a page token is the offset). Every request is recorded."""

    def __init__(self, total: int, page: int, stuck: bool = False) -> None:
        self.total, self.page, self.stuck = total, page, stuck
        self.requests: list[Any] = []


LISTS = {"ListWindows": ("windows", "seq"), "ListAudit": ("entries", "id"), "ListAlerts": ("alerts", "id"),
         "ListModels": ("versions", "version"), "ListApprovals": ("approvals", "id"),
         "ListRetraining": ("requests", "id"), "ListRollouts": ("rollouts", "id")}


def _lister(method: str) -> Callable[..., Any]:
    key, number = LISTS[method]

    def handle(self: PagingOps, request: Any, context: grpc.ServicerContext) -> Any:
        self.requests.append(request)
        start = 0 if self.stuck else int(request.page_token or 0)
        size = min(self.page, getattr(request, "limit", 0) or self.page)
        end = min(start + size, self.total)
        reply = getattr(pb, f"{method}Response")()
        for i in range(start, end):
            getattr(reply, key).add(**{number: i + 1})
        reply.next_page_token = "again" if self.stuck else (str(end) if end < self.total else "")
        return reply

    return handle


for _method in LISTS:
    setattr(PagingOps, _method, _lister(_method))


@contextlib.contextmanager
def paging(total: int, page: int, stuck: bool = False) -> Iterator[tuple[PagingOps, str]]:
    ops = PagingOps(total, page, stuck)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_OpsServiceServicer_to_server(ops, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield ops, f"127.0.0.1:{port}"
    finally:
        server.stop(0)


LIST_COMMANDS = sorted(name for name, case in CASES.items() if case.lists)


@pytest.mark.parametrize("name", LIST_COMMANDS)
def test_list_commands_follow_every_page(name: str):
    case = CASES[name]
    with paging(total=23, page=5) as (ops, address):
        ran = run(*case.argv(None), "--json", "--limit", "1000", collector=address) if "--limit" in _flags(name) \
            else run(*case.argv(None), "--json", collector=address)
    assert ran.code == 0, ran.err
    data = strict_json(ran.out)
    key, number = next(v for v in LISTS.values() if v[0] == case.lists)
    assert [item[number] for item in data[key]] == list(range(1, 24)) and data["next_page_token"] == ""
    assert [r.page_token for r in ops.requests] == ["", "5", "10", "15", "20"]


def _flags(name: str) -> set[str]:
    return {o for a in parsers()[name]._actions for o in a.option_strings}


@pytest.mark.parametrize("name", [n for n in LIST_COMMANDS if "--limit" in _flags(n)])
def test_limit_stops_the_pages_and_page_token_goes_on(name: str):
    case = CASES[name]
    key, number = next(v for v in LISTS.values() if v[0] == case.lists)
    with paging(total=23, page=5) as (ops, address):
        first = strict_json(run(*case.argv(None), "--json", "--limit", "12", collector=address).out)
        assert [r.limit for r in ops.requests] == [12, 7, 2]  # never more than is still wanted
        assert [item[number] for item in first[key]] == list(range(1, 13)) and first["next_page_token"] == "12"
        rest = strict_json(run(*case.argv(None), "--json", "--page-token", first["next_page_token"], "--limit", "100",
                               collector=address).out)
        assert [item[number] for item in rest[key]] == list(range(13, 24)) and rest["next_page_token"] == ""
        table = run(*case.argv(None), "--limit", "3", collector=address)
    assert table.code == 0 and "--page-token 3" in table.one_line()  # where to go on, on stderr


def test_a_collector_that_repeats_its_page_token_is_refused_not_followed_for_ever():
    with paging(total=10, page=2, stuck=True) as (ops, address):
        ran = run("models", "list", collector=address)
    assert ran.code == 1 and "twice" in ran.one_line() and len(ops.requests) == 2


def test_a_limit_beyond_one_page_of_the_real_collector_is_asked_for_in_pages(world: World):
    """The collector allows 10,000 windows or entries (1,000 rollouts) per call; --limit may be more."""
    from collector.api import server
    from collector.cli import cli, rollout_cli
    from collector.lifecycle import rollout

    assert (cli.PAGE_LIMIT, rollout_cli.PAGE_LIMIT) == (server.MAX_LIST_LIMIT, rollout.MAX_LIST_LIMIT)
    for args in (("audit", "--limit", "20000"), ("rollouts", "--limit", "5000"), ("windows", "--model", "m",
                                                                                   "--limit", "20000")):
        ran = run(*args, "--json", token=TOKENS["dave"], collector=world.address)
        assert ran.code == 0, ran.err


# ------------------------------------------------------------------ one person, no auth file


def test_without_an_auth_file_approve_says_how_to_get_a_second_person(world: World, tmp_path: Path):
    server = serve_collector(tmp_path / "c.db", "127.0.0.1:0", drift_interval=0, rollup_interval=3600)
    address = f"127.0.0.1:{server.port}"
    try:
        registered = run("models", "register", "solo", "--file", str(world.files["model"]), "--profile",
                         str(world.files["profile"]), collector=address)
        assert registered.code == 0, registered.err
        requested = run("models", "promote", "solo", "1", "--reason", "ship", "--json", collector=address)
        approval = strict_json(requested.out)["id"]
        ran = run("approve", str(approval), collector=address)
    finally:
        server.stop(grace=0)
    line = ran.one_line()
    assert ran.code == 1 and "cannot approve their own request" in line
    for words in ("'local'", "--auth-file", "two operator tokens", "role approver", "--token", "docs/governance.md"):
        assert words in line, words
    section = re.search(r"'([^']+)'\)$", line)[1]
    assert f"## {section}\n" in (ROOT / "docs" / "governance.md").read_text(encoding="utf-8")
