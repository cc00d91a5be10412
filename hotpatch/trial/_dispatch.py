"""Per-call dispatch between two versions of a function, through the function's own object.

A parallel run must reach every caller of a changed function: a ``from m import f`` binding, a
callback registered in a dict, a bound method, a decorator's closure. Replacing the name ``m.f``
reaches none of them. So, as the commit does, the dispatch goes through the live function object
itself: its ``__code__`` is swapped for a generated *trampoline*, a code object of the same kind
(plain, generator, coroutine, async generator) and with the same free variables (so the swap is
legal and the function's closure stays as it is), whose body asks a ``Dispatcher`` (held in the
trampoline's constants, not in any namespace) which version to run and calls it:

- the *old* version is a copy of the live function with its original code, globals, closure and
  defaults;
- the *new* version is a function built from the candidate's code with the same closure, and as
  globals a snapshot of the live module's namespace overlaid with the names the change sets or
  adds (see ``new_globals``): the live classes, functions and mutable state, the candidate's
  constants.

**Version affinity.** The first dispatched call of a chain (the outermost) picks the arm and
keeps it where every dispatched call beneath it, in any module of the run, reached in any way
(indirect calls cannot be ruled out statically), finds it for as long as it runs. A plain call
keeps it in its thread's *affinity cell*, a one-item list held in a ``threading.local``: the
outermost call writes the arm into the cell and clears it when it returns or raises, so the
thread-local itself is only read (a plain call cannot be suspended, so nothing else runs on its
thread meanwhile; another thread has its own cell, even one running a copy of this context,
which is why the cell is not kept in a context variable). A generator (or async generator) picks
its arm when first resumed and sets it in a ``ContextVar`` around each resume of the version it
drives (set and reset within the one step, so it never leaks into whatever resumes it);
coroutines keep theirs there too. So a request never mixes old and new code.

**Cost.** The outermost plain call's trampoline routes, counts and times with C-level calls
only: ``threading.local`` read, ``ContextVar.get`` of the routing key, and ``next`` on a bytes
iterator, the step's *routing table* (``StepStats``): its byte says the arm and whether this is
one of the one in eight calls timed (``perf_counter`` twice, ``deque.append``), and its
position is the count. With a routing key, the key's bucket is cached on the key and the
call's count and timing come from its arm's timing table. The dispatcher, the versions, the
affinity and the builtins are constants of the trampoline's code (no global or attribute
lookups for them), and the mode and kind are compiled in. No extra Python frame but the version
it calls. Anything else (``key=``, ``route=``, ``flag=``, a shadow sample) costs one Python call.
Errors are counted in Python (they are the rare path).

**Removal.** ``restore`` puts the functions' original code back (the dispatcher becomes garbage
once the last call inside it returns); the trial does it at a safe point.
"""

from __future__ import annotations

import inspect
import itertools
import math
import random
import re
import struct
import threading
import time
import types
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from operator import itemgetter, length_hint, or_
from typing import Any

from hotpatch.engine.changeset import ChangeSet, FunctionState, SetFunction, SetName
from hotpatch.engine.safepoint import closure_code
from hotpatch.judge import ArmSummary
from hotpatch.routing import _KEY as ROUTING_KEY  # the routing key's context variable

__all__ = ["Dispatcher", "StepStats", "Target", "build_trampoline", "refusal_of"]

LATENCY_SAMPLES = 10_000
"""Latencies kept per arm and step (the step's most recent ones)."""

TABLE_SIZE = 1_000
"""Calls per routing table: the new arm's share is exact over each table, to 1 in 1,000 (and in
expectation: a fractional count is rounded up or down per table at random). Small, so that a new
step's tables are built in about a millisecond, with the GIL held."""

TIMED_SHARE = 8
"""One call in this many is timed (``perf_counter`` twice): the latency samples of the step."""

OLD, NEW = False, True

_GEN_FLAGS = 0x20 | 0x100 | 0x200  # CO_GENERATOR | CO_COROUTINE | CO_ITERABLE_COROUTINE
_CO_GENERATOR, _CO_COROUTINE, _CO_ASYNC_GENERATOR = 0x20, 0x80, 0x200
_SUSPENDABLE = _GEN_FLAGS | _CO_COROUTINE

