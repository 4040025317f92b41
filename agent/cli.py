"""The ``outrider`` command line.

Subcommands are added by ``register(subparsers)`` functions: ``agent.serve_cli``'s
(``outrider agent ...``) plus those listed in ``OPTIONAL_COMMANDS``,
imported only when present so the CLI works before they exist. Every flag
also reads an ``OUTRIDER_...`` environment variable (``add_flag``). What every
command promises (exit codes, one-line errors, strict JSON, quiet closed pipes) is
``agent.cli_contract``; ``main`` runs each command under it.
"""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import importlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from agent import cli_contract, supervisor
from agent.cli_contract import EXIT_USAGE, UsageError  # noqa: F401  (commands import them from here)

AGENT_ENV = "OUTRIDER_AGENT_"  # environment prefix of `outrider agent serve`'s flags

# Modules that add subcommands through their own ``register(subparsers)``.
# >>> Other subcommands register here. <<<
#   agent.demo      -> ``outrider demo``        (not written yet; skipped while absent)
#   collector.cli.serve_cli -> ``outrider collector serve``; collector.cli.cli -> ``outrider status`` ...
OPTIONAL_COMMANDS: tuple[str, ...] = ("agent.demo", "collector.cli.serve_cli", "collector.cli.cli", "agent.profile",
                                       "collector.cli.drift_cli", "collector.cli.audit_cli", "collector.cli.models_cli",
                                       "collector.cli.approvals_cli", "collector.cli.retrain_cli",
                                       "collector.cli.rollout_cli", "collector.cli.shadow_cli",
                                       "collector.cli.data_cli", "agent.health_cli")


