"""Who may call the agent's port: bearer tokens from an auth file, checked by one interceptor; and TLS.

``outrider agent serve --auth-file FILE`` reads a TOML file of clients::

    [[client]]
    name = "checkout-web"
    token = "a-long-random-token"      # or token_sha256 = "<64 hex digits>" (sha256sum of the token)
    calls = ["inference"]              # what it may call: "inference", "feedback" (default: both)

"inference" is the Open Inference Protocol service (``ModelInfer`` and the
metadata and readiness calls beside it), "feedback" is ``FeedbackService``
(ground truth, which moves the accuracy operators see). Clients send
``authorization: Bearer <token>`` (tritonclient: ``headers={"authorization":
"Bearer ..."}``). The ``grpc.health.v1`` service stays open, for probes and
load balancers. A call without a known token is UNAUTHENTICATED, a call its
token may not make is PERMISSION_DENIED; both say why, are logged in one line
and counted (``AccessInterceptor.refusals``). Without an auth file nothing is
checked: every caller may call everything, as before tokens existed.

Tokens are kept only as SHA-256 digests and compared in constant time. The
entry format is the collector's (``collector/base/auth.py``: ``name``, ``token`` or
``token_sha256``, at least 16 characters), and its reading is written to be
shared: ``read_toml``, ``entry_name``, ``token_digest``, ``check_keys`` and
``TokenTable`` know nothing of the agent, nor does ``TLSFiles``.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc

from agent.errors import InvalidArgument
from agent.guard import handler_like

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16
# What a client's ``calls`` may name -> the gRPC services it opens.
AGENT_CALLS: dict[str, str] = {"inference": "inference.GRPCInferenceService",
                               "feedback": "outrider.v1.FeedbackService"}
OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})

T = TypeVar("T")


# ------------------------------------------------------------------ the file, shared parts

def read_toml(path: str | Path) -> tuple[dict[str, Any], str]:
    """The parsed file and its name for messages; InvalidArgument when it cannot be read or parsed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"cannot read auth file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_toml(text, str(path)), str(path)


def parse_toml(text: str, source: str = "auth file") -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{source} is not valid TOML: {exc}") from None


