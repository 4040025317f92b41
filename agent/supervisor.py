"""``outrider agent serve --processes N``: N serving processes on one port, and the one that watches them.

One Python process serves with one GIL; N processes listening on one port with
SO_REUSEPORT (the kernel spreads new connections over them) use N cores. The
process the user started becomes a supervisor: ``agent.cli`` has checked every
argument, then ``supervise`` holds the port with an SO_REUSEPORT socket that
never listens (port 0 becomes a concrete port, and nobody else can take the
port while a child restarts) and starts each child as ``python -m agent.cli
<the same arguments> --processes 1 --listen HOST:PORT --agent-id ID/I
[--spool-dir DIR/I] [--metrics 127.0.0.1:0] [--http-listen HOST:PORT]``. It
prints one "serving ..." line once every child has printed its own. The REST
port of ``--http-listen`` is held and shared the same way.

Each child is a whole agent: its own ring, summaries, spool and exporter, and
its own agent id ``ID/I`` (the collector counts the runs of one agent id as its
restarts, so processes serving side by side need ids of their own; drift merges
every window of a model version whichever agent sent it). A managed child is a
managed agent of the model: a rollout waits for an answer from every connected
managed agent, so it is acked once all N have swapped.

A child learns it is one of a group from ``OUTRIDER_AGENT_PROCESS_OF`` ("I/N"):
it then sets ``grpc.so_reuseport`` (its siblings hold the port, so it skips the
bind probe), runs grpcio's threads server unless ``--grpc-server`` says otherwise
(two event loops on two shared cores, each half as busy, cost more a request:
``agent.server.serve``), and stops, draining, when its stdin closes: the supervisor holds
the other end, so a supervisor killed with SIGKILL leaves no orphans serving.

What an on-call person gets (as from gunicorn's arbiter, or systemd's
Restart=on-failure with a start limit):

- At start, child 0 starts alone: if it fails, its one-line error is the only
  output and its exit code the supervisor's, and nothing else was started. The
  others then start together; one that fails to start stops all (exit 1).
- Later, a child that exits on its own (crash, OOM kill, SIGKILL) is restarted
  after ``RESTART_DELAY`` with the same agent id and spool (a new run that also
  sends what its predecessor left spooled); the others serve meanwhile. Each
  restart is logged and counted (``outrider_agent_process_restarts``). More than
  ``MAX_RESTARTS`` within ``RESTART_WINDOW`` stops all with exit 1: a crash loop
  is for the service manager above to see, not to hide.
- SIGTERM or SIGINT is passed to every child, each drains as a lone agent does;
  exit 0 only when every child exited 0. A child still running
  ``--grace-seconds`` + ``DRAIN_SECONDS`` later is killed, and the exit is 1.
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agent.cli_contract import CommandError, UsageError

log = logging.getLogger(__name__)

PROCESS_ENV = "OUTRIDER_AGENT_PROCESS_OF"  # "I/N": set by the supervisor for its children only
MAX_PROCESSES = 64
MAX_RESTARTS = 5
RESTART_WINDOW = 600.0  # seconds
RESTART_DELAY = 1.0  # seconds before a dead child is started again
DRAIN_SECONDS = 60.0  # beyond --grace-seconds: a child's last window is flushed and delivered (or spooled)
POLL_SECONDS = 0.2


# ------------------------------------------------------------------------ the child's side

def member() -> tuple[int, int] | None:
    """(index, processes) when this process is a child of ``supervise``, else None."""
    index, sep, count = os.environ.get(PROCESS_ENV, "").partition("/")
    if not (sep and index.isdigit() and count.isdigit()):
        return None
    return int(index), int(count)


def stop_when_orphaned(stop: Any) -> None:
    """Fill ``stop`` (an ``agent.cli.StopRequest``) when stdin closes: the supervisor is gone."""
    def watch() -> None:
        # os.read, not sys.stdin: a daemon thread blocked in a buffered reader holds its lock, and the
        # interpreter's shutdown then aborts on it
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        if stop.signum is None:
            log.warning("the supervising process is gone; stopping")
            stop.signum = signal.SIGTERM

    threading.Thread(target=watch, name="outrider-orphan-watch", daemon=True).start()


# ------------------------------------------------------------------------ the supervisor

def check_platform() -> None:
    """SO_REUSEPORT that spreads connections over the listeners: Linux's."""
    if not sys.platform.startswith("linux") or not hasattr(socket, "SO_REUSEPORT"):
        raise UsageError(f"--processes above 1 needs SO_REUSEPORT with load balancing (Linux); this system "
                         f"({sys.platform}) lacks it: run one agent per port, or --processes 1")


