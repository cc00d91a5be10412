"""Re-binding new objects to the live module, so that nothing live points into the candidate.

A function the candidate defined has the candidate's namespace as its globals; made live as it is,
it would read stale globals forever. ``Rebinder.rebind`` gives each new object its live form:
functions re-created over the live namespace (closures, defaults and ``__wrapped__`` re-bound as
well), descriptors rebuilt around them, new classes re-based onto the live classes they derive
from, and instances the candidate made of a class that stays live re-typed to it. ``remap`` maps
``id(candidate object)`` to its live twin and is shared by every plan of a change set.
"""

from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import dataclass, field

from hotpatch.engine.changeset import MISSING
from hotpatch.engine.compare import cell_value

CLASS_SKIP = frozenset({"__dict__", "__weakref__", "__module__", "__qualname__"})


def is_own_class(value: object, module: str) -> bool:
    """A class defined in ``module`` (by its ``__module__``)."""
    return isinstance(value, type) and value.__dict__.get("__module__") == module


@dataclass
class Rebinder:
    """Turns candidate objects into live ones for one module (see the module docstring)."""

    module: str
    live: dict[str, object]
    cand: dict[str, object]
    remap: dict[int, object] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    _cells: dict[int, types.CellType] = field(default_factory=dict)
    _adopted: set[int] = field(default_factory=set)

    def rebind(self, value: object) -> object:
        """The object to make live for a candidate value: nothing live may point into the candidate."""
        mapped = self.remap.get(id(value), MISSING)
        if mapped is not MISSING:
            return mapped
        if isinstance(value, types.FunctionType):
            return self._rebind_function(value) if value.__globals__ is self.cand else value
        if isinstance(value, staticmethod | classmethod):
            inner = self.rebind(value.__func__)
            return value if inner is value.__func__ else type(value)(inner)  # type: ignore[arg-type]
        if isinstance(value, property):
            parts = [
                self.rebind(f) if f is not None else None
                for f in (value.fget, value.fset, value.fdel)
            ]
            if all(p is f for p, f in zip(parts, (value.fget, value.fset, value.fdel))):
                return value
            return type(value)(parts[0], parts[1], parts[2], value.__doc__)  # type: ignore[arg-type]
        if isinstance(value, functools.cached_property):
            inner = self.rebind(value.func)
            if inner is value.func:
                return value
            rebuilt: functools.cached_property[object] = functools.cached_property(inner)  # type: ignore[arg-type]
            rebuilt.attrname = value.attrname
            return rebuilt
        if isinstance(value, type) and is_own_class(value, self.module):
            self._adopt_class(value)
            return value
        live_type = self.remap.get(id(type(value)))
        if isinstance(live_type, type) and not isinstance(value, type):
            with contextlib.suppress(TypeError):
                value.__class__ = live_type  # an instance the candidate made of a class kept live
        return value

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
        rebound = types.FunctionType(func.__code__, self.live, func.__name__, None, closure)
        self.remap[id(func)] = rebound
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
        self.remap[id(cls)] = cls
        bases = tuple(self.remap.get(id(b), b) for b in cls.__bases__)
        if bases != cls.__bases__:
            try:
                cls.__bases__ = bases  # type: ignore[assignment]
            except TypeError as exc:
                self.problems.append(f"new class {cls.__qualname__}: cannot re-base it: {exc}")
        for name, value in list(cls.__dict__.items()):
            if name in CLASS_SKIP:
                continue
            rebound = self.rebind(value)
            if rebound is not value:
                setattr(cls, name, rebound)
