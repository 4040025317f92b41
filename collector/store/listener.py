"""A PostgreSQL connection of its own that LISTENs for other collectors' announcements
(``collector.store.collectors.announce``) and hands each payload to a callback, reconnecting when the
connection drops. What it misses while away the caller's periodic resync finds."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from collector.store.engine import Engine, PostgresEngine
from collector.store.collectors import CHANNEL

log = logging.getLogger(__name__)


class Listener:
    """``on_payload(payload, pid)`` for every notification on CHANNEL (``pid``: the notifying backend);
    ``on_connect()`` each time listening (re)starts, so the caller can resync what it missed."""

    def __init__(self, engine: Engine, on_payload: Callable[[str, int], None],
                 on_connect: Callable[[], None], *, poll: float = 1.0, retry: float = 1.0) -> None:
        self.engine, self.on_payload, self.on_connect = engine, on_payload, on_connect
        self.poll, self.retry = poll, retry
        self.listening = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outrider-fleet-listener", daemon=True)

    @staticmethod
    def wanted(engine: Engine) -> bool:
        return isinstance(engine, PostgresEngine)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            conn = None
            try:
                conn = self.engine.connect()
                conn.execute(f"LISTEN {CHANNEL}")
                self.listening.set()
                self.on_connect()
                while not self._stop.is_set():
                    for note in conn.raw.notifies(timeout=self.poll):
                        self._handle(note.payload, note.pid)
            except Exception:  # the database went away: listen again; the resync covers the gap
                if not self._stop.is_set():
                    log.exception("listening for other collectors' changes failed; retrying in %.0f s", self.retry)
            finally:
                self.listening.clear()
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        log.debug("closing the listener's connection failed", exc_info=True)
            self._stop.wait(self.retry)

    def _handle(self, payload: str, pid: int) -> None:
        try:
            self.on_payload(payload, pid)
        except Exception:  # one bad push must not stop the listener
            log.exception("handling announcement %r failed", payload[:200])

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
