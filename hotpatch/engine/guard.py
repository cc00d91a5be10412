"""Checks on a candidate before anything live changes: API compatibility and verifiers.

The compatibility rules are pure functions of the old and new objects. ``run_with_deadline`` gives
verifiers and health checks a deadline: a check that hangs is abandoned in its (daemon) thread and
reported as a timeout instead of hanging the caller forever.
"""

from __future__ import annotations

import abc
import enum
import inspect
import threading
import typing
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def is_public(name: str) -> bool:
    """Public names are part of the API a patch must keep: no leading underscore, or a dunder."""
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


def signature_incompatibility(old: Callable[..., object], new: Callable[..., object]) -> str | None:
    """Why ``new`` cannot accept every call that ``old`` accepted, or ``None`` when it can.

    A call that bound to the old signature must bind to the new one: positional parameters keep
    their places, keyword-capable parameters keep their names, a parameter that had a default keeps
    one, and a new parameter needs a default (or is ``*args``/``**kwargs``).
    """
    try:
        old_sig = inspect.signature(old)
        new_sig = inspect.signature(new)
    except (TypeError, ValueError):
        return None  # no signature to compare (some builtins): nothing to refuse on
    old_params = list(old_sig.parameters.values())
    new_params = list(new_sig.parameters.values())
    new_by_name = {p.name: p for p in new_params}
    new_positional = [p for p in new_params if p.kind in _POSITIONAL]
    new_var_pos = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in new_params)
    new_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in new_params)

    for index, old_p in enumerate(p for p in old_params if p.kind in _POSITIONAL):
        if index < len(new_positional):
            new_p = new_positional[index]
            if (
                old_p.default is not inspect.Parameter.empty
                and new_p.default is inspect.Parameter.empty
            ):
                return f"parameter {new_p.name!r} lost its default"
        elif not new_var_pos:
            return f"positional parameter {old_p.name!r} was removed"
    for old_p in old_params:
        if old_p.kind in _KEYWORD:
            found = new_by_name.get(old_p.name)
            if found is None or found.kind not in _KEYWORD:
                if not new_var_kw:
                    return f"parameter {old_p.name!r} was removed or renamed"
            elif (
                old_p.default is not inspect.Parameter.empty
                and found.default is inspect.Parameter.empty
            ):
                return f"parameter {old_p.name!r} lost its default"
        elif old_p.kind is inspect.Parameter.VAR_POSITIONAL and not new_var_pos:
            return f"*{old_p.name} was removed"
        elif old_p.kind is inspect.Parameter.VAR_KEYWORD and not new_var_kw:
            return f"**{old_p.name} was removed"
    old_names = {p.name for p in old_params}
    for new_p in new_params:
        if (
            new_p.name not in old_names
            and new_p.default is inspect.Parameter.empty
            and new_p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ):
            return f"new parameter {new_p.name!r} has no default"
    return None


def class_incompatibility(old: type, new: type, remap: Callable[[object], object]) -> str | None:
    """Why ``new`` cannot replace ``old`` in place (bases, metaclass, slots, enum members)."""
    new_bases = tuple(remap(b) for b in new.__bases__)
    if new_bases != old.__bases__:
        return "its base classes changed"
    if remap(type(new)) is not type(old):
        return "its metaclass changed"
    if old.__dict__.get("__slots__") != new.__dict__.get("__slots__"):
        return "its __slots__ changed"
    if isinstance(old, enum.EnumMeta) and isinstance(new, enum.EnumMeta):
        old_members = [(m.name, m.value) for m in old.__members__.values()]  # type: ignore[var-annotated]
        new_members = [(m.name, m.value) for m in new.__members__.values()]  # type: ignore[var-annotated]
        if old_members != new_members:
            return "its enum members changed"
    return None


# Metaclasses that build nothing from a class body's declarations (enum members: checked above).
_PLAIN_METACLASSES = (type, abc.ABCMeta, type(typing.Protocol), enum.EnumMeta)


def metaclass_body_incompatibility(old: type, changed: Iterable[str]) -> str | None:
    """Why a class built by its metaclass cannot take ``changed`` body declarations in place.

    A metaclass such as Pydantic's ``ModelMetaclass``, Django's ``ModelBase`` or its forms'
    ``DeclarativeFieldsMetaclass`` reads the class body once, when the class is created, and
    derives state from it (fields, validators, a schema, a registration). Setting the new
    attributes on the live class would not run it again: the class would keep validating,
    saving or rendering by the old body while the patch said it changed.

    Args:
        old: the live class.
        changed: the body's plain declarations (``name = ...``, ``name: T``) that were added,
            removed or changed, as ``Class.name`` paths; methods are not declarations.
    """
    names = sorted(changed)
    meta = type(old)
    if not names or not _builds(meta):
        return None
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (
        f"its metaclass {meta.__module__}.{meta.__qualname__} built the class from its body "
        f"when it was created (fields, schema, registrations), and the body's declarations "
        f"changed ({shown}): the live class would keep what the old body built"
    )


def _builds(meta: type) -> bool:
    """Whether a metaclass runs code of its own when a class is created (not only ``type``'s)."""
    return any(
        m not in _PLAIN_METACLASSES
        and m is not object
        and any(hook in m.__dict__ for hook in ("__new__", "__init__", "__prepare__"))
        for m in meta.__mro__
    )


class DeadlineExceeded(TimeoutError):
    """A verifier or health check did not return before its deadline."""


def run_with_deadline(fn: Callable[[], T], *, timeout_s: float | None, name: str) -> T:
    """Call ``fn`` in a daemon thread and wait at most ``timeout_s`` for it.

    Raises:
        DeadlineExceeded: ``fn`` is still running at the deadline (it is left running, detached).
        BaseException: whatever ``fn`` raised.
    """
    if timeout_s is None:
        return fn()
    outcome: list[tuple[bool, object]] = []

    def target() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=target, name=f"hotpatch:{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        raise DeadlineExceeded(f"{name} did not return within {timeout_s:g}s")
    ok, value = outcome[0]
    if ok:
        return value  # type: ignore[return-value]
    assert isinstance(value, BaseException)
    raise value
