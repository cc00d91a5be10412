"""The safe point: apply a change when no thread is executing inside the code it replaces.

As Linux livepatch checks each task's stack before switching it, ``commit_at_safe_point`` inspects
every thread's Python stack and applies a change only when none is inside a function it replaces.
So a call chain never mixes old and new code of one change: a thread inside the old ``f`` finishes
on the old ``f`` and the old ``g`` before the new code goes live.

Under steady load a busy function may never be idle in all threads at once, so the replaced
functions are first *gated*: their code is swapped for a small trampoline. A thread already inside
the old code (the "old world") that calls a gated function runs the old code, so it finishes as it
started; any other caller waits at the gate until the change is applied (or abandoned at the
deadline) and then calls the function, which by then runs the new code. In-flight calls drain, new
ones wait briefly, and the safe point arrives within one call's duration. A gate stays closed at
most ``GATE_BUDGET_S``: a long call (a stream, a slow request) does not hold every other caller;
the gate opens, and closes again once the long call has left.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import types
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from hotpatch.engine.changeset import ChangeSet, FunctionState
from hotpatch.engine.compare import KIND_FLAGS

T = TypeVar("T")

# Long enough for any commit (a 3,000-line module applies in about a millisecond), short enough that
# a CPU-bound thread holding the GIL when we ask for it delays us by at most this much.
_WINDOW_S = 0.01
_GATE_NAME = "__hotpatch_gate__"
# The longest a caller waits at a gate before it is opened again (see commit_at_safe_point).
GATE_BUDGET_S = 0.2
_KEY_PLACEHOLDER = 0x7E57_6A7E


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
        inside = _stack_runs(frame, wanted) if ident != me else None
        if inside is not None:
            busy.append(_describe(ident, inside))
    return busy


def _stack_runs(frame: types.FrameType | None, wanted: set[int]) -> types.FrameType | None:
    while frame is not None:
        if id(frame.f_code) in wanted:
            return frame
        frame = frame.f_back
    return None


def _describe(ident: int, frame: types.FrameType) -> BusyThread:
    names = {t.ident: t.name for t in threading.enumerate()}
    code = frame.f_code
    return BusyThread(
        ident,
        names.get(ident, f"<thread {ident}>"),
        getattr(code, "co_qualname", code.co_name),
        code.co_filename,
        frame.f_lineno,
    )


@contextmanager
def _exclusive() -> Iterator[None]:
    """A stretch in which other Python threads are unlikely to run: a longer switch interval and
    no cyclic garbage collection (whose finalizers could run arbitrary code). Correctness does not
    rest on it: gating does. It only keeps functions that cannot be gated (replaced, not updated in
    place) from being entered between the last look at the stacks and the commit."""
    saved_interval = sys.getswitchinterval()
    gc_was_enabled = gc.isenabled()
    sys.setswitchinterval(max(saved_interval, _WINDOW_S))
    gc.disable()
    try:
        yield
    finally:
        if gc_was_enabled:
            gc.enable()
        sys.setswitchinterval(saved_interval)


class _Gate:
    """The trampoline's target while the replaced functions are gated."""

    def __init__(self, funcs: Sequence[types.FunctionType], old_codes: Collection[types.CodeType]):
        self.entries = {key: (f, FunctionState.capture(f)) for key, f in enumerate(funcs)}
        self.old_code_ids = {id(c) for c in old_codes}
        self.opened = threading.Event()
        self.owner = threading.get_ident()
        self.codes = {
            key: _gate_code(f.__code__.co_freevars, key) for key, (f, _) in self.entries.items()
        }

    def __call__(self, key: int, args: tuple[object, ...], kwargs: dict[str, object]) -> object:
        func, old = self.entries[key]
        if not self.opened.is_set() and (
            threading.get_ident() == self.owner
            or _stack_runs(sys._getframe(2), self.old_code_ids) is not None
        ):
            # An old-world caller: it started on the old code and finishes on it.
            twin = types.FunctionType(
                old.code, func.__globals__, func.__name__, old.defaults, func.__closure__
            )
            twin.__kwdefaults__ = old.kwdefaults
            return twin(*args, **kwargs)
        self.opened.wait()
        return func(*args, **kwargs)

    def close(self) -> None:
        """Install the trampolines (call inside an exclusive window)."""
        for key, (func, _) in self.entries.items():
            func.__globals__.setdefault(_GATE_NAME, self)
            func.__code__ = self.codes[key]

    def saved_states(self) -> dict[int, FunctionState]:
        """The gated functions' own states, by ``id(function)``, for capturing an inverse."""
        return {id(func): state for func, state in self.entries.values()}

    def reopen(self) -> None:
        """Put back the old code wherever a trampoline still sits, and release the waiters."""
        self.restore()
        self.opened.set()

    def restore(self) -> None:
        """Put back the old code wherever a trampoline still sits."""
        for key, (func, old) in self.entries.items():
            if func.__code__ is self.codes[key]:
                func.__code__ = old.code
            if func.__globals__.get(_GATE_NAME) is self:
                del func.__globals__[_GATE_NAME]


