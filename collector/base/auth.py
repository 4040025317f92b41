"""Who may talk to the collector: bearer tokens from an auth file, checked by one interceptor.

The auth file is TOML::

    [[agent]]
    name = "edge-1"
    token = "..."                  # or token_sha256 = "<64 hex digits>"
    agent_ids = ["edge-1"]         # globs of the agent ids it may speak for (default: its name)
    models = ["churn", "fraud-*"]  # globs of the models it may send windows for (default: any)

    [[operator]]
    name = "alice"
    token_sha256 = "..."
    role = "approver"              # viewer < operator < approver < admin

Agents may call AgentService, operators OpsService methods up to their role;
the health service is open. An agent token speaks only for the agent ids and
models its entry names (``Identity.may_speak_for`` / ``may_send_for``, checked
on each stream's Hello and windows): a leaked edge token cannot pose as another
agent or feed another model's drift. The identity of an accepted call is available to
servicers through ``current_identity()``. Without an auth file the collector
only listens on loopback and every caller is ``LOCAL``.
"""
from __future__ import annotations

import contextvars
import fnmatch
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from agent.errors import InvalidArgument
from agent.tokens import (MIN_TOKEN_CHARS, TLSFiles, TokenTable, check_keys, entry_name,  # noqa: F401  (re-exported)
                          parse_toml, read_toml, refusing_handler, tables, token_digest)
from protos import collector_pb2

log = logging.getLogger(__name__)

ROLES = ("viewer", "operator", "approver", "admin")  # each can do what the ones before it can

_SERVICES = collector_pb2.DESCRIPTOR.services_by_name
AGENT_SERVICE = _SERVICES["AgentService"].full_name
OPS_SERVICE = _SERVICES["OpsService"].full_name
OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})

# The least role each OpsService method needs; a method missing here needs
# "admin", so a new method is closed until someone decides otherwise.
OPS_METHOD_ROLES: dict[str, str] = {
    "Status": "viewer",
    "ListWindows": "viewer",
    "AttachProfile": "operator",
    "Drift": "viewer",
    "EvaluateDrift": "operator",
    "ListAlerts": "viewer",
    "AckAlert": "operator",
    "GetDriftConfig": "viewer",
    "SetDriftConfig": "operator",
    "ListAudit": "viewer",
    "VerifyAudit": "viewer",
    "RegisterModel": "operator",
    "ListModels": "viewer",
    "ShowModel": "viewer",
    "RunGate": "operator",
    "SetStage": "operator",
    "RequestPromotion": "operator",  # overriding a failed gate needs admin (checked by the servicer)
    "ListApprovals": "viewer",
    "Approve": "approver",  # and not the requester (checked by collector.lifecycle.approvals)
    "Reject": "approver",
    "RetireModel": "operator",
    "OpenRetraining": "operator",
    "ListRetraining": "viewer",
    "ShowRetraining": "viewer",
    "AcceptRetraining": "operator",
    "CompleteRetraining": "operator",
    "RejectRetraining": "operator",
    "CancelRetraining": "operator",
    "ExportData": "operator",  # sampled rows are data, not summaries: viewers may not take them
    "Rollback": "operator",  # immediate: back to a version that was approved before
    "ListRollouts": "viewer",
    "ShowRollout": "viewer",
    "SetShadow": "operator",
    "ClearShadow": "operator",
    "ShadowReport": "viewer",
    "CancelApproval": "operator",  # and only the requester or an admin (checked by collector.lifecycle.approval_cancel)
}


