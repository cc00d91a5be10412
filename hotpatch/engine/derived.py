"""State a module derives at import time from names that a patch changes: re-derive it or refuse.

The idea: a restarted process runs every module's top-level code again, so a table that module B
builds at import from module A's definitions (``TABLE = {k: f(k) for k in a.KINDS}``), a re-export
(``from .sub import *`` in a package ``__init__``) or a value computed from a function of the same
module (``LIMITS = compute()``) follows A's new version. An in-place patch keeps every live value
whose own statement did not change, so without more care it keeps values derived from the old A:
the patched process would differ from a restarted one while the patch reported success.

The problem is to find those statements without running anything, and to redo only what a restart
would redo. ``derive`` reads the statement index of a module (``statements.Reads``: the names each
top-level statement reads, calls and changes at import) and the names a change set changed in each
module, and marks a statement *dirty* when it reads a name that was re-bound (replaced, added or
removed), calls a name whose behaviour changed (a function whose code changed or that calls one
that did, a class whose construction changed, a changed method called on a class), or
star-imports from a module that gained or lost names. Dirty statements taint the names they
bind, in source order, so derivation follows chains inside a module; the caller runs modules in
dependency order, so it follows chains across modules.

The mechanism: the names a dirty statement binds (and the module's own objects it changes through
``name.method(...)`` or ``name[k] = v``) are *forced*: the commit takes their values from a
candidate executed with the new versions, as a restart would. A dirty statement whose effect lands
elsewhere (a bare call at import, a change to another module's object, a decorator that is a new
object) cannot be redone in place: ``derive`` returns it as a refusal, with the line and the reason,
and the patch is refused with "needs a restart". Pure logic: no imports are run here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from hotpatch.engine.statements import ImportRef, Reads, Unit

# Members that decide what calling a class makes (``K(...)``).
_MAKING = frozenset(
    {
        "__init__",
        "__new__",
        "__post_init__",
        "__attrs_post_init__",
        "__init_subclass__",
        "__set_name__",
        "__call__",
        "__class_getitem__",
        "__dataclass_fields__",
    }
)


@dataclass(frozen=True)
class ModuleChange:
    """What a patch changed in one module, by top-level name.

    Attributes:
        names: names whose object changed, in place or not, or that were added or removed (a
            class only when what makes its instances changed, ``__init__`` and the like).
        rebound: the subset bound to another object (replaced, added or removed): a reference
            taken before the patch no longer is the module's value.
        members: ``Class.member`` paths that changed, were added or were removed.
    """

    names: frozenset[str]
    rebound: frozenset[str]
    members: frozenset[str] = frozenset()  # "Class.member" paths that changed

    def __bool__(self) -> bool:
        return bool(self.names or self.members)


@dataclass(frozen=True)
class Derivation:
    """What re-deriving a module takes: forced names, or a refusal (line, reason)."""

    forced: frozenset[str]
    refusal: tuple[int, str] | None = None
    dirty_lines: tuple[int, ...] = ()
    callers: frozenset[str] = frozenset()  # definitions that call changed names (changed too)


def top_level_change(
    changed: Iterable[str], added: Iterable[str], removed: Iterable[str], rebound: Iterable[str]
) -> ModuleChange:
    """A ``ModuleChange`` from a plan's qualified names (``K.method`` counts as ``K``; a class's
    descriptive attributes, ``K.__doc__`` or ``K.__annotations__``, change no behaviour)."""
    paths = [n for part in (changed, added, removed) for n in part]
    # A class counts as changed when what makes its instances changed: ``K()`` at import then
    # builds another object. Another method changed in place changes no value built before.
    names = {n.partition(".")[0] for n in paths if "." not in n or n.rpartition(".")[2] in _MAKING}
    hard = {n for n in rebound if "." not in n}
    hard.update(n for n in (*added, *removed) if "." not in n)
    members = frozenset(n for n in paths if "." in n)
    return ModuleChange(frozenset(names), frozenset(hard), members)


def _member_changed(
    base: str,
    attr: str,
    own: ModuleChange | None,
    changed: Mapping[str, ModuleChange],
    origins: Mapping[str, tuple[str, str]],
) -> bool:
    """Whether ``base.attr`` is a changed member of a class of this module or an imported one."""
    if own is not None and f"{base}.{attr}" in own.members:
        return True
    origin = origins.get(base)
    if origin is None:
        return False
    change = changed.get(origin[0])
    return change is not None and f"{origin[1]}.{attr}" in change.members


def _reads_changed(
    reads: Reads,
    soft: set[str],
    hard: set[str],
    aliases: Mapping[str, str],
    changed: Mapping[str, ModuleChange],
) -> bool:
    """Whether one statement reads a re-bound name or calls a changed one (class bodies)."""
    for name in reads.names:
        if name in hard or (name in soft and name in reads.calls):
            return True
    for base, attr in reads.attrs:
        module = aliases.get(base)
        change = changed.get(module) if module else None
        if change is not None and (
            attr in change.rebound or (attr in change.names and base in reads.calls)
        ):
            return True
    return False


def _taint_callers(
    units: list[Unit],
    soft: set[str],
    hard: set[str],
    changed: Mapping[str, ModuleChange],
    package: str,
) -> None:
    """Functions and classes whose bodies use a changed name behave differently too: calling them
    at import (``CURRENT = main()``, where ``main`` calls a changed ``version``) is derivation."""
    aliases: dict[str, str] = {}
    imported: set[str] = set()  # local names bound to changed names of other modules
    for unit in units:
        for ref in unit.reads.imports:
            source = _from_source(ref, package, aliases)
            if source is None:
                continue
            change = changed.get(source)
            if change is not None and ref.name in change.names:
                imported.add(ref.asname or ref.name)
            aliases[ref.asname or ref.name] = f"{source}.{ref.name}"
    definitions = [
        ({name for scope, name in u.bound if not scope}, u.reads)
        for u in units
        if u.reads.kind in ("def", "class")
    ]
    grew = True
    while grew:
        grew = False
        tainted = soft | hard | imported
        for bound, reads in definitions:
            if bound <= soft:
                continue
            uses_changed = not reads.body.isdisjoint(tainted) or any(
                (change := changed.get(aliases.get(base, ""))) is not None and attr in change.names
                for base, attr in reads.body_attrs
            )
            if uses_changed:
                soft.update(bound)
                tainted.update(bound)
                grew = True


def resolve(ref: ImportRef, package: str) -> str | None:
    """The absolute module an import statement reads from."""
    if not ref.is_from:
        return ref.name
    if ref.level == 0:
        return ref.module
    parts = package.split(".") if package else []
    if ref.level - 1 > len(parts):
        return None
    base = parts[: len(parts) - (ref.level - 1)]
    if ref.module:
        base.append(ref.module)
    return ".".join(base) or None


def _from_source(ref: ImportRef, package: str, aliases: dict[str, str]) -> str | None:
    """The module a ``from`` import reads; a plain ``import`` is recorded in ``aliases`` instead.

    Returns ``None`` for a plain import and for an import that does not resolve.
    """
    source = resolve(ref, package)
    if source is None:
        return None
    if not ref.is_from:
        local = ref.asname or ref.name.partition(".")[0]
        aliases[local] = ref.name if ref.asname else local
        return None
    return source


def _registers_on_kept_value(
    unit: Unit,
    own: ModuleChange | None,
    kept: set[str],
    before: Mapping[str, str],
    *,
    imported: set[str],
) -> str | None:
    """Why a definition's decorator cannot do in place what it does in a restart, or None.

    ``@app.get("/new")``, ``@bp.route(...)``, ``@register.filter`` on a definition the patch adds
    register it on ``app``: in the candidate that is the candidate's own ``app``, which the patch
    discards because the live one is kept (its statement did not change). The live ``app``
    would never learn the new route, filter or command, where a restart has it. On an object
    imported from another module (``@router.get`` with ``from main import router``) the
    registration is made on the live object, and undone as the candidate's (``registrations``):
    the same outcome. The same holds
    when the decorator or the signature it may have read changed (a new path; FastAPI reads the
    parameters once, at registration): the live registration stays as the old ones made it. A
    body-only change is fine: the live registration holds the function, which takes the new code.
    """
    reads = unit.reads
    if own is None or reads.kind not in ("def", "class") or not reads.decorators:
        return None
    bound = sorted(name for scope, name in unit.bound if not scope)
    on = sorted(reads.decorators & kept)
    if not bound or not on:
        return None
    if set(bound) <= own.rebound:
        what = f"the decorator of the new {bound[0]}"
    elif before.get(bound[0], reads.decorated) != reads.decorated:
        what = f"the decorator of {bound[0]}, whose decorator or signature changed,"
    else:
        return None  # the same registration as the live one: it holds the live object
    if on[0] in imported:
        where = (
            f"{on[0]}, a live object this module imports: the new version's registration there "
            "is undone (it holds the new version's objects) and cannot be made again with the "
            "live ones"
        )
    else:
        where = (
            f"{on[0]}, which the patch keeps live: the registration would be made on the new "
            f"version's own {on[0]}, which is discarded"
        )
    return (
        f"{what} registers it on {where}, so the running process would not have it "
        "(a rolling reload carries this change)"
    )


def derive(
    units: Iterable[Unit],
    *,
    package: str,
    own: ModuleChange | None,
    changed: Mapping[str, ModuleChange],
    is_module: Callable[[str], bool],
    exported: Callable[[str], Iterable[str]],
    previous: Iterable[Unit] = (),
) -> Derivation:
    """Find the statements of a module that a restart would compute differently (module docstring).

    Args:
        units: the module's top-level statements, in order (``StatementIndex.units``).
        package: the module's ``__package__``, to resolve relative imports.
        own: what the patch changed in this module itself, when it is part of the change set.
        changed: what the patch changed in other modules, by module name.
        is_module: whether a dotted name is an imported module.
        exported: the names ``from module import *`` binds from a changed module.
        previous: the live version's statements, when known (a changed decorator is found there).

    Returns:
        The names to take from the candidate, or the first statement that needs a restart.
    """
    soft: set[str] = set(own.names) if own else set()  # behaviour changed (identity may be kept)
    hard: set[str] = set(own.rebound) if own else set()  # bound to another object
    aliases: dict[str, str] = {}  # local name -> module it is bound to
    origins: dict[str, tuple[str, str]] = {}  # local name -> (module, name) it was imported as
    units = list(units)
    own_names = {name for unit in units for scope, name in unit.bound if not scope}
    before = set(soft)
    _taint_callers(units, soft, hard, changed, package)
    callers = frozenset(soft - before)
    forced: set[str] = set()
    dirty_lines: list[int] = []
    classes = {member.partition(".")[0] for member in own.members} if own is not None else set()

    def _module_reads(names: frozenset[str]) -> set[str]:
        """Decorators read through a module alias whose names were replaced (``@m.deco``)."""
        found = set()
        for base, attr in unit.reads.attrs:
            module = aliases.get(base)
            change = changed.get(module) if module else None
            if base in names and change is not None and attr in change.rebound:
                found.add(f"{module}.{attr}")
        return found

    decorated = {  # the live version's decorators, by the name their definition binds
        name: unit.reads.decorated
        for unit in previous
        if unit.reads.decorated
        for scope, name in unit.bound[:1]
        if not scope
    }
    values = {  # names this module binds to values of its own (not imports, defs or classes)
        name
        for unit in units
        if unit.reads.kind == "plain" and not unit.reads.imports
        for scope, name in unit.bound
        if not scope
    }
    for unit in units:
        reads = unit.reads
        names = reads.names
        registrars = {  # imported objects a decorator calls a method of (``@router.get``)
            base for base, _ in reads.attrs if base in reads.decorators and base in origins
        }
        kept = _registers_on_kept_value(
            unit, own, (values - hard - forced) | registrars, decorated, imported=registrars
        )
        if kept:
            return Derivation(frozenset(forced), (unit.start, kept))
        if not reads.imports and (
            names.isdisjoint(soft)
            and names.isdisjoint(hard)
            and names.isdisjoint(aliases)
            and names.isdisjoint(origins)
            and names.isdisjoint(classes)
        ):
            continue  # reads nothing that changed (the common case, kept cheap)
        why_hard: list[str] = []
        why_soft: list[str] = []
        star_names: set[str] = set()
        for ref in reads.imports:
            source = _from_source(ref, package, aliases)
            if source is None:
                continue
            change = changed.get(source)
            if ref.name == "*":
                if change is not None and change.rebound:
                    why_hard.append(f"from {source} import *")
                    star_names.update(exported(source))
                continue
            local = ref.asname or ref.name
            full = f"{source}.{ref.name}"
            if is_module(full):
                aliases[local] = full
            else:
                aliases.pop(local, None)
                origins[local] = (source, ref.name)
            if change is not None and ref.name in change.rebound:
                why_hard.append(full)
        for name in reads.names:
            if name in hard:
                why_hard.append(name)
            elif name in soft and name in reads.calls:
                why_soft.append(f"{name}()")
            module = aliases.get(name)
            change = changed.get(module) if module else None
            if change and name in reads.bare and change.rebound:
                why_hard.append(f"module {module}")
        for base, attr in reads.attrs:
            module = aliases.get(base)
            change = changed.get(module) if module else None
            if change is None:
                if base in reads.calls and _member_changed(base, attr, own, changed, origins):
                    why_soft.append(f"{base}.{attr}()")  # a class's method called at import
                continue
            if attr in change.rebound:
                why_hard.append(f"{module}.{attr}")
            elif attr in change.names and base in reads.calls:
                why_soft.append(f"{module}.{attr}")
        if not why_hard and not why_soft:
            continue
        why = ", ".join(dict.fromkeys(why_hard + why_soft))
        bound = {name for scope, name in unit.bound if not scope}
        if reads.kind in ("def", "class"):
            if own is not None and bound and bound <= own.rebound:
                # Added or replaced as a whole: the candidate's object, made by the new
                # decorators from the new names, is what goes live, as in a restart.
                continue
            replaced = sorted((reads.decorators & hard) | _module_reads(reads.decorators))
            if replaced:  # the decorator itself is another object now: what it made differs
                return Derivation(
                    frozenset(forced),
                    (
                        unit.start,
                        f"the decorator of {sorted(bound)[0]} reads {', '.join(replaced)}, "
                        "which was replaced",
                    ),
                )
            if reads.kind == "def":
                # Updated in place with the defaults and annotations a candidate computes:
                # named, so that the module is re-derived (the function itself keeps its identity).
                forced.update(bound)
                dirty_lines.append(unit.start)
                continue
            members = [
                member
                for member, member_reads in reads.members
                if _reads_changed(member_reads, soft, hard, aliases, changed)
            ]
            if members:
                dirty_lines.append(unit.start)
                forced.update(members)
                soft.update(bound)
            continue
        dirty_lines.append(unit.start)
        if reads.effect is not None:
            return Derivation(
                frozenset(forced),
                (unit.start, f"{reads.effect} runs at import and reads {why}, which changed"),
            )
        for name in reads.mutates:
            if name not in own_names or name in aliases:
                return Derivation(
                    frozenset(forced),
                    (
                        unit.start,
                        f"the statement changes {name}, not a value of this module, at import "
                        f"from {why}, which changed",
                    ),
                )
        taken = bound | set(reads.mutates) | star_names
        forced.update(taken)
        soft.update(taken)
        hard.update(taken)
    return Derivation(frozenset(forced), None, tuple(dirty_lines), callers)
