"""The operators' ``outrider status`` / ``windows`` / ``attach``, and what every operators' command module
shares (flags, asking, errors); ``outrider collector serve`` is ``collector.cli.serve_cli``.

The query commands talk only to the collector's OpsService over gRPC (never
to its database), so they work from any machine the collector lets in.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from agent.cli import add_flag, client_credentials, collector_address, first_line, pem_path, positive
from agent.cli_contract import CommandError, Refused, Unreachable, UsageError, print_json, say
from collector.cli.cli_format import age, iso, listing, plain, rollout_state, table  # noqa: F401  (other command modules import them from here)

DEFAULT_COLLECTOR = "127.0.0.1:50051"
CALL_TIMEOUT = 30.0
PAGE_LIMIT = 10_000  # the most items the collector gives per List call (collector.api.server.MAX_LIST_LIMIT)
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SENDABLE_TOKEN = re.compile(r"^[\x21-\x7e]*$")  # what an HTTP/2 header value may carry


COLLECTOR_ENV = "OUTRIDER_COLLECTOR_"  # environment prefix of `outrider collector serve`'s flags


def register(subparsers: argparse._SubParsersAction) -> None:
    status = subparsers.add_parser(
        "status", help="show agents, model versions and collector counters",
        description="Show the agents the collector knows, totals per model version, and its counters.")
    _client_flags(status)
    status.set_defaults(func=status_command)

    windows = subparsers.add_parser(
        "windows", help="list a model's stored windows, newest first",
        description="List a model's stored windows (raw and rolled up), newest first.")
    # No OUTRIDER_MODEL here: that variable is `agent serve`'s model file.
    windows.add_argument("--model", required=True, metavar="NAME", help="model name")
    add_flag(windows, "--version", metavar="V", help="model version (default: all versions)")
    add_flag(windows, "--since", type=since_time, metavar="WHEN",
             help="windows ending at or after WHEN: a duration back from now (30m, 1h, 2d) "
                  "or a time (2026-11-26T10:00:00Z; UTC when no zone is given)")
    windows.add_argument("--performance", action="store_true",
                         help="also show each window's realised performance (labels joined by the agents)")
    add_paging(windows, 100, "windows")
    _client_flags(windows)
    windows.set_defaults(func=windows_command, json_list="windows")

    attach = subparsers.add_parser(
        "attach", help="attach a reference profile to a model version",
        description="Attach a reference profile (made with 'outrider profile') to a model version: drift of "
                    "that version's traffic is measured against it. Replaces the version's previous profile.")
    attach.add_argument("model_name", metavar="MODEL_NAME", help="model name, as the agents report it")
    attach.add_argument("model_version", metavar="MODEL_VERSION", help="model version, as the agents report it")
    attach.add_argument("profile", metavar="PROFILE.pb", help="the file 'outrider profile --out' wrote")
    _client_flags(attach)
    attach.set_defaults(func=attach_command)


def _client_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--collector", default=DEFAULT_COLLECTOR, type=collector_address, metavar="HOST:PORT",
             help="the collector to ask")
    add_flag(parser, "--token", metavar="TOKEN", secret=True, help="operator token, when the collector has an auth file")
    add_flag(parser, "--tls-ca", metavar="PEM", help="connect with TLS, trusting this CA's certificates")
    add_flag(parser, "--tls-client-cert", metavar="PEM", help="this client's certificate, for a collector "
             "that requires one (mutual TLS)")
    add_flag(parser, "--tls-client-key", metavar="PEM", help="the private key of --tls-client-cert")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


# ------------------------------------------------------------------ argument types


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def since_time(text: str) -> int:
    """A duration back from now (``30m``) or an ISO time, as Unix nanoseconds."""
    match = _DURATION.match(text.strip())
    if match:
        return time.time_ns() - int(float(match[1]) * _UNIT_SECONDS[match[2]] * 1e9)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (30m, 1h, 2d) nor a time (2026-11-26T10:00:00Z)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000


# ------------------------------------------------------------------ the operators' commands


def status_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    reply = _ask(args, "Status", pb.StatusRequest())
    if args.json:
        print_json(plain(reply))
        return 0
    now = time.time_ns()
    fleet = len(reply.collectors) > 1  # several collectors share the database: say which holds each stream
    if reply.agents:
        # MODEL: the version served; WANTS: what the collector asked a managed agent to serve
        print(table(["AGENT", "RUN", "HOST", "MODEL", "WANTS", "ROLLOUT", "SHADOW", "CONNECTED", "LAST WINDOW",
                     "WINDOWS", "ROWS", "DROPPED", "SPOOL", "RESTARTS"] + ["COLLECTOR"] * fleet,
                    [[a.agent_id, a.run_id[:8], a.host or "-", f"{a.model_name}@{a.model_version or '-'}",
                      (a.desired_version or "none") if a.managed else "-", rollout_state(a),
                      f"{a.shadow_version} ({a.shadow_share:.0%})" if a.shadow_version else "-",
                      "yes" if a.connected else "no", age(a.last_window_end_unix_nano, now), a.windows, a.rows,
                      a.dropped_rows + a.spool.dropped_rows, a.spool.windows, a.restarts]
                     + [a.collector_id or "-"] * fleet for a in reply.agents]))
        for a in reply.agents:
            if a.model_error:
                print(f"  {a.agent_id} run {a.run_id[:8]}: the last command failed, it serves "
                      f"{a.model_version or 'nothing'}: {a.model_error}")
    else:
        print("no agents have connected yet")
    print()
    if reply.models:
        print(table(["MODEL", "VERSION", "WINDOWS", "ROWS", "DROPPED", "ERRORS", "LAST WINDOW"],
                    [[m.model_name, m.model_version or "-", m.windows, m.rows, m.dropped_rows, m.errors,
                      age(m.last_window_end_unix_nano, now)] for m in reply.models]))
    else:
        print("no windows stored yet")
    print()
    if fleet:
        held = {lease.holder: lease.name for lease in reply.leases if lease.live}
        print(table(["COLLECTOR", "ADDRESS", "STATE", "HEARTBEAT", "STARTED", "LEASE"],
                    [[m.collector_id + (" (this one)" if m.collector_id == reply.collector_id else ""), m.address,
                      "live" if m.live else "stopped" if m.stopped else "silent", age(m.heartbeat_unix_nano, now),
                      age(m.started_unix_nano, now), held.get(m.collector_id, "-")] for m in reply.collectors]))
        print()
    c = reply.counters
    print(f"collector {reply.collector_id} {reply.collector_version}: windows stored {c.windows_stored}, "
          f"duplicate {c.windows_duplicate}, rejected {c.windows_rejected}; auth failures {c.auth_failures}; "
          f"write queue {c.write_queue_depth} (counters of this collector since it started)")
    return 0


def windows_command(args: argparse.Namespace) -> int:
    from protos import collector_pb2 as pb

    request = pb.ListWindowsRequest(model_name=args.model, model_version=args.version or "",
                                    since_unix_nano=args.since or 0, include_summaries=args.performance)
    page = _ask_pages(args, "ListWindows", request, "windows", limit=args.limit, page_limit=PAGE_LIMIT)
    if args.json:
        print_json(listing("windows", [plain(w) for w in page.items], page.next_page_token))
        return 0
    if not page.items:
        print(f"no windows of model {args.model!r}" + (f" version {args.version!r}" if args.version else "")
              + (" in that time" if args.since else ""))
        return 0
    header = ["END", "AGENT", "SEQ", "LEVEL", "ROWS", "CALLS", "DROPPED", "ERRORS"]
    rows = [[iso(w.end_unix_nano), w.agent_id or "-", w.seq if w.level == "raw" else "-", w.level, w.rows,
             w.calls, w.dropped_rows, w.errors] for w in page.items]
    if args.performance:  # realised performance of the labels that arrived in each window
        from collector.monitoring.evaluation import accuracy, mae

        header += ["LABELED", "ACCURACY", "MAE"]
        for row, w in zip(rows, page.items):
            perf = w.summary.performance
            row += [perf.labeled] + [f"{v:.3f}" if v == v else "-" for v in (accuracy(perf), mae(perf))]
    print(table(header, rows))
    print_page(args, page, len(rows))
    return 0


def attach_command(args: argparse.Namespace) -> int:
    from google.protobuf.message import DecodeError

    from protos import collector_pb2 as pb
    from protos import summary_pb2

    path = Path(args.profile)
    try:
        profile = summary_pb2.ReferenceProfile.FromString(path.read_bytes())
    except OSError as exc:
        raise UsageError(f"cannot read profile {path}: {exc.strerror or exc}; make one with 'outrider profile'") from None
    except DecodeError:
        raise UsageError(f"{path} is not a reference profile; make one with 'outrider profile --out {path.name}'") from None
    if not profile.columns:
        raise UsageError(f"{path} is not a reference profile (it has no columns); make one with 'outrider profile'")
    request = pb.AttachProfileRequest(model_name=args.model_name, model_version=args.model_version, profile=profile)
    reply = _ask(args, "AttachProfile", request)
    for warning in reply.warnings:  # what the collector could not check (stderr: stdout stays the result)
        say("outrider: warning: " + "".join(c if c.isprintable() else "?" for c in warning))
    if args.json:
        print_json({**plain(reply), "rows": profile.rows, "data_sha256": profile.data_sha256,
                    "data_name": profile.data_name})
        return 0
    print(f"attached profile {path.name} to {reply.model_name} version {reply.model_version}: {reply.columns} "
          f"columns, {profile.rows} rows of {profile.data_name or 'data'} (sha256 {profile.data_sha256[:16]}...)"
          + ("; replaced the previous profile" if reply.replaced else ""))
    return 0


# ------------------------------------------------------------------ asking the collector

# Every gRPC status the collector can answer with -> the exit code and how the line reads: the one
# place where codes become words (``{where}``: the collector at --collector; ``{details}``: its message).
_UNREACHABLE = ("cannot reach {where} ({details}); start it with 'outrider collector serve', point --collector "
                "(OUTRIDER_COLLECTOR) at it, and pass --tls-ca if it serves TLS")
_REFUSED = "{where} refused: {details}"
_FAILED = "{where} failed: {details}; its log says more"
RPC_OUTCOMES: dict[str, tuple[type[CommandError], str]] = {
    "UNAVAILABLE": (Unreachable, _UNREACHABLE),
    "DEADLINE_EXCEEDED": (Unreachable, "{where} did not answer within {timeout:.0f} s; check --collector "
                                       "(OUTRIDER_COLLECTOR) and that the collector is not stopped"),
    "UNAUTHENTICATED": (Unreachable, "{where} wants a valid operator token ({details}); pass --token "
                                     "(or set OUTRIDER_TOKEN) with one from its auth file"),
    "PERMISSION_DENIED": (Refused, _REFUSED),
    "INVALID_ARGUMENT": (Refused, _REFUSED),
    "NOT_FOUND": (Refused, _REFUSED),
    "ALREADY_EXISTS": (Refused, _REFUSED),
    "FAILED_PRECONDITION": (Refused, _REFUSED),
    "OUT_OF_RANGE": (Refused, _REFUSED),
    "ABORTED": (Refused, "{where} gave up on the request ({details}); try again"),
    "RESOURCE_EXHAUSTED": (Refused, "{where} cannot take this now ({details}); try again later, or ask for less"),
    "UNIMPLEMENTED": (Refused, "{where} does not know this request ({details}); is it an older outrider than this "
                               "CLI?"),
    "CANCELLED": (Refused, "{where} cancelled the request ({details}); try again"),
}
_DEFAULT_OUTCOME = (Refused, _FAILED)  # INTERNAL, UNKNOWN, DATA_LOSS: the collector's own trouble
_CODE_NAME = re.compile(r"\b(?:%s):\s*" % "|".join(list(RPC_OUTCOMES) + ["INTERNAL", "UNKNOWN", "DATA_LOSS"]))
MAX_DETAILS_CHARS = 500  # a message echoing a huge argument must stay one readable line


def rpc_failure(args: argparse.Namespace, exc: Any, timeout: float = CALL_TIMEOUT) -> CommandError:
    """The CLI's error for a failed call (a ``grpc.RpcError``): its exit code and a sentence without code names."""
    code = exc.code()
    kind, template = RPC_OUTCOMES.get(getattr(code, "name", ""), _DEFAULT_OUTCOME)
    # gRPC's own details name codes too ("last error: UNKNOWN: ipv4:...: Connection refused")
    details = _CODE_NAME.sub("", first_line(exc.details() or "")) or "no details"
    if len(details) > MAX_DETAILS_CHARS:
        details = details[:MAX_DETAILS_CHARS] + "…"
    details = "".join(c if c.isprintable() else "?" for c in details)  # it goes to a terminal
    return kind(template.format(where=f"the collector at {args.collector}", details=details, timeout=timeout))


