"""agent.grpc_loop: the event loop thread the agent's asyncio gRPC server runs on, driven from plain threads."""
from __future__ import annotations

import asyncio
import threading

import pytest

from agent.grpc_loop import LoopThread


def test_run_returns_the_result_and_raises_the_exception_of_a_coroutine_run_on_the_loop_thread():
    loop = LoopThread("test-loop")
    try:
        async def where() -> str:
            return threading.current_thread().name

        async def fail() -> None:
            raise ValueError("from the loop")

        assert loop.run(where()) == "test-loop"
        with pytest.raises(ValueError, match="from the loop"):
            loop.run(fail())
    finally:
        loop.close()


def test_call_waits_from_another_thread_schedules_on_its_own_and_drops_once_closed():
    loop = LoopThread("test-loop")
    done: list[str] = []

    async def note(what: str) -> None:
        done.append(what)

    loop.call(note("from outside"))  # waited for: done when call returns
    assert done == ["from outside"]

    async def from_inside() -> None:
        loop.call(note("scheduled"))  # on the loop itself: waiting would never end
        done.append("returned first")
        await asyncio.sleep(0)

    loop.run(from_inside())
    assert done == ["from outside", "returned first", "scheduled"]
    loop.close()
    loop.call(note("after close"))  # a health change after the server stopped: nothing to do, no error
    loop.close()  # twice is harmless
    assert done == ["from outside", "returned first", "scheduled"]
