"""Rollout: what a model's managed agents should serve, telling them, and what they answered.

The desired state of a model is its production version (``model_versions.stage``)
and its shadow (the ``shadows`` table). A managed agent learns it as Commands on
its stream (``Command`` in protos/collector.proto): on its Hello, and whenever the
production version or the shadow changes. Every change is a rollout (a row in
``rollouts``: promote, rollback, shadow, unshadow), and every agent run it is
sent to has an ack row in ``rollout_acks`` (pending, then ok or failed) that
the agent's ModelState answer settles.

Commands come in two families that change independently: "serve" (promote,
rollback) and "shadow"/"unshadow". A command names its version by number,
sha256, size and schema, and by the names of its input columns when the
registry has them ("feature_names", JSON ``{input: [names]}``): the agent names
its columns so, and its windows line up with the version's reference. A command carries the id "rollout-<id>" of
the newest rollout of its family when that rollout still describes the state
sent (so an agent connecting later is counted in that rollout too), otherwise
"hello-<uuid>".

A shadow runs a staging version only, so it never outlives its version's
leaving staging: a promotion of the shadowed version (``approvals.decide``)
clears it in the same transaction (audit ``model.unshadow``, reason "promoted
to production", and an unshadow rollout); a rollback clears a shadow naming
either version it moves (possible only for a shadow set before that rule); a
version in shadow cannot be moved back to candidate or retired until its
shadow is stopped (``approvals.set_stage`` / ``retire`` refuse, saying how).
Rollouts started in one transaction share its clock reading (``started_ns``)
and are pushed together (``RolloutPusher.push_started``).

Reference projections (``agent.reference``): every agent of a model, managed or
not, is sent a ``reference`` command for the version it serves when it says
hello (a managed agent: for the production version, before its "serve"), and
every live agent of the model when a profile is attached to one of its versions
(``RolloutPusher.push_reference``); an agent uses it only if it serves that
version. These commands settle no rollout: their ids are "reference-<uuid>".

The functions taking ``db`` run inside the store writer's transaction (or read
through ``Store.read``); ``RolloutPusher`` sends after the commit.
"""
from __future__ import annotations

import itertools
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from collector.store.engine import Conn

from agent import reference
from agent.errors import FailedPrecondition, InvalidArgument, NotFound, OutriderError
from collector.base.ingest import Limits, clean_text, validate_model_key, validate_model_state
from collector.lifecycle import stages
from collector.store import audit, collectors, rollouts, versions
from protos import collector_pb2 as pb
from protos import summary_pb2

if TYPE_CHECKING:
    from collector.lifecycle.registry import ArtifactStore

log = logging.getLogger(__name__)

SERVE, SHADOW = "serve", "shadow"  # the two families of commands
FAMILY = {"promote": SERVE, "rollback": SERVE, "shadow": SHADOW, "unshadow": SHADOW}
CHUNK_BYTES = 1 << 20  # FetchArtifact's chunks
MAX_ERROR_CHARS = Limits.max_error_chars  # of an agent's error, as stored
DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 1000


class Planned(NamedTuple):
    """A command to send, and the rollout whose ack it settles (0: none)."""

    command: pb.Command
    rollout_id: int


# ------------------------------------------------------------------ desired state


def production(db: Conn, model: str) -> dict[str, Any] | None:
    return versions.production(db, model)


def current_shadow(db: Conn, model: str) -> dict[str, Any] | None:
    return rollouts.shadow(db, model)


def _latest(db: Conn, model: str, family: str) -> dict[str, Any] | None:
    return rollouts.latest(db, model, [k for k, f in FAMILY.items() if f == family])


def _args(row: dict[str, Any]) -> dict[str, str]:
    """A version as a command names it; "feature_names" (JSON {input: [names]}) only when the registry has
    the version's column names, so that an agent that predates them sees the same command as before."""
    args = {"version": str(row["version"]), "sha256": row["sha256"], "size": str(row["size"]),
            "schema_json": row["schema"]}
    if row.get("feature_names", "{}") not in ("", "{}"):
        args["feature_names"] = row["feature_names"]
    return args


def _planned(kind: str, args: dict[str, str], rollout_id: int) -> Planned:
    command_id = f"rollout-{rollout_id}" if rollout_id else f"hello-{uuid.uuid4().hex}"
    return Planned(pb.Command(id=command_id, kind=kind, args=args), rollout_id)