class Identity(NamedTuple):
    name: str
    kind: str  # "agent", "operator", or "local" (no auth file: loopback only)
    role: str = ""  # operators' role; "" for agents
    agent_ids: tuple[str, ...] = ("*",)  # agents: globs of the agent ids this token may speak for
    models: tuple[str, ...] = ("*",)  # agents: globs of the model names it may send windows for

    def may_speak_for(self, agent_id: str) -> bool:
        """Whether this caller may send a Hello (and windows) as agent ``agent_id``."""
        return self.kind == "local" or any(fnmatch.fnmatchcase(agent_id, g) for g in self.agent_ids)

    def may_send_for(self, model_name: str) -> bool:
        """Whether this caller may send windows (or fetch artifacts) of model ``model_name``."""
        return self.kind == "local" or any(fnmatch.fnmatchcase(model_name, g) for g in self.models)


LOCAL = Identity("local", "local", "admin")

_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("outrider_identity", default=None)


def current_identity() -> Identity | None:
    """The caller of the RPC being served (gRPC runs interceptor and handler in one context)."""
    return _identity.get()


def role_at_least(role: str, needed: str) -> bool:
    return role in ROLES and ROLES.index(role) >= ROLES.index(needed)


class AuthConfig:
    """The tokens of an auth file, kept only as SHA-256 digests. The entry format (``name``,
    ``token`` or ``token_sha256``) and its reading are shared with the agent's own auth file
    (``agent.tokens``); what is the collector's is the two kinds and their keys."""

    def __init__(self, identities: TokenTable[Identity]) -> None:
        self._identities = identities

    @classmethod
    def from_file(cls, path: str | Path) -> AuthConfig:
        doc, source = read_toml(path)
        return cls.from_doc(doc, source)

    @classmethod
    def from_toml(cls, text: str, source: str = "auth file") -> AuthConfig:
        return cls.from_doc(parse_toml(text, source), source)

    @classmethod
    def from_doc(cls, doc: dict[str, Any], source: str) -> AuthConfig:
        unknown = set(doc) - {"agent", "operator"}
        if unknown:
            raise InvalidArgument(f"{source}: unknown section(s) {sorted(unknown)}; use [[agent]] and [[operator]]")
        entries = [_credential(kind, entry, where)
                   for kind in ("agent", "operator") for entry, where in tables(doc, kind, source)]
        if not entries:
            raise InvalidArgument(f"{source} defines no [[agent]] or [[operator]]: nobody could connect")
        return cls(TokenTable(entries, source, lambda who: f"{who.kind} {who.name!r}"))

    def authenticate(self, token: str) -> Identity | None:
        return self._identities.authenticate(token)


