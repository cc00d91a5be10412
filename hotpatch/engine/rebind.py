"""Re-binding new objects to the live module, so that nothing live points into the candidate.

A function the candidate defined has the candidate's namespace as its globals; made live as it is,
it would read stale globals forever. ``Rebinder.rebind`` gives each new object its live form:
functions re-created over the live namespace (closures, defaults and ``__wrapped__`` re-bound as
well), descriptors copied around them with their own state (a ``property`` subclass's attributes,
its doc) as instances of the live descriptor class, new classes re-based onto the live classes they
derive from, and instances the candidate made of a class that stays live re-typed to it. New
containers, instances of the module's classes and descriptors are walked (depth and size bounded)
so that a candidate function inside a dict of handlers is replaced by its live twin too. ``remap``
maps ``id(candidate object)`` to its live twin and is shared by every plan of a change set.
"""

from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import dataclass, field
from typing import Any

from hotpatch.engine.changeset import MISSING, descriptor_dict
from hotpatch.engine.compare import cell_value

CLASS_SKIP = frozenset({"__dict__", "__weakref__", "__module__", "__qualname__"})

# Values that cannot hold a candidate object: never walked.
_SCALARS = (
    int,
    float,
    complex,
    str,
    bytes,
    bool,
    type(None),
    range,
    type(Ellipsis),
    types.ModuleType,
)
# The exact types of those (no subclass: an enum member may be an ``int``), for a C-speed test.
_PLAIN_SCALARS = frozenset({int, float, complex, str, bytes, bool, type(None)})
# ``object``'s own ``__class__`` setter: ``value.__class__ = K`` would call a ``__class__`` property
# that a proxy class defines instead (and fail: it has no setter, or it sets the proxied object's).
_SET_CLASS = object.__dict__["__class__"].__set__
_WALK_LIMIT = 1_000_000  # objects walked per module: beyond, the patch is refused
_DEPTH_LIMIT = 120  # nesting walked (each level takes a few stack frames)


def _property_parts(value: property) -> tuple[object, object, object]:
    return (value.fget, value.fset, value.fdel)


def _slot_state(value: object) -> dict[str, object]:
    """The instance dictionary of a descriptor (a subclass's extra state, ``__doc__``...)."""
    try:
        state = object.__getattribute__(value, "__dict__")
    except Exception:
        return {}
    return dict(state) if isinstance(state, dict) else {}


def is_own_class(value: object, module: str) -> bool:
    """A class defined in ``module`` (by its ``__module__``)."""
    return isinstance(value, type) and value.__dict__.get("__module__") == module