def serve_command(db: Conn, model: str) -> Planned | None:
    """"serve" the production version; None while the model has none."""
    prod = production(db, model)
    if prod is None:
        return None
    latest = _latest(db, model, SERVE)
    rollout_id = latest["id"] if latest and latest["version"] == prod["version"] else 0
    return _planned("serve", _args(prod), rollout_id)


def shadow_command(db: Conn, model: str, shadow_running: bool = True) -> Planned | None:
    """"shadow" the model's shadow version; else "unshadow" when ``shadow_running`` (or when the
    newest shadow-family rollout was an unshadow); None when there is nothing to say."""
    latest = _latest(db, model, SHADOW)
    shadow = current_shadow(db, model)
    if shadow is not None:
        current = latest and latest["kind"] == "shadow" and latest["version"] == shadow["version"]
        return _planned("shadow", {**_args(shadow), "share": repr(float(shadow["share"]))},
                        latest["id"] if current else 0)
    unshadowed = latest is not None and latest["kind"] == "unshadow"
    if not (shadow_running or unshadowed):
        return None
    return _planned("unshadow", {}, latest["id"] if unshadowed else 0)


def reference_command(db: Conn, model: str, version: str, *, always: bool = False) -> Planned | None:
    """"reference": the projection of ``version``'s profile; None when it has none (unless ``always``:
    an empty projection then tells agents to stop using the one they have)."""
    body = versions.profile_body(db, model, version)
    profile = summary_pb2.ReferenceProfile.FromString(body) if body is not None else None
    projection = profile.projection if profile is not None and profile.HasField("projection") else None
    if projection is None and not always:
        return None
    command = pb.Command(id=f"reference-{uuid.uuid4().hex}", kind=reference.REFERENCE,
                         args=reference.command_args(version, projection))
    return Planned(command, 0)


def hello_commands(db: Conn, hello: pb.Hello) -> list[Planned]:
    """What a managed agent is told when it says hello: serve production (if any), and its shadow
    (or unshadow when its Hello says a shadow runs but none is set)."""
    running = hello.HasField("model_state") and bool(hello.model_state.shadow_version)
    planned = [serve_command(db, hello.model_name), shadow_command(db, hello.model_name, running)]
    return _with_reference(db, hello.model_name, [p for p in planned if p is not None])


def family_commands(db: Conn, model: str, family: str) -> list[Planned]:
    """What every live managed agent of ``model`` is told after a change in ``family``."""
    planned = serve_command(db, model) if family == SERVE else shadow_command(db, model)
    return _with_reference(db, model, [planned] if planned is not None else [])


def _with_reference(db: Conn, model: str, planned: list[Planned]) -> list[Planned]:
    """The served version's reference first, so that its session has the projection from its first window."""
    serve = next((p for p in planned if p.command.kind == "serve"), None)
    first = reference_command(db, model, serve.command.args["version"]) if serve is not None else None
    return [first, *planned] if first is not None else planned


def record_sent(db: Conn, runs: Iterable[tuple[str, str]], planned: list[Planned]) -> None:
    """A pending ack per run for each rollout command, and the runs' desired version."""
    serve = next((p for p in planned if p.command.kind == "serve"), None)
    for agent_id, run_id in runs:
        for p in planned:
            if p.rollout_id:  # an answer already recorded (a resend) is kept
                rollouts.add_pending_ack(db, p.rollout_id, agent_id, run_id)
        if serve is not None:
            rollouts.set_desired_version(db, agent_id, run_id, serve.command.args["version"])


# ------------------------------------------------------------------ answers


def record_state(db: Conn, agent_id: str, run_id: str, state: pb.ModelState, now_ns: int) -> None:
    """What the agent serves now, and its answer to the rollout the command belonged to."""
    error = "" if state.ok else clean_text(state.error or "failed without saying why", MAX_ERROR_CHARS)
    rollouts.set_served_state(db, agent_id, run_id, {
        "model_version": state.model_version, "model_sha256": state.model_sha256, "model_error": error,
        "shadow_version": state.shadow_version, "shadow_share": state.shadow_share}, now_ns)
    prefix, _, number = state.command_id.partition("-")
    if prefix != "rollout" or not number.isdigit():
        return  # a hello command, or unprompted: no rollout waits for it
    if not rollouts.exists(db, int(number)):
        log.warning("agent %s answered unknown command %s", agent_id, state.command_id)
        return
    rollouts.set_ack(db, int(number), agent_id, run_id, "ok" if state.ok else "failed", error, now_ns)


# ------------------------------------------------------------------ changes


