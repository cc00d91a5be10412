"""Keeping the promise: a patched process behaves like one restarted on the new code.

The idea: the planner pairs objects module by module, but a restart re-creates *every* reference:
the ``from m import f`` binding in another module, the table another module built from ``m``'s
names at import, the registry that holds ``f``. An in-place patch that updates ``m`` alone can
leave any of those on the old version while reporting success.

The problem is to find what else depends on a change, cheaply enough to do it on every patch, and
to check the result instead of trusting the plan. The mechanism, in three parts used by the
pipeline: ``NamespaceIndex`` answers "which live modules hold this module or these objects?" from
a reverse index of namespace ids (those modules' statements are then read by ``derived``);
``refuse_stale_references`` walks the garbage collector's referrers of every function that is
replaced rather than updated in place and refuses when something the commit does not re-bind
still holds it; ``fidelity_problem`` checks after the commit that a name reported changed or
added runs the candidate's code with the live module's globals.
"""

from __future__ import annotations

import gc
import os
import re
import sys
import sysconfig
import types
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from hotpatch.engine.changeset import ChangeSet, SetAttr, SetFunction, SetName, functions_of
from hotpatch.engine.derived import ModuleChange, top_level_change
from hotpatch.engine.statements import Unit
from hotpatch.engine.swap import Plan
from hotpatch.errors import PatchRejected


def module_change(plan: Plan, *, also: Iterable[str] = ()) -> ModuleChange:
    """What a plan changes, by top-level name; ``also``: names whose behaviour changed with it."""
    change = top_level_change(plan.changed, plan.added, plan.removed, plan.rebound)
    extra = frozenset(also)
    return ModuleChange(change.names | extra, change.rebound, change.members) if extra else change


def empty_plan(name: str) -> Plan:
    return Plan(name, ChangeSet(()), (), (), (), frozenset(), ())


# Objects every module shares (singletons, small ints): holding one says nothing about imports.
_SHARED = (bool, type(None), type(Ellipsis), type(NotImplemented))


_ABSENT = object()


