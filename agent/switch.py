"""The model version requests run on, swapped between requests.

``ModelSwitch`` is what the OIP servicer reads per request. A request holds
its version for the whole call (a counter, raised and lowered under a lock
held for that only), so a swap never fails or splits a request: requests that
started on the old version finish on it, and it is ``idle`` once the last has.
Static servers (``agent.server.serve``) hold one version for good; managed
agents (``agent.rollout``) swap.
"""
from __future__ import annotations

import threading
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
    active: int = 0        # requests running on it now (ModelSwitch's lock)
    retired: bool = False  # swapped out: closed once ``idle``
    idle: threading.Event = field(default_factory=threading.Event)


class ModelSwitch:
    """The version requests run on now (``current``; None until the first load) and the shadow."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.current: LoadedVersion | None = None
        self.shadow: ShadowRunner | None = None  # read once per request
        self._lock = threading.Lock()
        self._listeners: list[Callable[[LoadedVersion | None], None]] = []

    def waiting_message(self) -> str:
        return (f"model '{self.model_name}' is not loaded yet: this agent waits for the collector to name "
                f"the production version of {self.model_name}")

    def acquire(self, name: str) -> LoadedVersion:
        """The version this request runs on; ``release`` it when done, whatever happens."""
        if name != self.model_name:
            raise NotFound(f"model '{name}' is not served here; this server serves '{self.model_name}'")
        with self._lock:
            loaded = self.current
            if loaded is None:
                raise Unavailable(self.waiting_message())
            loaded.active += 1
        return loaded

    def release(self, loaded: LoadedVersion) -> None:
        with self._lock:
            loaded.active -= 1
            idle = loaded.retired and loaded.active == 0
        if idle:
            loaded.idle.set()

    def swap(self, new: LoadedVersion) -> LoadedVersion | None:
        """Make ``new`` current for every request from now on; returns the version replaced."""
        with self._lock:
            old, self.current = self.current, new
            if old is not None:
                old.retired = True
                if old.active == 0:
                    old.idle.set()
        for listener in list(self._listeners):
            listener(new)
        return old

    def on_change(self, listener: Callable[[LoadedVersion | None], None]) -> None:
        """Call ``listener(current)`` now and after every swap (the health service's status)."""
        self._listeners.append(listener)
        listener(self.current)