def start_rollout(db: Conn, model: str, version: int, kind: str, actor: str, reason: str, now_ns: int,
                  from_version: int = 0, share: float = 0.0) -> int:
    """Record a rollout (inside the caller's write transaction); push it after the commit."""
    if kind not in FAMILY:
        raise InvalidArgument(f"rollout kind {kind!r} is not one of {', '.join(FAMILY)}")
    rollout_id = rollouts.insert(db, model, version, kind, actor, reason, now_ns, from_version, share)
    collectors.announce_rollout(db, rollout_id)  # at commit, the other collectors push it to their streams
    return rollout_id


def previous_production(db: Conn, name: str, current: int) -> int:
    """The version that was production before ``current``: the from_version of the rollout that made
    it production (or, for promotions older than rollouts, the version archived most recently)."""
    made = rollouts.made_production_from(db, name, current)
    return made if made is not None else versions.newest_archived(db, name)


def rollback_target(db: Conn, name: str, to_version: int) -> tuple[int, int]:
    """(current production, target) of a rollback, checked: the target is archived, never retired."""
    if not versions.known(db, name):
        raise NotFound(f"model {name!r} is not registered")
    prod = production(db, name)
    if prod is None:
        raise FailedPrecondition(f"{name} has no production version: there is nothing to roll back")
    current = prod["version"]
    target = to_version or previous_production(db, name, current)
    if not target:
        raise FailedPrecondition(f"no version of {name} was production before version {current}; name an archived "
                                 f"version with --to VERSION (outrider models list {name})")
    if target == current:
        raise FailedPrecondition(f"{name} version {target} is already production")
    row = versions.stage_row(db, name, target)
    if row is None:
        raise NotFound(f"model {name!r} has no version {target}")
    stage = row["stage"]
    if stage == "retired":
        raise FailedPrecondition(f"{name} version {target} is retired and can never be served again; roll back to "
                                 f"another archived version with --to VERSION (outrider models list {name})")
    if stage != "archived":
        raise FailedPrecondition(f"{name} version {target} is {stage} and was never production: only archived "
                                 f"versions can be rolled back to; to make it production request a promotion "
                                 f"(outrider models promote {name} {target} --reason TEXT)")
    return current, target


def rollback(db: Conn, name: str, to_version: int, actor: str, reason: str, now_ns: int) -> int:
    """Make an archived version production again at once (the current one archived), in the caller's
    write transaction with its audit row; returns the rollout id (push it after the commit).
    ``to_version`` 0: the version that was production before the current one."""
    audit.take_turn(db)
    current, target = rollback_target(db, name, to_version)
    stages.move(db, name, current, "production", "archived", actor, f"rolled back to version {target}: {reason}",
                now_ns)
    stages.move(db, name, target, "archived", "production", actor, f"rollback from version {current}: {reason}",
                now_ns)
    rollout_id = start_rollout(db, name, target, "rollback", actor, reason, now_ns, from_version=current)
    audit.append(db, actor, "model.rollback", f"model/{name}", model_name=name, before={"production": current},
                 after={"production": target, "rollout": rollout_id}, reason=reason, now_ns=now_ns)
    clear_shadow_of(db, name, (current, target), actor, f"rolled back from version {current} to version {target}",
                    now_ns)
    return rollout_id


def check_share(share: float) -> float:
    if not (math.isfinite(share) and 0 < share <= 1):
        raise InvalidArgument(f"share must be more than 0 and at most 1 (0.25: a quarter of the requests), "
                              f"got {share}")
    return share


def set_shadow(db: Conn, name: str, version: int, share: float, actor: str, reason: str, now_ns: int) -> int:
    """Put staging ``version`` in shadow on the model's agents (replacing any shadow); returns the rollout id."""
    check_share(share)
    audit.take_turn(db)
    row = stages.version(db, name, version)
    if row["stage"] != "staging":
        raise FailedPrecondition(f"{name} version {version} is {row['stage']}; only a staging version can run in "
                                 f"shadow (outrider models stage {name} {version} staging --reason TEXT)")
    before = current_shadow(db, name)
    rollouts.set_shadow(db, name, version, share, now_ns, actor)
    rollout_id = start_rollout(db, name, version, "shadow", actor, reason, now_ns, share=share)
    audit.append(db, actor, "model.shadow", f"model/{name}/{version}", model_name=name,
                 before={"shadow": before["version"], "share": before["share"]} if before else None,
                 after={"shadow": version, "share": share, "rollout": rollout_id}, reason=reason, now_ns=now_ns)
    return rollout_id