class NamespaceIndex:
    """Which live modules hold which objects, by id, to find the modules that may depend on a
    changed one; and the state of each module's file when the index first saw the module.

    Reading every namespace on every patch would cost more than a small patch itself in a large
    process, so a reverse index (object id -> names of the modules holding it) is kept. It is
    brought up to date when ``sys.modules`` gained or lost modules (each module's namespace is
    read again when it is another dict or has another size) and for the modules hotpatch
    commits to. Not seen until then: a module that binds another module's object at run time,
    after its import, without any module being imported since. Building it reads every loaded
    module once (tens of ms with a few hundred modules loaded), so ``Engine.track`` (and with it
    ``watch`` and ``listen``) builds it ahead of the first patch: ``refresh``.

    The file state (``os.stat``: device, inode, size, modification time) is what tells, on first
    contact with a module that holds a changed module's objects, whether its file still holds the
    code that runs (``file_changed``): a file rewritten after the index first saw its module is
    not the version that was imported.
    """

    def __init__(self) -> None:
        self._state: dict[str, tuple[int, int, frozenset[int]]] = {}
        # object id -> the one module holding it (the common case) or the set of them
        self._holding: dict[int, str | set[str]] = {}
        self._modules_seen: tuple[int, int] = (-1, -1)  # len(sys.modules), id of its last key
        self._stale: set[str] = set()
        self._files: dict[str, tuple[int, _FileKey | None]] = {}  # name -> (id(module), stat)

    def forget(self, names: Iterable[str]) -> None:
        """Read these modules' namespaces again before the next question (a commit changed them)."""
        for name in names:
            self._drop(name)
            self._stale.add(name)

    def _drop(self, name: str) -> None:
        state = self._state.pop(name, None)
        if state is None:
            return
        holding = self._holding
        for key in state[2]:
            holders = holding.get(key)
            if holders is None:
                continue
            if isinstance(holders, str):
                if holders == name:
                    del holding[key]
                continue
            holders.discard(name)
            if len(holders) == 1:
                holding[key] = next(iter(holders))
            elif not holders:
                del holding[key]

    def refresh(self) -> None:
        """Bring the index up to date with ``sys.modules`` now (ahead of the first patch)."""
        self._refresh()

    def _refresh(self) -> None:
        modules = sys.modules
        last = next(reversed(modules), None) if modules else None
        seen = (len(modules), id(last))
        if seen == self._modules_seen:
            names = [n for n in self._stale if n in modules]
        else:
            for name in [n for n in self._state if n not in modules]:
                self._drop(name)
            for name in [n for n in self._files if n not in modules]:
                del self._files[name]
            names = list(modules)
        self._stale.clear()
        holding = self._holding
        get = holding.get
        for name in names:
            module = modules.get(name)
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            known = self._files.get(name)
            if known is None or known[0] != id(module):
                self._files[name] = (id(module), file_key(namespace.get("__file__")))
            state = self._state.get(name)
            if state is not None and state[0] == id(namespace) and state[1] == len(namespace):
                continue
            self._drop(name)
            ids = frozenset(map(id, list(namespace.values())))
            self._state[name] = (id(namespace), len(namespace), ids)
            for key in ids:  # a string for one holder: no set made for most objects
                holders = get(key)
                if holders is None:
                    holding[key] = name
                elif isinstance(holders, str):
                    if holders != name:
                        holding[key] = {holders, name}
                else:
                    holders.add(name)
        self._modules_seen = seen

    def _holders_of(self, key: int) -> tuple[str, ...] | set[str]:
        holders = self._holding.get(key)
        if holders is None:
            return ()
        return (holders,) if isinstance(holders, str) else holders

    def modules_holding(self, ids: Iterable[int]) -> set[str]:
        """The live modules whose namespace holds one of these objects (by id), as the index
        reads them now: a module that bound one at run time, after the last import, is missed."""
        self._refresh()
        found: set[str] = set()
        for key in ids:
            found.update(self._holders_of(key))
        return found

    def file_changed(self, name: str, module: types.ModuleType) -> bool:
        """Whether the module's file changed since the index first saw this module object.

        ``False`` when it did not, or when nothing was recorded (no file, or a module the index
        has not seen: call ``refresh`` first).
        """
        known = self._files.get(name)
        if known is None or known[0] != id(module) or known[1] is None:
            return False
        return file_key(getattr(module, "__file__", None)) != known[1]

    def holders(self, name: str, change: ModuleChange) -> list[str]:
        """Live modules whose namespace holds the module ``name``, or objects it changed or
        defines (cheap and wide: the statements of each one are read next)."""
        if not change:
            return []
        live = sys.modules.get(name)
        if not isinstance(live, types.ModuleType):
            return []
        self._refresh()
        ns = live.__dict__
        watched = {id(live)}
        by_name: dict[str, object] = {}  # shared objects (None, True, 3) are matched by name too
        for key in {*change.names, *(m.partition(".")[0] for m in change.members)}:
            value = ns.get(key, _ABSENT)
            if value is _ABSENT:
                continue
            if isinstance(value, _SHARED) or (isinstance(value, int) and -5 <= value <= 256):
                if key not in _OWN_METADATA:  # every module has its own: a match says nothing
                    by_name[key] = value
            else:
                watched.add(id(value))
        if change.rebound:  # names added or removed: star imports of this module follow
            for value in ns.values():
                if isinstance(value, type | types.FunctionType) and value.__module__ == name:
                    watched.add(id(value))
        found: set[str] = set()
        for watched_id in watched:
            found.update(self._holders_of(watched_id))
        for key, value in by_name.items():
            for holder in self._holders_of(id(value)):
                namespace = getattr(sys.modules.get(holder), "__dict__", None)
                if isinstance(namespace, dict) and namespace.get(key, _ABSENT) is value:
                    found.add(holder)
        parent = name.rpartition(".")[0]
        if parent in sys.modules:
            found.add(parent)
        found.discard(name)
        return sorted(found)