class Parser(argparse.ArgumentParser):
    """argparse, but errors are one line: what is wrong and where to look."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def print_help(self, file: Any = None) -> None:
        # argparse's own printing swallows OSError: a closed stdout must reach main, which ends quietly
        (file or sys.stdout).write(self.format_help())


def add_flag(parser: argparse.ArgumentParser, flag: str, *, required: bool = False,
             default: Any = None, help: str = "", secret: bool = False, prefix: str = "OUTRIDER_",
             **kwargs: Any) -> None:
    """Add ``--flag`` whose default comes from ``<prefix>FLAG`` when that is set.

    Servers use their own prefix (``OUTRIDER_AGENT_``, ``OUTRIDER_COLLECTOR_``)
    so that one shell can configure an agent, a collector and the operators'
    commands without one's ``--listen`` or ``--token`` leaking into another.

    argparse applies ``type`` to string defaults, so environment values are
    checked exactly like command-line ones. A ``secret`` default is never shown in help.
    """
    env = prefix + flag.lstrip("-").upper().replace("-", "_")
    if env in os.environ:
        default, required = os.environ[env], False
    shown = "" if default is None else " (set)" if secret else " (default: %(default)s)"
    parser.add_argument(flag, default=default, required=required,
                        help=f"{help}{shown} [env {env}]", **kwargs)


def add_log_level(parser: argparse.ArgumentParser, prefix: str) -> None:
    add_flag(parser, "--log-level", prefix=prefix, default="info", choices=["debug", "info", "warning", "error"],
             help="least severe event a server logs to stderr (connections, rollouts, decisions at info)")


def configure_logging(level: str) -> None:
    """A server's log: one line per event on stderr, with time and level. Only the servers
    configure logging; the library (MonitoredSession in someone's process) leaves it to its host."""
    group = supervisor.member()  # one of `agent serve --processes N`'s: whose line it is, in the shared stderr
    tag = f" [process {group[0]}]" if group is not None else ""
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s{tag} %(name)s: %(message)s")


def positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` greater than 0."""
    noun = "a whole number" if kind is int else "a number"

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
        return value

    convert.__name__ = f"positive {kind.__name__}"
    return convert


def whole_number(maximum: int) -> Callable[[str], int]:
    """An argparse type: a whole number from 0 to ``maximum``."""

    def convert(text: str) -> int:
        if not text.strip().isdigit() or int(text) > maximum:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 0 to {maximum}")
        return int(text)

    return convert


def whole_number_from(minimum: int, maximum: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``minimum`` to ``maximum``."""

    def convert(text: str) -> int:
        if not text.strip().isdigit() or not minimum <= int(text) <= maximum:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from {minimum} to {maximum}")
        return int(text)

    return convert


def listen_address(text: str) -> str:
    """HOST:PORT (IPv6 hosts in brackets); port 0 lets the system pick."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not HOST:PORT; use e.g. 127.0.0.1:8001 ([::1]:8001 for IPv6, port 0 for any free port)"
        )
    return text


def collector_address(text: str) -> str:
    """HOST:PORT of the collector (IPv6 hosts in brackets)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not HOST:PORT; use e.g. 127.0.0.1:50051 ([::1]:50051 for IPv6)"
        )
    return text


def collector_addresses(text: str) -> str:
    """One collector or several, comma-separated (the agent fails over between them)."""
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty address; give HOST:PORT[,HOST:PORT...]")
    return ",".join(collector_address(part) for part in parts)


def pem_path(flag: str, value: str | None) -> Path | None:
    """``value`` as the path of a readable PEM file given to ``flag`` (None when not given); UsageError otherwise."""
    if not value:
        return None
    path = Path(value)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in text:
        raise UsageError(f"{flag} {path} is not a PEM file (no '-----BEGIN' line)")
    return path


SYSTEM_CAS = "system"  # a --*-tls-ca value: TLS trusting the system's CAs


def add_client_tls_flags(parser: argparse.ArgumentParser, flag: str, peer: str) -> None:
    """``FLAG-tls-ca``, ``FLAG-tls-cert`` and ``FLAG-tls-key``: TLS to ``peer`` (read by ``client_tls``)."""
    add_flag(parser, f"{flag}-tls-ca", prefix=AGENT_ENV, metavar="PEM|system",
             help=f"connect to {peer} over TLS, trusting the CA certificates in this PEM file, or 'system' for the "
                  f"system's trusted CAs (default: plaintext)")
    add_flag(parser, f"{flag}-tls-cert", prefix=AGENT_ENV, metavar="PEM",
             help=f"this client's certificate for {peer} (mutual TLS; needs {flag}-tls-key and {flag}-tls-ca)")
    add_flag(parser, f"{flag}-tls-key", prefix=AGENT_ENV, metavar="PEM", help=f"the private key of {flag}-tls-cert")


def client_tls(args: argparse.Namespace, flag: str) -> Any:
    """The ``agent.exporter.TLSConfig`` that ``FLAG-tls-*`` ask for (None: plaintext), its files checked now."""
    from agent.exporter import TLSConfig

    name = flag.lstrip("-").replace("-", "_")
    ca, cert, key = (getattr(args, f"{name}_tls_{part}", None) for part in ("ca", "cert", "key"))
    if (cert is None) != (key is None):
        raise UsageError(f"{flag}-tls-cert and {flag}-tls-key go together (mutual TLS); give both or neither")
    if ca is None:
        if cert is not None:
            raise UsageError(f"{flag}-tls-cert needs {flag}-tls-ca (a PEM file, or 'system' for the system's CAs)")
        return None
    if not getattr(args, name, None) and not getattr(args, f"{name}_http", None):
        raise UsageError(f"{flag}-tls-ca goes with {flag}: there is no {flag[2:]} to connect to")
    config = TLSConfig(root_cert=None if ca == SYSTEM_CAS else pem_path(f"{flag}-tls-ca", ca),
                       client_cert=pem_path(f"{flag}-tls-cert", cert), client_key=pem_path(f"{flag}-tls-key", key))
    try:  # loaded once now, so a CA file or key pair that does not load stops the start, not each connection
        config.ssl_context()
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        what = f"{flag}-tls-cert and {flag}-tls-key" if cert else f"{flag}-tls-ca"
        raise UsageError(f"{what} do not load as TLS files: {first_line(exc)}") from None
    return config


def client_credentials(ca: str | Path | None = None, cert: str | Path | None = None,
                       key: str | Path | None = None) -> Any:
    """TLS for a gRPC client (``grpc.ChannelCredentials``): trust ``ca`` (default: the system roots),
    present ``cert``/``key`` for mutual TLS. Shared by the commands that call an agent or a collector."""
    import grpc  # here: commands that never connect start without loading gRPC

    def read(path: str | Path | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert))


def share_flags(source: argparse.ArgumentParser, target: argparse.ArgumentParser, flags: tuple[str, ...]) -> None:
    """Give ``target`` the very flags ``source`` defines (one definition, two commands), as argparse's
    own ``parents=`` does: the same Action objects, added to ``target``."""
    actions = {option: action for action in source._actions for option in action.option_strings}
    for flag in flags:
        target._add_action(actions[flag])


class StopRequest:
    """What SIGTERM or SIGINT asked for, read by the main thread.

    The handler only sets an attribute and the main thread polls it. Two hazards
    this avoids: a handler that takes a lock (``Event.set``) deadlocks when the
    main thread is interrupted while holding that lock; and a main thread blocked
    on a lock (``Event.wait()``) is not woken when the kernel hands the signal to
    another thread (gRPC's, say): Python's handler then never runs, and a SIGTERM
    is ignored for good (seen in CI)."""

    POLL_SECONDS = 0.2

    def __init__(self) -> None:
        self.signum: int | None = None

    def wait(self) -> int:
        """Block until a signal came; its number. ``time.sleep`` returns to the interpreter
        every poll, which runs a pending handler whichever thread the signal reached."""
        while self.signum is None:
            time.sleep(self.POLL_SECONDS)
        return self.signum


@contextlib.contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """A ``StopRequest`` that SIGTERM and SIGINT fill, for servers that stop in order.

    Installed before a server's (slow) start, so that an early signal still
    ends in an orderly stop rather than the default kill."""
    stop = StopRequest()

    def handler(signum: int, _frame: Any) -> None:
        stop.signum = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def check_listen(listen: str, flag: str = "--listen") -> None:
    """Bind-test HOST:PORT first: a bad address is then one clear line, not gRPC's log output."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"cannot listen on {listen}: host {host!r} does not resolve ({exc.strerror}); "
                         f"use a local IP address or host name with {flag}") from None
    reasons = []
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            # SO_REUSEADDR as servers use it: a port in TIME_WAIT is free, one with a listener is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
                return
            except OSError as exc:
                reasons.append(exc.strerror or str(exc))
    raise UsageError(f"cannot listen on {listen}: {reasons[0] if reasons else 'no address'}; "
                     f"pick a free port on a local address with {flag}")


def close(session: Any) -> None:
    close = getattr(session, "close", None)
    if callable(close):
        close()


def first_line(exc: BaseException | str) -> str:
    """An error's (or a text's) first line, for a one-line message; an exception without text: its type's name."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else (type(exc).__name__ if isinstance(exc, BaseException) else "")


def _registrars() -> Iterator[Callable[[argparse._SubParsersAction], None]]:
    from agent import serve_cli  # imports this module: loaded when the parser is built

    yield serve_cli.register
    for module_name in OPTIONAL_COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # not written yet: the CLI works without it
                continue
            raise
        if hasattr(module, "register"):
            yield module.register


def build_parser() -> Parser:
    from agent.hello import package_version

    parser = Parser(prog="outrider", description="Keep ONNX models working in production.")
    parser.add_argument("--version", action="version", version=f"outrider {package_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register_commands in _registrars():
        register_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    # On-call aid for a server that hangs: `kill -USR1 PID` prints every thread's stack to stderr.
    if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
        with contextlib.suppress(ValueError, OSError):  # stderr without a file descriptor (captured): no aid
            faulthandler.register(signal.SIGUSR1, all_threads=True)

    def command() -> int:
        try:
            args = build_parser().parse_args(argv)
            args.argv = list(sys.argv[1:] if argv is None else argv)  # what `agent serve --processes` repeats
        except SystemExit:  # --help, --version, a usage error: what they printed must reach a closed pipe here
            sys.stdout.flush()
            raise
        return args.func(args)

    return cli_contract.run(command)


if __name__ == "__main__":
    # Run as a script this file is ``__main__``, a second copy of agent.cli: call the
    # imported module's main so that there is one copy of its parsers and commands.
    from agent.cli import main as _main

    sys.exit(_main())