def clear_shadow(db: Conn, name: str, actor: str, reason: str, now_ns: int) -> int:
    """Stop the model's shadow on its agents; returns the rollout id."""
    audit.take_turn(db)
    before = current_shadow(db, name)
    if before is None:
        raise FailedPrecondition(f"no shadow runs for model {name!r}: there is nothing to clear")
    return _unshadow(db, name, before, actor, reason, now_ns)


def clear_shadow_of(db: Conn, name: str, versions: Iterable[int], actor: str, reason: str, now_ns: int) -> int:
    """Stop the model's shadow if it runs one of ``versions`` (which are leaving staging); returns the
    unshadow rollout's id (push it after the commit), or 0 when no such shadow runs."""
    before = current_shadow(db, name)
    if before is None or before["version"] not in set(versions):
        return 0
    return _unshadow(db, name, before, actor, reason, now_ns)


def shadowed(db: Conn, name: str, version: int) -> bool:
    return rollouts.shadowed(db, name, version)


def _unshadow(db: Conn, name: str, before: dict[str, Any], actor: str, reason: str, now_ns: int) -> int:
    rollouts.delete_shadow(db, name)
    rollout_id = start_rollout(db, name, before["version"], "unshadow", actor, reason, now_ns)
    audit.append(db, actor, "model.unshadow", f"model/{name}/{before['version']}", model_name=name,
                 before={"shadow": before["version"], "share": before["share"]},
                 after={"shadow": None, "rollout": rollout_id}, reason=reason, now_ns=now_ns)
    return rollout_id


# ------------------------------------------------------------------ reads


def get(db: Conn, rollout_id: int) -> pb.Rollout:
    row = rollouts.get(db, rollout_id)
    if row is None:
        raise NotFound(f"there is no rollout {rollout_id}; list them with: outrider rollouts")
    return _message(db, row)


def listing(db: Conn, model: str = "", limit: int = DEFAULT_LIST_LIMIT) -> list[pb.Rollout]:
    """The newest ``limit`` rollouts (of ``model``), newest first, with their acks."""
    return [r for _, r in itertools.islice(listing_rows(db, model, limit=limit), limit)]


def listing_rows(db: Conn, model: str = "", *, before_id: int = 0,
                 limit: int | None = None) -> Iterator[tuple[tuple[int], pb.Rollout]]:
    """``listing`` read lazily as ((id,), rollout); ``before_id``: only older rollouts."""
    for r in rollouts.listing(db, model, before_id, None if limit is None else limit + 1):
        yield (r["id"],), _message(db, r)


def _message(db: Conn, r: dict[str, Any]) -> pb.Rollout:
    acks = [pb.Rollout.AgentAck(agent_id=a["agent_id"], run_id=a["run_id"], state=a["state"], error=a["error"],
                                unix_nano=a["at_ns"])
            for a in rollouts.acks(db, r["id"])]
    return pb.Rollout(id=r["id"], model_name=r["model"], version=r["version"], kind=r["kind"], actor=r["actor"],
                      reason=r["reason"], started_unix_nano=r["started_ns"], from_version=r["from_version"],
                      agents=acks, share=r["share"])


def artifact_chunks(db: Conn, artifacts: ArtifactStore, name: str, version: int,
                    limits: Limits = Limits()) -> Iterator[pb.ArtifactChunk]:
    """A version's artifact in CHUNK_BYTES chunks, the first with its size and sha256. Every check
    happens before the first chunk, so a refusal is a clean status."""
    validate_model_key(name, "-", limits)
    row = versions.artifact(db, name, version)
    if row is None:
        raise NotFound(f"model {name!r} has no version {version}")
    if row["stage"] == "retired":
        raise FailedPrecondition(f"{name} version {version} is retired and can never be served")
    file = artifacts.open(row["sha256"])
    if row["artifact_removed_ns"] or file is None:
        raise FailedPrecondition(f"the artifact of {name} version {version} has been removed")

    def chunks() -> Iterator[pb.ArtifactChunk]:
        with file:
            first = True
            while data := file.read(CHUNK_BYTES):
                yield (pb.ArtifactChunk(data=data, total_size=row["size"], sha256=row["sha256"]) if first
                       else pb.ArtifactChunk(data=data))
                first = False

    return chunks()


# ------------------------------------------------------------------ pushing