_FileKey = tuple[int, int, int, int]

# Names the import system sets in every module for the module itself.
_OWN_METADATA = frozenset(
    {"__doc__", "__name__", "__file__", "__cached__", "__package__", "__loader__", "__spec__"}
)


def file_key(filename: object) -> _FileKey | None:
    """What identifies a version of a file cheaply: device, inode, size, modification time."""
    if not isinstance(filename, str) or not filename.endswith(".py"):
        return None
    try:
        st = os.stat(filename)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def may_import(text: str, package: str, modules: Iterable[str]) -> bool:
    """Whether a module's source may import one of ``modules`` (a cheap filter before parsing).

    ``derived`` finds what a module derives from another through its import statements only.
    Here the import statements are found by their first word (at a line start, or after ``;``
    or ``:``, parenthesised lists followed to their closing bracket) and resolved against
    ``package`` (the module's ``__package__``) to every module they may name: ``from a.b import
    c`` names ``a``, ``a.b`` and ``a.b.c``; ``from .. import x`` the parent package and its
    ``x``. Text in comments, strings or docstrings that looks like an import may pass as well:
    the filter errs towards parsing. An import statement with non-ASCII text always passes
    (identifiers are NFKC-normalized; keywords are ASCII).
    """
    wanted = set(modules)
    if not wanted:
        return False
    named = imported_modules(text, package)
    return named is None or not wanted.isdisjoint(named)


def imported_modules(text: str, package: str) -> frozenset[str] | None:
    """Every module name the import statements of ``text`` may name (see ``may_import``);
    ``None`` when one of them has non-ASCII text (it may name any module)."""
    if "\\\n" in text or "\\\r" in text:  # explicit line joins: one logical line
        text = re.sub(r"\\\r?\n", " ", text)
    found: set[str] = set()
    for statement in _import_statements(text):
        if not statement.isascii():
            return None
        found |= _named_modules(statement, package)
    return frozenset(found)


def packages_not_named(data: bytes, package: str, tops: Iterable[str]) -> frozenset[str]:
    """Of the top-level package names ``tops``, those no import statement in the source
    ``data`` can name a module under, seen without decoding or scanning it.

    An absolute import spells its top-level package out, so ASCII source that does not contain
    the name cannot import it; a relative import resolves inside the module's own top-level
    package (``package``: its ``__package__``), so that one is never among them. Source that is
    not ASCII, or declares an encoding (bytes that are ASCII may decode to other text), gives
    none: ``imported_modules`` of the decoded text decides.
    """
    first = data.find(b"\n")
    second = data.find(b"\n", first + 1) if first >= 0 else -1
    head = data if second < 0 else data[:second]  # the two lines a PEP 263 cookie may be on
    if not data.isascii() or b"coding" in head:
        return frozenset()
    own = package.partition(".")[0]
    return frozenset(t for t in tops if t != own and t.encode("utf-8") not in data)


_IMPORT_START = re.compile(r"(?:^|[;:])[ \t]*(?:from|import)\b", re.MULTILINE)
_FROM = re.compile(r"from\b(.*?)\bimport\b(.*)", re.DOTALL)
_MODULE_PATH = re.compile(r"(\.*)((?:\w+(?:\.\w+)*)?)")


