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

**Version affinity.** The first dispatched call of a chain (the outermost) picks the arm and sets
it in a ``ContextVar`` for as long as it runs; every dispatched call beneath it, in any module of
the run, follows that arm. So a request never mixes old and new code. A generator (or async
generator) picks its arm when first resumed and sets it around each resume of the version it
drives (set and reset within the one step, so it never leaks into whatever resumes it): the
calls its body makes follow its arm.

**Cost.** The outermost plain call's trampoline does its routing (a routing key's bucket is cached
on the key) and counting with C-level calls only (``ContextVar.get``, a thread-local's attribute,
``next`` on an ``itertools.count``): no extra Python frame but the version it calls. A plain call
keeps its arm in a thread-local (it cannot be suspended, so nothing else runs on its thread
meanwhile); coroutines and generators keep it in the context variable. One call in eight is
timed (``perf_counter`` twice, ``deque.append``): the latency sample of the step.
Anything else (``key=``, ``route=``, ``flag=``, shadowing) costs one Python
call of the dispatcher. Errors are counted in Python (they are the rare path).

**Removal.** ``restore`` puts the functions' original code back (the dispatcher becomes garbage
once the last call inside it returns); the trial does it at a safe point.
"""

from __future__ import annotations

import inspect
import itertools
import random
import re
import threading
import time
import types
from collections import deque
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

from hotpatch.engine.changeset import ChangeSet, FunctionState, SetFunction, SetName
from hotpatch.judge import ArmSummary
from hotpatch.routing import _KEY as ROUTING_KEY  # the routing key's context variable

__all__ = ["Dispatcher", "StepStats", "Target", "build_trampoline", "refusal_of"]

LATENCY_SAMPLES = 10_000
"""Latencies kept per arm and step (the step's most recent ones)."""

OLD, NEW = False, True

_PLACEHOLDER = "__hotpatch_trial_dispatcher__"
_KEY_PLACEHOLDER = 0x7E57_7A1A

_GEN_FLAGS = 0x20 | 0x100 | 0x200  # CO_GENERATOR | CO_COROUTINE | CO_ITERABLE_COROUTINE
_CO_GENERATOR, _CO_COROUTINE, _CO_ASYNC_GENERATOR = 0x20, 0x80, 0x200
_SUSPENDABLE = _GEN_FLAGS | _CO_COROUTINE


def count_value(counter: itertools.count[int]) -> int:
    """The next value of an ``itertools.count`` without taking it (its repr is ``count(n)``)."""
    return int(repr(counter)[6:-1])


class StepStats:
    """Calls, errors and recent latencies of each arm during one step; recorded lock-free.

    ``next()`` on an ``itertools.count`` and ``deque.append`` are single C calls, atomic under the
    GIL and on free-threaded builds alike, so concurrent calls never lose a count.
    """

    __slots__ = ("calls", "errors", "lat", "started")

    def __init__(self) -> None:
        self.calls = [itertools.count(), itertools.count()]
        self.errors = [itertools.count(), itertools.count()]
        self.lat: list[deque[float]] = [
            deque(maxlen=LATENCY_SAMPLES),
            deque(maxlen=LATENCY_SAMPLES),
        ]
        self.started = time.monotonic()

    def fail(self, arm: bool) -> None:
        next(self.errors[arm])

    def counts(self, arm: bool) -> tuple[int, int]:
        """(calls, errors) of ``arm`` so far."""
        calls = count_value(self.calls[arm])
        return calls, min(count_value(self.errors[arm]), calls)

    def summary(self, arm: bool) -> ArmSummary:
        calls = count_value(self.calls[arm])
        errors = min(count_value(self.errors[arm]), calls)
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


class Affinity(threading.local):
    """The arm of the plain call running in this thread (None: no dispatched call).

    A plain call runs to completion on its thread (no other task of an event loop can run in
    between), so a thread-local is enough for it, and cheaper to set than a context variable.
    Coroutines and generators, which suspend, keep their arm in the context variable instead.
    """

    arm: bool | None = None


class Dispatcher:
    """Picks the arm of each call and records what each arm served (one per parallel run).

    Attributes read by the trampolines (keep them plain attributes): ``local`` and ``var`` (the
    affinity; ``suspendable``: whether any trampoline sets ``var``), ``fns`` (per target: (old,
    new)), ``mode`` (0: inline bucket routing; 1: ``choose``; 2: shadow: the old arm, and
    ``shadow`` for a ``sample`` of the calls), ``share`` (the new arm's share, 0..1), ``run``
    (the run id salting the bucket), ``stats`` (the current ``StepStats``).
    """

    def __init__(self, run_id: str, targets: Sequence[Target]) -> None:
        self.run = run_id
        self.var: ContextVar[bool | None] = ContextVar(f"hotpatch_trial_{run_id}", default=None)
        self.local = Affinity()
        self.keyvar = ROUTING_KEY
        self.fns = [t.versions for t in targets]
        # Only generator and coroutine trampolines set ``var``: without them, a plain call
        # need not read it.
        self.suspendable = any(t.func.__code__.co_flags & _SUSPENDABLE for t in targets)
        self.mode = 0
        self.share = 0.0
        self.sample = 0.0  # shadow: the share of calls also run on the new version
        self.stats = StepStats()
        self.random = random.random
        self.clock = time.perf_counter
        self.choose: Callable[[], bool] = self._bucket_choice
        self.shadow: Callable[[int, tuple[Any, ...], dict[str, Any]], Any] = self._no_shadow

    def arm(self) -> bool | None:
        """The arm of the current call chain (None outside any dispatched call)."""
        v = self.local.arm
        return self.var.get() if v is None else v

    def _bucket_choice(self) -> bool:
        key = self.keyvar.get()
        point = self.random() if key is None else key.bucket(self.run)
        return point < self.share

    def _no_shadow(self, k: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        raise AssertionError("shadow mode without a shadow")


# -- the trampolines ------------------------------------------------------------------------------

_LOCALS = ("D", "k", "v", "R", "b", "S", "T", "c", "A", "K", "g", "x", "s", "e", "r", "L")

_PLAIN = """\
D = {d!r}
k = {k!r}
v = D.local.arm
if v is not None:
    return D.fns[k][v](*A, **K)
if D.suspendable:
    v = D.var.get()
    if v is not None:
        return D.fns[k][v](*A, **K)
if D.mode == 0:
    R = D.keyvar.get()
    if R is None:
        v = D.random() < D.share
    else:
        b = R.buckets.get(D.run)
        if b is None:
            b = R.bucket(D.run)
        v = b < D.share
elif D.mode == 1:
    v = D.choose()
elif D.random() < D.sample:
    return D.shadow(k, A, K)
else:
    v = False
S = D.stats
L = D.local
L.arm = v
try:
    if next(S.calls[v]) & 7:
        return D.fns[k][v](*A, **K)
    c = D.clock()
    R = D.fns[k][v](*A, **K)
    S.lat[v].append(D.clock() - c)
    return R
except BaseException:
    S.fail(v)
    raise
finally:
    L.arm = None
"""

_COROUTINE = """\
D = {d!r}
k = {k!r}
v = D.local.arm
if v is None:
    v = D.var.get()
if v is not None:
    return await D.fns[k][v](*A, **K)
v = False if D.mode == 2 else D.choose()
S = D.stats
T = D.var.set(v)
next(S.calls[v])
c = D.clock()
try:
    R = await D.fns[k][v](*A, **K)
    S.lat[v].append(D.clock() - c)
    return R
except BaseException:
    S.fail(v)
    raise
finally:
    D.var.reset(T)
"""

_GENERATOR = """\
D = {d!r}
k = {k!r}
v = D.local.arm
if v is None:
    v = D.var.get()
if v is None:
    v = D.choose() if D.mode != 2 else False
    S = D.stats
    next(S.calls[v])
else:
    S = None
g = D.fns[k][v](*A, **K)
s = None
e = None
while True:
    T = D.var.set(v)
    try:
        if e is None:
            x = g.send(s)
        else:
            x = g.throw(e)
    except StopIteration as r:
        return r.value
    except GeneratorExit:
        raise
    except BaseException:
        if S is not None:
            S.fail(v)
        raise
    finally:
        D.var.reset(T)
    e = None
    try:
        s = yield x
    except GeneratorExit:
        T = D.var.set(v)
        try:
            g.close()
        finally:
            D.var.reset(T)
        raise
    except BaseException as c:
        e = c
"""

_ASYNC_GENERATOR = """\
D = {d!r}
k = {k!r}
v = D.local.arm
if v is None:
    v = D.var.get()
if v is None:
    v = D.choose() if D.mode != 2 else False
    S = D.stats
    next(S.calls[v])
else:
    S = None
g = D.fns[k][v](*A, **K)
s = None
e = None
while True:
    T = D.var.set(v)
    try:
        if e is None:
            x = await g.asend(s)
        else:
            x = await g.athrow(e)
    except StopAsyncIteration:
        return
    except GeneratorExit:
        raise
    except BaseException:
        if S is not None:
            S.fail(v)
        raise
    finally:
        D.var.reset(T)
    e = None
    try:
        s = yield x
    except GeneratorExit:
        T = D.var.set(v)
        try:
            await g.aclose()
        finally:
            D.var.reset(T)
        raise
    except BaseException as c:
        e = c
"""

_templates: dict[tuple[object, ...], types.CodeType] = {}


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
    func: types.FunctionType, dispatcher: Dispatcher, key: int, *, exact: bool = True
) -> types.CodeType:
    """A code object of ``func``'s kind and free variables that dispatches through ``key``.

    With ``exact`` (both versions have the same defaults), the trampoline has ``func``'s own
    parameters (names, kinds, positional-only marker; the defaults stay on the function object),
    so ``inspect.signature`` is unchanged and a call is forwarded without building an argument
    tuple and dict. Otherwise it takes ``*args, **kwargs`` and forwards them, so each version
    binds its own defaults.
    """
    code = func.__code__
    if code.co_flags & _CO_ASYNC_GENERATOR:
        kind, body = "async_generator", _ASYNC_GENERATOR
    elif code.co_flags & _CO_COROUTINE:
        kind, body = "coroutine", _COROUTINE
    elif code.co_flags & _CO_GENERATOR:
        kind, body = "generator", _GENERATOR
    else:
        kind, body = "plain", _PLAIN
    freevars = code.co_freevars
    positional, posonly, keyword_only, varargs, varkw = _parameters(code)
    signature = (tuple(positional), posonly, tuple(keyword_only), varargs, varkw) if exact else None
    template = _templates.get((kind, freevars, signature))
    if template is None:
        text = body.format(d=_PLACEHOLDER, k=_KEY_PLACEHOLDER)
        text = text.replace("D.shadow(k, A, K)", "D.shadow(k, @ARGS@, @KWARGS@)")
        text = text.replace("(*A, **K)", "(@CALL@)")
        taken = set(freevars) | set(code.co_varnames[: code.co_argcount + code.co_kwonlyargcount])
        taken |= {varargs or "", varkw or ""}
        prefix = "_hotpatch_"
        while any(prefix + n in taken for n in _LOCALS):
            prefix += "_"
        for n in _LOCALS:  # whole words only, so that no local shadows a free variable
            text = re.sub(rf"\b{n}\b", prefix + n, text)
        if exact:
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
        lines = ["def _outer():"]
        lines += [f"    {name} = None" for name in freevars]
        lines.append(f"    {header} _hotpatch_trial({header_params}):")
        if freevars:
            lines.append("        " + ", ".join(freevars))
        lines += ["        " + line for line in text.splitlines()]
        namespace: dict[str, object] = {}
        exec(compile("\n".join(lines), "<hotpatch trial>", "exec"), namespace)
        outer = namespace["_outer"]
        assert isinstance(outer, types.FunctionType)
        template = next(c for c in outer.__code__.co_consts if isinstance(c, types.CodeType))
        _templates[(kind, freevars, signature)] = template

    def fill(c: object) -> object:
        if type(c) is str and c == _PLACEHOLDER:
            return dispatcher
        if type(c) is int and c == _KEY_PLACEHOLDER:
            return key
        return c

    names: dict[str, Any] = {"co_name": code.co_name}
    if hasattr(code, "co_qualname"):  # 3.11+: tracebacks show the qualified name
        names["co_qualname"] = code.co_qualname
    return template.replace(co_consts=tuple(fill(c) for c in template.co_consts), **names)


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
