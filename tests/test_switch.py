"""ModelSwitch: requests take no lock, and a version is idle (closable) only once no request holds it."""
from __future__ import annotations

import sys
import threading
from collections import deque

import pytest

from agent.errors import NotFound, Unavailable
from agent.switch import LoadedVersion, ModelSwitch


def version(name: str) -> LoadedVersion:
    return LoadedVersion(plane=None, session=None, version=name)  # type: ignore[arg-type]


def test_a_request_holds_its_version_across_a_swap_and_the_old_one_is_idle_after_it():
    switch = ModelSwitch("m")
    one, two = version("1"), version("2")
    switch.swap(one)
    held = switch.acquire("m")
    assert held is one and one.active == 1 and not one.idle.is_set()
    assert switch.swap(two) is one
    assert one.retired and not one.idle.is_set()  # still running a request
    assert switch.acquire("m") is two  # new requests run on the new version
    switch.release(held)
    assert one.idle.is_set() and one.active == 0
    assert two.active == 1 and not two.idle.is_set()


def test_a_version_swapped_out_with_nothing_running_is_idle_at_once():
    switch = ModelSwitch("m")
    one = version("1")
    switch.swap(one)
    switch.release(switch.acquire("m"))
    assert not one.idle.is_set()  # serving: never idle
    switch.swap(version("2"))
    assert one.idle.is_set()


def test_wrong_name_and_nothing_loaded_are_refused():
    switch = ModelSwitch("m")
    with pytest.raises(NotFound, match="model 'x' is not served here"):
        switch.acquire("x")
    with pytest.raises(Unavailable, match="not loaded yet"):
        switch.acquire("m")


def test_a_request_that_read_the_version_a_swap_retires_runs_on_the_new_one():
    """The race the lock used to close: the request reads ``current``, a swap retires that version
    (finding nothing running: idle), then the request puts its token in. It must not run there."""
    switch = ModelSwitch("m")
    two = version("2")

    class SwapFirst(deque):
        def append(self, token):
            if switch.current is not two:
                switch.swap(two)  # lands between the request's read of current and its token
            super().append(token)

    one = LoadedVersion(plane=None, session=None, version="1", running=SwapFirst())  # type: ignore[arg-type]
    switch.swap(one)
    assert switch.acquire("m") is two
    assert one.idle.is_set() and one.active == 0 and two.active == 1


def test_no_version_is_closed_while_a_request_holds_it():
    switch = ModelSwitch("m")
    closed: set[str] = set()
    problems: list[str] = []
    versions = [version(str(i)) for i in range(200)]

    def closer(loaded: LoadedVersion) -> None:  # what agent.rollout does with a swapped-out version
        loaded.idle.wait()
        closed.add(loaded.version)

    def requests() -> None:
        for _ in range(4000):
            held = switch.acquire("m")
            if held.version in closed:
                problems.append(f"request on closed version {held.version}")
            switch.release(held)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave the threads as finely as CPython will
    try:
        switch.swap(versions[0])
        threads = [threading.Thread(target=requests) for _ in range(4)]
        closers = []
        for thread in threads:
            thread.start()
        for new in versions[1:]:
            old = switch.swap(new)
            closers.append(threading.Thread(target=closer, args=(old,)))
            closers[-1].start()
        for thread in threads + closers:
            thread.join(60)
    finally:
        sys.setswitchinterval(interval)
    assert not problems
    assert closed == {v.version for v in versions[:-1]}  # every retired version went idle
    assert all(v.active == 0 for v in versions)