def _named_modules(statement: str, package: str) -> set[str]:
    """The module names an import statement's text may refer to (empty: not an import)."""
    statement = statement.lstrip(";: \t").split(";", 1)[0].replace("(", " ").replace(")", " ")
    found: set[str] = set()
    match = _FROM.match(statement)
    if match is not None:
        path = _MODULE_PATH.fullmatch("".join(match.group(1).split()))
        if path is None:
            return found
        dots, module = path.group(1), path.group(2)
        if dots:
            parts = package.split(".") if package else []
            if len(dots) - 1 > len(parts):
                return found
            base = ".".join(parts[: len(parts) - (len(dots) - 1)])
            module = f"{base}.{module}" if base and module else base or module
        if not module:
            return found
        found.update(_prefixes(module))
        for item in match.group(2).split(","):
            words = item.split()
            if words and words[0] != "*":
                found.add(f"{module}.{words[0]}")
        return found
    if statement.startswith("import"):
        for item in statement[len("import") :].split(","):
            words = item.split()
            if words:
                found.update(_prefixes("".join(words[0].split())))
    return found


def _prefixes(dotted: str) -> list[str]:
    parts = dotted.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _import_statements(text: str) -> Iterator[str]:
    """The text of each statement that may be an import, comments cut (see ``may_import``).

    Every import statement has the word ``import`` on its first line: the lines holding it are
    found with ``str.find`` (much faster than a regular expression over the whole text), then
    the statement's start on that line (a line start, or after ``;`` or ``:``).
    """
    size = len(text)
    pos = text.find("import")
    while pos >= 0:
        start = text.rfind("\n", 0, pos) + 1
        end = text.find("\n", pos)
        end = size if end < 0 else end
        line = text[start:end]
        for match in _IMPORT_START.finditer(line):
            chunk = line[match.start() :].split("#", 1)[0]
            stop = end
            if "(" in chunk and ")" not in chunk.partition("(")[2]:
                while stop < size:  # a parenthesised list: up to its closing bracket
                    nxt = text.find("\n", stop + 1)
                    nxt = size if nxt < 0 else nxt
                    more = text[stop:nxt].split("#", 1)[0]
                    chunk += more
                    stop = nxt
                    if ")" in more:
                        break
            yield chunk
        pos = text.find("import", end)