def hold_port(listen: str, flag: str = "--listen") -> tuple[socket.socket, str]:
    """An SO_REUSEPORT socket bound (never listening) to ``listen``, and HOST:PORT with the concrete port."""
    host, _, port = listen.rpartition(":")
    family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    held = socket.socket(family, kind, proto)
    try:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(address)
    except OSError as exc:
        held.close()
        raise UsageError(f"cannot listen on {listen}: {exc.strerror or exc}; pick a free port on a local "
                         f"address with {flag}") from None
    return held, f"{host}:{held.getsockname()[1]}"


class Child:
    """One serving process: its ``proc``, and what it printed (its metrics URL, its serving line)."""

    def __init__(self, index: int, command: list[str], env: dict[str, str]) -> None:
        self.index = index
        self.ready = threading.Event()
        self.serving_line = ""
        self.metrics_url: str | None = None
        self.rest_url: str | None = None
        self.reported = False  # its readiness was logged
        # stdin: a pipe the child reads to notice our death (stop_when_orphaned); stderr: ours, for its log
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        self._reader = threading.Thread(target=self._read, name=f"outrider-process-{index}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("metrics on "):
                self.metrics_url = line[len("metrics on "):]
            elif line.startswith("rest on "):
                self.rest_url = line[len("rest on "):]
            elif line.startswith("serving "):
                self.serving_line = line
                self.ready.set()
            else:
                log.info("process %d: %s", self.index, line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exited(self) -> int | None:
        return self.proc.poll()

    def close(self) -> None:
        """After it exited: our pipe ends, and its reader."""
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Supervisor:
    """N children serving one port; ``run`` until a stop signal (see the module's text for the policy)."""

    def __init__(self, argv: list[str], processes: int, listen: str, agent_id: str,
                 spool_dir: str | None, metrics: bool, grace_seconds: float, http_listen: str | None = None) -> None:
        self.argv, self.processes, self.listen = list(argv), processes, listen
        self.http_listen = http_listen
        self.agent_id, self.spool_dir, self.metrics = agent_id, spool_dir, metrics
        self.grace_seconds = grace_seconds
        self.children: list[Child | None] = [None] * processes
        self.restarts = 0  # over the supervisor's life (the metric)
        self._recent: collections.deque[float] = collections.deque()  # times of the restarts in RESTART_WINDOW
        self._due: dict[int, float] = {}  # index -> when its restart is due
        self._lock = threading.Lock()  # children and counters, read by /metrics scrapes

    # --- what the children run ----------------------------------------------------------
    def command(self, index: int) -> list[str]:
        """The child's command line: the user's arguments, then ours (argparse keeps a flag's last value)."""
        ours = ["--processes", "1", "--listen", self.listen, "--agent-id", f"{self.agent_id}/{index}"]
        if self.spool_dir:
            ours += ["--spool-dir", str(Path(self.spool_dir) / str(index))]
        if self.metrics:
            ours += ["--metrics", "127.0.0.1:0"]
        if self.http_listen:
            ours += ["--http-listen", self.http_listen]
        return [sys.executable, "-m", "agent.cli", *self.argv, *ours]

    def _start(self, index: int) -> Child:
        env = {**os.environ, PROCESS_ENV: f"{index}/{self.processes}"}
        child = Child(index, self.command(index), env)
        with self._lock:
            self.children[index] = child
        log.info("process %d starting (pid %d, agent id %s/%d)", index, child.pid, self.agent_id, index)
        return child

    def live(self) -> list[Child]:
        with self._lock:
            return [c for c in self.children if c is not None and c.exited() is None]

    def scrape_targets(self) -> list[tuple[int, str]]:
        """(index, /metrics URL) of every child serving now."""
        return [(c.index, c.metrics_url) for c in self.live() if c.ready.is_set() and c.metrics_url]

    def serving(self) -> int:
        return sum(c.ready.is_set() for c in self.live())

    # --- the life of the group ----------------------------------------------------------
    def run(self, stop: Any) -> int:
        """Start the children, print the serving line, watch them until ``stop`` (a StopRequest) fills."""
        first = self._start(0)
        code = self._wait_ready([first], stop)
        if code is not None:  # its own one-line error (stderr is shared) says why; nothing else started
            first.close()
            return code
        if stop.signum is not None:
            return self._stop_all()
        others = [self._start(i) for i in range(1, self.processes)]
        if self._wait_ready(others, stop) is not None:
            failed = next(c for c in others if c.exited() is not None)
            self._stop_all_after(f"process {failed.index} {describe(failed.exited() or 0)} while starting (its "
                                 "error is above); stopped the others")
        if stop.signum is None:
            if self.http_listen:
                print(f"rest on {first.rest_url or 'http://' + self.http_listen}", flush=True)
            print(first.serving_line, flush=True)
            log.info("%d processes serving on %s (pids %s)", self.processes, self.listen,
                     " ".join(str(c.pid) for c in self.live()))
            for child in self.live():
                child.reported = True
            failure = self._watch(stop)
            if failure:
                self._stop_all_after(failure)
        return self._stop_all()

    def _stop_all_after(self, failure: str) -> None:
        """Stop every child because of ``failure``, and raise it (with what went wrong stopping them)."""
        try:
            self._stop_all()
        except CommandError as exc:
            failure = f"{failure}; then {exc}"
        raise CommandError(failure)

    def _wait_ready(self, children: list[Child], stop: Any) -> int | None:
        """Until every one of ``children`` is serving (None), one exited first (its exit code), or a stop."""
        while stop.signum is None:
            for child in children:
                code = child.exited()
                if code is not None:
                    child.ready.wait(1)  # its reader may not have seen the last line yet
                    return code if code != 0 else 1
            if all(c.ready.is_set() for c in children):
                return None
            time.sleep(POLL_SECONDS)
        return None

    def _watch(self, stop: Any) -> str:
        """Restart children that exit on their own; returns why everything must stop ("" on a signal)."""
        while stop.signum is None:
            now = time.monotonic()
            with self._lock:
                children = list(self.children)
            for index, child in enumerate(children):
                if index in self._due:
                    if now >= self._due[index]:
                        del self._due[index]
                        self._start(index)
                    continue
                if child is None:
                    continue
                if child.ready.is_set() and not child.reported:
                    child.reported = True
                    log.info("process %d serving again (pid %d)", index, child.pid)
                code = child.exited()
                if code is None:
                    continue
                child.close()
                while self._recent and now - self._recent[0] > RESTART_WINDOW:
                    self._recent.popleft()
                if len(self._recent) >= MAX_RESTARTS:
                    return (f"process {index} (pid {child.pid}) {describe(code)}, after {len(self._recent)} "
                            f"restarts in the last {RESTART_WINDOW / 60:.0f} minutes; stopped all processes "
                            "(see the log above)")
                self._recent.append(now)
                with self._lock:
                    self.restarts += 1
                    self.children[index] = None
                self._due[index] = now + RESTART_DELAY
                log.error("process %d (pid %d, agent id %s/%d) %s; restarting it in %.0f s (restart %d of at most "
                          "%d in %.0f minutes)", index, child.pid, self.agent_id, index, describe(code), RESTART_DELAY,
                          len(self._recent), MAX_RESTARTS, RESTART_WINDOW / 60)
            time.sleep(POLL_SECONDS)
        return ""

    def _stop_all(self) -> int:
        """SIGTERM to every child, wait for each to drain; 0 when all exited 0, else CommandError."""
        self._due.clear()
        with self._lock:
            children = [c for c in self.children if c is not None]
        for child in children:
            if child.exited() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_seconds + DRAIN_SECONDS
        failures = []
        for child in children:
            try:
                code = child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
                failures.append(f"process {child.index} (pid {child.pid}) had not stopped "
                                f"{self.grace_seconds + DRAIN_SECONDS:.0f} s after SIGTERM and was killed")
                code = 0
            if code != 0:
                failures.append(f"process {child.index} (pid {child.pid}) {describe(code)} while stopping")
            child.close()
        if failures:
            raise CommandError("; ".join(failures) + " (see the log above)")
        return 0


def supervise(args: argparse.Namespace) -> int:
    """``outrider agent serve --processes N`` with N > 1, after ``agent.cli`` checked the arguments."""
    from agent.cli import close, stop_signals
    from agent.metrics import ProcessMetrics, start_for_cli

    check_platform()
    held, listen = hold_port(args.listen)
    held_http, http_listen = None, None
    metrics = None
    try:
        if getattr(args, "http_listen", None):
            held_http, http_listen = hold_port(args.http_listen, "--http-listen")
        group = Supervisor(getattr(args, "argv", None) or sys.argv[1:], args.processes, listen,
                           args.agent_id or socket.gethostname(), args.spool_dir, bool(args.metrics),
                           args.grace_seconds, http_listen)
        metrics = start_for_cli(lambda: ProcessMetrics(group), args.metrics)
        with stop_signals() as stop:
            return group.run(stop)
    finally:
        close(metrics)
        held.close()
        if held_http is not None:
            held_http.close()