class AgentLink(Protocol):
    """One live agent stream, as the pusher needs it (``collector.api.streams.AgentStream`` is one):
    this room only plans commands, the api room owns the streams and passes them in."""

    hello: pb.Hello
    key: tuple[str, str]

    def send(self, message: pb.CollectorMessage) -> bool: ...  # False once the stream has ended


class LiveAgents(Protocol):
    """The agent streams open now (``collector.api.streams.LiveStreams`` is one)."""

    def of_model(self, model_name: str, managed: bool = False) -> Sequence[AgentLink]: ...


class RolloutPusher:
    """Tells managed agents' live streams what to serve, after the change is committed.

    One lock per model orders the reading of the desired state with the queueing of its commands,
    so a Hello racing a change can never leave an agent on the older state: whichever takes the
    lock second reads (and sends) the newer one. Agents answer the same command twice harmlessly."""

    def __init__(self, store: Any, live: LiveAgents, limits: Limits = Limits()) -> None:
        self.store = store
        self.live = live
        self.limits = limits
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def _lock(self, model: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(model, threading.Lock())

    def hello(self, stream: AgentLink) -> None:
        """Queue an agent's commands after its Hello was recorded (and its stream is live): a managed
        agent's rollout, and for any agent the reference projection of the version it serves."""
        model = stream.hello.model_name
        try:
            with self._lock(model):
                db = self.store.read()
                if stream.hello.managed:
                    planned = hello_commands(db, stream.hello)
                else:
                    found = reference_command(db, model, stream.hello.model_version)
                    planned = [found] if found is not None else []
                self._deliver([stream], planned)
        except OutriderError as exc:  # the store is closing: the agent hears again when it reconnects
            log.warning("cannot tell agent %s what to serve: %s", stream.hello.agent_id, exc)

    def push_reference(self, model: str, version: str) -> int:
        """Send ``version``'s reference projection (or its absence) to every live agent of ``model``;
        those that serve ``version`` use it. Returns how many streams it was sent to. The profile is
        stored already: a failure here is logged, not raised (agents hear on their next hello)."""
        try:
            with self._lock(model):
                streams = self.live.of_model(model)
                planned = reference_command(self.store.read(), model, version, always=True)
                self._deliver(streams, [planned] if planned is not None else [])
        except OutriderError as exc:
            log.warning("cannot send the reference of %s %s to its agents: %s", model, version, exc)
            return 0
        return len(streams)

    def push(self, model: str, family: str) -> int:
        """Send the current state of ``family`` (SERVE or SHADOW) to every live managed agent of ``model``;
        returns how many streams it was sent to."""
        with self._lock(model):
            streams = self.live.of_model(model, managed=True)
            self._deliver(streams, family_commands(self.store.read(), model, family))
        return len(streams)

    def push_rollout(self, rollout_id: int) -> int:
        """Push the rollout and any started in the same transaction (a rollback's unshadow)."""
        found = rollouts.get(self.store.read(), rollout_id)
        if found is None:
            raise NotFound(f"there is no rollout {rollout_id}")
        return self.push_started(found["model"], found["started_ns"])

    def push_started(self, model: str, started_ns: int) -> int:
        """Push every family in which a rollout of ``model`` started at ``started_ns`` (one transaction's
        clock reading), serve before shadow; returns how many streams they were sent to."""
        kinds = rollouts.kinds_started(self.store.read(), model, started_ns)
        families = {FAMILY[k] for k in kinds if k in FAMILY}
        return max((self.push(model, family) for family in (SERVE, SHADOW) if family in families), default=0)

    def _deliver(self, streams: Sequence[AgentLink], planned: list[Planned]) -> None:
        if not streams or not planned:
            return
        runs = sorted({s.key for s in streams})
        self.store.write(lambda db: record_sent(db, runs, planned))  # acks exist before any answer can
        for stream in streams:
            for p in planned:
                stream.send(pb.CollectorMessage(command=p.command))
        log.info("sent %s to %d agent stream(s) of %s", ", ".join(f"{p.command.kind} {p.command.id}" for p in planned),
                 len(streams), streams[0].hello.model_name)

    def record(self, agent_id: str, run_id: str, state: pb.ModelState) -> None:
        """An agent's ModelState: what it serves now, and its answer to a command. Returns after commit."""
        validate_model_state(state, self.limits)  # InvalidArgument ends the stream, changing nothing
        self.store.write(lambda db: record_state(db, agent_id, run_id, state, time.time_ns()))
        if not state.ok:
            log.warning("agent %s run %s: command %s failed: %s", agent_id, run_id, state.command_id, state.error)