def refuse_stale_references(
    plans: list[tuple[str, Plan, str]],
    candidates: Iterable[dict[str, object]] = (),
    modules_holding: Callable[[set[int]], Iterable[str]] | None = None,
) -> None:
    """A function replaced rather than updated in place (it became a generator, a coroutine, or
    the reverse) must have no reference the commit leaves pointing at it: module namespaces and
    class attributes that the change set re-binds are fine; anything else (a registry, a
    callback list, a closure, a bound method) would keep running the old code.

    Args:
        plans: (module name, plan, file name) of every module the change set commits.
        candidates: the namespaces of candidates: this change set's (they hold the live
            values of the statements that did not change), and earlier ones not collected yet.
        modules_holding: the live modules that may hold these objects (``NamespaceIndex``);
            only their namespaces are counted as holders of a replaced value (every module's
            when ``None``). One it misses leaves a reference uncounted: a heap walk then
            decides, so a wrong answer costs time, never a wrong outcome.

    Raises:
        PatchRejected: stage ``compatibility``, naming what holds the old function.
    """
    values = _replaced_values(plans)
    if not values and not any(plan.replaced_definitions for _, plan, _ in plans):
        return
    # The old objects to look for, in one walk of the heap (``gc.get_referrers`` reads every
    # tracked object each time it is called): those with a reference that is not accounted for.
    # ``sys.getrefcount`` sees, besides the holders counted, the loop's name and its own
    # argument; the records of ``values`` (one per module that re-binds a name to the value)
    # hold the value too.
    records = Counter(id(record[1]) for record in values)
    # A replaced definition held only by the names the change set re-binds (a method by its
    # class's dict) and by the plans' records of it: every reference is accounted for (where
    # the count is exact), so a walk would find no holder to refuse for. Any other reference,
    # even a harmless one, is left to the walk.
    rebound = _rebound_references(plans) if _EXACT_COUNTS else Counter()
    # (in a comprehension of its own: no name is left holding a definition)
    own = records + Counter(
        id(record[1]) for _, plan, _ in plans for record in plan.replaced_definitions
    )
    targets: list[object] = []
    for _, plan, _ in plans:
        for _, old, _ in plan.replaced_definitions:
            if not _EXACT_COUNTS or sys.getrefcount(old) > 2 + own[id(old)] + rebound[id(old)]:
                targets.append(old)
    walked: list[tuple[str, object, tuple[str, str]]] = []
    held = _held_by_namespaces(set(records), candidates, modules_holding)
    for record in values:
        old = record[1]
        if sys.getrefcount(old) <= 2 + records[id(old)] + held[id(old)]:
            continue  # held only by module namespaces (as a walk would find): no walk needed
        targets.append(old)
        walked.append(record)
    if not targets:
        return
    rebinding: dict[int, set[object]] = {}  # id(namespace or class) -> names re-bound there
    for _, plan, _ in plans:
        for op in plan.changeset.assignments:
            if isinstance(op, SetName):
                rebinding.setdefault(id(op.namespace), set()).add(op.name)
                # the old value is replaced as a whole (a list of the module that held it)
                rebinding.setdefault(id(op.namespace.get(op.name)), set()).add(_WHOLE)
            elif isinstance(op, SetAttr):
                rebinding.setdefault(id(op.cls), set()).add(op.name)
                rebinding.setdefault(id(op.cls.__dict__.get(op.name)), set()).add(_WHOLE)
    modules = {id(m.__dict__): m for m in list(sys.modules.values()) if hasattr(m, "__dict__")}
    class_dicts: dict[int, int] = {}  # id(a class's own dict) -> id(the class)
    for _, plan, _ in plans:
        for op in plan.changeset.assignments:
            if isinstance(op, SetAttr):
                for inner in gc.get_referents(op.cls):
                    if type(inner) is dict and op.name in inner:
                        class_dicts[id(inner)] = id(op.cls)

    def refusal() -> PatchRejected | None:
        return _stale_reference(
            plans,
            walked,
            referrers=_referrers_of(targets),
            rebinding=rebinding,
            modules=modules,
            class_dicts=class_dicts,
        )

    found = refusal()
    if found is not None:
        # What holds an old object may be garbage not collected yet (a cycle an earlier
        # candidate left, more likely while the collector was paused for a parse): collect,
        # then look again.
        gc.collect()
        found = refusal()
    if found is not None:
        raise found


def _stale_reference(
    plans: list[tuple[str, Plan, str]],
    walked: list[tuple[str, object, tuple[str, str]]],
    *,
    referrers: dict[int, list[object]],
    rebinding: dict[int, set[object]],
    modules: dict[int, types.ModuleType],
    class_dicts: dict[int, int],
) -> PatchRejected | None:
    """The refusal of ``refuse_stale_references`` for these referrers, if any."""
    for name, plan, filename in plans:
        for path, old, _ in plan.replaced_definitions:
            holders = _foreign_holders(
                old, referrers.get(id(old), []), rebinding, modules, class_dicts
            )
            if holders:
                return PatchRejected(
                    name,
                    "compatibility",
                    f"{path} cannot be updated in place (it became a generator or a coroutine, "
                    "or the reverse, or its shape changed), so the new version replaces it; "
                    f"references to the old one held elsewhere ({', '.join(sorted(set(holders))[:5])}) "
                    "would keep running the old code, where a restart re-creates them: a restart "
                    "is needed",
                    filename=filename,
                )
    for path, old, (name, filename) in walked:
        # Another module's name bound at run time to the old value is that module's live state
        # (as the module's own run-time names are); imports of it were re-derived above.
        holders = _foreign_holders(
            old,
            referrers.get(id(old), []),
            rebinding,
            modules,
            class_dicts,
            modules_hold=False,
        )
        if holders:
            return PatchRejected(
                name,
                "compatibility",
                f"{path} becomes a new object (its statement changed, or it is derived from what "
                f"changed), but the old {type(old).__name__} is also held elsewhere "
                f"({', '.join(sorted(set(holders))[:5])}: an attribute or a cache that read it "
                "at start-up), which would keep using the old one where a restart builds it from "
                "the new one: needs a restart (a rolling reload carries this change)",
                filename=filename,
            )
    return None


