"""Plan the in-place update of a live module from its candidate.

The plan pairs every live object with its twin in the candidate and turns the differences into a
``ChangeSet``:

- a live function gets the new code, defaults, annotations and doc *in place*, so every reference to
  it (a ``from m import f`` binding, a callback in a dict, a ``functools.wraps`` wrapper, a closure made
  by a factory) runs the new code;
- a live class keeps its identity (instances stay ``isinstance`` of it) and gets its members updated
  the same way;
- a function that cannot take the new code in place (it became a generator or a coroutine, or the
  reverse; a factory made it with other closure values) is *replaced*: the new function is bound
  where the old one was, never mapped back onto it, and the plan lists it in
  ``replaced_definitions`` so that the pipeline refuses when references it cannot re-bind remain;
- a plain value keeps its live object unless the statement that assigns it changed
  (``statements.StatementIndex``) or is *forced* (``__hotpatch_migrate__``, or ``derived``: it is
  computed from names that changed);
- new objects are re-bound to the live module namespace (``rebind.Rebinder``), so that nothing
  live points into the candidate; a descriptor whose own state changed is copied around the live
  functions.

Planning reads live objects but changes none: the commit applies the change set later, at a safe
point. Changes that cannot be made in place are reported as compatibility problems.
"""

from __future__ import annotations

import enum
import functools
import gc
import os
import types
from collections.abc import Callable
from dataclasses import dataclass, field

from hotpatch.engine.changeset import (
    MISSING,
    Assignment,
    ChangeSet,
    FunctionState,
    SetAttr,
    SetFunction,
    SetName,
    codes_of,
    functions_of,
)
from hotpatch.engine.compare import (
    IMMUTABLE,
    cell_value,
    nested_codes,
    parameter_shape,
    safe_equal,
    same_behavior,
    same_generated,
    same_kind,
    same_repr,
    same_value,
)
from hotpatch.engine.guard import (
    class_incompatibility,
    is_public,
    metaclass_body_incompatibility,
    signature_incompatibility,
)
from hotpatch.engine.rebind import CLASS_SKIP, IdentityMap, Rebinder, is_own_class
from hotpatch.engine.statements import StatementIndex, collector_paused

MODULE_SKIP = frozenset(
    {
        "__builtins__",
        "__name__",
        "__file__",
        "__cached__",
        "__path__",
        "__package__",
        "__loader__",
        "__spec__",
    }
)
_CLASS_TAKE_NEW = frozenset(
    {
        "__doc__",
        "__dataclass_fields__",
        "__dataclass_params__",
        "__match_args__",
        "__abstractmethods__",
        "__annotations__",
        "__firstlineno__",
        "__static_attributes__",
        "__orig_bases__",
        "__parameters__",
        "__type_params__",
    }
)


# Names under which ``setattr`` (and ``delattr``) on a class reaches the type's own attribute, not
# the class ``__dict__``: ``setattr(K, "__name__", v)`` renames the class itself. A commit never
# assigns or deletes them on a live class. A descriptor a class body put under such a name (toolz's
# ``Compose.__name__`` property, seen by instances only) still takes new code in place: that
# changes the descriptor's functions and assigns nothing on the class.
_CLASS_NEVER_SET = frozenset({"__class__", "__bases__", "__mro__", "__name__"})


@dataclass(frozen=True)
class Problem:
    """Why part of a change cannot be made in place.

    ``policy`` marks a compatibility-policy refusal (a public name or parameter removed, a call
    the old signature took that the new one refuses): a restart would break the same callers, so
    ``allow_removals=True`` lifts it. Every other problem means the process would not behave like
    one restarted on the new code: a restart (or rolling reload) is needed.
    """

    message: str
    lineno: int | None = None
    policy: bool = False


@dataclass
class Plan:
    """What a commit of one module will do."""

    module: str
    changeset: ChangeSet
    changed: tuple[str, ...]
    added: tuple[str, ...]
    removed: tuple[str, ...]
    replaced_codes: frozenset[types.CodeType]
    problems: tuple[Problem, ...]
    after_commit: tuple[Callable[[], object], ...] = ()
    rebound: tuple[str, ...] = ()  # module-level names bound to another object (not in place)
    paired_plain: tuple[int, ...] = ()  # ids of candidate values this plan mapped to live ones
    # (path, old object, ()) of definitions replaced rather than updated in place
    replaced_definitions: tuple[tuple[str, object, tuple[()]], ...] = ()


_COMPREHENSIONS = frozenset({"<listcomp>", "<setcomp>", "<dictcomp>", "<genexpr>"})


