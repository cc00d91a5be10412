"""A change set: the assignments a commit makes, applied together and undone exactly.

Three kinds of assignment cover every in-place change: a function's code-carrying attributes, an entry
of a module namespace, and an attribute of a class. ``capture_inverse`` reads the current value of
everything a change set is about to touch, so applying the inverse restores the very same objects
(the same code objects, the same namespace values). Rollback is just "apply the inverse".
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, NamedTuple


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()


class FunctionState(NamedTuple):
    """The attributes of a function that carry its behaviour."""

    code: types.CodeType
    defaults: tuple[object, ...] | None
    kwdefaults: dict[str, object] | None
    annotations: dict[str, object]
    doc: str | None
    qualname: str

    @classmethod
    def capture(cls, func: types.FunctionType) -> FunctionState:
        return cls(
            func.__code__,
            func.__defaults__,
            func.__kwdefaults__,
            func.__annotations__,
            func.__doc__,
            func.__qualname__,
        )

    def apply_to(self, func: types.FunctionType) -> None:
        func.__code__ = self.code
        func.__defaults__ = self.defaults
        func.__kwdefaults__ = self.kwdefaults
        func.__annotations__ = self.annotations
        func.__doc__ = self.doc
        func.__qualname__ = self.qualname


@dataclass(frozen=True, slots=True)
class SetFunction:
    func: types.FunctionType
    state: FunctionState

    def apply(self) -> None:
        self.state.apply_to(self.func)

    def inverse(self, saved: Mapping[int, FunctionState] | None = None) -> SetFunction:
        state = saved.get(id(self.func)) if saved else None
        return SetFunction(self.func, state or FunctionState.capture(self.func))


@dataclass(frozen=True, slots=True)
class SetName:
    """``namespace[name] = value``, or deletion when ``value`` is MISSING."""

    namespace: dict[str, object]
    name: str
    value: object

    def apply(self) -> None:
        if self.value is MISSING:
            self.namespace.pop(self.name, None)
        else:
            self.namespace[self.name] = self.value

    def inverse(self, saved: Mapping[int, FunctionState] | None = None) -> SetName:
        return SetName(self.namespace, self.name, self.namespace.get(self.name, MISSING))


@dataclass(frozen=True, slots=True)
class SetAttr:
    """``setattr(cls, name, value)``, or ``delattr`` when ``value`` is MISSING."""

    cls: type
    name: str
    value: object

    def apply(self) -> None:
        if self.value is MISSING:
            if self.name in self.cls.__dict__:
                delattr(self.cls, self.name)
        else:
            setattr(self.cls, self.name, self.value)

    def inverse(self, saved: Mapping[int, FunctionState] | None = None) -> SetAttr:
        return SetAttr(self.cls, self.name, self.cls.__dict__.get(self.name, MISSING))


Assignment = SetFunction | SetName | SetAttr


@dataclass(frozen=True)
class ChangeSet:
    assignments: tuple[Assignment, ...]

    def capture_inverse(self, saved: Mapping[int, FunctionState] | None = None) -> ChangeSet:
        """The change set that restores what ``self`` overwrites; read it just before applying.

        Args:
            saved: function states to use instead of the live ones, by ``id(function)``: the
                originals of functions whose code is temporarily a safe-point gate.
        """
        return ChangeSet(tuple(a.inverse(saved) for a in reversed(self.assignments)))

    def functions(self) -> list[types.FunctionType]:
        """The functions this change set updates in place."""
        return [a.func for a in self.assignments if isinstance(a, SetFunction)]

    def apply(self) -> None:
        """Make every assignment, or none: one that raises (a class whose metaclass refuses the
        attribute) undoes those made before it, and the error propagates."""
        done: list[Assignment] = []
        try:
            for assignment in self.assignments:
                inverse = assignment.inverse()
                assignment.apply()
                done.append(inverse)
        except BaseException:
            for inverse in reversed(done):
                with contextlib.suppress(Exception):
                    inverse.apply()
            raise

    def replaced_codes(self) -> set[types.CodeType]:
        """Code objects that applying ``self`` now would take out of service (read live state)."""
        found: set[types.CodeType] = set()
        for a in self.assignments:
            if isinstance(a, SetFunction):
                if a.func.__code__ is not a.state.code:
                    found.add(a.func.__code__)
                continue
            current = (
                a.namespace.get(a.name) if isinstance(a, SetName) else a.cls.__dict__.get(a.name)
            )
            if current is not a.value:
                found.update(codes_of(current))
        return found

    def __len__(self) -> int:
        return len(self.assignments)


def functions_of(value: object, shapes: dict[type, int] | None = None) -> list[types.FunctionType]:
    """The functions inside a function or a known descriptor type (never runs user code).

    ``shapes``: a cache of ``type -> what its instances hold`` for a caller that asks about many
    values of few types (a plan: every class member); valid while no class changes.
    """
    kind = type(value)  # the common kinds by identity first: asked for every class member
    if kind is types.FunctionType:
        return [value]  # type: ignore[list-item]
    if kind in _NOT_DESCRIPTORS:
        return []
    shape = shapes.get(kind) if shapes is not None else None
    if shape is None:
        shape = _shape(kind)
        if shapes is not None:
            shapes[kind] = shape
    if shape == _NONE:
        return []
    if shape == _DESCRIPTOR:  # a descriptor that keeps its functions as attributes
        state = _instance_dict(value)
        if state is None:
            return []
        wrapped = state.get("__wrapped__")
        if wrapped is not None:  # a functools.wraps-style wrapper (lru_cache): what it wraps
            return [wrapped] if isinstance(wrapped, types.FunctionType) else []
        return [v for v in state.values() if isinstance(v, types.FunctionType)]
    if shape == _WRAPPER:
        inner = value.__func__  # type: ignore[attr-defined]
        return [inner] if isinstance(inner, types.FunctionType) else []
    if shape == _PROPERTY:
        return [
            f
            for f in (value.fget, value.fset, value.fdel)  # type: ignore[attr-defined]
            if isinstance(f, types.FunctionType)
        ]
    func = value.func  # type: ignore[attr-defined]  # _CACHED
    return [func] if isinstance(func, types.FunctionType) else []


# Built-in types that are not descriptors (none defines ``__get__``): most class and module
# values are of these, and are answered without walking their type's MRO.
_NOT_DESCRIPTORS = frozenset(
    {str, int, float, bool, bytes, type(None), tuple, list, dict, set, frozenset, complex}
)
_NO_STATE = (type, types.FunctionType, types.ModuleType)
# What ``functions_of`` reads in an instance of a type, decided by the type alone (not by the
# instance's ``__class__``, which a proxy can make claim anything): nothing, a staticmethod's or
# classmethod's ``__func__``, a property's three functions, a cached_property's ``func``, or the
# functions in the instance dictionary of another descriptor.
_NONE, _WRAPPER, _PROPERTY, _CACHED, _DESCRIPTOR = range(5)


def _shape(kind: type) -> int:
    if issubclass(kind, (staticmethod, classmethod)):  # a tuple: checked in C, no union
        return _WRAPPER
    if issubclass(kind, property):
        return _PROPERTY
    if issubclass(kind, functools.cached_property):
        return _CACHED
    return _DESCRIPTOR if _is_descriptor_type(kind) else _NONE


def _is_descriptor_type(kind: type) -> bool:
    """Whether ``kind``'s instances are descriptors that may keep state (not a class, function
    or module), read from the MRO's dictionaries without running code."""
    if kind in _NOT_DESCRIPTORS or issubclass(kind, _NO_STATE):
        return False
    # A loop, not any() over a generator: a third of the time.
    for klass in kind.__mro__[:-1]:  # noqa: SIM110
        if "__get__" in klass.__dict__:
            return True
    return False


def _instance_dict(value: object) -> dict[str, object] | None:
    try:
        state = object.__getattribute__(value, "__dict__")
    except Exception:
        return None
    return state if isinstance(state, dict) else None


def descriptor_dict(value: object) -> dict[str, object] | None:
    """The instance dictionary of a descriptor (an object whose type defines ``__get__``), read
    without running its code; ``None`` for anything else."""
    return _instance_dict(value) if _is_descriptor_type(type(value)) else None


def codes_of(value: object) -> list[types.CodeType]:
    """The code objects behind ``value`` (see ``functions_of``)."""
    return [f.__code__ for f in functions_of(value)]