def _credential(kind: str, entry: dict[str, Any], where: str) -> tuple[bytes, Identity]:
    check_keys(entry, {"name", "token", "token_sha256"} | ({"role"} if kind == "operator" else {"agent_ids", "models"}),
               where)
    name = entry_name(entry, where)
    where = f"{where} ({name})"
    digest = token_digest(entry, where)
    if kind == "operator":
        role = entry.get("role", "viewer")
        if role not in ROLES:
            raise InvalidArgument(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
        return digest, Identity(name, kind, role)
    agent_ids = _globs(entry, "agent_ids", [name], where)
    models = _globs(entry, "models", ["*"], where)
    return digest, Identity(name, kind, "", agent_ids, models)


def _globs(entry: dict[str, Any], key: str, default: list[str], where: str) -> tuple[str, ...]:
    """A list of glob patterns (a single string is taken as a list of one)."""
    value = entry.get(key, default)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise InvalidArgument(f"{where}: {key} must be a non-empty list of names or globs, e.g. {key} = "
                              f"[{default[0]!r}]")
    return tuple(v.strip() for v in value)


def peer_address(peer: str) -> str:
    """The address of a gRPC peer ("ipv4:10.0.0.5:51234", "ipv6:[::1]:51234") without its port: one
    caller's calls come from many ports."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        return rest.rpartition("]")[0].lstrip("[") or rest
    return peer or "unknown"


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks every call's bearer token against ``config``; with no config every caller is ``LOCAL``.

    Each refusal is counted and handed to ``on_refusal(actor, object, reason, peer)``
    (the audit trail's ``AuthFailureLog``, which aggregates them), which must not block or raise."""

    def __init__(self, config: AuthConfig | None, method_roles: Mapping[str, str] = OPS_METHOD_ROLES, *,
                 on_refusal: Callable[[str, str, str, str], None] | None = None) -> None:
        self.config = config
        self.method_roles = method_roles
        self.on_refusal = on_refusal
        self._lock = threading.Lock()
        self._failures = 0

    @property
    def failures(self) -> int:
        with self._lock:
            return self._failures

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED
            return None
        service, _, method = details.method.lstrip("/").partition("/")
        if service in OPEN_SERVICES:
            return handler
        if self.config is None:
            _identity.set(LOCAL)
            return handler
        identity, refusal = self._check(service, method, details.invocation_metadata or ())
        if refusal is not None:
            actor, obj = identity.name if identity else "anonymous", f"rpc{details.method}"
            # recorded where the caller's address is known: in the call, not in this interceptor
            return refusing_handler(handler, *refusal, lambda context: self.count_refusal(
                actor, obj, refusal[1], peer_address(context.peer())))
        _identity.set(identity)
        return handler

    def count_refusal(self, actor: str, obj: str, reason: str, peer: str = "") -> None:
        """Count a refusal in the collector's one auth-failure counter and hand it to ``on_refusal``
        (the audit trail); for refusals made elsewhere too (the web page's, ``obj`` "http/PATH").
        ``peer``: the caller's address. Never raises: recording must not turn a refusal into a crash."""
        with self._lock:
            self._failures += 1
        if self.on_refusal is None:
            log.warning("refused %s from %s: %s", obj, peer or "unknown", reason)
            return
        try:
            self.on_refusal(actor, obj, reason, peer)
        except Exception:
            log.exception("recording the refusal of %s failed", obj)

    def close(self) -> None:
        """Record what ``on_refusal`` still holds (its ``close``, if it has one): before the store closes."""
        close = getattr(self.on_refusal, "close", None)
        if close is not None:
            close()

    def _check(self, service: str, method: str,
               metadata: Any) -> tuple[Identity | None, tuple[grpc.StatusCode, str] | None]:
        """(identity, None) to let the call in; (identity or None, refusal) to refuse it. A refused
        caller's identity is returned when its token was valid, so the audit trail can name it."""
        assert self.config is not None
        values = [value for key, value in metadata if key == "authorization"]
        if not values:
            return None, (grpc.StatusCode.UNAUTHENTICATED,
                          "missing token: send metadata 'authorization: Bearer <token>' "
                          "(outrider CLI: --token or OUTRIDER_TOKEN)")
        scheme, _, token = str(values[0]).partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None, (grpc.StatusCode.UNAUTHENTICATED, "malformed authorization metadata: expected 'Bearer <token>'")
        identity = self.config.authenticate(token)
        if identity is None:
            return None, (grpc.StatusCode.UNAUTHENTICATED, "unknown token: it is not in the collector's auth file")
        call = f"{service.rpartition('.')[2]}/{method}"
        who = f"{identity.kind} {identity.name!r}"
        if service == AGENT_SERVICE:
            if identity.kind != "agent":
                return identity, (grpc.StatusCode.PERMISSION_DENIED,
                                  f"{who} cannot call {call}: it needs an agent token")
        elif service == OPS_SERVICE:
            needed = self.method_roles.get(method, "admin")
            if identity.kind != "operator":
                return identity, (grpc.StatusCode.PERMISSION_DENIED,
                              f"{who} cannot call {call}: it needs an operator token (role {needed} or above)")
            if not role_at_least(identity.role, needed):
                return identity, (grpc.StatusCode.PERMISSION_DENIED,
                              f"{who} has role {identity.role}; {call} needs {needed} or above")
        return identity, None


# ------------------------------------------------------------------ TLS and listening


def is_loopback(listen: str) -> bool:
    """True when every address HOST of HOST:PORT stands for is a loopback address."""
    host = listen.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)