def _own_function(value: object, namespace: dict[str, object]) -> bool:
    return isinstance(value, types.FunctionType) and value.__globals__ is namespace


def _instance_dict(value: object) -> dict[str, object] | None:
    try:
        d = object.__getattribute__(value, "__dict__")
    except Exception:
        return None
    return d if isinstance(d, dict) else None


def _innermost_own(value: object, namespace: dict[str, object]) -> types.FunctionType | None:
    """Follow ``__wrapped__`` (functools.wraps, lru_cache) to a function of this module."""
    for _ in range(16):
        if _own_function(value, namespace):
            assert isinstance(value, types.FunctionType)
            return value
        d = _instance_dict(value)
        if d is None or "__wrapped__" not in d:
            return None
        value = d["__wrapped__"]
    return None


@dataclass
class _Planner:
    module: str
    live: dict[str, object]
    cand: dict[str, object]
    old_index: StatementIndex | None
    new_index: StatementIndex
    allow_removals: bool
    forced: frozenset[str]
    remap: IdentityMap = field(default_factory=IdentityMap)
    ops: list[Assignment] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    replaced: set[types.CodeType] = field(default_factory=set)
    problems: list[Problem] = field(default_factory=list)
    after_commit: list[Callable[[], object]] = field(default_factory=list)
    rebound: list[str] = field(default_factory=list)
    paired_plain: list[int] = field(default_factory=list)
    replaced_definitions: list[tuple[str, object, tuple[()]]] = field(default_factory=list)
    _funcs_done: set[int] = field(default_factory=set)
    _can: dict[tuple[int, int], bool] = field(default_factory=dict)
    _classes_done: set[int] = field(default_factory=set)
    # (id(live class), its path, member name) of the plain members ``_pair_class`` kept live:
    # what ``update_member`` would conclude for them again (no function in either version, the
    # statement binding it unchanged), so the second pass skips them (six: 150 of 178 members)
    _kept_members: set[tuple[int, str, str]] = field(default_factory=set)
    _nested: dict[types.CodeType, types.CodeType] = field(default_factory=dict)
    # id(value) -> (value, its functions): a class member is asked several times per plan;
    # the value is kept, so its id is not reused while the plan runs (planning changes nothing)
    _functions: dict[int, tuple[object, list[types.FunctionType]]] = field(default_factory=dict)
    _shapes: dict[type, int] = field(default_factory=dict)  # functions_of's cache by type
    rebinder: Rebinder = field(init=False)

    def __post_init__(self) -> None:
        self.rebinder = Rebinder(self.module, self.live, self.cand, self.remap)

    def functions_of(self, value: object) -> list[types.FunctionType]:
        """``changeset.functions_of``, once per value and plan (a copy: callers may keep it)."""
        known = self._functions.get(id(value))
        if known is None or known[0] is not value:
            known = self._functions[id(value)] = (value, functions_of(value, self._shapes))
        return list(known[1])

    def rebind(self, value: object) -> object:
        """The live form of a candidate object (``rebind.Rebinder``)."""
        return self.rebinder.rebind(value)

    # -- pairing ---------------------------------------------------------------------------------
    def kind(self, old: object, new: object) -> str:
        if _own_function(old, self.live) and _own_function(new, self.cand):
            return "function"
        if is_own_class(old, self.module) and is_own_class(new, self.module) and old is not new:
            return "class"
        if old is not new and type(old) is type(new):
            inner_old = _innermost_own(old, self.live)
            if inner_old is not None and _innermost_own(new, self.cand) is not None:
                return "wrapped"
        return "plain"

    def take_new(self, scope: str, name: str, old: object, new: object) -> bool:
        """Whether a plain name takes its new value (else the live object is kept)."""
        if (f"{scope}.{name}" if scope else name) in self.forced:
            return True  # set by __hotpatch_migrate__, or derived from names that changed
        if self.old_index is not None and (
            self.old_index.binds(scope, name) or self.new_index.binds(scope, name)
        ):
            return self.old_index.statement_changed(self.new_index, scope, name)
        # No statement to go by: the baseline source is unknown, or the name was set by a
        # decorator or a metaclass. Immutable values take the new value, live state is kept
        # (an instance of a class of this module is of the same type once classes are paired).
        return self.remap_value(type(new)) is not type(old) or isinstance(new, IMMUTABLE)

    def pair_names(self) -> None:
        """First pass: map candidate objects to the live objects they will become."""
        for name, new in self.cand.items():
            if name in MODULE_SKIP:
                continue
            old = self.live.get(name, MISSING)
            if old is MISSING:
                continue
            kind = self.kind(old, new)
            if kind == "function":
                if self.can_update(old, new):  # else the new function replaces the old one
                    self.remap.pair(new, old)
            elif kind == "wrapped":
                if self.can_update(_innermost_own(old, self.live), _innermost_own(new, self.cand)):
                    self.remap.pair(new, old)
            elif kind == "class":
                self._pair_class(old, new, name)  # type: ignore[arg-type]
            elif (
                id(new) not in self.remap  # paired by the plan of the module that made it
                and not isinstance(new, IMMUTABLE)
                and not self.take_new("", name, old, new)
            ):
                self.remap.pair(new, old)
                self.paired_plain.append(id(new))

    def _pair_class(self, old: type, new: type, path: str) -> None:
        if self.remap.get(id(new)) is old:
            return  # paired already (a class attribute that refers back to its class)
        self.remap.pair(new, old)
        self._pair_generated_bases(old, new)
        for name, nv in new.__dict__.items():
            ov = old.__dict__.get(name, MISSING)
            if is_own_class(ov, self.module) and is_own_class(nv, self.module) and ov is not nv:
                assert isinstance(ov, type) and isinstance(nv, type)
                self._pair_class(ov, nv, f"{path}.{name}")
            elif type(nv) is types.FunctionType:  # else can_update is False
                if self.can_update(ov, nv):
                    self.remap.pair(nv, ov)
            elif (
                ov is not MISSING
                and id(nv) not in self.remap
                and name not in CLASS_SKIP
                and name not in _CLASS_TAKE_NEW
                and not isinstance(nv, IMMUTABLE)
                and not self.functions_of(ov)
                and not self.functions_of(nv)
                and not isinstance(nv, type)
                and not self.take_new(path, name, ov, nv)
            ):
                # A plain class-body value kept live (a sentinel ``__marker = object()``): what
                # the candidate's methods refer to (defaults, kw-defaults, closure cells) is
                # re-bound to it, as for a module-level value.
                self.remap.pair(nv, ov)
                self.paired_plain.append(id(nv))
                self._kept_members.add((id(old), path, name))

    def _pair_generated_bases(self, old: type, new: type) -> None:
        """Pair base classes generated in the class statement itself (``class Info(namedtuple(
        "Info", "hits misses"))``): the candidate's base is a new class, but when it is the same
        generated class as the live one (same metaclass, name, module, bases and members, none of
        them a function of this module), a restart would build the same class: the live base is
        kept and the candidate's is its twin. A base that differs stays unpaired (refused)."""
        if len(old.__bases__) != len(new.__bases__):
            return
        for ob, nb in zip(old.__bases__, new.__bases__):
            if (
                ob is not nb
                and id(nb) not in self.remap
                and is_own_class(nb, self.module)
                and self._same_generated_class(ob, nb, depth=0)
            ):
                self.remap.pair(nb, ob)

    def _same_generated_class(self, old: type, new: type, *, depth: int) -> bool:
        if depth > 8 or type(old) is not type(new):
            return False
        if (old.__name__, old.__qualname__) != (new.__name__, new.__qualname__):
            return False
        if tuple(self.remap_value(b) for b in new.__bases__) != old.__bases__ and (
            len(old.__bases__) != len(new.__bases__)
            or not all(
                ob is nb or self._same_generated_class(ob, nb, depth=depth + 1)
                for ob, nb in zip(old.__bases__, new.__bases__)
            )
        ):
            return False
        if old.__dict__.keys() != new.__dict__.keys():
            return False
        for name, nv in new.__dict__.items():
            if name in ("__dict__", "__weakref__"):
                continue
            if not self._same_generated_member(old.__dict__[name], nv):
                return False
        return True

    def _same_generated_member(self, ov: object, nv: object) -> bool:
        if ov is nv or same_value(ov, nv) or same_repr(ov, nv):
            return True
        if type(ov) is not type(nv):
            return False
        if isinstance(ov, tuple) and isinstance(nv, tuple):  # _fields, __slots__, __match_args__
            return len(ov) == len(nv) and all(map(self._same_generated_member, ov, nv))
        old_funcs, new_funcs = functions_of(ov), functions_of(nv)
        if old_funcs or new_funcs:
            return (
                len(old_funcs) == len(new_funcs)
                and not any(f.__globals__ in (self.live, self.cand) for f in old_funcs + new_funcs)
                and all(same_generated(o, n) for o, n in zip(old_funcs, new_funcs))
            )
        reduce_old = getattr(type(ov), "__reduce__", None)
        if type(ov).__module__ in ("builtins", "collections", "_collections") and reduce_old:
            try:  # a field accessor (_tuplegetter): its index and doc
                return safe_equal(ov.__reduce__(), nv.__reduce__())
            except Exception:
                return False
        return False

    def can_update(self, old: object, new: object, depth: int = 0) -> bool:
        """Whether live function ``old`` can take ``new``'s code in place, with the functions its
        closure and ``__wrapped__`` hold (decorators): same kind (not a plain function turned
        generator or coroutine), same free variables. Otherwise the new function replaces it."""
        if not (
            isinstance(old, types.FunctionType)
            and isinstance(new, types.FunctionType)
            and _own_function(old, self.live)
            and _own_function(new, self.cand)
        ):
            return False
        key = (id(old), id(new))
        known = self._can.get(key)
        if known is None:  # decided once per plan, so pairing and updating agree
            known = self._can[key] = self._can_update(old, new, depth)
        return known

    def _can_update(self, old: types.FunctionType, new: types.FunctionType, depth: int) -> bool:
        if old.__code__.co_freevars != new.__code__.co_freevars:
            return False
        if not same_kind(old.__code__, new.__code__):
            return False
        if depth > 16 or id(old) in self._funcs_done:
            return True
        pairs = [
            (cell_value(o), cell_value(n))
            for o, n in zip(old.__closure__ or (), new.__closure__ or ())
        ]
        for o, n in pairs:
            if not _same_cell(o, n, self.remap):
                return False  # made by a factory with other arguments: a restart differs
        pairs.append((old.__dict__.get("__wrapped__"), new.__dict__.get("__wrapped__")))
        return all(
            self.can_update(o, n, depth + 1)
            for o, n in pairs
            if _own_function(o, self.live) or _own_function(n, self.cand)
        )

    def remap_value(self, value: object) -> object:
        return self.remap.get(id(value), value)

    # -- module level ----------------------------------------------------------------------------
    def plan_module(self) -> None:
        origin = _built_from_elsewhere(self.live)
        if origin is not None:
            self.problems.append(
                Problem(
                    f"{self.module} was built from {origin} (its import spec), not from its "
                    f"__file__ {self.live.get('__file__')} (an alias an import hook made): "
                    "executing that file as this module is not what a restart does; a restart or "
                    "rolling reload is needed"
                )
            )
            return
        self.pair_names()
        all_names = self.live.get("__all__")
        exported = set(all_names) if isinstance(all_names, list | tuple) else None

        def public(name: str) -> bool:
            if name.startswith("__hotpatch_"):
                return False  # the module's own hooks may come and go
            return name in exported if exported is not None else is_public(name)

        for name, new in self.cand.items():
            if name in MODULE_SKIP:
                continue
            old = self.live.get(name, MISSING)
            if old is MISSING:
                self.ops.append(SetName(self.live, name, self.rebind(new)))
                self.added.append(name)
                continue
            kind = self.kind(old, new)
            if kind == "function":
                assert isinstance(old, types.FunctionType) and isinstance(new, types.FunctionType)
                if public(name):
                    self.check_signature(old, new, name)
                if not self.update_function(old, new, name):
                    self.replace_name(name, old, new)
            elif kind == "class":
                assert isinstance(old, type) and isinstance(new, type)
                self.update_class(old, new, name, public=public(name))
            elif kind == "wrapped":
                old_inner = _innermost_own(old, self.live)
                new_inner = _innermost_own(new, self.cand)
                assert old_inner is not None and new_inner is not None
                if public(name):
                    self.check_signature(old_inner, new_inner, name)
                if self.update_function(old_inner, new_inner, name):
                    clear = getattr(type(old), "cache_clear", None)
                    if callable(clear) and name in self.changed:
                        self.after_commit.append(functools.partial(clear, old))
                else:
                    self.replace_name(name, old, new)
            else:
                if self._is_definition(old) and public(name):
                    what = "function" if isinstance(old, types.FunctionType) else "class"
                    self.problems.append(
                        Problem(
                            f"{name!r} changed from a {what} to {type(new).__name__}: references "
                            "to the old one cannot follow; a restart or rolling reload is needed",
                        )
                    )
                    continue
                if self.take_new("", name, old, new) and not same_value(old, new):
                    if name in self.forced and self.rebind(new) is old:
                        continue  # re-derived to the very same object
                    self.replace_name(name, old, new)

        for name, old in self.live.items():
            if name in MODULE_SKIP or name in self.cand:
                continue
            if name in self.forced and not self._is_definition(old):
                pass  # re-derived, and a restart would not bind it any more (a star import)
            elif self.old_index is not None:
                if not self.old_index.binds("", name):
                    continue  # set at run time, not by the source: live state, kept
            elif not self._is_definition(old):
                continue  # no baseline source: only definitions are known to come from it
            if public(name) and self._is_api(old) and not self.allow_removals:
                self.problems.append(Problem(f"public name {name!r} was removed", policy=True))
                continue
            self.ops.append(SetName(self.live, name, MISSING))
            self.replaced.update(codes_of(old))
            self.removed.append(name)

    def _is_definition(self, value: object) -> bool:
        return _own_function(value, self.live) or is_own_class(value, self.module)

    def _is_api(self, value: object) -> bool:
        """Definitions and data of this module are API; imported modules and objects are not."""
        if isinstance(value, types.ModuleType):
            return False
        if isinstance(value, type | types.FunctionType | types.BuiltinFunctionType):
            return getattr(value, "__module__", None) == self.module
        return True

    def replace_name(self, name: str, old: object, new: object) -> None:
        self.ops.append(SetName(self.live, name, self.rebind(new)))
        self.replaced.update(codes_of(old))
        self.changed.append(name)
        self.rebound.append(name)
        self._note_replaced_definition(name, old)

    def _note_replaced_definition(self, path: str, old: object) -> None:
        """A function of this module that is replaced, not updated in place (it became a
        generator, a coroutine, or the reverse): references to it that the commit does not
        re-bind would keep running the old code, so they must not exist."""
        filename = self.live.get("__file__")
        old_funcs = [f for f in functions_of(old) if _own_function(f, self.live)]
        inner = _innermost_own(old, self.live)
        if inner is not None and inner not in old_funcs:
            old_funcs.append(inner)
        # Functions generated by a decorator (a dataclass's __init__) are not in the source.
        old_funcs = [f for f in old_funcs if f.__code__.co_filename == filename]
        if old_funcs:
            self.replaced_definitions.append((path, old, ()))

    def check_signature(self, old: types.FunctionType, new: types.FunctionType, path: str) -> None:
        if self.allow_removals or (
            old.__code__ == new.__code__  # the same parameters; then only defaults can differ
            and len(old.__defaults__ or ()) == len(new.__defaults__ or ())
            and (old.__kwdefaults__ or {}).keys() == (new.__kwdefaults__ or {}).keys()
        ):
            return
        if parameter_shape(old) == parameter_shape(new):
            return  # same names, kinds and defaults present: every old call still binds
        reason = signature_incompatibility(old, new)
        if reason:
            self.problems.append(
                Problem(
                    f"{path}(): {reason}, so existing callers could break",
                    new.__code__.co_firstlineno,
                    policy=True,
                )
            )

    # -- functions -------------------------------------------------------------------------------
    def update_function(self, old: types.FunctionType, new: types.FunctionType, path: str) -> bool:
        """Plan ``old`` to take ``new``'s code in place; ``False`` when that cannot be done."""
        if id(old) in self._funcs_done:
            return True
        if not self.can_update(old, new):
            return False  # e.g. a plain function became a generator: the new one replaces it
        self._funcs_done.add(id(old))
        self.remap.pair(new, old)
        same_code = old.__code__ == new.__code__  # line numbers included
        if (
            same_code  # and so no closure in old when there is none in new
            and old.__defaults__ is None
            and new.__defaults__ is None
            and old.__kwdefaults__ is None
            and new.__kwdefaults__ is None
            and new.__closure__ is None
            and old.__doc__ == new.__doc__
            and "__wrapped__" not in old.__dict__
            and "__wrapped__" not in new.__dict__
        ):
            return True  # what the full comparison below concludes: nothing to assign or report
        state = FunctionState(
            new.__code__,
            self.rebinder.rebind_tuple(new.__defaults__),
            self.rebinder.rebind_kwdefaults(new.__kwdefaults__),
            new.__annotations__,
            new.__doc__,
            new.__qualname__,
        )
        if not (
            same_code
            and same_value(old.__defaults__, state.defaults)
            and same_value(old.__kwdefaults__, state.kwdefaults)
            and old.__doc__ == new.__doc__
        ):
            self.ops.append(SetFunction(old, state))
        behaves_alike = same_code or same_behavior(old.__code__, new.__code__)
        if not behaves_alike:
            self.replaced.add(old.__code__)
            self.replaced.update(nested_codes(old.__code__))
            self._pair_nested(old.__code__, new.__code__)
        if (
            not behaves_alike
            or not same_value(old.__defaults__, state.defaults)
            or not same_value(old.__kwdefaults__, state.kwdefaults)
        ):
            self.changed.append(path)
        # Decorators that close over the function they wrap (with or without functools.wraps).
        for old_cell, new_cell in zip(old.__closure__ or (), new.__closure__ or ()):
            old_inner, new_inner = cell_value(old_cell), cell_value(new_cell)
            if isinstance(old_inner, types.FunctionType) and isinstance(
                new_inner, types.FunctionType
            ):
                self.update_function(old_inner, new_inner, path)
        old_wrapped = old.__dict__.get("__wrapped__")
        new_wrapped = new.__dict__.get("__wrapped__")
        if isinstance(old_wrapped, types.FunctionType) and isinstance(
            new_wrapped, types.FunctionType
        ):
            self.update_function(old_wrapped, new_wrapped, path)
        return True

    def _pair_nested(self, old: types.CodeType, new: types.CodeType) -> None:
        """Pair inner functions' code (closures a factory made) by name and order."""

        def named(code: types.CodeType) -> dict[tuple[str, int], types.CodeType]:
            seen: dict[str, int] = {}
            out: dict[tuple[str, int], types.CodeType] = {}
            for const in code.co_consts:
                if isinstance(const, types.CodeType):
                    n = seen.get(const.co_name, 0)
                    seen[const.co_name] = n + 1
                    out[(const.co_name, n)] = const
            return out

        new_named = named(new)
        for key, old_inner in named(old).items():
            new_inner = new_named.get(key)
            if (
                new_inner is None
                or old_inner.co_freevars != new_inner.co_freevars
                or not same_kind(old_inner, new_inner)
            ):
                continue
            if not same_behavior(old_inner, new_inner):
                self._nested[old_inner] = new_inner
                self._pair_nested(old_inner, new_inner)

    def plan_closures(self) -> None:
        """Closures made before the patch run the new inner code (free variables unchanged)."""
        # A comprehension's function object lives only for its one call: no closure to find, so
        # no heap walk (tens of ms in a large process) for a function whose comprehension changed.
        nested = [old for old in self._nested if old.co_name not in _COMPREHENSIONS]
        if not nested:
            return
        by_id = {id(old): self._nested[old] for old in nested}
        for obj in gc.get_referrers(*nested):
            if (
                isinstance(obj, types.FunctionType)
                and obj.__globals__ is self.live
                and id(obj.__code__) in by_id
                and id(obj) not in self._funcs_done
            ):
                self._funcs_done.add(id(obj))
                new_code = by_id[id(obj.__code__)]
                self.ops.append(
                    SetFunction(obj, FunctionState.capture(obj)._replace(code=new_code))
                )

    # -- classes ---------------------------------------------------------------------------------
    def update_class(self, old: type, new: type, path: str, *, public: bool) -> None:
        if id(old) in self._classes_done:
            return
        self._classes_done.add(id(old))
        reason = class_incompatibility(old, new, self.remap_value)
        if not reason and self.old_index is not None and type(old) is not type:
            reason = metaclass_body_incompatibility(old, self._declarations_changed(path))
        if reason:
            top = path.partition(".")[0]
            lineno = next((u.start for u in self.new_index.units if ("", top) in u.bound), None)
            self.problems.append(
                Problem(f"class {path}: {reason}; a restart or rolling reload is needed", lineno)
            )
            return
        is_enum = isinstance(old, enum.EnumMeta)
        for name, nv in new.__dict__.items():
            if name in CLASS_SKIP or (is_enum and _enum_internal(old, name)):
                continue
            member = f"{path}.{name}"
            ov = old.__dict__.get(name, MISSING)
            if ov is MISSING and name in _CLASS_NEVER_SET:
                self.problems.append(
                    Problem(f"{member} was added: a restart or rolling reload is needed")
                )
            elif ov is MISSING:
                self.ops.append(SetAttr(old, name, self.rebind(nv)))
                self.added.append(member)
            elif (id(old), path, name) not in self._kept_members:
                self.update_member(old, name, ov, nv, path, public=public and is_public(name))
        for name, ov in old.__dict__.items():
            if (
                name in new.__dict__
                or name in CLASS_SKIP
                or (is_enum and _enum_internal(old, name))
            ):
                continue
            is_code = bool(self.functions_of(ov)) or is_own_class(ov, self.module)
            if not is_code and (self.old_index is None or not self.old_index.binds(path, name)):
                continue  # set at run time or by a decorator: live state, kept
            if name in _CLASS_NEVER_SET:
                self.problems.append(
                    Problem(
                        f"{path}.{name} was removed: deleting {name} on a live class would delete "
                        "the class's own; a restart or rolling reload is needed"
                    )
                )
                continue
            if public and is_public(name) and not self.allow_removals:
                self.problems.append(
                    Problem(f"public member {path}.{name} was removed", policy=True)
                )
                continue
            self.ops.append(SetAttr(old, name, MISSING))
            self.replaced.update(codes_of(ov))
            self.removed.append(f"{path}.{name}")

    def _declarations_changed(self, path: str) -> list[str]:
        """The plain statements of class ``path``'s body (nested classes too) that changed."""
        assert self.old_index is not None
        found = []
        for index, other in ((self.old_index, self.new_index), (self.new_index, self.old_index)):
            for scope, texts in index.texts.items():
                if scope == path or scope.startswith(f"{path}."):
                    found += [
                        f"{scope}.{name}"
                        for name in texts
                        if texts[name] != other.texts.get(scope, {}).get(name)
                    ]
        return sorted(set(found))

    def update_member(
        self, cls: type, name: str, ov: object, nv: object, scope: str, *, public: bool
    ) -> None:
        member = f"{scope}.{name}"
        if name in _CLASS_NEVER_SET:
            before = len(self.ops)
            self._update_member(cls, name, ov, nv, scope, public=public)
            # Functions updated in place are fine; an assignment of the name on the class is not.
            if any(
                isinstance(op, SetAttr) and op.cls is cls and op.name == name
                for op in self.ops[before:]
            ):
                del self.ops[before:]
                self.problems.append(
                    Problem(
                        f"{member} changed: assigning {name} on a live class would change what "
                        "the class itself is; a restart or rolling reload is needed"
                    )
                )
            return
        self._update_member(cls, name, ov, nv, scope, public=public)

    def _update_member(
        self, cls: type, name: str, ov: object, nv: object, scope: str, *, public: bool
    ) -> None:
        member = f"{scope}.{name}"
        if type(ov) is types.FunctionType and type(nv) is types.FunctionType:
            old_funcs, new_funcs = [ov], [nv]  # functions_of's answer (most members: methods)
        else:
            old_funcs, new_funcs = self.functions_of(ov), self.functions_of(nv)
            if is_own_class(ov, self.module) and is_own_class(nv, self.module) and ov is not nv:
                assert isinstance(ov, type) and isinstance(nv, type)
                self.update_class(ov, nv, member, public=public)
                return
            if not old_funcs and not new_funcs:
                taken = name in _CLASS_TAKE_NEW or self.take_new(scope, name, ov, nv)
                if taken and not same_value(ov, nv) and not same_repr(ov, nv):
                    self.ops.append(SetAttr(cls, name, self.rebind(nv)))
                    self.changed.append(member)
                return
        same_shape = self.remap_value(type(nv)) is type(ov) and (
            not isinstance(ov, property)
            or [f is None for f in (ov.fget, ov.fset, ov.fdel)]
            == [f is None for f in (nv.fget, nv.fset, nv.fdel)]  # type: ignore[attr-defined]
        )
        if same_shape and len(old_funcs) == len(new_funcs):
            if public:
                self.check_signature(old_funcs[0], new_funcs[0], member)
            if all(self.update_function(o, n, member) for o, n in zip(old_funcs, new_funcs)):
                if not self._same_descriptor_state(ov, nv):
                    # The functions run the new code in place; the descriptor's own state
                    # (its doc, a subclass's attributes) is new: a copy around the live functions.
                    self.ops.append(SetAttr(cls, name, self.rebind(nv)))
                    self.changed.append(member)
                return
            if all(same_generated(o, n) for o, n in zip(old_funcs, new_funcs)):
                return  # made by a decorator (dataclass __init__...), identical: keep the live one
        elif public and isinstance(ov, types.FunctionType) != isinstance(nv, types.FunctionType):
            self.problems.append(
                Problem(
                    f"{member} changed from {type(ov).__name__} to {type(nv).__name__}; "
                    "a restart or rolling reload is needed"
                )
            )
            return
        self.ops.append(SetAttr(cls, name, self.rebind(nv)))
        self.replaced.update(codes_of(ov))
        self.changed.append(member)
        self._note_replaced_definition(member, ov)

    def _same_descriptor_state(self, ov: object, nv: object) -> bool:
        """Whether two descriptors carry the same state besides their functions."""
        if type(ov) is types.FunctionType:
            return True
        old_state, new_state = _descriptor_state(ov), _descriptor_state(nv)
        if old_state.keys() != new_state.keys():
            return False
        for key, old_value in old_state.items():
            new_value = new_state[key]
            if not (
                old_value is new_value
                or self.remap.get(id(new_value), MISSING) is old_value
                or same_value(old_value, new_value)
            ):
                return False
        return True


