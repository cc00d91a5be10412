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

A gated call runs through a trampoline frame (the gated function's code is the trampoline's, and
it calls the function's old or new code), so it is one Python frame deeper than it would be
ungated; a recursive function in the old world pays that at every level. The trampoline raises
the recursion limit by one for exactly as long as its call lasts, with C calls only (no Python
frame of its own), so the depth the application can still use is the same as without the gate.
Suspended generators and coroutines are old-world frames that no thread stack shows: one that
runs replaced code holds the commit like a thread inside it, found by ``gc.get_referrers`` on the
replaced generator codes (only when the change replaces one).

An event loop is one thread that runs many requests, each a coroutine stepped in turn: a loop
thread that waits at a gate stops every request it serves, not one. A process whose requests run
on a loop (a uvicorn worker) names it as its *commit thread* (``use_commit_thread``): that thread
never waits at a gate (like the committing thread, it runs the old code until the commit), and the
last step, the final look at the stacks and the suspended coroutines plus the assignments, runs ON
it, as a callback between two coroutine steps (``loop.call_soon_threadsafe``), so no coroutine is
halfway through a step when the code changes, and the loop stops for exactly as long as the commit
takes. The waiting (threads of its executor leaving, suspended coroutines finishing) happens in the
calling thread while the loop serves; if a look on the loop finds the moment gone, the wait goes on.
"""

from __future__ import annotations

import gc
import inspect
import os
import re
import sys
import sysconfig
import threading
import time
import types
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from hotpatch.engine.changeset import ChangeSet, FunctionState
from hotpatch.engine.compare import KIND_FLAGS

T = TypeVar("T")

# Long enough for any commit (a 3,000-line module applies in about a millisecond), short enough that
# a CPU-bound thread holding the GIL when we ask for it delays us by at most this much.
_WINDOW_S = 0.01
# The longest a caller waits at a gate before it is opened again (see commit_at_safe_point).
GATE_BUDGET_S = 0.2
_GATE_PLACEHOLDER = "__hotpatch_gate_placeholder__"
_KEY_PLACEHOLDER = 0x7E57_6A7E
# Code flags of frames that can be suspended with the code in them (and so outlive a stack walk).
_SUSPENDABLE = (
    inspect.CO_GENERATOR
    | inspect.CO_COROUTINE
    | inspect.CO_ASYNC_GENERATOR
    | inspect.CO_ITERABLE_COROUTINE
)
# How often the safe point looks for suspended generators (a whole-heap walk) while it waits.
_SUSPENDED_POLL_S = 0.05


@dataclass(frozen=True)
class BusyThread:
    """A thread found inside code a change replaces."""

    ident: int
    name: str
    function: str
    filename: str
    lineno: int
    suspended: str | None = None  # "generator", "coroutine"...: a suspended frame, no thread
    is_commit_thread: bool = False  # the event loop that was to run the commit, and did not

    def describe(self) -> str:
        if self.is_commit_thread:
            return (
                f"the event loop (thread {self.name!r}) did not run the commit: it is inside "
                f"{self.function}() at {self.filename}:{self.lineno}"
            )
        if self.suspended:
            return (
                f"a suspended {self.suspended} of {self.function}() at {self.filename}:"
                f"{self.lineno} runs code this change replaces (resumed, it would run old code "
                "calling new code); let it finish or close it"
            )
        return f"thread {self.name!r} is inside {self.function}() at {self.filename}:{self.lineno}"


CommitThread = tuple[int, Callable[[Callable[[], None]], object]]
"""``(thread ident, schedule)``: the thread every commit runs on, and how to run a callable there
(``loop.call_soon_threadsafe``; it raises when it cannot, e.g. a closed loop)."""

_commit_thread: Callable[[], CommitThread | None] | None = None


def use_commit_thread(get: Callable[[], CommitThread | None] | None) -> None:
    """Run every commit of this process on one thread, an event loop's (``None``: stop doing so).

    Args:
        get: returns the thread and its scheduler now, or ``None`` while there is none (the loop
            has not started yet, or has stopped): the commit then runs in the calling thread.
    """
    global _commit_thread
    _commit_thread = get


def _current_commit_thread() -> CommitThread | None:
    get = _commit_thread
    if get is None:
        return None
    try:
        found = get()
    except Exception:  # a host that cannot say: commit as without one
        return None
    if found is None or found[0] == threading.get_ident():
        return None  # called on the loop itself (a patch from a request): commit right here
    return found


_Attempt = tuple["list[ChangeSet] | None", "list[BusyThread]"]


class _OnThread:
    """One attempt to run a callable on the commit thread, abandoned if it has not started by
    the caller's deadline (it then never runs: it checks under the lock when it starts)."""

    def __init__(self, fn: Callable[[], _Attempt]) -> None:
        self.fn = fn
        self.lock = threading.Lock()
        self.state = "pending"
        self.done = threading.Event()
        self.result: _Attempt = (None, [])
        self.error: BaseException | None = None

    def run(self) -> None:
        with self.lock:
            if self.state != "pending":
                return
            self.state = "running"
        try:
            self.result = self.fn()
        except BaseException as exc:  # handed to the waiting thread, never lost in the loop
            self.error = exc
        finally:
            self.done.set()

    def wait(self, timeout_s: float) -> bool:
        """Whether it ran (its ``result``/``error`` are set); False: it never will."""
        if not self.done.wait(max(timeout_s, 0.0)):
            with self.lock:
                if self.state == "pending":
                    self.state = "abandoned"
                    return False
            self.done.wait()  # it started: the commit itself, short
        if self.error is not None:
            raise self.error
        return True


def _stuck(ident: int) -> BusyThread:
    """Where the commit thread is while it does not run the commit (a long step, a blocking call):
    the innermost frame outside the standard library (the app's code that holds the loop)."""
    frame = sys._current_frames().get(ident)
    names = {t.ident: t.name for t in threading.enumerate()}
    name = names.get(ident, f"<thread {ident}>")
    if frame is None:
        return BusyThread(ident, name, "<gone>", "", 0, is_commit_thread=True)
    stdlib = os.path.dirname(threading.__file__) + os.sep
    outside: types.FrameType | None = frame
    while outside is not None and outside.f_code.co_filename.startswith(stdlib):
        outside = outside.f_back
    shown = outside or frame
    code = shown.f_code
    return BusyThread(
        ident,
        name,
        getattr(code, "co_qualname", code.co_name),
        code.co_filename,
        shown.f_lineno,
        is_commit_thread=True,
    )


class SafePointTimeout(TimeoutError):
    def __init__(self, busy: BusyThread, timeout_s: float) -> None:
        self.busy = busy
        super().__init__(f"{busy.describe()}, still after {timeout_s:g}s (safepoint_timeout_s)")


def threads_inside(
    codes: Collection[types.CodeType], *, ignore: int | None = None
) -> list[BusyThread]:
    """Every other thread (but ``ignore``) whose stack has a frame running one of ``codes``."""
    if not codes:
        return []
    wanted = {id(code) for code in codes}
    me = threading.get_ident()
    busy = []
    for ident, frame in sys._current_frames().items():
        inside = _stack_runs(frame, wanted) if ident not in (me, ignore) else None
        if inside is not None:
            busy.append(_describe(ident, inside))
    return busy


def can_suspend(codes: Collection[types.CodeType]) -> bool:
    """Whether ``codes`` holds generator or coroutine code (what ``suspended_inside`` looks for)."""
    return any(code.co_flags & _SUSPENDABLE for code in codes)


def suspended_inside(
    codes: Collection[types.CodeType], holders: Collection[object] = ()
) -> list[BusyThread]:
    """Suspended (or not yet started) generators and coroutines whose frame runs one of ``codes``.

    They are on no thread's stack, so ``threads_inside`` cannot see them; resumed after a commit,
    they would run their old code against the new code around it. Finding them costs a walk of
    the heap (``gc.get_referrers``, with the GIL held: every thread waits), paid only when
    ``codes`` holds generator or coroutine code, and only when something but ``codes``, the
    code objects holding them as constants and ``holders`` refers to one of those codes (a
    frame does: see ``_unknown_references``).

    Args:
        codes: the code objects a change takes out of service.
        holders: what is known to refer to them and runs nothing: the functions that have them
            as their code, the change set's other collections of them.
    """
    suspendable = [code for code in codes if code.co_flags & _SUSPENDABLE]
    if not suspendable:
        return []
    if _OWN_REFERENCES is not None and not _unknown_references(suspendable, codes, holders):
        return []
    wanted = {id(code) for code in suspendable}
    found = []
    for obj in gc.get_referrers(*suspendable):
        for prefix, kind in (("gi", "generator"), ("cr", "coroutine"), ("ag", "async generator")):
            frame = getattr(obj, f"{prefix}_frame", None)
            code = getattr(obj, f"{prefix}_code", None)
            if isinstance(frame, types.FrameType) and id(code) in wanted:
                if not getattr(obj, f"{prefix}_running", False):  # running: on a stack
                    found.append(
                        BusyThread(
                            0,
                            f"<suspended {kind}>",
                            getattr(frame.f_code, "co_qualname", frame.f_code.co_name),
                            frame.f_code.co_filename,
                            frame.f_lineno or frame.f_code.co_firstlineno,
                            suspended=kind,
                        )
                    )
                break
    return found


def _unknown_references(
    suspendable: list[types.CodeType],
    codes: Collection[types.CodeType],
    holders: Collection[object],
) -> int:
    """How many references to the most referred-to of ``suspendable`` no known holder accounts
    for (``_OWN_REFERENCES`` taken off: the ones this call makes itself).

    A generator, suspended or not started, holds its code (through its frame), as a running
    frame does; so does a traceback's frame, or a function made elsewhere from the same code.
    When every reference to each code is one of the known holders', none of them exists and
    the heap need not be walked: ``sys.getrefcount`` is exact, and each known reference is
    counted by identity, each holder once. Counting one reference too many could hide a
    generator: the holders are deduplicated, and ``_OWN_REFERENCES`` is measured at import
    through this very function (``_calibrate``); a reference not counted only costs the walk.
    """
    known = _known_references(
        {id(code) for code in suspendable}, (codes, suspendable, *codes, *holders)
    )
    own = _OWN_REFERENCES or 0
    return max(sys.getrefcount(code) - own - known[id(code)] for code in suspendable)


def _known_references(wanted: set[int], holders: tuple[object, ...]) -> dict[int, int]:
    """``id(code) -> references to it from holders`` (each holder counted once), for every id
    of ``wanted``. A function of its own: none of its names outlives it to hold a code."""
    known = dict.fromkeys(wanted, 0)
    seen: set[int] = set()
    for holder in holders:
        if id(holder) in seen:
            continue
        seen.add(id(holder))
        kind = type(holder)
        items: Iterable[object]
        if kind is types.CodeType:
            items = holder.co_consts  # type: ignore[attr-defined]
        elif kind is types.FunctionType:
            items = (holder.__code__,)  # type: ignore[attr-defined]
        elif kind in (frozenset, set, list, tuple):
            items = holder  # type: ignore[assignment]
        else:
            continue
        for key in filter(wanted.__contains__, map(id, items)):
            known[key] += 1
    return known


def _calibrate() -> int | None:
    """``_OWN_REFERENCES``: what ``_unknown_references`` counts of a code nothing else holds,
    checked to see one more reference and a generator (which holds its code once or twice, by
    version); ``None`` (always walk the heap) where reference counts are not exact (a
    free-threaded build) or the checks fail."""
    global _OWN_REFERENCES
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return None
    namespace: dict[str, object] = {}
    exec(compile("def probe():\n    yield 1\n", "<hotpatch probe>", "exec"), namespace)
    probe = namespace.pop("probe")
    assert isinstance(probe, types.FunctionType)
    codes = frozenset([probe.__code__])

    def count() -> int:  # called as suspended_inside calls it: a list made for the call
        return _unknown_references([c for c in codes if c.co_flags & _SUSPENDABLE], codes, [probe])

    _OWN_REFERENCES = 0
    try:
        own = count()
        _OWN_REFERENCES = own
        extra = [probe.__code__]
        one_more = count()
        del extra
        generator = probe()
        suspended = count()
        del generator
        again = count()
    finally:
        _OWN_REFERENCES = None
    return own if one_more == 1 and suspended >= 1 and again == 0 else None


_OWN_REFERENCES: int | None = None
_OWN_REFERENCES = _calibrate()


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


class _Depth:
    """Recursion-limit compensation shared by every trampoline (the limit is per interpreter).

    A trampoline raises the limit by one around its call and lowers it after, under ``lock``.
    Lowering can fail when the lowering thread is at the very limit; the step is then owed
    (``debt``) and paid by the next trampoline to lower it, or at the end of the safe point.
    """

    def __init__(self) -> None:
        # Re-entrant: a signal handler that calls a gated function may run while its thread
        # holds the lock (between two bytecodes of the trampoline). Its step is whole, so the
        # interrupted step reads and writes a consistent limit.
        self.lock = threading.RLock()
        self.debt = 0
        self.getlimit = sys.getrecursionlimit
        self.setlimit = sys.setrecursionlimit

    def settle(self) -> None:
        with self.lock:
            if self.debt:
                try:
                    self.setlimit(self.getlimit() - self.debt)
                    self.debt = 0
                except RecursionError:
                    pass


_DEPTH = _Depth()


class _Gate:
    """What the trampolines of one closing of the gate read: all of it is reached with C calls.

    The trampoline (``_gate_code``) holds this object in its constants, not in the module's
    globals, and does its checks in its own frame: it calls no Python function but the one it
    stands in for (or that one's old twin), so a gated call costs exactly one frame, which it
    compensates (``_Depth``).
    """

    def __init__(
        self,
        funcs: Sequence[types.FunctionType],
        old_codes: Collection[types.CodeType],
        owners: frozenset[int] = frozenset(),
    ):
        self.entries = {key: (f, FunctionState.capture(f)) for key, f in enumerate(funcs)}
        self.funcs = {key: f for key, (f, _) in self.entries.items()}
        self.twins = {key: _twin(f, old) for key, (f, old) in self.entries.items()}
        self.old_code_ids = frozenset(id(c) for c in old_codes)
        self.is_open = False
        self.closed = threading.Lock()  # held while the gate is closed; waiters queue on it
        self.closed.acquire()
        # Threads that never wait at the gate (they run the old code until the commit): the
        # committing thread, and the commit thread (an event loop), which runs the commit itself.
        self.owners = owners | {threading.get_ident()}
        self.get_ident = threading.get_ident
        self.getframe = sys._getframe
        self.id = id
        self.depth = _DEPTH
        self.codes = {
            key: _gate_code(f.__code__.co_freevars, self, key)
            for key, (f, _) in self.entries.items()
        }

    def close(self) -> None:
        """Install the trampolines (call inside an exclusive window)."""
        for key, (func, _) in self.entries.items():
            func.__code__ = self.codes[key]

    def saved_states(self) -> dict[int, FunctionState]:
        """The gated functions' own states, by ``id(function)``, for capturing an inverse."""
        return {id(func): state for func, state in self.entries.values()}

    def reopen(self) -> None:
        """Put back the old code wherever a trampoline still sits, and release the waiters: the
        end of this gate (a later closing makes a new one)."""
        self.restore()
        # The trampolines hold this gate in their constants and it holds them: a cycle through
        # code objects, which the cyclic collector does not see, so it would never be freed (and
        # with it every gated function's old state). Calls still inside a trampoline only read
        # ``funcs``, ``twins``, ``owners`` and the lock, which stay.
        self.codes = {}
        if not self.is_open:
            self.is_open = True
            self.closed.release()

    def restore(self) -> None:
        """Put back the old code wherever a trampoline still sits."""
        for key, (func, old) in self.entries.items():
            if func.__code__ is self.codes.get(key):
                func.__code__ = old.code


def _twin(func: types.FunctionType, old: FunctionState) -> types.FunctionType:
    """A function that runs ``func``'s old code: what old-world callers get at the gate."""
    twin = types.FunctionType(
        old.code, func.__globals__, func.__name__, old.defaults, func.__closure__
    )
    twin.__kwdefaults__ = old.kwdefaults
    return twin


_gate_templates: dict[tuple[str, ...], types.CodeType] = {}

# The trampoline's body. Every call in it is to a C function, except ``fn(...)``: no helper frame
# sits between the caller and the function (see _Gate and _Depth).
_GATE_BODY = """\
G = {gate!r}
k = {key!r}
if G.is_open:
    fn = G.funcs[k]
elif G.get_ident() in G.owners:
    fn = G.twins[k]
else:
    fn = None
    fr = G.getframe(1)
    ids = G.old_code_ids
    while fr is not None:
        if G.id(fr.f_code) in ids:
            fn = G.twins[k]
            break
        fr = fr.f_back
    fr = None
    if fn is None:
        with G.closed:
            pass
        fn = G.funcs[k]
D = G.depth
with D.lock:
    D.setlimit(D.getlimit() + 1)
try:
    return fn(*A, **K)
finally:
    with D.lock:
        try:
            D.setlimit(D.getlimit() - 1 - D.debt)
            D.debt = 0
        except RecursionError:
            D.debt += 1
"""


def closure_code(
    header: str, body: str, freevars: tuple[str, ...], filename: str
) -> types.CodeType:
    """The code of ``{header}: {body}`` compiled with ``freevars`` as its free variables, so that
    it may replace the ``__code__`` of a function whose closure has those cells.

    ``header`` is the ``def`` line without its colon (``async def`` for a coroutine); the body
    must name every free variable (it is read once at its top, which makes each one free).
    """
    lines = ["def _outer():"]
    lines += [f"    {name} = None" for name in freevars]
    lines.append(f"    {header}:")
    if freevars:
        lines.append("        " + ", ".join(freevars))
    lines += ["        " + line for line in body.splitlines()]
    namespace: dict[str, object] = {}
    exec(compile("\n".join(lines), filename, "exec"), namespace)
    outer = namespace["_outer"]
    assert isinstance(outer, types.FunctionType)
    return next(c for c in outer.__code__.co_consts if isinstance(c, types.CodeType))


def _gate_code(freevars: tuple[str, ...], gate: _Gate, key: int) -> types.CodeType:
    """A trampoline with the same free variables as the function it stands in for."""
    template = _gate_templates.get(freevars)
    if template is None:
        body = _GATE_BODY.format(gate=_GATE_PLACEHOLDER, key=_KEY_PLACEHOLDER)
        local_names = ("G", "k", "fn", "fr", "ids", "D", "A", "K")
        prefix = "_hotpatch_"
        while any(prefix + n in freevars for n in local_names):
            prefix += "_"
        for n in local_names:  # whole-word renames, so no local can shadow a free variable
            body = re.sub(rf"\b{n}\b", prefix + n, body)
        template = closure_code(
            f"def _hotpatch_gate(*{prefix}A, **{prefix}K)", body, freevars, "<hotpatch gate>"
        )
        _gate_templates[freevars] = template

    def fill(c: object) -> object:
        if type(c) is str and c == _GATE_PLACEHOLDER:
            return gate
        if type(c) is int and c == _KEY_PLACEHOLDER:
            return key
        return c

    return template.replace(co_consts=tuple(fill(c) for c in template.co_consts))


def _attempt(
    changesets: Sequence[ChangeSet],
    codes: Collection[types.CodeType],
    gate: _Gate | None,
    *,
    forced: bool,
    holders: Collection[object] = (),
) -> _Attempt:
    """The commit, if nothing is inside ``codes`` now: the inverses, or what is inside."""
    with _exclusive():
        busy = [] if forced else threads_inside(codes) or suspended_inside(codes, holders)
        if busy:
            return None, busy
        saved = gate.saved_states() if gate is not None else None
        undos = [cs.capture_inverse(saved) for cs in changesets]
        for cs in changesets:
            cs.apply()
        return undos, []


def commit_at_safe_point(
    changesets: Sequence[ChangeSet],
    *,
    codes: Collection[types.CodeType],
    timeout_s: float,
    force_at_deadline: bool = False,
    gate_budget_s: float = GATE_BUDGET_S,
    holders: Collection[object] = (),
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
        holders: what else refers to ``codes`` and runs nothing (see ``suspended_inside``);
            the change sets' functions are added here.

    Returns:
        One inverse per change set (applying them in reverse order undoes the commit exactly).

    Raises:
        SafePointTimeout: a thread stayed inside ``codes`` until the deadline.
    """
    deadline = time.monotonic() + timeout_s
    code_ids = {id(c) for c in codes}
    look_for_suspended = can_suspend(codes)
    if look_for_suspended:  # the functions the change sets assign hold their old code
        holders = [*holders, *(f for cs in changesets for f in cs.functions())]
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
    # Suspended generators in replaced code hold the commit as threads do; the search walks the
    # heap, so it runs just before each attempt at the commit and, once one has held it, every
    # _SUSPENDED_POLL_S while waiting (not before the first attempt: that would walk twice).
    suspended: list[BusyThread] = []
    next_look = time.monotonic() + _SUSPENDED_POLL_S
    host = _current_commit_thread()
    try:
        while True:
            last_busy: list[BusyThread] = []  # what held this turn's attempt at the commit
            now = time.monotonic()
            forced = force_at_deadline and now >= deadline
            # The commit thread is looked at when the commit runs on it, between two steps.
            busy = threads_inside(codes, ignore=host[0] if host is not None else None)
            if look_for_suspended and now >= next_look:
                suspended = suspended_inside(codes, holders)
                next_look = now + _SUSPENDED_POLL_S
                if suspended and gate is not None:
                    gate.reopen()  # no point holding callers while a generator holds the commit
                    gate = None
            if (
                gate is None
                and gated
                and not suspended
                and not (holdouts & {b.ident for b in busy})
            ):
                # Gate before committing, always: applying a change set is not atomic by itself
                # (a thread switch can fall between two assignments), gating makes it so.
                # Partial gating is consistent too: a thread that enters a not-yet-gated
                # function runs old code, so it is in the old world, which gates let through.
                holdouts = set()
                gate = _Gate(
                    gated, codes, frozenset([host[0]]) if host is not None else frozenset()
                )
                gate.close()
                gate_closed_at = now
            if forced or (not busy and not suspended and (gate is not None or not gated)):
                if host is None or forced:  # forced: a rollback goes in, stuck loop or not
                    undos, last_busy = _attempt(
                        changesets, codes, gate, forced=forced, holders=holders
                    )
                else:
                    left_s = deadline - time.monotonic()
                    if gate is not None:  # never hold the other threads past the gate's budget
                        budget_left_s = gate_budget_s - (time.monotonic() - gate_closed_at)
                        left_s = min(left_s, max(budget_left_s, 0.02))
                    on_loop = _OnThread(
                        partial(_attempt, changesets, codes, gate, forced=False, holders=holders)
                    )
                    try:
                        host[1](on_loop.run)
                    except Exception:  # the loop is closed: nothing runs on it any more
                        host = None
                        continue
                    if on_loop.wait(left_s):
                        undos, last_busy = on_loop.result
                    else:
                        undos, last_busy = None, [_stuck(host[0])]
                if undos is not None:
                    return undos
                if look_for_suspended and any(b.suspended for b in last_busy):
                    suspended = last_busy  # looked for at the attempt: wait as for the others
                    next_look = time.monotonic() + _SUSPENDED_POLL_S
                    if gate is not None:
                        gate.reopen()
                        gate = None
            if gate is not None and time.monotonic() - gate_closed_at >= gate_budget_s:
                holdouts = {b.ident for b in busy}
                gate.reopen()
                gate = None
            if time.monotonic() >= deadline and not force_at_deadline:
                busy = threads_inside(codes) or suspended_inside(codes, holders) or last_busy
                if busy:
                    raise SafePointTimeout(busy[0], timeout_s)
            time.sleep(pause_s)
            pause_s = min(pause_s * 2, 0.002)
    finally:
        if gate is not None:
            gate.reopen()
        _DEPTH.settle()