# What a routing table's byte says about one call: bit 0 the arm, bit 1 timed; bit 2, SAMPLED
# (shadow mode), an old-arm call also offered to the shadow worker (which times it anyway).
_NEW_BIT, _TIMED_BIT, SAMPLED = 1, 2, 4


def count_value(counter: itertools.count[int]) -> int:
    """The next value of an ``itertools.count`` without taking it (its repr is ``count(n)``)."""
    return int(repr(counter)[6:-1])


def _roundings(exact: float) -> list[tuple[int, float]]:
    """The whole counts around ``exact`` and the weights that make their expectation ``exact``."""
    if abs(exact - round(exact)) < 1e-6:
        return [(round(exact), 1.0)]
    low = math.floor(exact)
    return [(low, 1.0 - (exact - low)), (low + 1, exact - low)]


_KEY_BYTES = struct.calcsize("I")


def _shuffled(values: list[int]) -> tuple[int, ...]:
    """``values`` in a random order, built with C calls only (sorted by random keys): a new step's
    tables are built while the GIL is held, so this must be quick."""
    keys = memoryview(random.randbytes(_KEY_BYTES * len(values))).cast("I").tolist()
    order = sorted(range(len(values)), key=keys.__getitem__)
    return tuple(itemgetter(*order)(values)) if len(values) > 1 else tuple(values)