def _held_by_namespaces(
    wanted: set[int],
    candidates: Iterable[dict[str, object]],
    modules_holding: Callable[[set[int]], Iterable[str]] | None = None,
) -> Counter[int]:
    """How many references to each object of ``wanted`` (by id) the module namespaces hold, live
    or candidates': the holders ``_foreign_holders`` does not count for a replaced value
    (``modules_hold=False``). One pass over their values, in C; over the namespaces of
    ``modules_holding(wanted)`` only when given (each reference counted is a real one either
    way: fewer namespaces read can only count fewer)."""
    held: Counter[int] = Counter()
    if not wanted:
        return held
    live: list[object] = (
        list(sys.modules.values())
        if modules_holding is None
        else [sys.modules.get(name) for name in modules_holding(wanted)]
    )
    seen: set[int] = set()
    for namespace in (*(getattr(m, "__dict__", None) for m in live), *candidates):
        if (
            type(namespace) is dict
            and id(namespace) not in seen
            and "__builtins__" in namespace
            and "__name__" in namespace
        ):
            seen.add(id(namespace))
            held.update(filter(wanted.__contains__, map(id, list(namespace.values()))))
    return held


# Values a holder may keep a copy of without being stale: equal is as good as the same.
# (a compiled pattern too: ``re``'s cache holds every one compiled, in a restart as well)
_IMMUTABLE = (
    str,
    bytes,
    int,
    float,
    complex,
    bool,
    type(None),
    tuple,
    frozenset,
    range,
    re.Pattern,
)
_ANNOTATION_MODULES = frozenset({"typing", "typing_extensions"})


def _is_value(old: object) -> bool:
    """Whether ``old`` is a value a holder may keep a copy of: an immutable built-in, or an
    annotation object (``Optional``, ``list[int]``, ``int | None``, a ``TypeVar``: typing's own
    caches hold every one made, in a restarted process as well)."""
    return (
        isinstance(old, (*_IMMUTABLE, types.GenericAlias, types.UnionType))
        or type(old).__module__ in _ANNOTATION_MODULES
    )


def _home_object(old: object, changed: str) -> bool:
    """Whether ``old`` is an object of the module that defines its type, bound there by name
    (``from __future__ import annotations``: ``__future__.annotations``, a ``_Feature``): that
    module made it and keeps it, in a restarted process as well, so whatever else holds it did
    not read it from the module that changed."""
    home = type(old).__module__
    if home == changed:
        return False
    module = sys.modules.get(home)
    namespace = getattr(module, "__dict__", None)
    return isinstance(namespace, dict) and any(v is old for v in list(namespace.values()))


def _replaced_values(
    plans: list[tuple[str, Plan, str]],
) -> list[tuple[str, object, tuple[str, str]]]:
    """(``module.name``, old value, (module, file)) of every mutable module-level value that the
    change set binds to another object: a list, a dict, an instance (not a function or class).
    Shaped like the plan's (path, old, ...) records, which ``_foreign_holders`` knows as its own."""
    found = []
    for name, plan, filename in plans:
        module = sys.modules.get(name)
        namespace = getattr(module, "__dict__", None)
        for op in plan.changeset.assignments:
            if not isinstance(op, SetName) or op.namespace is not namespace:
                continue
            old = op.namespace.get(op.name, _ABSENT)
            if old is _ABSENT or old is op.value or _is_value(old) or _home_object(old, name):
                continue
            if isinstance(old, type | types.ModuleType) or functions_of(old):
                continue  # definitions: updated in place, or refused above when replaced
            found.append((f"{name}.{op.name}", old, (name, filename)))
    return found


_WHOLE = object()  # marks an old value the change set replaces as a whole

