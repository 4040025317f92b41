"""Where closed windows go. The gRPC exporter to the collector is one more sink.

A sink's ``export`` is called from the summary worker's side, never from a
request thread; it must not raise (the worker logs and counts what it does).
"""
from __future__ import annotations

import threading
from typing import Callable, Protocol

from protos import summary_pb2


class WindowSink(Protocol):
    def export(self, window: summary_pb2.WindowSummary) -> None: ...


class InMemorySink:
    """Keeps the most recent windows in memory (all of them up to ``max_windows``;
    older ones are evicted and counted, so a long-running agent stays bounded)."""

    def __init__(self, max_windows: int = 10_000) -> None:
        self.max_windows = max_windows
        self.windows: list[summary_pb2.WindowSummary] = []
        self.evicted = 0
        self._received = 0
        self._cond = threading.Condition()

    def export(self, window: summary_pb2.WindowSummary) -> None:
        with self._cond:
            self.windows.append(window)
            self._received += 1
            if len(self.windows) > self.max_windows:
                excess = len(self.windows) - self.max_windows
                del self.windows[:excess]
                self.evicted += excess
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[summary_pb2.WindowSummary]:
        """Block until at least ``count`` windows arrived (or timeout); return those kept."""
        with self._cond:
            self._cond.wait_for(lambda: self._received >= count, timeout)
            return list(self.windows)


class CallbackSink:
    """Calls a function with each window (the demo prints them)."""

    def __init__(self, fn: Callable[[summary_pb2.WindowSummary], None]) -> None:
        self.fn = fn

    def export(self, window: summary_pb2.WindowSummary) -> None:
        self.fn(window)