_gate_templates: dict[tuple[str, ...], types.CodeType] = {}


def _gate_code(freevars: tuple[str, ...], key: int) -> types.CodeType:
    """A trampoline with the same free variables as the function it stands in for."""
    template = _gate_templates.get(freevars)
    if template is None:
        lines = ["def _outer():"]
        lines += [f"    {name} = None" for name in freevars]
        lines.append("    def _hotpatch_gate(*args, **kwargs):")
        if freevars:
            lines.append("        " + ", ".join(freevars))
        lines.append(f"        return {_GATE_NAME}({_KEY_PLACEHOLDER}, args, kwargs)")
        namespace: dict[str, object] = {}
        exec(compile("\n".join(lines), "<hotpatch gate>", "exec"), namespace)
        outer = namespace["_outer"]
        assert isinstance(outer, types.FunctionType)
        template = next(c for c in outer.__code__.co_consts if isinstance(c, types.CodeType))
        _gate_templates[freevars] = template
    consts = tuple(
        key if c == _KEY_PLACEHOLDER and type(c) is int else c for c in template.co_consts
    )
    return template.replace(co_consts=consts)


def commit_at_safe_point(
    changesets: Sequence[ChangeSet],
    *,
    codes: Collection[types.CodeType],
    timeout_s: float,
    force_at_deadline: bool = False,
    gate_budget_s: float = GATE_BUDGET_S,
) -> list[ChangeSet]:
    """Apply ``changesets`` when no other thread is inside ``codes``, and return their inverses.

    While threads are inside, the functions the change sets update in place are gated, so that
    callers that are not already inside the old code wait for the commit instead of entering
    the old code, and the commit cannot expose a half-applied change: each gated function goes
    straight from its gate to its new code. A gate stays closed at most ``gate_budget_s``: if a
    thread is still inside then (a long request, a stream), the gate opens again so that nobody
    waits on it, and closes again once that thread has left.

    Args:
        changesets: what to apply, in order.
        codes: the code objects the change takes out of service.
        timeout_s: how long to wait for the threads inside ``codes`` to leave.
        force_at_deadline: apply anyway at the deadline (used to restore a known-good version).
        gate_budget_s: the longest a caller may be held at a gate.

    Returns:
        One inverse per change set (applying them in reverse order undoes the commit exactly).

    Raises:
        SafePointTimeout: a thread stayed inside ``codes`` until the deadline.
    """
    deadline = time.monotonic() + timeout_s
    code_ids = {id(c) for c in codes}
    gated = [
        f
        for cs in changesets
        for f in cs.functions()
        if id(f.__code__) in code_ids and not f.__code__.co_flags & KIND_FLAGS
    ]  # the trampoline is a plain function: generators and coroutines are not gated
    gate: _Gate | None = None
    gate_closed_at = 0.0
    holdouts: set[int] = set()  # threads that outlasted a gate: no new gate until they leave
    pause_s = 0.00005
    try:
        while True:
            now = time.monotonic()
            forced = force_at_deadline and now >= deadline
            busy = threads_inside(codes)
            if gate is None and gated and not (holdouts & {b.ident for b in busy}):
                # Gate before committing, always: applying a change set is not atomic by itself
                # (a thread switch can fall between two assignments), gating makes it so.
                # Partial gating is consistent too: a thread that enters a not-yet-gated
                # function runs old code, so it is in the old world, which gates let through.
                holdouts = set()
                gate = _Gate(gated, codes)
                gate.close()
                gate_closed_at = now
            if forced or (not busy and (gate is not None or not gated)):
                with _exclusive():
                    if forced or not threads_inside(codes):
                        saved = gate.saved_states() if gate is not None else None
                        undos = [cs.capture_inverse(saved) for cs in changesets]
                        for cs in changesets:
                            cs.apply()
                        return undos
            elif gate is not None and now - gate_closed_at >= gate_budget_s:
                holdouts = {b.ident for b in busy}
                gate.reopen()
                gate = None
            if now >= deadline and not force_at_deadline:
                busy = threads_inside(codes)
                if busy:
                    raise SafePointTimeout(busy[0], timeout_s)
            time.sleep(pause_s)
            pause_s = min(pause_s * 2, 0.002)
    finally:
        if gate is not None:
            gate.reopen()