@contextlib.contextmanager
def connect(args: argparse.Namespace, options: Sequence[tuple[str, Any]] = ()) -> Iterator[Any]:
    """A channel to --collector with the command's TLS flags; bad local TLS files or a token that
    cannot be sent are the caller's to fix (UsageError)."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC's own log lines would break the one-line errors
    import grpc

    cert, key = args.tls_client_cert, args.tls_client_key
    if bool(cert) != bool(key):
        raise UsageError("--tls-client-cert and --tls-client-key go together: pass both PEM files")
    if args.token is not None and not _SENDABLE_TOKEN.match(args.token):
        raise UsageError("--token (OUTRIDER_TOKEN) must be printable ASCII without spaces; copy it again from the "
                         "collector's auth file")
    if args.tls_ca or cert:
        for flag, value in (("--tls-ca", args.tls_ca), ("--tls-client-cert", cert), ("--tls-client-key", key)):
            pem_path(flag, value)
        channel = grpc.secure_channel(args.collector, client_credentials(args.tls_ca, cert, key), list(options))
    else:
        channel = grpc.insecure_channel(args.collector, list(options))
    with channel:
        yield channel


def metadata(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {args.token}")] if args.token else []


def _ask(args: argparse.Namespace, method: str, request: Any, channel: Any = None) -> Any:
    """Call OpsService ``method`` and return its reply; every failure raises the contract's error
    (``rpc_failure``). Every operators' command asks through here (or ``_ask_pages``)."""
    import grpc

    from protos import collector_pb2_grpc as pb_grpc

    if channel is None:
        with connect(args) as opened:
            return _ask(args, method, request, opened)
    try:
        return getattr(pb_grpc.OpsServiceStub(channel), method)(request, metadata=metadata(args),
                                                                timeout=CALL_TIMEOUT)
    except grpc.RpcError as exc:
        raise rpc_failure(args, exc) from None