def _routing_tables(share: float, sample: float) -> tuple[list[bytes], list[float]]:
    """The routing tables of one share (and shadow sample), with the weights to pick them by."""
    size = TABLE_SIZE
    share = min(max(share, 0.0), 1.0)
    sample = min(max(sample, 0.0), 1.0)
    timed = _shuffled([_TIMED_BIT] * (size // TIMED_SHARE) + [0] * (size - size // TIMED_SHARE))
    tables, weights = [], []
    for new, new_weight in _roundings(share * size):
        for wanted, sampled_weight in _roundings(sample * size):
            sampled = min(wanted, size - new)  # (shadow runs at share 0)
            arms = [_NEW_BIT] * new + [SAMPLED] * sampled + [0] * (size - new - sampled)
            tables.append(bytes(map(or_, _shuffled(arms), timed)))
            weights.append(new_weight * sampled_weight)
    return tables, weights


def _timing_table(arm: bool) -> bytes:
    """A table of one arm's keyed calls: which ones are timed (one in ``TIMED_SHARE``)."""
    timed = [_TIMED_BIT] * (TABLE_SIZE // TIMED_SHARE)
    timed += [0] * (TABLE_SIZE - len(timed))
    return bytes(x | (_NEW_BIT if arm else 0) for x in _shuffled(timed))


_TIMING_TABLES = (_timing_table(OLD), _timing_table(NEW))

UNKEYED, KEYED_OLD, KEYED_NEW = 0, 1, 2
"""The streams of a step: calls routed by its table, and calls routed otherwise, per arm."""


class StepStats:
    """Calls, errors and recent latencies of each arm during one step; recorded lock-free.

    A call without a routing key takes the next byte of a shuffled *routing table* (``next`` on
    a bytes iterator: one C call, atomic under the GIL): it says the arm, whether the call is
    timed and (shadow) whether it is sampled. A table holds exactly ``share * TABLE_SIZE`` new
    bytes (a fractional count is rounded up or down at random, per table, so the expectation is
    exact too): the share of unkeyed calls is exact over every 1,000 calls. A call routed
    otherwise (a routing key's bucket, ``choose``) takes the next byte of its arm's *timing
    table* (one call in ``TIMED_SHARE`` timed). Either way the position in the table *is* the
    count: the calls of each arm are read from the tables drawn (``counts``), with no counter to
    bump. A spent table is followed by the same one rotated by a random offset (so no periodic
    workload lines up with it), started under a lock by a call that finds the table empty.

    The trampolines read the three streams' iterators as ``it``, ``kold`` and ``knew``. Calls of
    generators, coroutines and the shadow worker are counted on ``calls`` (``next()`` on an
    ``itertools.count``, a single C call); errors the same way; ``deque.append`` keeps the
    latencies. No count is lost under threads: each of these is one C call, atomic under the GIL
    (a free-threaded build does not promise that for iterators shared between threads).
    """

    __slots__ = (
        "_banked",
        "_drawn",
        "_lock",
        "_tables",
        "calls",
        "errors",
        "it",
        "knew",
        "kold",
        "lat",
        "sample",
        "share",
        "started",
    )

    def __init__(self, share: float = 0.0, sample: float = 0.0) -> None:
        self.calls = [itertools.count(), itertools.count()]
        self.errors = [itertools.count(), itertools.count()]
        self.lat: list[deque[float]] = [
            deque(maxlen=LATENCY_SAMPLES),
            deque(maxlen=LATENCY_SAMPLES),
        ]
        self.started = time.monotonic()
        self.sample = sample
        self.share = share
        self._lock = threading.Lock()
        self._banked = [0, 0]  # calls of each arm in spent tables, dropped from _drawn
        self._drawn: list[tuple[bytes, Iterator[int]]] = []
        self._tables = [
            _routing_tables(share, sample),
            ([_TIMING_TABLES[OLD]], [1.0]),
            ([_TIMING_TABLES[NEW]], [1.0]),
        ]
        self.it = self._next_table(UNKEYED)
        self.kold = self._next_table(KEYED_OLD)
        self.knew = self._next_table(KEYED_NEW)

    def set_share(self, share: float) -> None:
        """Route the unkeyed calls from now on by ``share`` (0..1); what was drawn stays counted."""
        tables = _routing_tables(share, self.sample)  # outside the lock: it takes a while
        with self._lock:
            self.share = share
            self._tables[UNKEYED] = tables
            self.it = self._next_table(UNKEYED)

    def draw(self, stream: int = UNKEYED) -> int:
        """The next byte of a stream, starting its next table when this one is spent."""
        with self._lock:
            while True:
                x = next(self._iterator(stream), None)
                if x is not None:
                    return x
                it = self._next_table(stream)
                if stream == UNKEYED:
                    self.it = it
                elif stream == KEYED_OLD:
                    self.kold = it
                else:
                    self.knew = it

    def _iterator(self, stream: int) -> Iterator[int]:
        return self.it if stream == UNKEYED else self.kold if stream == KEYED_OLD else self.knew

    def _next_table(self, stream: int) -> Iterator[int]:
        """A new table's iterator, recorded in ``_drawn`` (called under the lock, or in init)."""
        kept = []
        for table, it in self._drawn:  # a spent iterator never yields again: bank its counts
            if length_hint(it):
                kept.append((table, it))
            else:
                new = table.count(_NEW_BIT) + table.count(_NEW_BIT | _TIMED_BIT)
                self._banked[NEW] += new
                self._banked[OLD] += len(table) - new
        choices, weights = self._tables[stream]
        table = random.choices(choices, weights)[0] if len(choices) > 1 else choices[0]
        turn = random.randrange(len(table))
        table = table[turn:] + table[:turn]
        it = iter(table)
        kept.append((table, it))
        self._drawn = kept
        return it

    def fail(self, arm: bool) -> None:
        next(self.errors[arm])

    def _calls(self, arm: bool) -> int:
        with self._lock:
            out = self._banked[arm]
            for table, it in self._drawn:
                taken = len(table) - length_hint(it)
                new = table.count(_NEW_BIT, 0, taken) + table.count(_NEW_BIT | _TIMED_BIT, 0, taken)
                out += new if arm else taken - new
        return out + count_value(self.calls[arm])

    def counts(self, arm: bool) -> tuple[int, int]:
        """(calls, errors) of ``arm`` so far."""
        calls = self._calls(arm)
        return calls, min(count_value(self.errors[arm]), calls)

    def summary(self, arm: bool) -> ArmSummary:
        calls, errors = self.counts(arm)
        return ArmSummary(calls, errors, tuple(self.lat[arm].copy()))  # one C call: atomic


class Target:
    """One live function under dispatch: its original state, its two versions, its trampoline."""

    def __init__(
        self,
        func: types.FunctionType,
        new_state: FunctionState,
        new_globals: dict[str, Any],
        *,
        path: str,
    ) -> None:
        self.func = func
        self.path = path
        self.original = FunctionState.capture(func)
        old = types.FunctionType(
            self.original.code,
            func.__globals__,
            func.__name__,
            self.original.defaults,
            func.__closure__,
        )
        old.__kwdefaults__ = self.original.kwdefaults
        old.__qualname__ = self.original.qualname
        old.__dict__.update(func.__dict__)
        new = types.FunctionType(
            new_state.code, new_globals, func.__name__, new_state.defaults, func.__closure__
        )
        new.__kwdefaults__ = new_state.kwdefaults
        new.__qualname__ = new_state.qualname
        new.__dict__.update(func.__dict__)
        self.versions: tuple[types.FunctionType, types.FunctionType] = (old, new)
        # Same defaults: the trampoline can take the function's own parameters (see
        # build_trampoline); else each version must bind its own.
        self.same_defaults = _same_values(self.original.defaults, new_state.defaults) and (
            _same_values(self.original.kwdefaults, new_state.kwdefaults)
        )
        self.new_code = new_state.code
        self.trampoline: types.CodeType | None = None


def _same_values(a: object, b: object) -> bool:
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # an __eq__ that raises: not provably the same
        return False


def refusal_of(func: types.FunctionType, new_code: types.CodeType) -> str | None:
    """Why ``func`` cannot be dispatched to ``new_code`` (None: it can)."""
    old = func.__code__
    if (old.co_flags ^ new_code.co_flags) & (_GEN_FLAGS | _CO_COROUTINE):
        return "its kind changed (plain, generator, coroutine or async generator)"
    if old.co_freevars != new_code.co_freevars:
        return (
            f"its free variables changed ({', '.join(old.co_freevars) or 'none'} -> "
            f"{', '.join(new_code.co_freevars) or 'none'})"
        )
    return None


def new_globals(live: dict[str, Any], changeset: ChangeSet) -> dict[str, Any]:
    """The namespace the new versions of one module run in.

    A snapshot of the live namespace (so the new code sees the live classes, the live functions,
    which dispatch to the new arm under its affinity, and the live module state: the same dicts,
    lists and objects), overlaid with every module-level name the change sets or adds. A function
    the change adds is re-made with this namespace as its globals, so it sees the other added
    names. A name either version *rebinds* later (``global x; x = ...``) is seen by that version
    only, until the promote.
    """
    overlay = dict(live)
    for a in changeset.assignments:
        if isinstance(a, SetName) and a.namespace is live:
            overlay[a.name] = a.value
    for name, value in list(overlay.items()):
        if (
            isinstance(value, types.FunctionType)
            and value.__globals__ is live
            and live.get(name) is not value
        ):
            made = types.FunctionType(
                value.__code__, overlay, value.__name__, value.__defaults__, value.__closure__
            )
            made.__kwdefaults__ = value.__kwdefaults__
            made.__qualname__ = value.__qualname__
            made.__dict__.update(value.__dict__)
            overlay[name] = made
    return overlay


class Dispatcher:
    """Picks the arm of each call and records what each arm served (one per parallel run).

    Read by the trampolines (keep them plain attributes): ``stats`` (the current ``StepStats``:
    its routing table, its share, its counters), ``var`` (the affinity of generators and
    coroutines), ``choose`` and ``shadow`` (the Python paths), ``clock``. ``local`` (the
    per-thread affinity cell), ``fns`` and the run id are constants of the trampolines. ``mode``
    (0: inline bucket routing; 1: ``choose``; 2: shadow: the old arm, and ``shadow`` for a
    sampled call) and ``suspendable`` (whether any target is a generator or coroutine) are
    compiled into the trampolines, so they are fixed before ``build_trampoline``.
    """

    def __init__(self, run_id: str, targets: Sequence[Target]) -> None:
        self.run = run_id
        self.var: ContextVar[bool | None] = ContextVar(f"hotpatch_trial_{run_id}", default=None)
        self.local = threading.local()  # .cell: this thread's [arm of the running plain call]
        self.keyvar = ROUTING_KEY
        self.fns = [t.versions for t in targets]
        # Only generator and coroutine trampolines set ``var``: without them, a plain call
        # need not read it.
        self.suspendable = any(t.func.__code__.co_flags & _SUSPENDABLE for t in targets)
        self.mode = 0
        self.sample = 0.0  # shadow: the share of calls also run on the new version
        self.stats = StepStats()
        self.random = random.random
        self.clock = time.perf_counter
        self.choose: Callable[[], bool] = self._bucket_choice
        self.shadow: Callable[[int, list[bool | None], tuple[Any, ...], dict[str, Any]], Any]
        self.shadow = self._no_shadow

    @property
    def share(self) -> float:
        """The new arm's share of the calls (0..1) in the current step."""
        return self.stats.share

    @share.setter
    def share(self, value: float) -> None:
        self.stats.set_share(value)

    def cell(self) -> list[bool | None]:
        """This thread's affinity cell: ``[arm]`` of the plain call running (None: none runs)."""
        try:
            cell: list[bool | None] = self.local.cell
        except AttributeError:
            cell = self.local.cell = [None]
        return cell

    def arm(self) -> bool | None:
        """The arm of the current call chain (None outside any dispatched call)."""
        v = self.cell()[0]
        return self.var.get() if v is None else bool(v)

    def _bucket_choice(self) -> bool:
        key = self.keyvar.get()
        point = self.random() if key is None else key.bucket(self.run)
        return point < self.stats.share

    def _no_shadow(
        self, k: int, cell: list[bool | None], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        raise AssertionError("shadow mode without a shadow")


# -- the trampolines ------------------------------------------------------------------------------
#
# Each template is the body of a function; A and K stand for its parameters (replaced below by the
# function's own, or by *args, **kwargs). Names in _CONSTANTS are set from placeholder constants
# that ``build_trampoline`` swaps for the objects (the dispatcher, the versions, this thread's
# affinity, the builtins used: so a module's own ``next`` can never stand in for them). Every
# local is renamed with a prefix no parameter or free variable of the function uses.

_CONSTANTS = ("D", "k", "F", "L", "N", "KV", "RUN", "AE", "BE", "KE", "SI", "SAI", "GE")
_LOCALS = (*_CONSTANTS, "C", "v", "x", "R", "b", "S", "T", "c", "A", "K", "g", "s", "e", "r")

_HEAD = """\
try:
    C = L.cell
except AE:
    C = D.cell()
v = C[0]
if v is not None:
    return F[v](*A, **K)
"""

_HEAD_SUSPENDABLE = """\
v = D.var.get()
if v is not None:
    return F[v](*A, **K)
"""

# The arm and the timing of an outermost call: x is a routing table's byte (bit 0: the arm,
# bit 1: timed, SAMPLED: shadowed) or, for a call routed otherwise, built the same way.
_ROUTE_INLINE = """\
S = D.stats
R = KV.get()
if R is None:
    try:
        x = N(S.it)
    except SI:
        x = S.draw()
else:
    try:
        b = R.buckets[RUN]
    except KE:
        b = R.bucket(RUN)
    if b < S.share:
        x = N(S.knew, None)
        if x is None:
            x = S.draw(2)
    else:
        x = N(S.kold, None)
        if x is None:
            x = S.draw(1)
"""

_ROUTE_CHOOSE = """\
S = D.stats
if D.choose():
    x = N(S.knew, None)
    if x is None:
        x = S.draw(2)
else:
    x = N(S.kold, None)
    if x is None:
        x = S.draw(1)
"""

_ROUTE_SHADOW = """\
S = D.stats
try:
    x = N(S.it)
except SI:
    x = S.draw()
"""

_CALL = """\
if x < 2:
    C[0] = x
    try:
        return F[x](*A, **K)
    except:
        S.fail(x)
        raise
    finally:
        C[0] = None
"""

_CALL_SAMPLED = f"""\
if x >= {SAMPLED}:
    return D.shadow(k, C, A, K)
"""

_CALL_TIMED = """\
v = x & 1
C[0] = v
c = D.clock()
try:
    R = F[v](*A, **K)
except:
    S.fail(v)
    raise
finally:
    C[0] = None
S.lat[v].append(D.clock() - c)
return R
"""

_COROUTINE = """\
try:
    C = L.cell
except AE:
    C = D.cell()
v = C[0]
if v is None:
    v = D.var.get()
if v is not None:
    return await F[v](*A, **K)
v = False if D.mode == 2 else D.choose()
S = D.stats
T = D.var.set(v)
N(S.calls[v])
c = D.clock()
try:
    R = await F[v](*A, **K)
    S.lat[v].append(D.clock() - c)
    return R
except:
    S.fail(v)
    raise
finally:
    D.var.reset(T)
"""

_GENERATOR = """\
try:
    C = L.cell
except AE:
    C = D.cell()
v = C[0]
if v is None:
    v = D.var.get()
if v is None:
    v = D.choose() if D.mode != 2 else False
    S = D.stats
    N(S.calls[v])
else:
    S = None
g = F[v](*A, **K)
s = None
e = None
while True:
    T = D.var.set(v)
    try:
        if e is None:
            x = g.send(s)
        else:
            x = g.throw(e)
    except SI as r:
        return r.value
    except GE:
        raise
    except:
        if S is not None:
            S.fail(v)
        raise
    finally:
        D.var.reset(T)
    e = None
    try:
        s = yield x
    except GE:
        T = D.var.set(v)
        try:
            g.close()
        finally:
            D.var.reset(T)
        raise
    except BE as c:
        e = c
"""

_ASYNC_GENERATOR = """\
try:
    C = L.cell
except AE:
    C = D.cell()
v = C[0]
if v is None:
    v = D.var.get()
if v is None:
    v = D.choose() if D.mode != 2 else False
    S = D.stats
    N(S.calls[v])
else:
    S = None
g = F[v](*A, **K)
s = None
e = None
while True:
    T = D.var.set(v)
    try:
        if e is None:
            x = await g.asend(s)
        else:
            x = await g.athrow(e)
    except SAI:
        return
    except GE:
        raise
    except:
        if S is not None:
            S.fail(v)
        raise
    finally:
        D.var.reset(T)
    e = None
    try:
        s = yield x
    except GE:
        T = D.var.set(v)
        try:
            await g.aclose()
        finally:
            D.var.reset(T)
        raise
    except BE as c:
        e = c
"""


def _plain_body(*, mode: int, suspendable: bool, shadowed: bool) -> str:
    route = (_ROUTE_INLINE, _ROUTE_CHOOSE, _ROUTE_SHADOW)[mode]
    sampled = _CALL_SAMPLED if mode == 2 and shadowed else ""
    return (
        _HEAD + (_HEAD_SUSPENDABLE if suspendable else "") + route + _CALL + sampled + _CALL_TIMED
    )


_templates: dict[tuple[object, ...], types.CodeType] = {}


def _placeholder(name: str) -> str:
    return f"__hotpatch_trial_constant_{name}__"


def _parameters(code: types.CodeType) -> tuple[list[str], int, list[str], str | None, str | None]:
    """(positional names, how many are positional-only, keyword-only names, *args, **kwargs)."""
    names = code.co_varnames
    argc, kwonly = code.co_argcount, code.co_kwonlyargcount
    positional = list(names[:argc])
    keyword_only = list(names[argc : argc + kwonly])
    index = argc + kwonly
    varargs = varkw = None
    if code.co_flags & inspect.CO_VARARGS:
        varargs = names[index]
        index += 1
    if code.co_flags & inspect.CO_VARKEYWORDS:
        varkw = names[index]
    return positional, code.co_posonlyargcount, keyword_only, varargs, varkw


def build_trampoline(
    func: types.FunctionType,
    dispatcher: Dispatcher,
    key: int,
    *,
    exact: bool = True,
    shadowed: bool = True,
) -> types.CodeType:
    """A code object of ``func``'s kind and free variables that dispatches through ``key``.

    With ``exact`` (both versions have the same defaults), the trampoline has ``func``'s own
    parameters (names, kinds, positional-only marker; the defaults stay on the function object),
    so ``inspect.signature`` is unchanged and a call is forwarded without building an argument
    tuple and dict. Otherwise it takes ``*args, **kwargs`` and forwards them, so each version
    binds its own defaults. ``shadowed`` (shadow mode): a sampled call goes to
    ``dispatcher.shadow``; else it is an old-arm call like any other.
    """
    code = func.__code__
    if code.co_flags & _CO_ASYNC_GENERATOR:
        kind, body = "async_generator", _ASYNC_GENERATOR
    elif code.co_flags & _CO_COROUTINE:
        kind, body = "coroutine", _COROUTINE
    elif code.co_flags & _CO_GENERATOR:
        kind, body = "generator", _GENERATOR
    else:
        kind = "plain"
        body = _plain_body(
            mode=dispatcher.mode, suspendable=dispatcher.suspendable, shadowed=shadowed
        )
    freevars = code.co_freevars
    positional, posonly, keyword_only, varargs, varkw = _parameters(code)
    signature = (tuple(positional), posonly, tuple(keyword_only), varargs, varkw) if exact else None
    template = _templates.get((kind, body, freevars, signature))
    if template is None:
        template = _compile_template(kind, body, code, signature)
        _templates[(kind, body, freevars, signature)] = template
    constants: dict[str, object] = {
        _placeholder("D"): dispatcher,
        _placeholder("k"): key,
        _placeholder("F"): dispatcher.fns[key],
        _placeholder("L"): dispatcher.local,
        _placeholder("N"): next,
        _placeholder("KV"): dispatcher.keyvar,
        _placeholder("RUN"): dispatcher.run,
        _placeholder("AE"): AttributeError,
        _placeholder("BE"): BaseException,
        _placeholder("KE"): KeyError,
        _placeholder("SI"): StopIteration,
        _placeholder("SAI"): StopAsyncIteration,
        _placeholder("GE"): GeneratorExit,
    }

    def fill(c: object) -> object:
        if type(c) is str and c in constants:
            return constants[c]
        return c

    names: dict[str, Any] = {"co_name": code.co_name}
    if hasattr(code, "co_qualname"):  # 3.11+: tracebacks show the qualified name
        names["co_qualname"] = code.co_qualname
    return template.replace(co_consts=tuple(fill(c) for c in template.co_consts), **names)


def _compile_template(
    kind: str,
    body: str,
    code: types.CodeType,
    signature: tuple[tuple[str, ...], int, tuple[str, ...], str | None, str | None] | None,
) -> types.CodeType:
    freevars = code.co_freevars
    positional, posonly, keyword_only, varargs, varkw = _parameters(code)
    used = {n for n in _CONSTANTS if re.search(rf"(?<![.\w]){n}\b", body)}
    text = "".join(f"{n} = {_placeholder(n)!r}\n" for n in _CONSTANTS if n in used) + body
    text = text.replace("D.shadow(k, C, A, K)", "D.shadow(k, C, @ARGS@, @KWARGS@)")
    text = text.replace("(*A, **K)", "(@CALL@)")
    taken = set(freevars) | set(code.co_varnames[: code.co_argcount + code.co_kwonlyargcount])
    taken |= {varargs or "", varkw or ""}
    prefix = "_hotpatch_"
    while any(prefix + n in taken for n in _LOCALS):
        prefix += "_"
    for n in _LOCALS:  # whole names, never attributes: no local shadows a free variable
        text = re.sub(rf"(?<![.\w]){n}\b", prefix + n, text)
    if signature is not None:
        params = list(positional)
        if posonly:
            params.insert(posonly, "/")
        if varargs:
            params.append("*" + varargs)
        elif keyword_only:
            params.append("*")
        params += keyword_only
        if varkw:
            params.append("**" + varkw)
        star = [f"*{varargs}"] if varargs else []
        call = [*positional, *star, *(f"{n}={n}" for n in keyword_only)]
        call += [f"**{varkw}"] if varkw else []
        args = "(" + "".join(f"{n}, " for n in [*positional, *star]) + ")"
        kwargs = "{" + ", ".join([*(f"{n!r}: {n}" for n in keyword_only)])
        kwargs += (", " if keyword_only and varkw else "") + (f"**{varkw}" if varkw else "")
        kwargs += "}"
        text = text.replace("@CALL@", ", ".join(call))
        text = text.replace("@ARGS@", args).replace("@KWARGS@", kwargs)
        header_params = ", ".join(params)
    else:
        text = text.replace("@CALL@", f"*{prefix}A, **{prefix}K")
        text = text.replace("@ARGS@", f"{prefix}A").replace("@KWARGS@", f"{prefix}K")
        header_params = f"*{prefix}A, **{prefix}K"
    header = "async def" if kind in ("coroutine", "async_generator") else "def"
    return closure_code(
        f"{header} _hotpatch_trial({header_params})", text, freevars, "<hotpatch trial>"
    )


def install_set(targets: Sequence[Target]) -> ChangeSet:
    """The change set that puts every target's trampoline in place of its code."""
    out = []
    for t in targets:
        assert t.trampoline is not None
        out.append(SetFunction(t.func, t.original._replace(code=t.trampoline)))
    return ChangeSet(tuple(out))


def restore_set(targets: Sequence[Target]) -> ChangeSet:
    """The change set that puts every target's own code back."""
    return ChangeSet(tuple(SetFunction(t.func, t.original) for t in targets))
