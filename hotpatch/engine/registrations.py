"""Registrations a candidate makes in live containers: found, undone, and redone only when applied.

A candidate executes the module's top-level code again, apart from the live module, but that code
reaches out: a decorator adds the function to a registry dict of another module, a metaclass or a
base class's ``__init_subclass__`` appends every new class to a list, a blueprint collects views.
Every ``check``, refused patch and dry run used to leave the candidate's objects there (one class,
then four entries after three tries), so refused code was reachable from live code.

The mechanism: before the candidate runs, the containers it can reach through the live module are
copied shallowly (``snapshot``, about a millisecond for a module importing Flask). These are the
module namespaces it imports from (modules, and the modules of the classes and functions it imports)
and the dicts, lists and sets at their top level; those held by the classes it uses (every class of
their MRO and of their metaclass's MRO: ``Meta.registry``, a base class's list filled by
``__init_subclass__``); those in the closures of the functions it imports; and those in the
``__dict__`` of the instances it holds (a blueprint's deferred views). Registries further away
are reached too (issue 12): the containers of the instances those classes and instances hold, up
to ``MAX_INSTANCE_DEPTH`` attributes deep (Django's ``Note._meta.apps.all_models``, a
``defaultdict`` of dicts; SQLAlchemy's ``Base.registry._class_registry``), subclasses of dict,
list and set, and the containers held in a copied container (a registry of registries), within
budgets (``MAX_INSTANCES``, ``MAX_NESTED_SCAN``): a check of a models module used to leave the
candidate's classes in Django's app registry, where ``apps.get_model()`` answered them.

After the candidate ran, whatever it raised, each container is compared with its copy: an entry
added or replaced whose key or value is an object of the candidate (a function whose globals are
the candidate's namespace, a class of the module that is not live, an instance, bound method,
``partial``, ``staticmethod`` or small tuple of those, a weak reference to one, an instance holding
a few of them: SQLAlchemy's marker of two classes of one name) is a registration, and is undone at
once, so no live code ever sees a candidate object. When the patch is applied, the registrations
are made again with the live twins of those objects (an edited function is the live one, a new
function its re-bound copy, a new class itself); a rollback after a failed health check undoes that
again. Entries changed by other threads meanwhile are left alone.

The import system's process-wide lists (``sys.meta_path``, ``sys.path_hooks``, ``sys.path``) are
copied as well, and whatever the candidate did to them is undone: six takes the importer an earlier
run installed out of ``sys.meta_path`` and appends its own, so a refused candidate used to leave
its importer there instead of the live one. A list is put back only when nobody changed it since
the candidate ran. When the patch is applied, each list is set as the candidate's execution left it,
with the live twin of every candidate object (the live importer when its statement did not change):
what a restart has when the module's code is idempotent, as six's is; a module that appends
unconditionally gets a second entry, as after ``importlib.reload``.

``atexit`` keeps its callbacks where no copy reaches: when their number rose while the candidate
ran, the candidate's functions are unregistered (``Registrations.exit_callbacks``).

Warnings a framework gives only because a class is declared a second time in one process
(Django's "Model ... was already registered") are ignored in the patching thread while the
candidate runs (``quiet_re_execution``).

What this cannot see is documented in docs/in-process.md ("Limits and refusals"): containers not
reachable that way (a registry further away, a C extension's table), containers over
``MAX_ENTRIES`` entries (caches), registrations of plain values (a string, a count), other side
effects (files, sockets, threads), and ``Base.__subclasses__()``, which lists a candidate's
subclasses until the garbage collector frees them.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import functools
import re
import sys
import threading
import types
import warnings
import weakref
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field

# Containers larger than this are taken for caches, not registries, and not copied.
MAX_ENTRIES = 100_000
# How many attributes deep the snapshot follows instances: a class's ``_meta`` (1), its ``apps``
# (2), whose ``all_models`` is a registry; and how many instances one snapshot looks into at most.
MAX_INSTANCE_DEPTH = 2
MAX_INSTANCES = 5_000
# The containers held in a container are copied too when it has at most this many entries.
MAX_NESTED_SCAN = 1_000
_BUILTIN_TYPES = frozenset(v for v in vars(builtins).values() if isinstance(v, type))
_MISSING = object()
_CONTAINERS = (dict, list, set)
_NOT_INSTANCE_BASES = (type, types.ModuleType, dict, list, set)
_SMALL_COLLECTIONS = (list, set, tuple, frozenset)
Container = dict[object, object] | list[object] | set[object]
_NOT_INSTANCES = frozenset(
    {
        types.FunctionType,
        types.MethodType,
        types.BuiltinFunctionType,
        types.CodeType,
        types.FrameType,
        types.GeneratorType,
        types.CoroutineType,
        types.CellType,
        types.MappingProxyType,
        functools.partial,
        weakref.ref,
    }
)
# Types whose objects hold no registry of their own: values, functions, code (not dict/list/set).
_LEAVES = (_BUILTIN_TYPES - set(_CONTAINERS)) | _NOT_INSTANCES


@dataclass
class _Found:
    container: Container
    key: object  # dict key; for lists and sets, the added item itself
    old: object  # the value replaced in a dict, or _MISSING
    new: object


@dataclass
class _ListState:
    """A process-wide list of the import system, before and after a candidate ran."""

    container: list[object]
    before: list[object]
    after: list[object]


# Warnings a framework gives only because a module's top level runs a second time in one process:
# the candidate declares a class that the live module declared under the same module and name.
# The registration they warn about is undone with the rest (``quiet_re_execution``).
_RE_EXECUTION_WARNINGS = (
    # Django, apps.register_model: the candidate's model class, registered over the live one.
    r"Model '[^']*' was already registered\. Reloading models is not advised",
    # SQLAlchemy (SAWarning), the declarative class registry: the candidate's mapped class.
    r"This declarative base already contains a class with the same class name and module name",
)


class _InThisThread:
    """A ``warnings`` filter's message pattern that matches in one thread only.

    The filters are process-wide; the warnings module asks a filter's message for ``.match``,
    so this one answers for the candidate's thread alone: other threads' warnings are filtered
    exactly as before."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern  # a str, as ``re.Pattern.pattern`` is, for code that reads filters
        self._regex = re.compile(pattern)
        self.thread = threading.get_ident()

    def match(self, text: str) -> bool:
        return threading.get_ident() == self.thread and self._regex.match(text) is not None


