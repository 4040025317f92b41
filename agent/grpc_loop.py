"""A ``grpc.aio`` server driven from synchronous code: its own event loop, on its own thread.

Why the agent's port is asynchronous (issue 12): grpcio's synchronous server takes every call off the
completion queue on one thread and hands it to a pool thread, and the reply back; on a small model
those hand-offs are most of what a call costs. ``grpc.aio`` runs a handler that is a coroutine on the
loop that took the call, with no hand-off (measured side by side with the cpp loadgen, 16 connections:
1.2-1.4x the requests a second of the synchronous server at 0.8x its CPU a request). Handlers that are
plain functions still run on a thread pool (``migration_thread_pool``), so the servicers stay synchronous
where a call is rare or may wait (metadata, feedback, health watches).

The callers of ``agent.server`` (the CLI, a managed agent, the tests) stay synchronous: ``LoopThread.run``
runs a coroutine on the loop and waits for its result, exceptions included.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
CALL_SECONDS = 10.0  # the longest ``call`` waits for the loop to run what it was given
FINISH_SECONDS = 2.0  # how long ``close`` lets pending tasks end on their own before cancelling them


class LoopThread:
    """An asyncio event loop running on a daemon thread named ``name`` until ``close``."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coroutine`` on the loop; its result, or its exception raised here."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call(self, coroutine: Coroutine[Any, Any, Any], timeout: float = CALL_SECONDS) -> None:
        """Run ``coroutine`` on the loop, for its effect: from another thread, wait for it (at most ``timeout``:
        a loop stopping meanwhile never runs it); on the loop's own thread, where waiting would never end,
        schedule it. Once the loop is closed (the server stopped) it is dropped."""
        if threading.current_thread() is self._thread:
            self.loop.create_task(coroutine)
            return
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        except RuntimeError:  # the loop is closed
            coroutine.close()
            return
        try:
            future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()

    def close(self) -> None:
        """Stop the loop and release it (from any thread but the loop's). Tasks still pending -- e.g. gRPC's
        own for a call that ended as the server stopped -- get to end first (cancelled after FINISH_SECONDS):
        a task destroyed pending logs errors later, from whatever runs then."""
        if self.loop.is_closed():
            return
        try:
            self.run(self._finish_tasks(), timeout=CALL_SECONDS)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass  # the loop stops regardless
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    async def _finish_tasks(self) -> None:
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        if tasks:  # most end on their own once the loop runs them (a call that ended as the server stopped)
            _, pending = await asyncio.wait(tasks, timeout=FINISH_SECONDS)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.loop.shutdown_asyncgens()
