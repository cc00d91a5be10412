"""The commit thread: an event loop that never waits at a gate and runs every commit itself.

A real asyncio loop runs in a thread of its own, named to the safe point with
``use_commit_thread`` as a uvicorn worker names its serving loop; the patches come from another
thread, as a deploy's do (the control socket's thread).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from hotpatch import Engine, PatchRejected
from hotpatch.demo.harness import wait_until
from hotpatch.engine.safepoint import use_commit_thread
from tests.unit.test_engine_safety import run_in_thread

SOURCE = """
import threading
entered = threading.Event()
release = threading.Event()

def f(hold=False):
    if hold:
        entered.set()
        release.wait(30)
    return "old"
"""


@pytest.fixture(name="loop")
def _loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="event-loop", daemon=True)
    thread.start()
    wait_until(loop.is_running, timeout_s=10, what="the loop running")
    assert thread.ident is not None
    ident = thread.ident
    use_commit_thread(lambda: (ident, loop.call_soon_threadsafe) if loop.is_running() else None)
    try:
        yield loop
    finally:
        use_commit_thread(None)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def hold_the_loop(loop: asyncio.AbstractEventLoop) -> threading.Event:
    """Keep the loop inside one callback (a step that does not return) until the event is set."""
    held, free = threading.Event(), threading.Event()

    def stuck() -> None:
        held.set()
        free.wait(30)

    loop.call_soon_threadsafe(stuck)
    wait_until(held.is_set, timeout_s=10, what="the loop held")
    return free


def test_the_commit_runs_on_the_loop_between_two_steps(make_module: Any, loop: Any) -> None:
    """While the loop is inside a step, the commit waits for it; once the step is over, the loop
    runs the commit."""
    mod = make_module(SOURCE)
    free = hold_the_loop(loop)
    patcher, box = run_in_thread(
        lambda: Engine(safepoint_timeout_s=20).patch(
            mod.__name__, source=SOURCE.replace('"old"', '"new"')
        ),
        "patcher",
    )
    patcher.join(0.3)
    assert patcher.is_alive(), "the commit must wait for the loop's step to end"
    assert mod.f() == "old"
    free.set()
    patcher.join(20)
    assert "error" not in box, box
    assert mod.f() == "new"


def test_a_loop_that_never_runs_the_commit_refuses_it_at_the_deadline(
    make_module: Any, loop: Any
) -> None:
    mod = make_module(SOURCE)
    free = hold_the_loop(loop)
    try:
        with pytest.raises(PatchRejected) as info:
            Engine().patch(
                mod.__name__, source=SOURCE.replace('"old"', '"new"'), safepoint_timeout_s=0.3
            )
        assert info.value.stage == "safepoint"
        assert "the event loop (thread 'event-loop') did not run the commit" in info.value.reason
        assert "stuck()" in info.value.reason  # where the loop is held
        assert mod.f() == "old"
    finally:
        free.set()
    assert asyncio.run_coroutine_threadsafe(asyncio.sleep(0, "ok"), loop).result(10) == "ok"
    assert mod.f() == "old"  # the abandoned attempt never ran


def test_the_loop_never_waits_at_a_gate(make_module: Any, loop: Any) -> None:
    """A thread inside the old ``f`` holds the commit and the gate closes on ``f``: the loop's
    calls of ``f`` run the old code at once instead of waiting (which would stop every request
    the loop serves). Seen from the loop: a call made while the gate is closed returns while it
    is still closed."""
    mod = make_module(SOURCE)
    inside, _ = run_in_thread(lambda: mod.f(hold=True), "request-thread")
    wait_until(mod.entered.is_set, timeout_s=10, what="a thread inside f")
    seen: list[tuple[str, bool]] = []
    stop = asyncio.Event()

    def gated() -> bool:
        return bool(mod.f.__code__.co_name == "_hotpatch_gate")

    async def requests() -> None:
        while not stop.is_set():
            if gated():
                answer = mod.f()
                seen.append((answer, gated()))
            await asyncio.sleep(0.0005)

    running = asyncio.run_coroutine_threadsafe(requests(), loop)
    patcher, box = run_in_thread(
        lambda: Engine(safepoint_timeout_s=20).patch(
            mod.__name__, source=SOURCE.replace('"old"', '"new"')
        ),
        "patcher",
    )
    try:
        wait_until(lambda: len(seen) >= 3, timeout_s=10, what="calls while the gate is closed")
        assert all(answer == "old" for answer, _ in seen), seen
        assert any(still_closed for _, still_closed in seen), seen
    finally:
        mod.release.set()
        inside.join(10)
        patcher.join(20)
        loop.call_soon_threadsafe(stop.set)
        running.result(10)
    assert "error" not in box, box
    assert mod.f() == "new"