class Page(NamedTuple):
    items: list[Any]
    next_page_token: str  # "" when the list is complete; else where --page-token goes on


def _ask_pages(args: argparse.Namespace, method: str, request: Any, field: str, limit: int | None = None,
               page_limit: int = 0) -> Page:
    """Every item of list method ``method`` (the reply's repeated ``field``), following
    ``next_page_token`` until the collector says there is no more or ``limit`` items are in.
    ``page_limit``: the most the method gives per call (its request's ``limit``), for methods that
    have one. Starts at --page-token when the command has it."""
    items: list[Any] = []
    token = getattr(args, "page_token", None) or ""
    seen = {token}
    with connect(args) as channel:
        while True:
            if limit is not None:
                request.limit = min(limit - len(items), page_limit) if page_limit else limit - len(items)
            request.page_token = token
            reply = _ask(args, method, request, channel)
            items.extend(getattr(reply, field))
            token = reply.next_page_token
            if not token:
                return Page(items, "")
            if limit is not None and len(items) >= limit:
                return Page(items[:limit], token)
            if token in seen:  # a collector that repeats itself would keep us here for ever
                raise Refused(f"the collector at {args.collector} sent page token {token[:40]!r} twice; "
                              "list fewer items (--limit) and report this")
            seen.add(token)


def add_paging(parser: argparse.ArgumentParser, default_limit: int, what: str) -> None:
    """--limit and --page-token of a list command (the CLI follows the collector's pages up to --limit)."""
    add_flag(parser, "--limit", default=str(default_limit), type=positive(int), metavar="N",
             help=f"list at most N {what} (asked for page by page)")
    add_flag(parser, "--page-token", metavar="TOKEN",
             help="go on where an earlier listing stopped: its JSON's next_page_token")


def print_page(args: argparse.Namespace, page: Page, shown: int) -> None:
    """After a table: say where the listing goes on when --limit cut it short (on stderr: stdout is the table)."""
    if page.next_page_token and shown:
        say(f"outrider: the first {shown} shown; for the next ones add --page-token {page.next_page_token}")