def _built_from_elsewhere(namespace: dict[str, object]) -> str | None:
    """The file a module was built from, when it is not its ``__file__``, else ``None``.

    The import system executes ``__spec__.origin`` and sets ``__file__`` to it; an import hook
    that builds a module from another module's namespace (toolz's ``tlz``, a copy of ``toolz``
    with its own docstring) may point ``__file__`` at that other module's source.
    """
    spec = namespace.get("__spec__")
    origin = getattr(spec, "origin", None) if spec is not None else None
    filename = namespace.get("__file__")
    if not isinstance(origin, str) or not isinstance(filename, str):
        return None
    if not getattr(spec, "has_location", False):
        return None  # "built-in", "frozen" or a hook's own label, not a file
    if os.path.normpath(origin) == os.path.normpath(filename):
        return None
    return origin


def _descriptor_state(value: object) -> dict[str, object]:
    """A descriptor's state besides its functions: doc, attribute name, a subclass's attributes."""
    state: dict[str, object] = {}
    if isinstance(value, property):
        state["__doc__"] = value.__doc__
    try:
        own = object.__getattribute__(value, "__dict__")
    except Exception:
        own = None
    if isinstance(own, dict):
        for key, item in own.items():
            if key in ("lock", "__wrapped__") or isinstance(item, types.FunctionType):
                continue
            state[key] = item
    return state