@contextlib.contextmanager
def quiet_re_execution() -> Iterator[None]:
    """Ignore, in this thread, the warnings a framework gives when a candidate re-declares a live
    class (``_RE_EXECUTION_WARNINGS``): a check printed Django's "Model ... was already
    registered" each time, and under ``-W error`` refused every models module at ``execute``.

    The filters are taken out again by identity; if another thread's ``catch_warnings`` restores
    a copy of the list made meanwhile, they stay there, matching these messages in this thread
    only."""
    filters: list[object] = warnings.filters  # type: ignore[assignment]  # a list at run time
    added = [("ignore", _InThisThread(p), RuntimeWarning, None, 0) for p in _RE_EXECUTION_WARNINGS]
    mutated = getattr(warnings, "_filters_mutated", None)  # the filters' cache key (3.10-3.13)
    filters[:0] = added
    if callable(mutated):
        mutated()
    try:
        yield
    finally:
        for entry in added:
            for index in range(len(filters) - 1, -1, -1):
                if filters[index] is entry:
                    del filters[index]
                    break
        if callable(mutated):
            mutated()


def _same_items(a: list[object], b: list[object]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _import_lists() -> list[list[object]]:
    """``sys.meta_path``, ``sys.path_hooks`` and ``sys.path`` (those that are lists)."""
    lists = (
        getattr(sys, "meta_path", None),
        getattr(sys, "path_hooks", None),
        getattr(sys, "path", None),
    )
    return [value for value in lists if type(value) is list]


@dataclass
class Registrations:
    """What one candidate added to live containers (``snapshot(...).collect(...)``), and how it
    left the import system's lists (``sys.meta_path``, ``sys.path_hooks``, ``sys.path``)."""

    found: list[_Found] = field(default_factory=list)
    lists: list[_ListState] = field(default_factory=list)
    exit_callbacks: list[object] = field(default_factory=list)  # given to ``atexit.register``

    def undo(self) -> None:
        """Take the candidate's entries out again, newest first; others' changes are kept.

        An import-system list is put back as it was before the candidate ran (a hook the
        candidate took out is back, its own one gone) when nobody changed it since."""
        for state in reversed(self.lists):
            with contextlib.suppress(Exception):
                if _same_items(state.container, state.after):
                    state.container[:] = state.before
        for entry in reversed(self.found):
            _remove(entry)
        for callback in self.exit_callbacks:
            with contextlib.suppress(Exception):
                atexit.unregister(callback)  # type: ignore[arg-type]

    def redo(self, remap: dict[int, object]) -> Registrations:
        """Make the registrations again with live objects, after the commit; returns them.

        ``remap`` maps ``id(candidate object)`` to its live twin (shared by the plans of the
        change set). An object with no live twin (an instance the candidate made, a function
        it did not bind to a name) is not registered again.
        """
        done = Registrations()
        for state in self.lists:  # as the candidate left them, with live twins: as a restart
            with contextlib.suppress(Exception):
                if _same_items(state.container, state.before):
                    current = list(state.container)
                    state.container[:] = [remap.get(id(item), item) for item in state.after]
                    done.lists.append(_ListState(state.container, current, list(state.container)))
        for entry in self.found:
            with contextlib.suppress(Exception):  # a hostile key or a changed container: skip it
                self._redo_one(entry, remap, done)
        return done

    @staticmethod
    def _redo_one(entry: _Found, remap: dict[int, object], done: Registrations) -> None:
        live = remap.get(id(entry.new), _MISSING)
        if live is not _MISSING:
            container = entry.container
            if isinstance(container, dict):
                key = remap.get(id(entry.key), entry.key)
                old = container.get(key, _MISSING)
                if old is not live:
                    container[key] = live
                    done.found.append(_Found(container, key, old, live))
            elif isinstance(container, list):
                if not any(item is live for item in container):
                    container.append(live)
                    done.found.append(_Found(container, live, _MISSING, live))
            elif live not in container:
                container.add(live)
                done.found.append(_Found(container, live, _MISSING, live))


def _remove(entry: _Found) -> None:
    container = entry.container
    with contextlib.suppress(Exception):  # a container changed meanwhile: leave it as it is
        if isinstance(container, dict):
            if container.get(entry.key, _MISSING) is entry.new:
                if entry.old is _MISSING:
                    del container[entry.key]
                else:
                    container[entry.key] = entry.old
        elif isinstance(container, list):
            for index in range(len(container) - 1, -1, -1):
                if container[index] is entry.new:
                    del container[index]
                    break
        elif any(item is entry.new for item in container):
            container.discard(entry.new)


@dataclass
class Snapshot:
    """Shallow copies of the live containers a candidate of ``module`` can reach."""

    module: str
    live_ids: frozenset[int]
    copies: list[tuple[Container, Container]]
    import_lists: list[tuple[list[object], list[object]]] = field(default_factory=list)
    # Where each copied container was found (a namespace, a class or an instance attribute):
    # code that replaces the container with a new one (Django's ``Signal`` rebuilds its
    # ``receivers`` list when one has died) is compared against the copy all the same.
    held: list[tuple[Mapping[str, object], str, Container, Container]] = field(default_factory=list)
    exit_callbacks: int = -1  # how many ``atexit`` callbacks there were (-1: unknown)

    def collect(self, namespace: dict[str, object]) -> Registrations:
        """The registrations the candidate whose namespace is ``namespace`` made."""
        owned = _Ownership(self.module, namespace, self.live_ids)
        found = Registrations()
        for import_list, before in self.import_lists:
            if not _same_items(import_list, before):
                found.lists.append(_ListState(import_list, before, list(import_list)))
        for container, copy in self.copies:
            try:
                _compare(container, copy, owned, found.found)
            except Exception:  # a container mutated while we read it: skip it, not the patch
                continue
        for holder, name, container, copy in self.held:
            try:
                now = holder.get(name, _MISSING)
                if now is not container and _container_base(type(now)) is type(copy):
                    _compare(now, copy, owned, found.found)  # type: ignore[arg-type]
            except Exception:
                continue
        if 0 <= self.exit_callbacks < _exit_callbacks():
            # ``atexit`` keeps its callbacks where Python cannot see them: what was registered
            # is found by trying the candidate's functions (``unregister`` removes by equality).
            found.exit_callbacks = [
                value
                for value in list(namespace.values())
                if type(value) in (types.FunctionType, types.MethodType) and owned(value)
            ]
        return found


def _exit_callbacks() -> int:
    """How many callbacks ``atexit`` holds (-1 where the interpreter does not say)."""
    count = getattr(atexit, "_ncallbacks", None)
    try:
        return int(count()) if callable(count) else -1
    except Exception:
        return -1


def snapshot(live: types.ModuleType) -> Snapshot:
    """Copy the containers reachable from ``live`` (see the module docstring); cheap and shallow."""
    namespace = vars(live)
    walker = _Walker(live, namespace)
    for value in list(namespace.values()):
        try:
            walker.add_value(value)
        except Exception:  # an object that resists being looked at is no registry of ours
            continue
    live_ids = frozenset(id(v) for v in namespace.values())
    import_lists = [(value, list(value)) for value in _import_lists()]
    return Snapshot(
        live.__name__, live_ids, walker.copies, import_lists, walker.held, _exit_callbacks()
    )


class _Walker:
    """Finds and copies the containers of one snapshot, each once, within the budgets."""

    def __init__(self, live: types.ModuleType, namespace: dict[str, object]) -> None:
        self.live = live
        self.namespace = namespace
        self.copies: list[tuple[Container, Container]] = []
        self.held: list[tuple[Mapping[str, object], str, Container, Container]] = []
        self.seen: set[int] = {id(namespace)}
        self.instances = 0  # instances looked into, against MAX_INSTANCES

    def add(self, value: object, nested: int = 1) -> Container | None:
        """Copy ``value`` if it is a container, and the containers it holds (``nested`` deep);
        returns the copy (``None``: not a container, met before, or too large)."""
        base = _container_base(type(value))
        if base is None or id(value) in self.seen:
            return None
        self.seen.add(id(value))
        assert isinstance(value, dict | list | set)
        size = len(value)
        if size > MAX_ENTRIES:
            return None
        try:
            copy: Container = base.copy(value)  # type: ignore[attr-defined]
        except Exception:
            return None
        self.copies.append((value, copy))
        if nested > 0 and size <= MAX_NESTED_SCAN:
            # A registry of registries: Django's ``apps.all_models`` holds a dict per app.
            for member in copy.values() if isinstance(copy, dict) else copy:
                if issubclass(type(member), _CONTAINERS):
                    self.add(member, nested - 1)
        return copy

    def add_held(self, holder: Mapping[str, object], name: object, value: object) -> None:
        """``add(value)``, remembering that ``holder[name]`` held it."""
        copy = self.add(value)
        if copy is not None and type(name) is str:
            self.held.append((holder, name, value, copy))  # type: ignore[arg-type]

    def add_class(self, cls: type, depth: int = 0) -> None:
        """The containers in the ``__dict__`` of every class of ``cls``'s MRO and of its
        metaclass's MRO, and those of the instances there (``depth``: how deep ``cls`` was met)."""
        metaclass: type = type(cls)
        for klass in (*cls.__mro__, *metaclass.__mro__):
            if klass in _BUILTIN_TYPES or id(klass) in self.seen:
                continue
            self.seen.add(id(klass))
            attributes = vars(klass)
            deeper = depth < MAX_INSTANCE_DEPTH
            for name, member in list(attributes.items()):
                kind = type(member)
                if kind in _LEAVES:  # most of a class body: functions, strings, numbers
                    continue
                if issubclass(kind, _CONTAINERS):
                    self.add_held(attributes, name, member)
                elif (
                    deeper
                    and not issubclass(kind, _NOT_INSTANCE_BASES)
                    and not hasattr(kind, "__get__")  # a descriptor: a field, a property
                ):
                    self.add_instance(member, depth + 1)  # Django's ``Model._meta``

    def add_namespace(self, other: dict[str, object]) -> None:
        if id(other) in self.seen:
            return
        self.add(other, nested=0)
        for name, member in list(other.items()):
            if issubclass(type(member), _CONTAINERS):
                self.add_held(other, name, member)

    def add_value(self, value: object) -> None:
        kind = type(value)  # never isinstance(): it may ask a proxy for its __class__
        if issubclass(kind, _CONTAINERS):
            self.add(value)
        elif issubclass(kind, types.ModuleType):
            if value is not self.live:
                self.add_namespace(vars(value))
        elif issubclass(kind, type):
            assert isinstance(value, type)
            self.add_class(value)
            other = sys.modules.get(str(value.__dict__.get("__module__")))
            if other is not None and other is not self.live:
                self.add_namespace(vars(other))
        elif kind in (types.FunctionType, types.MethodType, functools.partial):
            for inner in _functions_in(value):
                if inner.__globals__ is not self.namespace:
                    self.add_namespace(inner.__globals__)
                for cell in inner.__closure__ or ():
                    with contextlib.suppress(ValueError):
                        self.add(cell.cell_contents)
            bound_to = value.__self__ if kind is types.MethodType else None  # type: ignore[attr-defined]
            if issubclass(type(bound_to), type):
                self.add_class(bound_to)  # type: ignore[arg-type]
            elif bound_to is not None:
                self.add_instance(bound_to, 0)
        else:
            self.add_instance(value, 0)

    def add_instance(self, value: object, depth: int) -> None:
        """The containers an instance holds in its ``__dict__`` (a blueprint's deferred views),
        and those of the instances it holds, ``MAX_INSTANCE_DEPTH`` attributes deep (Django's
        ``Model._meta.apps.all_models``, SQLAlchemy's ``Base.registry._class_registry``)."""
        kind = type(value)
        if kind in _LEAVES or not kind.__dictoffset__ or id(value) in self.seen:
            return  # a value, a function, or an instance with no ``__dict__`` (slots)
        if self.instances >= MAX_INSTANCES:
            return
        self.seen.add(id(value))
        self.instances += 1
        try:
            attributes = object.__getattribute__(value, "__dict__")
            if type(attributes) is not dict or len(attributes) > MAX_NESTED_SCAN:
                return  # not a plain namespace, or a table kept as attributes: not looked into
            members = list(attributes.items())
        except Exception:
            return
        deeper = depth < MAX_INSTANCE_DEPTH
        for name, member in members:
            member_kind = type(member)
            if member_kind in _LEAVES:
                continue
            if issubclass(member_kind, _CONTAINERS):
                self.add_held(attributes, name, member)
            elif deeper and not issubclass(member_kind, _NOT_INSTANCE_BASES):
                self.add_instance(member, depth + 1)
        if depth == 0:  # the class of an instance the module holds (a registry class)
            self.add_class(kind)


def _container_base(kind: type) -> type | None:
    """``dict``, ``list`` or ``set`` for those and their subclasses (``defaultdict``,
    ``OrderedDict``, a framework's registry type); ``None`` for anything else."""
    if kind in _CONTAINERS:
        return kind
    for base in _CONTAINERS:
        if issubclass(kind, base):
            return base
    return None


def _functions_in(value: object) -> Iterator[types.FunctionType]:
    """The plain functions in a function, a bound method or a ``functools.partial``."""
    kind = type(value)
    inner = (
        value.__func__  # type: ignore[attr-defined]
        if kind is types.MethodType
        else value.func  # type: ignore[attr-defined]
        if kind is functools.partial
        else value
    )
    if type(inner) is types.FunctionType:
        yield inner


@dataclass
class _Ownership:
    """Decides whether an object was made by the candidate (see the module docstring)."""

    module: str
    namespace: dict[str, object]
    live_ids: frozenset[int]

    def __call__(self, value: object, depth: int = 0) -> bool:
        try:
            return self._owned(value, depth)
        except Exception:  # an object that resists being looked at is not the candidate's
            return False

    def _owned(self, value: object, depth: int) -> bool:
        """Type-based checks only: ``isinstance`` may ask a proxy for its ``__class__``."""
        if depth > 3 or id(value) in self.live_ids:
            return False
        kind = type(value)
        if kind is types.FunctionType:
            assert isinstance(value, types.FunctionType)
            if value.__globals__ is self.namespace:
                return True
            wrapped = value.__dict__.get("__wrapped__")
            if wrapped is not None and self(wrapped, depth + 1):
                return True
            return any(
                self(cell.cell_contents, depth + 1)
                for cell in value.__closure__ or ()
                if _has_contents(cell)
            )
        if issubclass(kind, type):
            return bool(value.__dict__.get("__module__") == self.module)
        if kind is types.MethodType:
            return self(value.__func__, depth + 1) or self(value.__self__, depth + 1)  # type: ignore[attr-defined]
        if kind in (staticmethod, classmethod):
            return self(value.__func__, depth + 1)  # type: ignore[attr-defined]
        if kind is functools.partial:
            return self(value.func, depth + 1)  # type: ignore[attr-defined]
        if kind in (tuple, frozenset):
            items: tuple[object, ...] | frozenset[object] = value  # type: ignore[assignment]
            return len(items) <= 16 and any(self(item, depth + 1) for item in items)
        if issubclass(kind, weakref.ref):  # a weak reference to one of the candidate's objects
            return self(weakref.ref.__call__(value), depth + 1)  # type: ignore[arg-type]
        if kind in _BUILTIN_TYPES:
            return False
        if self(kind, depth + 1):
            return True
        # An instance of another module's class made for the candidate: it holds a candidate
        # function (FastAPI's APIRoute made by ``@router.get`` for the candidate's endpoint), or
        # a few of the candidate's objects or weak references to them (SQLAlchemy's marker of
        # two classes of one name, the candidate's and the live one, in the class registry).
        for member in _attributes(value):
            member_kind = type(member)
            if member_kind is types.FunctionType:
                assert isinstance(member, types.FunctionType)
                if member.__globals__ is self.namespace:
                    return True
            elif member_kind in _SMALL_COLLECTIONS:  # exactly these types: len() is theirs
                held: Collection[object] = member  # type: ignore[assignment]
                if len(held) <= 16 and any(self(item, depth + 1) for item in list(held)):
                    return True
        return False


def _attributes(value: object, limit: int = 64) -> list[object]:
    """Up to ``limit`` attribute values of an instance: its ``__dict__``, or its slots."""
    try:
        attributes = object.__getattribute__(value, "__dict__")
    except AttributeError:
        attributes = None
    if type(attributes) is dict:
        return list(attributes.values())[:limit]
    found: list[object] = []
    for klass in type(value).__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for name in (slots,) if type(slots) is str else slots:
            if type(name) is str and name not in ("__dict__", "__weakref__"):
                with contextlib.suppress(Exception):
                    found.append(object.__getattribute__(value, name))
                if len(found) >= limit:
                    return found
    return found


def _has_contents(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


def _compare(container: Container, copy: Container, owned: _Ownership, out: list[_Found]) -> None:
    if isinstance(container, dict):
        assert isinstance(copy, dict)
        for key, value in list(container.items()):
            old = copy.get(key, _MISSING)
            if old is not value and (owned(value) or owned(key)):
                out.append(_Found(container, key, old, value))
    elif isinstance(container, list):
        assert isinstance(copy, list)
        now = list(container)
        unchanged = 0  # the common case: nothing added, or only appended
        for old_item, item in zip(copy, now):
            if old_item is not item:
                break
            unchanged += 1
        if unchanged == len(now):
            return
        before = Counter(id(item) for item in copy[unchanged:])
        for item in now[unchanged:]:
            if before[id(item)]:
                before[id(item)] -= 1
            elif owned(item):
                out.append(_Found(container, item, _MISSING, item))
    else:
        before_ids = {id(item) for item in copy}
        for item in list(container):
            if id(item) not in before_ids and owned(item):
                out.append(_Found(container, item, _MISSING, item))
