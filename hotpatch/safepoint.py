"""The safe point: apply a change when no thread is executing inside the code it replaces.

As Linux livepatch checks each task's stack before switching it, ``at_safe_point`` inspects every
thread's Python stack. When none is inside a replaced function it applies the change at once, in a
window where no other thread can run: the switch interval is raised and the GIL freshly taken, the
cyclic garbage collector (which could run finalizers that release the GIL) is paused, and nothing in
the window does I/O. So a call chain never mixes old and new code of one change: a thread inside
the old ``f`` finishes on the old ``f`` and the old ``g`` before the new code goes live.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import types
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

# Long enough for any commit (a 3,000-line module applies in about a millisecond), short enough that
# a CPU-bound thread holding the GIL when we ask for it delays us by at most this much.
_WINDOW_S = 0.02


@dataclass(frozen=True)
class BusyThread:
    """A thread found inside code a change replaces."""

    ident: int
    name: str
    function: str
    filename: str
    lineno: int

    def describe(self) -> str:
        return f"thread {self.name!r} is inside {self.function}() at {self.filename}:{self.lineno}"


class SafePointTimeout(TimeoutError):
    def __init__(self, busy: BusyThread, timeout_s: float) -> None:
        self.busy = busy
        super().__init__(f"{busy.describe()}, still after {timeout_s:g}s (safepoint_timeout_s)")


def threads_inside(codes: Collection[types.CodeType]) -> list[BusyThread]:
    """Every other thread whose stack has a frame running one of ``codes``."""
    if not codes:
        return []
    wanted = {id(code) for code in codes}
    me = threading.get_ident()
    busy = []
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue  # the caller's own stack: it is patching, not running the old code
        f: types.FrameType | None = frame
        while f is not None:
            if id(f.f_code) in wanted:
                busy.append(_describe(ident, f))
                break
            f = f.f_back
    return busy


def _describe(ident: int, frame: types.FrameType) -> BusyThread:
    names = {t.ident: t.name for t in threading.enumerate()}
    code = frame.f_code
    return BusyThread(
        ident, names.get(ident, f"<thread {ident}>"), getattr(code, "co_qualname", code.co_name),
        code.co_filename, frame.f_lineno,
    )


def at_safe_point(
    codes: Collection[types.CodeType],
    apply: Callable[[], T],
    *,
    timeout_s: float,
    force_at_deadline: bool = False,
) -> T:
    """Call ``apply`` when no other thread is inside ``codes``; all of it before any thread runs.

    Args:
        codes: the code objects the change takes out of service.
        apply: the change itself; it must not block, do I/O or log.
        timeout_s: how long to wait for the threads inside ``codes`` to leave.
        force_at_deadline: apply anyway at the deadline (used to restore a known-good version).

    Raises:
        SafePointTimeout: a thread stayed inside ``codes`` until the deadline.
    """
    deadline = time.monotonic() + timeout_s
    pause_s = 0.0001
    while True:
        forced = force_at_deadline and time.monotonic() >= deadline
        saved_interval = sys.getswitchinterval()
        gc_was_enabled = gc.isenabled()
        sys.setswitchinterval(max(saved_interval, _WINDOW_S))
        gc.disable()
        try:
            # Give the GIL up and take it back: threads already waiting for it restart their wait
            # with the longer interval, so none can force a switch inside the window.
            time.sleep(0)
            busy = threads_inside(codes)
            if not busy or forced:
                return apply()
        finally:
            if gc_was_enabled:
                gc.enable()
            sys.setswitchinterval(saved_interval)
        if time.monotonic() >= deadline and not force_at_deadline:
            raise SafePointTimeout(busy[0], timeout_s)
        time.sleep(pause_s)
        pause_s = min(pause_s * 2, 0.005)
