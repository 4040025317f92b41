"""The model version requests run on, swapped between requests.

``ModelSwitch`` is what the OIP servicer reads per request. A request holds
its version for the whole call, so a swap never fails or splits a request:
requests that started on the old version finish on it, and it is ``idle`` once
the last has. Static servers (``agent.server.serve``) hold one version for
good; managed agents (``agent.rollout``) swap.

A request takes no lock (it runs on every request, under the GIL): it reads
``current`` (one attribute: the old version or the new, never half of one),
puts a token in that version's ``running`` deque (``append`` and ``pop`` are
atomic in CPython) and then checks that the version was not retired meanwhile;
if it was, it takes its token back and reads ``current`` again. A swap sets
``current`` first, then ``retired``, then looks at ``running``: so either the
request saw ``retired`` and never uses the old version, or its token was in
``running`` before the swap looked, and the last request to leave sets ``idle``.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.dataplane import DataPlane
from agent.errors import NotFound, Unavailable
from agent.shadow import ShadowRunner


@dataclass(eq=False)
class LoadedVersion:
    """One loaded model version and the requests running on it."""

    plane: DataPlane
    session: Any
    version: str
    sha256: str = ""
    schema_json: str = ""
    feature_names: dict[str, list[str]] | None = None  # as the registry named its columns (managed agents)
    running: deque = field(default_factory=deque)  # one token per request running on it now
    retired: bool = False  # swapped out: closed once ``idle``
    idle: threading.Event = field(default_factory=threading.Event)

    @property
    def active(self) -> int:
        """Requests running on it now."""
        return len(self.running)


class ModelSwitch:
    """The version requests run on now (``current``; None until the first load) and the shadow."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.current: LoadedVersion | None = None
        self.shadow: ShadowRunner | None = None  # read once per request
        self._lock = threading.Lock()  # swaps one at a time (requests take no lock)
        self._listeners: list[Callable[[LoadedVersion | None], None]] = []

    def waiting_message(self) -> str:
        return (f"model '{self.model_name}' is not loaded yet: this agent waits for the collector to name "
                f"the production version of {self.model_name}")

    def acquire(self, name: str) -> LoadedVersion:
        """The version this request runs on; ``release`` it when done, whatever happens."""
        if name != self.model_name:
            raise NotFound(f"model '{name}' is not served here; this server serves '{self.model_name}'")
        while True:  # again only if a swap retires the version between the read and the token
            loaded = self.current
            if loaded is None:
                raise Unavailable(self.waiting_message())
            loaded.running.append(None)
            if not loaded.retired:
                return loaded
            self.release(loaded)

    def release(self, loaded: LoadedVersion) -> None:
        loaded.running.pop()
        if loaded.retired and not loaded.running:  # more than one may see it: setting an Event twice is fine
            loaded.idle.set()

    def swap(self, new: LoadedVersion) -> LoadedVersion | None:
        """Make ``new`` current for every request from now on; returns the version replaced."""
        with self._lock:
            old, self.current = self.current, new  # first: a request that then sees ``retired`` reads ``new``
            if old is not None:
                old.retired = True
                if not old.running:
                    old.idle.set()
        for listener in list(self._listeners):
            listener(new)
        return old

    def on_change(self, listener: Callable[[LoadedVersion | None], None]) -> None:
        """Call ``listener(current)`` now and after every swap (the health service's status)."""
        self._listeners.append(listener)
        listener(self.current)