def _same_cell(old: object, new: object, remap: dict[int, object]) -> bool:
    """Whether a closure cell of a live function may stay as it is when its code is updated.

    Immutable values must be equal: they are a factory's or a decorator's arguments
    (``make_handler("v2")``, ``@retry(times=5)``), and a function made with others is another
    function. Functions and classes match their counterpart by qualified name (they are paired on
    their own). Containers and other objects are state (a decorator's cache, a lock, a client):
    the live one is kept, as for a module-level value whose statement did not change.
    """
    if old is new or remap.get(id(new), MISSING) is old:
        return True
    if isinstance(old, types.FunctionType | type) or isinstance(new, types.FunctionType | type):
        return type(old) is type(new) and getattr(old, "__qualname__", None) == getattr(
            new, "__qualname__", None
        )
    if type(old) is tuple and type(new) is tuple:
        return len(old) == len(new) and all(_same_cell(a, b, remap) for a, b in zip(old, new))
    if isinstance(old, IMMUTABLE) or isinstance(new, IMMUTABLE):
        return type(old) is type(new) and safe_equal(old, new)
    return True


def _enum_internal(cls: type, name: str) -> bool:
    """Enum members and the enum machinery's ``_sunder_`` state are never touched."""
    members: dict[str, object] = getattr(cls, "__members__", {})
    is_sunder = name.startswith("_") and name.endswith("_") and not name.startswith("__")
    return name in members or is_sunder


