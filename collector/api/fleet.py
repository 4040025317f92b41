"""This collector as one of several on a shared database: its id and heartbeat, which agent runs
are connected anywhere in the fleet, the leases of its background loops, and pushes made through
other collectors reaching the agents streaming here.

- Heartbeat: a row in ``collectors`` refreshed every ``heartbeat_interval`` seconds; a run counts
  as connected when its stream is open here (``LiveStreams``, exact) or on another collector whose
  heartbeat is younger than ``heartbeat_timeout`` (``collector.store.collectors.connected_runs``, read at
  most every ``refresh`` seconds), so Status, the web page, metrics and the alerts' "still served"
  answer for the whole fleet, and a killed collector's agents drop out after the timeout.
- Leases (``collector.store.leases``): the rollup and the drift evaluation loops run a pass only
  while they hold theirs.
- Pushes: on PostgreSQL every rollout and attached profile is announced at commit
  (``collector.store.collectors.announce``); a listener (``collector.store.listener``) pushes what other
  collectors announce to the streams open here, and a resync every ``resync_interval`` seconds pushes
  rollouts and profiles newer than the last seen that no announcement brought (a listener that was
  reconnecting). On SQLite there is one collector: pushes stay in-process, nothing listens.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.errors import InvalidArgument, OutriderError
from collector.lifecycle.rollout import RolloutPusher
from collector.store import collectors, leases
from collector.store.listener import Listener
from collector.store.store import Store

log = logging.getLogger(__name__)

MAX_ID_CHARS = 200
FORGET_AFTER = 86400.0  # seconds a collector that stopped or went silent stays listed in Status


def default_id() -> str:
    """host:pid-random: unique across restarts and machines."""
    return f"{socket.gethostname()}:{os.getpid()}-{secrets.token_hex(3)}"


def check_id(collector_id: str) -> str:
    if not collector_id or len(collector_id) > MAX_ID_CHARS or not collector_id.isprintable():
        raise InvalidArgument(f"a collector id must be 1 to {MAX_ID_CHARS} printable characters, got "
                              f"{collector_id[:MAX_ID_CHARS]!r}")
    return collector_id


class FleetMember:
    def __init__(self, store: Store, pusher: RolloutPusher, collector_id: str = "", *,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.store, self.pusher = store, pusher
        self.id = check_id(collector_id or default_id())
        self.clock = clock
        self.heartbeat_interval, self.heartbeat_timeout, self.resync_interval = 5.0, 15.0, 10.0
        self.refresh = 1.0  # how stale the other collectors' runs may be
        self.leases: dict[str, leases.Lease] = {}
        self.address = ""
        self._started_ns = clock()
        self._lock = threading.Lock()  # the resync's sets
        self._remote_lock = threading.Lock()  # held while the other collectors' runs are read
        self._remote: set[tuple[str, str]] = set()
        self._remote_read_ns = 0
        self._started = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener: Listener | None = None
        self._own_pid = 0  # our writer's backend: our own announcements were pushed in-process
        self._seen: set[int] = set()  # rollouts pushed here since the resync floor
        self._floor = 0  # rollouts up to this id need no resync
        self._ref_floor_ns = 0
        self._refs_heard: set[tuple[str, str]] = set()

    # ------------------------------------------------------------ lifecycle

    def start(self, address: str, *, heartbeat_interval: float = 5.0, heartbeat_timeout: float | None = None,
              resync_interval: float = 10.0) -> None:
        """Heartbeat once (before any stream can say hello here), then keep it going; listen on PostgreSQL."""
        self.address = address
        self.heartbeat_interval, self.resync_interval = heartbeat_interval, resync_interval
        self.heartbeat_timeout = heartbeat_timeout if heartbeat_timeout is not None else 3 * heartbeat_interval
        self.refresh = min(1.0, heartbeat_interval / 2)
        self._beat()
        self._started = True
        self._threads.append(threading.Thread(target=self._heartbeats, name="outrider-fleet-heartbeat", daemon=True))
        if Listener.wanted(self.store.engine):
            self._own_pid = self.store.write(collectors.backend_pid)
            db = self.store.read()
            self._floor = collectors.newest_rollout(db)
            self._ref_floor_ns = max((at for _, _, at in collectors.profiles_after(db, 0)), default=0)
            self._listener = Listener(self.store.engine, self._heard, self.resync)
            self._threads.append(threading.Thread(target=self._resyncs, name="outrider-fleet-resync", daemon=True))
            self._listener.start()
        else:  # SQLite: this collector is the only one, and holds every lease
            self.store.write(lambda db: leases.take_all(db, self.id))
        for thread in self._threads:
            thread.start()
        log.info("collector %s at %s joined the fleet (heartbeat every %g s, timeout %g s)", self.id, address,
                 self.heartbeat_interval, self.heartbeat_timeout)

    def lease(self, name: str, ttl: float) -> leases.Lease:
        """This collector's lease ``name`` (one object for the loops sharing it; its ttl the longest asked)."""
        found = self.leases.get(name)
        if found is None:
            found = self.leases[name] = leases.Lease(self.store.write, name, self.id, ttl, self.clock)
        found.ttl_ns = max(found.ttl_ns, int(ttl * 1e9))
        return found

    def stop(self) -> None:
        """After the streams and loops have stopped: stop listening, and leave (no heartbeat), so the
        fleet stops counting this collector at once."""
        self._stop.set()
        if self._listener is not None:
            self._listener.stop()
        for thread in self._threads:
            if thread.is_alive():
                thread.join()
        if self._started:
            try:
                self.store.write(lambda db: collectors.leave(db, self.id, self.clock()))
            except OutriderError as exc:
                log.warning("cannot record that collector %s left: %s", self.id, exc)

    def _heartbeats(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            self._beat()

    def _beat(self) -> None:
        try:
            self.store.write(lambda db: collectors.heartbeat(db, self.id, self.address, self._started_ns, self.clock()))
        except OutriderError as exc:  # the database is away: the fleet counts us gone after the timeout
            log.warning("collector %s: heartbeat failed: %s", self.id, exc)

    def members(self, now_ns: int) -> list[dict[str, Any]]:
        """Every collector known (``collector.store.collectors.collector_rows``: live ones first), each with
        ``leases``, the names of the live leases it holds: what Status and the web page show."""
        db = self.store.read()
        held: dict[str, list[str]] = {}
        for lease in leases.holders(db, now_ns):
            if lease["live"]:
                held.setdefault(lease["holder"], []).append(lease["name"])
        fresh_after = now_ns - int(self.heartbeat_timeout * 1e9)
        return [{**c, "leases": held.get(c["id"], [])} for c in collectors.collector_rows(db, fresh_after)]

    def prune(self, now_ns: int) -> None:
        """Forget collectors silent or stopped for longer than FORGET_AFTER (by the lease holder's housekeeping)."""
        gone = self.store.write(lambda db: collectors.prune(db, now_ns - int(FORGET_AFTER * 1e9)))
        if gone:
            log.info("forgot %d collector(s) not heard from in %g h", gone, FORGET_AFTER / 3600)

    # ------------------------------------------------------------ streams

    def stream_opened(self, agent_id: str, run_id: str) -> None:
        self.store.write(lambda db: collectors.stream_opened(db, agent_id, run_id, self.id))

    def stream_closed(self, agent_id: str, run_id: str, now_ns: int) -> None:
        self.store.write(lambda db: collectors.stream_closed(db, agent_id, run_id, self.id, now_ns))

    def remote_connected(self, agent_id: str, run_id: str) -> bool:
        """Whether the run streams to another live collector (this collector's own streams are the caller's)."""
        if not self._started:
            return False
        now = self.clock()
        with self._remote_lock:
            if now - self._remote_read_ns > self.refresh * 1e9:
                fresh_after = now - int(self.heartbeat_timeout * 1e9)
                try:
                    self._remote = collectors.connected_runs(self.store.read(), fresh_after, besides=self.id)
                except OutriderError as exc:
                    log.warning("cannot read which agents stream to other collectors: %s", exc)
                    self._remote = set()
                self._remote_read_ns = now
            return (agent_id, run_id) in self._remote

    # ------------------------------------------------------------ pushes from other collectors

    def announce_reference(self, model: str, version: str) -> None:
        """A profile was attached here (and pushed to the streams here): tell the other collectors."""
        try:
            self.store.write(lambda db: collectors.announce_reference(db, model, version))
        except OutriderError as exc:  # their resync finds it
            log.warning("cannot announce the reference of %s %s to the other collectors: %s", model, version, exc)

    def _heard(self, payload: str, pid: int) -> None:
        parsed = collectors.parse(payload)
        if parsed is None:
            log.warning("ignored an announcement this collector does not understand: %r", payload[:200])
            return
        kind, what = parsed
        own = pid == self._own_pid
        if kind == "rollout":
            with self._lock:
                if what in self._seen or what <= self._floor:
                    return
                self._seen.add(what)
            if not own:
                self._push_rollout(what)
        else:
            with self._lock:
                self._refs_heard.add(what)
            if not own:
                self.pusher.push_reference(*what)

    def _push_rollout(self, rollout_id: int) -> None:
        try:
            sent = self.pusher.push_rollout(rollout_id)
        except OutriderError as exc:
            log.warning("cannot push rollout %d made through another collector: %s", rollout_id, exc)
            return
        log.info("pushed rollout %d (made through another collector) to %d agent stream(s) here", rollout_id, sent)

    def _resyncs(self) -> None:
        while not self._stop.wait(self.resync_interval):
            self.resync()

    def resync(self) -> None:
        """Push rollouts and profiles newer than the floor that no announcement brought here."""
        try:
            db = self.store.read()
            with self._lock:
                floor, ref_floor = self._floor, self._ref_floor_ns
            missed = []
            for rollout_id in collectors.rollouts_after(db, floor):
                with self._lock:
                    if rollout_id not in self._seen:
                        self._seen.add(rollout_id)
                        missed.append(rollout_id)
            profiles = collectors.profiles_after(db, ref_floor)
        except OutriderError as exc:
            log.warning("resync of rollouts made through other collectors failed: %s", exc)
            return
        for rollout_id in missed:
            self._push_rollout(rollout_id)
        with self._lock:
            heard, self._refs_heard = self._refs_heard, set()
            if self._seen:
                self._floor = max(self._floor, *self._seen)
                self._seen = set()
            if profiles:
                self._ref_floor_ns = max(at for _, _, at in profiles)
        for model, version, _ in profiles:
            if (model, version) not in heard:
                self.pusher.push_reference(model, version)
        if missed:
            log.info("resync pushed %d rollout(s) no announcement brought: %s", len(missed), missed)