class IdentityMap(dict[int, object]):
    """``id(candidate object) -> live object``, keeping alive every candidate object it pairs,
    as long as itself.

    An ``id`` is an address: once the object is freed (a candidate's value rebuilt, re-bound or
    dropped by a later plan), the next object made may take the address, and would be paired
    with the live object of another (seen in a replay: a method of one class committed as the
    ``__call__`` of a descriptor of another module). Entries are made with ``pair``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._alive: list[object] = []

    def pair(self, new: object, old: object) -> None:
        self[id(new)] = old
        self._alive.append(new)


@dataclass
class Rebinder:
    """Turns candidate objects into live ones for one module (see the module docstring)."""

    module: str
    live: dict[str, object]
    cand: dict[str, object]
    remap: IdentityMap = field(default_factory=IdentityMap)
    problems: list[str] = field(default_factory=list)
    _cells: dict[int, types.CellType] = field(default_factory=dict)
    _adopted: set[int] = field(default_factory=set)
    _walked: set[int] = field(default_factory=set)
    # What ``_cells`` and ``_walked`` name by id, kept alive while they are (see IdentityMap):
    # a walked tuple is replaced by its rebuilt copy and freed, and its address is free again.
    _alive: list[object] = field(default_factory=list)
    _visits: int = 0
    _depth: int = 0

    def rebind(self, value: object) -> object:
        """The object to make live for a candidate value: nothing live may point into the candidate."""
        mapped = self.remap.get(id(value), MISSING)
        if mapped is not MISSING:
            return mapped
        if isinstance(value, types.FunctionType):
            if value.__globals__ is self.cand:
                return self._rebind_function(value)
            self._walk_function(value)  # e.g. a decorator's wrapper around a candidate function
            return value
        if isinstance(value, type):
            if is_own_class(value, self.module):
                self._adopt_class(value)
            return value
        if isinstance(value, property | staticmethod | classmethod):
            return self._rebind_descriptor(value)
        if (
            isinstance(value, _SCALARS)
            or id(value) in self._walked
            or value is self.cand
            or value is self.live
        ):
            return value
        if self._depth >= _DEPTH_LIMIT:
            self._too_deep()
            return value
        self._depth += 1
        try:
            return self._rebind_object(value)
        finally:
            self._depth -= 1

    def _only_plain_scalars(self, items: tuple[object, ...] | list[object]) -> bool:
        """Whether every item is an exact ``int``, ``str``, ``bytes``... that no pairing maps
        (checked in C: a table of thousands of constants is not walked item by item)."""
        return all(map(_PLAIN_SCALARS.__contains__, map(type, items))) and (
            not self.remap or self.remap.keys().isdisjoint(map(id, items))
        )

    def _too_deep(self) -> None:
        message = (
            f"new values nest objects more than {_DEPTH_LIMIT} levels deep; hotpatch cannot "
            "show that none of them points into the candidate: a restart is needed"
        )
        if message not in self.problems:
            self.problems.append(message)

    def _rebind_object(self, value: object) -> object:
        """``rebind`` for containers, descriptors and instances (walked, cycles cut)."""
        self._walked.add(id(value))
        self._alive.append(value)
        self._visits += 1
        if self._visits > _WALK_LIMIT:
            if self._visits == _WALK_LIMIT + 1:
                self.problems.append(
                    f"new values hold more than {_WALK_LIMIT:,} objects to re-bind to the live "
                    "module; a restart is needed"
                )
            return value
        if type(value) in (tuple, list) and self._only_plain_scalars(value):  # type: ignore[arg-type]
            return value  # a data table: nothing in it can point into the candidate
        if type(value) is tuple:
            items = tuple(self.rebind(v) for v in value)
            return value if all(a is b for a, b in zip(items, value)) else items
        if type(value) is list:
            for i, item in enumerate(value):
                rebound = self.rebind(item)
                if rebound is not item:
                    value[i] = rebound
            return value
        if type(value) is dict:
            pairs = [(self.rebind(k), self.rebind(v)) for k, v in value.items()]
            if any(a is not k or b is not v for (a, b), (k, v) in zip(pairs, value.items())):
                value.clear()
                value.update(pairs)
            return value
        if type(value) in (set, frozenset):
            items_set = [self.rebind(v) for v in value]  # type: ignore[attr-defined]
            if any(a is not b for a, b in zip(items_set, value)):  # type: ignore[call-overload]
                if type(value) is frozenset:
                    return frozenset(items_set)
                value.clear()  # type: ignore[attr-defined]
                value.update(items_set)  # type: ignore[attr-defined]
            return value
        live_type = self.remap.get(id(type(value)))
        if isinstance(live_type, type):
            with contextlib.suppress(TypeError):
                _SET_CLASS(value, live_type)  # an instance the candidate made of a class kept live
        if isinstance(value, functools.cached_property) or is_own_class(type(value), self.module):
            self._walk_dict(value)
        elif descriptor_dict(value) is not None:
            self._walk_dict(value)  # a descriptor with functions and state of its own
        return value

    def _walk_dict(self, value: object) -> None:
        """Re-bind the attributes of an object the candidate made, in place."""
        try:
            state = object.__getattribute__(value, "__dict__")
        except Exception:
            return
        if not isinstance(state, dict):
            return
        for key, item in list(state.items()):
            rebound = self.rebind(item)
            if rebound is not item:
                state[key] = rebound

    def _walk_function(self, func: types.FunctionType) -> None:
        """A function of another module made by the candidate (a decorator's wrapper): its cells,
        defaults and attributes may hold candidate objects; they get their live twins."""
        if id(func) in self._walked:
            return
        self._walked.add(id(func))
        self._alive.append(func)
        for cell in func.__closure__ or ():
            content = cell_value(cell)
            if content is not MISSING:
                rebound = self.rebind(content)
                if rebound is not content:
                    cell.cell_contents = rebound
        if func.__defaults__:
            func.__defaults__ = self.rebind_tuple(func.__defaults__)
        for key, item in list(func.__dict__.items()):
            rebound = self.rebind(item)
            if rebound is not item:
                func.__dict__[key] = rebound

    def _rebind_descriptor(self, value: property | staticmethod | classmethod) -> object:  # type: ignore[type-arg]
        """A property, staticmethod or classmethod (or a subclass) around candidate functions:
        a copy around the live functions, of the live class, with its own state kept."""
        cls = type(value)
        live_cls = self.rebind(cls)  # the live twin of a class the module defines, or itself
        assert isinstance(live_cls, type)
        state = _slot_state(value)
        new_state = {k: self.rebind(v) for k, v in state.items()}
        parts: list[Any]
        if isinstance(value, property):
            parts = [self.rebind(f) if f is not None else None for f in _property_parts(value)]
            same_parts = all(p is f for p, f in zip(parts, _property_parts(value)))
        else:
            parts = [self.rebind(value.__func__)]
            same_parts = parts[0] is value.__func__
        if same_parts and live_cls is cls and all(new_state[k] is v for k, v in state.items()):
            return value
        # Made through the base type's own __new__/__init__: a subclass's __init__ may take
        # other arguments; its extra state is copied below.
        base: Any = (
            property
            if isinstance(value, property)
            else staticmethod
            if isinstance(value, staticmethod)
            else classmethod
        )
        rebuilt = base.__new__(live_cls)
        if base is property:
            base.__init__(rebuilt, *parts, value.__doc__)  # type: ignore[call-arg]
        else:
            base.__init__(rebuilt, parts[0])
        if new_state:
            object.__getattribute__(rebuilt, "__dict__").update(new_state)
        self.remap.pair(value, rebuilt)
        return rebuilt

    def rebind_tuple(self, values: tuple[object, ...] | None) -> tuple[object, ...] | None:
        return None if values is None else tuple(self.rebind(v) for v in values)

    def rebind_kwdefaults(self, values: dict[str, object] | None) -> dict[str, object] | None:
        return None if values is None else {k: self.rebind(v) for k, v in values.items()}

    def _rebind_function(self, func: types.FunctionType) -> types.FunctionType:
        closure = None
        if func.__closure__:
            closure = tuple(
                self._cells.setdefault(id(c), types.CellType()) for c in func.__closure__
            )
            self._alive.append(func.__closure__)
        rebound = types.FunctionType(func.__code__, self.live, func.__name__, None, closure)
        self.remap.pair(func, rebound)
        rebound.__defaults__ = self.rebind_tuple(func.__defaults__)
        rebound.__kwdefaults__ = self.rebind_kwdefaults(func.__kwdefaults__)
        rebound.__annotations__ = func.__annotations__
        rebound.__doc__ = func.__doc__
        rebound.__qualname__ = func.__qualname__
        rebound.__module__ = func.__module__
        if hasattr(func, "__type_params__"):  # Python 3.12+
            rebound.__type_params__ = func.__type_params__  # type: ignore[attr-defined,unused-ignore]
        rebound.__dict__.update({k: self.rebind(v) for k, v in func.__dict__.items()})
        for old_cell, new_cell in zip(func.__closure__ or (), closure or ()):
            content = cell_value(old_cell)
            if content is not MISSING:
                new_cell.cell_contents = self.rebind(content)
        return rebound

    def _adopt_class(self, cls: type) -> None:
        """A class new in this version: its functions move to the live namespace."""
        if id(cls) in self._adopted:
            return
        self._adopted.add(id(cls))
        self.remap.pair(cls, cls)
        bases = tuple(self.remap.get(id(b), b) for b in cls.__bases__)
        if bases != cls.__bases__:
            try:
                cls.__bases__ = bases  # type: ignore[assignment]
            except TypeError as exc:
                self.problems.append(
                    f"new class {cls.__qualname__}: cannot re-base it: {exc}; a restart is needed"
                )
        for name, value in list(cls.__dict__.items()):
            if name in CLASS_SKIP:
                continue
            rebound = self.rebind(value)
            if rebound is not value:
                setattr(cls, name, rebound)