# ``sys.getrefcount`` counts every reference, plus its own argument, on the versions measured
# (tests/unit/test_engine_fidelity.py: one reference more is found); not in a free-threaded
# build, nor where a name may be read without a reference (3.14's borrowed loads).
_EXACT_COUNTS = (3, 10) <= sys.version_info[:2] <= (3, 13) and not sysconfig.get_config_var(
    "Py_GIL_DISABLED"
)


def _rebound_references(plans: list[tuple[str, Plan, str]]) -> Counter[int]:
    """``id(value) -> how many of the names the change set re-binds hold it now``: each
    (namespace or class, name) once, however many assignments name it."""
    rebound: Counter[int] = Counter()
    seen: set[tuple[int, str]] = set()
    for _, plan, _ in plans:
        for op in plan.changeset.assignments:
            if isinstance(op, SetName):
                key, value = (id(op.namespace), op.name), op.namespace.get(op.name, _WHOLE)
            elif isinstance(op, SetAttr):
                key, value = (id(op.cls), op.name), op.cls.__dict__.get(op.name, _WHOLE)
            else:
                continue
            if key not in seen:
                seen.add(key)
                rebound[id(value)] += 1
    return rebound


def _referrers_of(targets: list[object]) -> dict[int, list[object]]:
    """``id(target) -> what refers to it`` for every object of ``targets``, from one heap walk
    (``targets`` itself and this function's own records left out)."""
    wanted = set(map(id, targets))
    found: dict[int, list[object]] = {}
    # The call's own argument tuple holds every target and is tracked on 3.13: made here, it
    # is passed as it is (``f(*t)`` with a tuple), so it can be left out by identity.
    arguments = tuple(targets)
    for ref in gc.get_referrers(*arguments):
        if ref is targets or ref is found or ref is arguments:
            continue
        seen: set[int] = set()
        for inner in gc.get_referents(ref):
            key = id(inner)
            if key in wanted and key not in seen:
                seen.add(key)
                found.setdefault(key, []).append(ref)
    return found


def _foreign_holders(
    old: object,
    referrers: list[object],
    rebinding: dict[int, set[object]],
    modules: dict[int, types.ModuleType],
    class_dicts: dict[int, int],
    *,
    modules_hold: bool = True,
) -> list[str]:
    """What holds ``old`` besides the places the change set re-binds and hotpatch's own records.

    Written without comprehensions over ``old``: a comprehension's closure cell would hold it.
    """
    holders: list[str] = []
    bookkeeping = (SetName, SetAttr, SetFunction, types.FrameType)
    for ref in referrers:
        if isinstance(ref, bookkeeping) or _WHOLE in rebinding.get(id(ref), ()):
            continue
        if (
            isinstance(ref, tuple)
            and len(ref) == 3
            and _filled(ref)
            and ref[1] is old
            and isinstance(ref[0], str)
        ):
            continue  # the plan's (path, old, ()) record, or _replaced_values' own
        if isinstance(ref, dict):
            keys: set[object] = set()
            only_int_keys = True
            for key, value in ref.items():
                if value is old:
                    keys.add(key)
                only_int_keys = only_int_keys and isinstance(key, int)
            if not modules_hold and "__builtins__" in ref and "__name__" in ref:
                continue  # a module's namespace, live or a candidate's kept by the history
            if id(ref) in modules:
                if keys <= rebinding.get(id(ref), set()):
                    continue
                name = sorted(map(str, keys))[0]
                holders.append(f"{modules[id(ref)].__name__}.{name}")
                continue
            owner = class_dicts.get(id(ref))
            if owner is not None and keys <= rebinding.get(owner, set()):
                continue
            if only_int_keys:
                continue  # a remap table of the planner (id -> live object)
            owner_name = _instance_of(ref, keys)
            if owner_name:
                holders.append(owner_name)
                continue
        elif isinstance(ref, type) and _keys_rebound(ref, old, rebinding):
            continue
        holders.append(_attribute_of(ref, old) or type(ref).__name__)
    return holders