def tables(doc: dict[str, Any], kind: str, source: str) -> list[tuple[dict[str, Any], str]]:
    """The ``[[kind]]`` tables of ``doc``, each with where it is, for messages."""
    entries = doc.get(kind, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InvalidArgument(f"{source}: write each {kind} as a [[{kind}]] table")
    return [(entry, f"{source}: [[{kind}]] #{number}") for number, entry in enumerate(entries, 1)]


def check_keys(entry: dict[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = set(entry) - set(allowed)
    if unknown:
        raise InvalidArgument(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


def entry_name(entry: dict[str, Any], where: str) -> str:
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgument(f"{where} needs a name")
    return name


def token_digest(entry: dict[str, Any], where: str) -> bytes:
    """SHA-256 of the entry's ``token``, or its ``token_sha256``: exactly one of them."""
    if ("token" in entry) == ("token_sha256" in entry):
        raise InvalidArgument(f"{where} needs exactly one of token or token_sha256")
    if "token" in entry:
        token = entry["token"]
        if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
            raise InvalidArgument(f"{where}: token must be at least {MIN_TOKEN_CHARS} characters; make one with "
                                  "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
        return hashlib.sha256(token.encode("utf-8")).digest()
    hexed = entry["token_sha256"]
    try:
        digest = bytes.fromhex(hexed) if isinstance(hexed, str) else b""
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise InvalidArgument(f"{where}: token_sha256 must be 64 hex digits (sha256sum of the token)")
    return digest


class TokenTable(Generic[T]):
    """Token digests and whom each stands for; every digest once."""

    def __init__(self, entries: list[tuple[bytes, T]], source: str, describe: Callable[[T], str] = str) -> None:
        seen: dict[bytes, T] = {}
        for digest, owner in entries:
            if digest in seen:
                raise InvalidArgument(f"{source}: {describe(owner)} has the same token as {describe(seen[digest])}; "
                                      "give each its own")
            seen[digest] = owner
        self._entries = entries

    def authenticate(self, token: str) -> T | None:
        digest = hashlib.sha256(token.encode("utf-8", "replace")).digest()
        found = None
        for known, owner in self._entries:  # no early exit: the time taken does not say which entry matched
            if hmac.compare_digest(digest, known):
                found = owner
        return found


def bearer_token(metadata: Iterable[Any], server: str = "this server") -> tuple[str | None, str]:
    """(token, "") from ``authorization: Bearer <token>``, or (None, why not) for the refusal."""
    values = [value for key, value in metadata if key == "authorization"]
    if not values:
        return None, (f"missing token: {server} needs metadata 'authorization: Bearer <token>' "
                      "(tritonclient: headers={'authorization': 'Bearer <token>'})")
    scheme, _, token = str(values[0]).partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None, "malformed authorization metadata: expected 'Bearer <token>'"
    return token, ""


# ------------------------------------------------------------------ the agent's clients

@dataclass(frozen=True)
class Client:
    name: str
    calls: frozenset[str]  # names of AGENT_CALLS


class ClientAuth:
    """The agent's auth file: its ``[[client]]`` entries."""

    def __init__(self, clients: TokenTable[Client]) -> None:
        self._clients = clients

    @classmethod
    def from_file(cls, path: str | Path) -> ClientAuth:
        doc, source = read_toml(path)
        return cls.from_doc(doc, source)

    @classmethod
    def from_toml(cls, text: str, source: str = "auth file") -> ClientAuth:
        return cls.from_doc(parse_toml(text, source), source)

    @classmethod
    def from_doc(cls, doc: dict[str, Any], source: str) -> ClientAuth:
        unknown = set(doc) - {"client"}
        if unknown:
            raise InvalidArgument(f"{source}: unknown section(s) {sorted(unknown)}; the agent's auth file has "
                                  "[[client]] tables (name, token or token_sha256, calls)")
        entries = []
        for entry, where in tables(doc, "client", source):
            check_keys(entry, ("name", "token", "token_sha256", "calls"), where)
            name = entry_name(entry, where)
            where = f"{where} ({name})"
            entries.append((token_digest(entry, where), Client(name, _calls(entry, where))))
        if not entries:
            raise InvalidArgument(f"{source} defines no [[client]]: nobody could call this agent")
        return cls(TokenTable(entries, source, lambda c: f"client {c.name!r}"))

    def authenticate(self, token: str) -> Client | None:
        return self._clients.authenticate(token)


def _calls(entry: dict[str, Any], where: str) -> frozenset[str]:
    value = entry.get("calls", list(AGENT_CALLS))
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(v in AGENT_CALLS for v in value):
        raise InvalidArgument(f"{where}: calls must be a non-empty list of {', '.join(map(repr, AGENT_CALLS))}, "
                              f"e.g. calls = ['inference']")
    return frozenset(value)


def refusing_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str,
                     on_call: Callable[[grpc.ServicerContext], None] | None = None) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only answers ``code`` (its body is never decoded).
    ``on_call(context)`` runs first, where the caller's address (``context.peer()``) is known."""

    def abort(request: Any, context: grpc.ServicerContext) -> None:
        if on_call is not None:
            on_call(context)
        context.abort(code, message)

    return handler_like(handler, abort)


class AccessInterceptor(grpc.ServerInterceptor):
    """Checks every call's bearer token against ``auth``: the client must be named there and may make
    only the calls its entry lists. ``services``: gRPC service -> the call name that opens it."""

    def __init__(self, auth: ClientAuth, services: Mapping[str, str] | None = None) -> None:
        self.auth = auth
        self.services = dict(services) if services is not None else {s: c for c, s in AGENT_CALLS.items()}
        self._lock = threading.Lock()
        self._refusals = {"unauthenticated": 0, "permission_denied": 0}

    def refusals(self) -> dict[str, int]:
        """Calls refused so far, by reason."""
        with self._lock:
            return dict(self._refusals)

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED
            return None
        refusal = self.refusal(details)
        return handler if refusal is None else refusing_handler(handler, *refusal)

    def refusal(self, details: grpc.HandlerCallDetails) -> tuple[grpc.StatusCode, str] | None:
        """(code, message) refusing the call ``details`` describes, counted and logged; None: it may go on.
        (The asyncio server's interceptor asks this and answers the refusal itself: ``agent.handlers``.)"""
        service, _, method = details.method.lstrip("/").partition("/")
        if service in OPEN_SERVICES:
            return None
        refusal = self._check(service, method, details.invocation_metadata or ())
        if refusal is None:
            return None
        code, message = refusal
        with self._lock:
            self._refusals[code.name.lower()] += 1
        log.warning("refused %s: %s", details.method, message)
        return refusal

    def _check(self, service: str, method: str, metadata: Any) -> tuple[grpc.StatusCode, str] | None:
        token, why = bearer_token(metadata, "this agent")
        if token is None:
            return grpc.StatusCode.UNAUTHENTICATED, why
        client = self.auth.authenticate(token)
        if client is None:
            return grpc.StatusCode.UNAUTHENTICATED, "unknown token: it is not in the agent's auth file"
        needed = self.services.get(service)
        if needed is None:  # a service no entry can open
            return grpc.StatusCode.PERMISSION_DENIED, f"client {client.name!r} may not call {service}/{method}"
        if needed not in client.calls:
            return grpc.StatusCode.PERMISSION_DENIED, (
                f"client {client.name!r} may call {', '.join(sorted(client.calls))}, not {needed} ({method}); "
                f"add {needed!r} to its calls in the agent's auth file")
        return None


# ------------------------------------------------------------------ TLS

@dataclass(frozen=True)
class TLSFiles:
    """PEM files: the server's certificate and key, and optionally the CA that signs client certificates."""

    cert: Path
    key: Path
    client_ca: Path | None = None  # set: clients must present a certificate it signed (mutual TLS)

    @classmethod
    def from_paths(cls, cert: str | Path | None, key: str | Path | None,
                   client_ca: str | Path | None = None) -> TLSFiles | None:
        """None when no file is given; InvalidArgument (naming the flag) for a half pair or a missing file."""
        if not (cert or key or client_ca):
            return None
        if not (cert and key):
            raise InvalidArgument("--tls-cert and --tls-key go together: pass both PEM files")
        for flag, value, marker in (("--tls-cert", cert, b"CERTIFICATE-----"), ("--tls-key", key, b"PRIVATE KEY-----"),
                                    ("--tls-client-ca", client_ca, b"CERTIFICATE-----")):
            if not value:
                continue
            try:
                pem = Path(value).read_bytes()
            except OSError as exc:
                raise InvalidArgument(f"{flag} {value}: {exc.strerror or exc}") from None
            if b"-----BEGIN " not in pem or marker not in pem:  # gRPC would only say "failed to bind"
                raise InvalidArgument(f"{flag} {value} is not a PEM file with a {marker[:-5].decode().lower()}")
        return cls(Path(cert), Path(key), Path(client_ca) if client_ca else None)

    def server_credentials(self) -> grpc.ServerCredentials:
        client_ca = self.client_ca.read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials([(self.key.read_bytes(), self.cert.read_bytes())],
                                           root_certificates=client_ca, require_client_auth=client_ca is not None)
