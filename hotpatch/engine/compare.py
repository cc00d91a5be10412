"""Whether two versions of an object do the same thing.

Pure comparisons used by the planner: code objects ignoring line numbers, the parameter shape of
a function read from its code, values compared without trusting an ``__eq__`` that may raise.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Iterator

from hotpatch.engine.changeset import MISSING

IMMUTABLE = (
    int,
    float,
    complex,
    str,
    bytes,
    bool,
    type(None),
    tuple,
    frozenset,
    range,
    type(Ellipsis),
    types.ModuleType,
)


# What kind of function a code object makes: plain, generator, coroutine, async generator.
KIND_FLAGS = (
    inspect.CO_GENERATOR
    | inspect.CO_COROUTINE
    | inspect.CO_ITERABLE_COROUTINE
    | inspect.CO_ASYNC_GENERATOR
)


def same_kind(a: types.CodeType, b: types.CodeType) -> bool:
    """Whether ``b`` may replace ``a`` as a function's ``__code__`` (Python 3.13 deprecates
    swapping a generator's code for a plain function's, and the reverse)."""
    return not (a.co_flags ^ b.co_flags) & KIND_FLAGS


def same_behavior(a: types.CodeType, b: types.CodeType) -> bool:
    """Whether two code objects do the same thing, ignoring line numbers (recursively)."""
    if a is b:
        return True
    if (
        a.co_code != b.co_code
        or a.co_names != b.co_names
        or a.co_varnames != b.co_varnames
        or a.co_freevars != b.co_freevars
        or a.co_cellvars != b.co_cellvars
        or a.co_argcount != b.co_argcount
        or a.co_posonlyargcount != b.co_posonlyargcount
        or a.co_kwonlyargcount != b.co_kwonlyargcount
        or a.co_flags != b.co_flags
        or getattr(a, "co_exceptiontable", None) != getattr(b, "co_exceptiontable", None)
        or len(a.co_consts) != len(b.co_consts)
    ):
        return False
    for x, y in zip(a.co_consts, b.co_consts):
        if isinstance(x, types.CodeType) and isinstance(y, types.CodeType):
            if not same_behavior(x, y):
                return False
        elif x is not y and (type(x) is not type(y) or not safe_equal(x, y)):
            return False
    return True


def nested_codes(code: types.CodeType) -> Iterator[types.CodeType]:
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield const
            yield from nested_codes(const)


def safe_equal(x: object, y: object) -> bool:
    try:
        return bool(x == y)
    except Exception:
        return False


_VARARGS_FLAGS = inspect.CO_VARARGS | inspect.CO_VARKEYWORDS


def parameter_shape(func: types.FunctionType) -> tuple[object, ...]:
    """What decides which calls a function accepts, read cheaply from its code object."""
    code = func.__code__
    count = code.co_argcount + code.co_kwonlyargcount
    flags = code.co_flags & _VARARGS_FLAGS
    names = code.co_varnames[
        : count + bool(flags & inspect.CO_VARARGS) + bool(flags & inspect.CO_VARKEYWORDS)
    ]
    return (
        code.co_argcount,
        code.co_posonlyargcount,
        code.co_kwonlyargcount,
        flags,
        names,
        len(func.__defaults__ or ()),
        frozenset(func.__kwdefaults__ or ()),
    )


def same_generated(old: types.FunctionType, new: types.FunctionType) -> bool:
    """Two functions generated outside the module (by dataclasses, attrs...) that behave alike."""
    return (
        same_behavior(old.__code__, new.__code__)
        and same_value(old.__defaults__, new.__defaults__)
        and same_value(old.__kwdefaults__, new.__kwdefaults__)
    )


_REPR_COMPARED = frozenset({"Field", "_DataclassParams", "dict", "tuple"})


def same_repr(a: object, b: object) -> bool:
    """Decorator-made class attributes (dataclass fields and params) compared by their repr."""
    if type(a) is not type(b) or type(a).__name__ not in _REPR_COMPARED:
        return False
    try:
        return repr(a) == repr(b)
    except Exception:  # a repr that raises means "not known equal"
        return False


def cell_value(cell: types.CellType) -> object:
    try:
        return cell.cell_contents
    except ValueError:
        return MISSING


def same_value(a: object, b: object) -> bool:
    if a is b:
        return True
    if type(a) is not type(b) or not isinstance(a, (*IMMUTABLE, dict)):
        return False
    return safe_equal(a, b)