def _filled(ref: tuple[object, ...]) -> bool:
    """Whether every slot of a tuple found among the referrers holds an object.

    A tuple another thread is still building (``tuple(iterator)``, paused while the iterator's
    Python code runs) is already tracked by the collector, so a heap walk can find it with
    empty slots, and indexing an empty slot crashes the interpreter. ``gc.get_referents``
    reads the slots in C and skips the empty ones.
    """
    return len(gc.get_referents(ref)) == len(ref)


def _attribute_of(owner: object, old: object) -> str | None:
    """``Type.attr`` when ``owner`` holds ``old`` as an instance attribute (named in a refusal)."""
    try:
        attrs = object.__getattribute__(owner, "__dict__")
    except Exception:
        return None
    if type(attrs) is not dict:
        return None
    for key, value in attrs.items():
        if value is old:
            return f"{type(owner).__qualname__}.{key}"
    return None


def _instance_of(attrs: dict[object, object], keys: set[object]) -> str | None:
    """``Type.attr`` when ``attrs`` is an object's ``__dict__`` (named in a refusal)."""
    for owner in gc.get_referrers(attrs):
        if getattr(owner, "__dict__", None) is attrs:
            return f"{type(owner).__qualname__}.{sorted(map(str, keys))[0] if keys else '?'}"
    return None


def _keys_rebound(cls: type, old: object, rebinding: dict[int, set[object]]) -> bool:
    names = set()
    for key, value in cls.__dict__.items():
        if value is old:
            names.add(key)
    return names <= rebinding.get(id(cls), set())


def _codes(value: object) -> list[types.CodeType]:
    """The code objects a value runs: its functions, through ``__wrapped__`` chains."""
    codes: list[types.CodeType] = []
    for _ in range(16):
        codes += [f.__code__ for f in functions_of(value)]
        try:
            inner = object.__getattribute__(value, "__dict__").get("__wrapped__")
        except Exception:
            inner = None
        if inner is None:
            break
        value = inner
    return codes


def fidelity_problem(live: dict[str, object], cand: dict[str, object], path: str) -> str | None:
    """Why the live object at ``path`` does not run the candidate's code (``None``: it does)."""
    first, *rest = path.split(".")
    live_value, cand_value = live.get(first), cand.get(first)
    for part in rest:
        if not isinstance(live_value, type) or not isinstance(cand_value, type):
            return None
        live_value, cand_value = live_value.__dict__.get(part), cand_value.__dict__.get(part)
    if isinstance(cand_value, type):
        return None  # a class: its members are checked by their own names
    filename = live.get("__file__")
    want = [c for c in _codes(cand_value) if c.co_filename == filename]
    have = [c for c in _codes(live_value) if c.co_filename == filename]
    if len(want) != len(have) or any(a is not b and a != b for a, b in zip(want, have)):
        return "still runs code of the old version"
    for func in functions_of(live_value):
        if func.__globals__ is cand:
            return "runs with the candidate's globals, not the live module's"
    return None


def completed_units(filename: str, units: Iterable[Unit]) -> list[Unit]:
    """The top-level statements of a running script that have finished.

    A script's module code may still be running (``while True: serve()`` at top level): the
    statement it is in is the program, not a value computed at start-up, and the statements
    after it have not run yet (they will run the new code). Only the statements before the
    line any thread's module-level frame of ``filename`` is at count; all of them when none is.
    """
    lines = [line for frame in _module_frames(filename) if isinstance(line := frame.f_lineno, int)]
    if not lines:
        return list(units)
    first = min(lines)
    return [unit for unit in units if unit.end < first]


def _module_frames(filename: str) -> list[types.FrameType]:
    found = []
    for frame in sys._current_frames().values():
        current: types.FrameType | None = frame
        while current is not None:
            code = current.f_code
            if code.co_name == "<module>" and code.co_filename == filename:
                found.append(current)
            current = current.f_back
    return found