def plan_update(
    module: str,
    live: dict[str, object],
    candidate: dict[str, object],
    *,
    old_index: StatementIndex | None,
    new_index: StatementIndex,
    allow_removals: bool,
    forced: frozenset[str] = frozenset(),
    remap: IdentityMap | None = None,
) -> Plan:
    """Pair ``live`` with ``candidate`` and return what a commit must do (changes nothing).

    ``remap`` (``id(candidate object) -> live object``) is shared by the plans of one change set,
    so that a module importing an object from another module of the set gets its live twin.
    """
    planner = _Planner(
        module,
        live,
        candidate,
        old_index,
        new_index,
        allow_removals,
        forced,
        remap if remap is not None else IdentityMap(),
    )
    with collector_paused():
        planner.plan_module()
        planner.problems.extend(Problem(message) for message in planner.rebinder.problems)
        if not planner.problems:
            planner.plan_closures()
    return Plan(
        module=module,
        changeset=ChangeSet(tuple(planner.ops)),
        changed=tuple(dict.fromkeys(planner.changed)),
        added=tuple(planner.added),
        removed=tuple(planner.removed),
        replaced_codes=frozenset(planner.replaced),
        problems=tuple(planner.problems),
        after_commit=tuple(planner.after_commit),
        rebound=tuple(planner.rebound),
        paired_plain=tuple(planner.paired_plain),
        replaced_definitions=tuple(planner.replaced_definitions),
    )
