"""The in-process pipeline: source -> candidate -> guard -> commit at a safe point -> health -> history.

``Engine`` holds the history, the registered verifiers and health checks, and the settings. The
module-level functions (``hotpatch.patch`` and friends) use a default engine. Patches are serialized
by the engine's lock; each one either commits whole (every module of a change set) or not at all.

A success is a promise that the process behaves like one restarted on the new code. So the modules
of a change set are prepared in dependency order; values a module derives at import from names
that changed are re-derived, in that module and in live modules that depend on it (found through
a reverse index of namespace ids, then ``derived.derive`` on their statements), or the patch is
refused with "needs a restart"; a replaced function must leave no reference the commit cannot
re-bind; and after the commit, every name reported changed or added is checked to run the
candidate's code, else the commit is rolled back and refused.
"""

from __future__ import annotations

import io
import linecache
import sys
import threading
import time
import types
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

from hotpatch._log import get_logger
from hotpatch.engine.arguments import (
    check_count,
    check_module_name,
    check_optional_seconds,
    check_seconds,
    require_imported,
)
from hotpatch.engine.candidate import (
    DEFAULT_MAX_SOURCE_BYTES,
    Candidate,
    Source,
    build_candidate,
    compile_source,
    decode_source,
    live_module,
    read_source_file,
    source_from_text,
    text_sha256,
    without_repeated_registrations,
)
from hotpatch.engine.changeset import ChangeSet, FunctionState, SetFunction, functions_of
from hotpatch.engine.derived import Derivation, ModuleChange, derive
from hotpatch.engine.fidelity import (
    NamespaceIndex,
    completed_units,
    empty_plan,
    fidelity_problem,
    file_key,
    imported_modules,
    module_change,
    packages_not_named,
    refuse_stale_references,
)
from hotpatch.engine.guard import DeadlineExceeded, run_with_deadline
from hotpatch.engine.history import Entry, ModuleHistory, Version, version_id
from hotpatch.engine.modulemap import dependency_order, executed_imports, package_of
from hotpatch.engine.pieces import ModuleCode, piece_codes
from hotpatch.engine.rebind import IdentityMap
from hotpatch.engine.registrations import Registrations, quiet_re_execution
from hotpatch.engine.registrations import snapshot as snapshot_registrations
from hotpatch.engine.safepoint import SafePointTimeout, can_suspend, commit_at_safe_point
from hotpatch.engine.swap import Plan, plan_update
from hotpatch.errors import HotpatchError, PatchRejected

log = get_logger(__name__)

SourceInput = str | bytes | None
Verifier = Callable[[types.ModuleType], object]
HealthCheck = Callable[[], object]
F = TypeVar("F", bound=Callable[..., object])


@dataclass(frozen=True)
class PatchResult:
    """What ``patch`` did to one module."""

    module: str
    version: str
    previous: str
    changed: tuple[str, ...]
    added: tuple[str, ...]
    removed: tuple[str, ...]
    duration_s: float
    derived: tuple[str, ...] = ()  # names of other modules re-derived from this change

    @property
    def is_noop(self) -> bool:
        return self.version == self.previous


class Engine:
    """The in-process hot-patch engine: history, verifiers, health checks and settings.

    Args:
        history_limit: applied versions kept restorable per module; older ones are freed.
        safepoint_timeout_s: default deadline for threads to leave replaced code.
        verify_timeout_s: deadline for each verifier.
        health_timeout_s: deadline for each health check.
        max_source_bytes: larger sources are refused at ``load``.
    """

    def __init__(
        self,
        *,
        history_limit: int = 10,
        safepoint_timeout_s: float = 5.0,
        verify_timeout_s: float = 10.0,
        health_timeout_s: float = 10.0,
        max_source_bytes: int = DEFAULT_MAX_SOURCE_BYTES,
    ) -> None:
        self.history_limit = check_count("history_limit", history_limit)
        self.safepoint_timeout_s = check_seconds("safepoint_timeout_s", safepoint_timeout_s)
        self.verify_timeout_s = check_seconds(
            "verify_timeout_s", verify_timeout_s, allow_zero=False
        )
        self.health_timeout_s = check_seconds(
            "health_timeout_s", health_timeout_s, allow_zero=False
        )
        self.max_source_bytes = check_count("max_source_bytes", max_source_bytes)
        self._lock = threading.RLock()
        self._histories: dict[str, ModuleHistory] = {}
        self._verifiers: dict[str | None, list[Verifier]] = {}
        self._health_checks: dict[str | None, list[HealthCheck]] = {}
        self._attempted: dict[str, str] = {}  # module -> sha256 of the source being tried
        self._busy = threading.local()  # .patching: this thread is inside patch/check
        self._namespace_ids = NamespaceIndex()
        # holder module -> what its file imports: a holder that imports none of a change set's
        # modules is not read again per patch
        self._holder_imports: dict[str, _HolderImports] = {}
        self._held: dict[str, str] = {}  # module -> what holds it (a running trial): no patch
        self._controls: dict[str, dict[str, Callable[[], Any]]] = {}  # holder -> its controls
        # Candidate modules of earlier change sets: garbage in reference cycles until the
        # collector's next full pass, their functions may still have codes a commit replaces.
        # The last two change sets' are kept (weakly): an older one still uncollected costs a walk.
        self._earlier_candidates: deque[tuple[weakref.ref[types.ModuleType], ...]] = deque(maxlen=2)

    # -- registration ----------------------------------------------------------------------------
    def verifier(self, module: str | None = None) -> Callable[[F], F]:
        """Register ``fn(candidate_module)``, run before commit; raising refuses the patch.

        Args:
            module: the module it guards (imported already); ``None`` for every module.

        Raises:
            ConfigError: ``module`` is not imported (register it after the import, or with
                ``None`` and look at ``candidate.__name__``).
        """
        self._check_registered_module("verifier", module)

        def register(fn: F) -> F:
            with self._lock:
                self._verifiers.setdefault(module, []).append(fn)
                if module is not None:
                    self._ensure_history(module)
            return fn

        return register

    def health_check(self, module: str | None = None) -> Callable[[F], F]:
        """Register ``fn()``, run after commit; raising (or hanging) rolls the patch back.

        Args:
            module: the module whose patches it checks (imported already); ``None`` for every
                module.

        Raises:
            ConfigError: ``module`` is not imported (as for ``verifier``).
        """
        self._check_registered_module("health_check", module)

        def register(fn: F) -> F:
            with self._lock:
                self._health_checks.setdefault(module, []).append(fn)
                if module is not None:
                    self._ensure_history(module)
            return fn

        return register

    @staticmethod
    def _check_registered_module(api: str, module: str | None) -> None:
        if module is not None:
            check_module_name(f"{api}(module)", module)
            require_imported(f"{api}(module)", module, hint="; import it before registering")

    def track(self, *modules: str) -> None:
        """Record the current source of ``modules`` as their baseline, before any file is edited.

        With a baseline, a patch can tell which statements changed, so module-level values whose
        statement did not change keep their live objects and edited ones take new values.
        ``watch`` does this for every module it watches; ``verifier`` and ``health_check`` for
        the module they name. Every call (with no module too) also brings the engine's index of
        the loaded modules up to date: one-time work the first patch would otherwise pay.

        Raises:
            ConfigError: a module is not imported; ``TypeError``: a name is not a str.
            PatchRejected: stage ``load``: a module cannot be patched (built-in, extension,
                still being imported).
        """
        for name in modules:
            check_module_name("track(modules)", name)
        with self._lock:
            for name in modules:
                if name not in self._histories:
                    require_imported("track(modules)", name)
                self._ensure_history(name)
            # One-time work moved out of the first patch: the index of every loaded module's
            # namespace (and its file's state), used to find the modules that depend on a change.
            self._namespace_ids.refresh()

    # -- queries ---------------------------------------------------------------------------------
    def history(self, module: str) -> list[Version]:
        """The versions of ``module``, newest first (empty when it was never patched).

        Raises:
            ConfigError: hotpatch knows nothing of ``module`` and it is not imported (a typo?).
        """
        check_module_name("history(module)", module)
        with self._lock:
            record = self._histories.get(module)
            if record is None:
                require_imported("history(module)", module)
            return [e.version for e in reversed(record.entries)] if record else []

    # -- patch -----------------------------------------------------------------------------------
    def patch(
        self,
        module: str,
        *,
        source: SourceInput = None,
        allow_removals: bool = False,
        safepoint_timeout_s: float | None = None,
    ) -> PatchResult:
        """Verify and apply a new version of ``module`` in place; see ``patch_many``."""
        return self.patch_many(
            {module: source}, allow_removals=allow_removals, safepoint_timeout_s=safepoint_timeout_s
        )[0]

    def check(
        self, module: str, *, source: SourceInput = None, allow_removals: bool = False
    ) -> PatchResult:
        """Run the guard on a new version of ``module`` without committing it; see ``check_many``."""
        return self.check_many({module: source}, allow_removals=allow_removals)[0]

    def check_many(
        self,
        changes: Mapping[str, SourceInput] | Iterable[str],
        *,
        allow_removals: bool = False,
    ) -> list[PatchResult]:
        """Run the guard on new versions of several modules as one change, committing nothing.

        The same guard as ``patch_many`` up to the commit: load, compile, execute (each candidate
        in isolation, seeing the other candidates of the change: a module may import a name
        another one adds), compatibility, verifiers, the modules that derive state from the
        change, stale references. Nothing live changes and nothing is added to the history. The
        checks that need the commit (the post-commit fidelity check, health checks) do not run.

        Returns:
            One ``PatchResult`` per module, in the order given (what ``patch_many`` would
            report); ``is_noop`` where the version is the live one.

        Raises:
            PatchRejected: the change would be refused; ``.stage`` says where.
        """
        changes = _as_changes(changes, "check_many")
        started = time.perf_counter()
        with self._lock, self._not_reentered(changes):
            try:
                prepared, _ = self._prepare_change_set(changes, allow_removals=allow_removals)
            finally:
                for name in changes:
                    self._attempted.pop(name, None)
        duration = time.perf_counter() - started
        by_name: dict[str, PatchResult] = {}
        for p in prepared:
            if p.plan is None:
                by_name[p.name] = p.noop_result(duration)
            else:
                by_name[p.name] = PatchResult(
                    p.name,
                    version_id(p.source.sha256),
                    p.live_entry.version.id,
                    p.plan.changed,
                    p.plan.added,
                    p.plan.removed,
                    duration,
                )
        return [by_name[name] for name in changes]

    def patch_many(
        self,
        changes: Mapping[str, SourceInput] | Iterable[str],
        *,
        allow_removals: bool = False,
        safepoint_timeout_s: float | None = None,
    ) -> list[PatchResult]:
        """Apply new versions of several modules as one change: all of them or none.

        Args:
            changes: module name -> new source (``None`` reads the module's file again); or an
                iterable of module names, each read from its file.
            allow_removals: lift the compatibility policy (a public name removed, a signature
                that refuses calls the old one took) instead of refusing at ``compatibility``.
            safepoint_timeout_s: how long to wait for threads to leave the replaced code.

        Returns:
            One ``PatchResult`` per module, in the order given.

        Raises:
            PatchRejected: the change was refused or rolled back; ``.stage`` says where. The live
                modules are exactly as before the call.
        """
        changes = _as_changes(changes, "patch_many")
        given_timeout = check_optional_seconds("safepoint_timeout_s", safepoint_timeout_s)
        timeout_s = self.safepoint_timeout_s if given_timeout is None else given_timeout
        started = time.perf_counter()
        with self._lock, self._not_reentered(changes):
            self._refuse_held(changes, "patch")
            try:
                prepared, todo = self._prepare_change_set(changes, allow_removals=allow_removals)
                if todo:
                    self._namespace_ids.forget(p.name for p in todo)
                    self._commit(todo, timeout_s=timeout_s)
                    self._check_fidelity(todo)
                    self._check_health(todo)
            except PatchRejected as exc:
                self._record_rejection(exc)
                raise
            duration = time.perf_counter() - started
            by_name: dict[str, PatchResult] = {}
            dependents = [p for p in todo if p.derived_from]
            for p in prepared:
                if p.plan is None:
                    by_name[p.name] = p.noop_result(duration)
                    continue
                mine = [d for d in dependents if d.derived_from == p.name] if p is todo[0] else []
                by_name[p.name] = self._record_applied(p, duration, mine)
            return [by_name[name] for name in changes]

    def _prepare_change_set(
        self, changes: Mapping[str, SourceInput], *, allow_removals: bool
    ) -> tuple[list[_Prepared], list[_Prepared]]:
        """The guard up to the commit, for every module of one change (``patch_many``,
        ``check_many``): (every module prepared, those with something to commit plus the
        modules that derive state from them). Call with the lock held.

        Raises:
            PatchRejected: refused; a defect or limit of the planner is refused at
                ``compatibility``, saying so.
        """
        prepared: list[_Prepared] = []
        shared = _ChangeSetContext()
        current = ""
        try:
            ordered = self._in_dependency_order(changes)
            log.debug("patch.started", modules=[name for name, _, _ in ordered])  # one event
            for name, given, compiled in ordered:
                current = name
                prepared.append(
                    self._prepare(
                        name,
                        given,
                        allow_removals=allow_removals,
                        change_set=shared,
                        compiled=compiled,
                    )
                )
            todo = [p for p in prepared if p.plan is not None]
            if todo:
                current = todo[0].name
                todo += self._prepare_dependents(todo, shared)
                refuse_stale_references(
                    [(p.name, p.plan, p.source.filename) for p in todo if p.plan],
                    [m.__dict__ for m in (*shared.candidates.values(), *self._earlier())],
                    self._namespace_ids.modules_holding,
                )
        except (PatchRejected, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a defect or a limit of the planner: refuse, say so
            raise PatchRejected(
                current,
                "compatibility",
                f"hotpatch could not plan this change ({type(exc).__name__}: {exc}); "
                "nothing was changed",
            ) from None
        finally:
            self._earlier_candidates.append(tuple(map(weakref.ref, shared.candidates.values())))
        return prepared, todo

    @contextmanager
    def _not_reentered(self, changes: Mapping[str, object]) -> Iterator[None]:
        """Refuse a patch started from inside another one in this thread.

        A module whose top-level code calls ``patch`` on itself (a script without a main guard,
        patched as ``__main__``) would otherwise re-enter the engine (its lock is re-entrant)
        and recurse without end. (Verifiers, migrations and health checks run in threads of
        their own: a patch from there waits for the lock and times out with them.)
        """
        if getattr(self._busy, "patching", False):
            name = next(iter(changes), "?")
            raise PatchRejected(
                str(name),
                "load",
                "patch requested from inside another patch in the same thread (a module's "
                "top-level code calling hotpatch); refused to avoid endless recursion",
            )
        self._busy.patching = True
        try:
            yield
        finally:
            self._busy.patching = False

    def _prepare(
        self,
        name: str,
        given: SourceInput,
        *,
        allow_removals: bool,
        change_set: _ChangeSetContext | None = None,
        compiled: _Compiled | None = None,
    ) -> _Prepared:
        module = live_module(name)
        filename = str(module.__file__)
        if given is None:
            given = read_source_file(name, filename, max_bytes=self.max_source_bytes)
        text = decode_source(name, given, filename, max_bytes=self.max_source_bytes)
        if compiled is not None and compiled.source.text == text:
            sha = compiled.source.sha256  # hashed when the change set was ordered
        else:
            sha = text_sha256(text)
        self._attempted[name] = sha
        record = self._ensure_history(name, unless_sha=sha)
        live_entry = record.live()
        old_source = live_entry.source
        if not text.strip() and (old_source is None or old_source.text.strip()):
            raise PatchRejected(
                name,
                "load",
                "the new source is empty (a save in progress?); refusing to replace a module "
                "that has code with nothing",
                filename=filename,
            )
        if old_source is not None and live_entry.version.sha256 == sha:
            return _Prepared(module, old_source, None, live_entry, None)
        if compiled is not None and compiled.source.sha256 == sha:
            source, code = compiled.source, compiled.code  # compiled to order the change set
        else:
            source, code = compile_source(name, text, filename, previous=old_source, sha256=sha)
        if code.unchanged:
            # Comments rewritten, nothing else: the live code is this version's, statement for
            # statement, and the module is left as an unchanged one would be (what a sibling
            # in this change set changes reaches it as a holder, ``_prepare_dependents``).
            record.learn_live_source(source)
            return _Prepared(module, source, None, live_entry, None)
        code = without_repeated_registrations(
            source, code, previous=old_source, live=module.__dict__
        )
        shared = change_set or _ChangeSetContext()
        candidate, registrations = self._execute_candidate(module, source, code, shared)
        shared.candidates[name] = candidate.module
        shared.remap.pair(candidate.module, module)
        forced = self._migrate(candidate, module)
        plan = plan_update(
            name,
            module.__dict__,
            candidate.namespace,
            old_index=old_source.index if old_source else None,
            new_index=source.index,
            allow_removals=allow_removals,
            forced=forced,
            remap=shared.remap,
        )
        _raise_problems(name, plan, filename)
        prepared = _Prepared(
            module,
            source,
            plan,
            live_entry,
            candidate,
            forced=forced,
            registrations=registrations,
            remap=shared.remap,
            candidates=shared.candidates,
        )
        self._replan_derived(prepared, shared, allow_removals=allow_removals)
        if prepared.plan is None or not prepared.plan.changeset:
            # Identical down to line numbers: nothing to commit. A baseline that was unknown
            # (first contact after the file changed) is now known to be this source.
            record.learn_live_source(source)
            return _Prepared(module, source, None, live_entry, None)
        self._verify(candidate)
        return prepared

    def _execute_candidate(
        self,
        module: types.ModuleType,
        source: Source,
        code: ModuleCode,
        shared: _ChangeSetContext,
    ) -> tuple[Candidate, Registrations]:
        """Build the candidate; what its execution registered in live containers is undone at once.

        Nothing live sees a candidate object: the registrations are redone with the live objects
        only when the patch is applied (``_commit``).
        """
        live_containers = snapshot_registrations(module)
        made: list[Registrations] = []
        try:
            with quiet_re_execution():
                candidate = build_candidate(
                    module,
                    source,
                    code,
                    siblings=shared.candidates,
                    on_executed=lambda namespace: made.append(live_containers.collect(namespace)),
                )
        finally:
            for registrations in made:
                registrations.undo()
        if "__warningregistry__" not in module.__dict__:  # a warning's bookkeeping, not a name
            candidate.namespace.pop("__warningregistry__", None)
        return candidate, made[0] if made else Registrations()

    def _in_dependency_order(
        self, changes: Mapping[str, SourceInput]
    ) -> list[tuple[str, SourceInput, _Compiled | None]]:
        """The change set's modules, each after those of them it imports, so that a module's
        candidate imports the new versions and its derived values follow them.

        Only the modules whose text differs from the live version take part: each is compiled
        here, once (``_prepare`` takes the result), and its imports are read off the statement
        index that compiling builds, instead of parsing every module again. A module that is
        unchanged is a no-op wherever it stands; one that cannot be read or compiled is left to
        ``_prepare``, which refuses it with the stage and line.
        """
        if len(changes) < 2:
            return [(name, given, None) for name, given in changes.items()]
        texts: dict[str, str] = {}
        compiled: dict[str, _Compiled] = {}
        imports: dict[str, set[str]] = {}
        for name, given in changes.items():
            try:
                filename = str(live_module(name).__file__)
                data = given
                if data is None:
                    data = read_source_file(name, filename, max_bytes=self.max_source_bytes)
                text = decode_source(name, data, filename, max_bytes=self.max_source_bytes)
            except PatchRejected:
                return [(n, g, None) for n, g in changes.items()]  # _prepare refuses it
            texts[name] = text
            imports[name] = set()
            sha = text_sha256(text)
            live = self._ensure_history(name, unless_sha=sha).live()
            if live.source is not None and live.version.sha256 == sha:
                continue  # unchanged: a no-op, its place does not matter
            try:
                source, code = compile_source(
                    name, text, filename, previous=live.source, sha256=sha
                )
            except PatchRejected:
                continue  # _prepare compiles it again and refuses it, in this order
            compiled[name] = _Compiled(source, code)
            imports[name] = executed_imports(source.index, package=package_of(name))
        return [(name, texts[name], compiled.get(name)) for name in dependency_order(imports)]

    def _replan_derived(
        self, p: _Prepared, shared: _ChangeSetContext, *, allow_removals: bool
    ) -> bool:
        """Plan again while statements derive values from what the change set changed.

        Returns:
            Whether the plan changed.
        """
        assert p.plan is not None and p.candidate is not None
        replanned = False
        for _ in range(4):
            derivation = self._derivation(
                p.name, p.source, p.plan, shared, own=True, previous=p.live_entry.source
            )
            _raise_derivation(p.name, derivation, p.source.filename, p.name)
            if derivation.forced <= p.forced:
                break
            p.forced |= derivation.forced
            for paired in p.plan.paired_plain:  # values kept live by that plan may be forced now
                shared.remap.pop(paired, None)
            p.plan = plan_update(
                p.name,
                p.module.__dict__,
                p.candidate.namespace,
                old_index=p.live_entry.source.index if p.live_entry.source else None,
                new_index=p.source.index,
                allow_removals=allow_removals,
                forced=p.forced,
                remap=shared.remap,
            )
            _raise_problems(p.name, p.plan, p.source.filename)
            replanned = True
        # Functions that call what changed behave differently as well (for other modules).
        shared.changes[p.name] = module_change(p.plan, also=derivation.callers)
        return replanned

    def _derivation(
        self,
        name: str,
        source: Source,
        plan: Plan,
        shared: _ChangeSetContext,
        *,
        own: bool,
        previous: Source | None = None,
    ) -> Derivation:
        """What the module's statements derive from names this change set changed."""

        def exported(module_name: str) -> list[str]:
            candidate = shared.candidates.get(module_name)
            names = vars(candidate) if candidate is not None else {}
            listed = names.get("__all__")
            if isinstance(listed, list | tuple):
                return [n for n in listed if isinstance(n, str)]
            return [n for n in names if not n.startswith("_")]

        units = source.index.units
        if name == "__main__":  # the program itself: only what its start-up already computed
            units = tuple(completed_units(source.filename, units))
        return derive(
            units,
            package=package_of(name),
            own=module_change(plan) if own else None,
            changed=shared.changes,
            is_module=lambda n: n in sys.modules,
            exported=exported,
            previous=previous.index.units if previous is not None else (),
        )

    def _prepare_dependents(
        self, todo: list[_Prepared], shared: _ChangeSetContext
    ) -> list[_Prepared]:
        """Re-derive the live modules that derive state from what ``todo`` changes.

        A module that imports from a changed module (``from .sub import *``, a table built from
        its names) is found by the objects its namespace shares with the changed module, then
        its statements are read (``derived.derive``); dirty ones are taken from a candidate
        executed with the new versions, in dependency order, as a restart would compute them.
        """
        queue = [p.name for p in todo]
        done = set(queue)
        found: list[_Prepared] = []
        while queue:
            trigger = queue.pop(0)
            for name in self._namespace_ids.holders(trigger, shared.changes[trigger]):
                if name in done:
                    continue
                done.add(name)
                p = self._rederive(name, trigger, shared)
                if p is not None:
                    p.derived_from = todo[0].name
                    found.append(p)
                    queue.append(name)
        return found

    def _rederive(self, name: str, trigger: str, shared: _ChangeSetContext) -> _Prepared | None:
        module = sys.modules.get(name)
        filename = getattr(module, "__file__", None)
        if not isinstance(module, types.ModuleType) or not str(filename).endswith(".py"):
            return None  # no Python source: nothing derived at import that hotpatch could read
        record = self._holder_history(name, module, trigger, shared)
        if record is None:
            return None  # its source imports none of the changed modules: nothing derived
        live_entry = record.live()
        source = live_entry.source
        if source is None:
            raise PatchRejected(
                trigger,
                "compatibility",
                f"needs a restart: {name} imports from {trigger}, which changed, and its live "
                "source is unknown (its file changed before hotpatch first saw it)",
                filename=str(filename),
            )
        plan = empty_plan(name)
        derivation = self._derivation(name, source, plan, shared, own=False)
        _raise_derivation(trigger, derivation, source.filename, name)
        if not derivation.forced:
            return None
        if name == "__main__":
            raise PatchRejected(
                trigger,
                "compatibility",
                f"needs a restart: the program's script computes {sorted(derivation.forced)[0]!r} "
                f"at start-up from {trigger}, which changed, and hotpatch does not run a script "
                "again to re-derive it",
                filename=source.filename,
                lineno=derivation.dirty_lines[0] if derivation.dirty_lines else None,
            )
        try:
            compiled, code = compile_source(
                name, source.text, source.filename, previous=source, sha256=source.sha256
            )
            # Its statements' code is kept on the live version, for the next re-derivation.
            record.learn_live_source(compiled)
            code = without_repeated_registrations(
                source, code, previous=source, live=module.__dict__
            )
            candidate, registrations = self._execute_candidate(module, source, code, shared)
        except PatchRejected as exc:
            raise PatchRejected(
                trigger,
                "compatibility",
                f"needs a restart: {name} derives values from {trigger}, which changed, and "
                f"running it again with the new version failed at {exc.stage}: {exc.reason}",
                filename=exc.filename,
                lineno=exc.lineno,
            ) from None
        shared.candidates[name] = candidate.module
        shared.remap.pair(candidate.module, module)
        plan = plan_update(
            name,
            module.__dict__,
            candidate.namespace,
            old_index=source.index,
            new_index=source.index,
            allow_removals=True,
            forced=derivation.forced,
            remap=shared.remap,
        )
        _raise_problems(trigger, plan, source.filename, name)
        if not plan.changeset:
            return None
        shared.changes[name] = module_change(plan, also=derivation.callers)
        log.debug("patch.rederived", module=name, trigger=trigger, names=list(plan.changed))
        return _Prepared(
            module,
            source,
            plan,
            live_entry,
            candidate,
            registrations=registrations,
            remap=shared.remap,
            candidates=shared.candidates,
        )

    def _holder_history(
        self, name: str, module: types.ModuleType, trigger: str, shared: _ChangeSetContext
    ) -> ModuleHistory | None:
        """The history of a module met because it holds a changed module's objects.

        On first contact its file is the baseline, so the file must still be the version that
        runs: a file changed since hotpatch first saw the module (``NamespaceIndex.file_changed``)
        is not, and the patch is refused. A source that imports none of the changed modules
        derives nothing from them (``fidelity.may_import``): it is not parsed, and no history is
        started (met again, it is read again only if its file changed since: what its imports
        may name is kept with the file's state).

        Raises:
            PatchRejected: stage ``compatibility``: the module's file changed since its import.
        """
        record = self._histories.get(name)
        if record is not None:
            return record
        filename = str(module.__file__)
        if self._namespace_ids.file_changed(name, module):
            raise PatchRejected(
                trigger,
                "compatibility",
                f"needs a restart: {name} holds objects of {trigger}, which changed, and its file "
                "was rewritten after hotpatch first saw the module, so the code it runs (what a "
                "restart would re-derive from) is unknown",
                filename=filename,
            )
        state = file_key(filename)  # taken before the read: a write after it changes it
        tops = {m.partition(".")[0] for m in shared.changes}
        known = self._holder_imports.get(name)
        if (
            known is not None
            and known.state == (id(module), state)
            and known.excludes(shared.changes, tops)
        ):
            return None  # the same file as last time, which imports none of the changed modules
        package = package_of(name)
        text = None  # unreadable: the baseline is unknown (refused below if it matters)
        with suppress(PatchRejected):
            data = read_source_file(name, filename, max_bytes=self.max_source_bytes)
            absent = packages_not_named(data, package, tops)
            if tops <= absent:  # not one import can name a changed module: it is not decoded
                if state is not None:
                    self._holder_imports[name] = _HolderImports((id(module), state), None, absent)
                return None
            text = decode_source(name, data, filename, max_bytes=self.max_source_bytes)
        if text is not None:
            named = imported_modules(text, package)  # None: a non-ASCII import, any module
            if state is not None:
                self._holder_imports[name] = _HolderImports((id(module), state), named, frozenset())
            if named is not None and named.isdisjoint(shared.changes):
                return None
        baseline = None if text is None else source_from_text(name, text, filename)
        record = ModuleHistory.start(name, baseline, limit=self.history_limit)
        self._histories[name] = record
        return record

    def _check_fidelity(self, todo: list[_Prepared]) -> None:
        """After the commit: every name reported changed or added runs the candidate's code."""
        for p in todo:
            if p.plan is None or p.candidate is None:
                continue
            for path in (*p.plan.changed, *p.plan.added):
                problem = fidelity_problem(p.module.__dict__, p.candidate.namespace, path)
                if problem is None:
                    continue
                reason = (
                    f"after the commit, {p.name}.{path} {problem}; rolled back: a restart is "
                    "needed for this change"
                )
                self._undo(todo, reason=reason)
                raise PatchRejected(
                    (p.derived_from or p.name),
                    "compatibility",
                    reason,
                    filename=p.source.filename,
                )

    def _migrate(self, candidate: Candidate, live: types.ModuleType) -> frozenset[str]:
        """Run the candidate's ``__hotpatch_migrate__(old_namespace)``; names it sets are taken."""
        migrate = candidate.namespace.get("__hotpatch_migrate__")
        if not callable(migrate):
            return frozenset()
        before = {k: id(v) for k, v in candidate.namespace.items()}
        try:
            run_with_deadline(
                lambda: migrate(dict(live.__dict__)),
                timeout_s=self.verify_timeout_s,
                name=f"{candidate.name}.__hotpatch_migrate__",
            )
        except BaseException as exc:
            raise _rejection(candidate, "execute", "__hotpatch_migrate__", exc) from None
        return frozenset(k for k, v in candidate.namespace.items() if before.get(k) != id(v))

    def _verify(self, candidate: Candidate) -> None:
        checks: list[tuple[str, Verifier]] = []
        own = candidate.namespace.get("__hotpatch_verify__")
        if callable(own):
            checks.append(("__hotpatch_verify__", own))
        for fn in (*self._verifiers.get(candidate.name, ()), *self._verifiers.get(None, ())):
            checks.append((getattr(fn, "__qualname__", repr(fn)), fn))
        for label, fn in checks:
            try:
                run_with_deadline(
                    lambda fn=fn: fn(candidate.module),  # type: ignore[misc]
                    timeout_s=self.verify_timeout_s,
                    name=f"verifier {label}",
                )
            except BaseException as exc:
                raise _rejection(candidate, "verify", f"verifier {label}", exc) from None

    def _earlier(self) -> list[types.ModuleType]:
        """The candidate modules of earlier change sets that are not collected yet."""
        refs = [ref for change_set in self._earlier_candidates for ref in change_set]
        return [m for m in (ref() for ref in refs) if m is not None]

    def _commit(
        self, todo: list[_Prepared], *, timeout_s: float, trial: _TrialCommit | None = None
    ) -> None:
        plans = [p.plan for p in todo if p.plan is not None]
        codes = frozenset().union(*(plan.replaced_codes for plan in plans))
        waited_from = time.perf_counter()
        # One change set for all modules, so that an assignment that fails undoes them all
        # (``ChangeSet.apply``); its inverse is split back per module below.
        merged = ChangeSet(tuple(a for plan in plans for a in plan.changeset.assignments))
        holders: list[object] = []
        if can_suspend(codes):
            try:
                holders = _code_holders(todo, self._earlier())
            except Exception:  # only a shortcut: without it, the heap is walked
                holders = []
        try:
            if trial is None:
                (merged_undo,) = commit_at_safe_point(
                    [merged], codes=codes, timeout_s=timeout_s, holders=holders
                )
            else:  # the trial's dispatch comes off in the same safe point as the commit
                _, merged_undo = commit_at_safe_point(
                    [trial.restore, merged],
                    codes=codes | trial.codes,
                    timeout_s=timeout_s,
                    holders=[*holders, trial.codes],
                )
                merged_undo = trial.undo_to_originals(merged_undo)
        except Exception as exc:
            if isinstance(exc, SafePointTimeout):
                raise PatchRejected(
                    todo[0].name,
                    "safepoint",
                    str(exc),
                    filename=exc.busy.filename,
                    lineno=exc.busy.lineno,
                ) from None
            raise PatchRejected(
                todo[0].name,
                "compatibility",
                f"the commit could not make an assignment ({type(exc).__name__}: {exc}); "
                "nothing was changed",
                filename=todo[0].source.filename,
            ) from None
        undos: list[ChangeSet] = []
        rest = merged_undo.assignments  # the inverse runs backwards: the last module first
        for plan in reversed(plans):
            count = len(plan.changeset)
            undos.insert(0, ChangeSet(rest[:count]))
            rest = rest[count:]
        log.debug(
            "patch.committed",
            modules=[p.name for p in todo],
            assignments=sum(len(plan.changeset) for plan in plans),
            safepoint_wait_s=round(time.perf_counter() - waited_from, 6),
        )
        for p, undo in zip(todo, undos):
            p.undo = undo
            p.registered = p.registrations.redo(p.remap)
            _cache_lines(p.source)
            for action in p.plan.after_commit if p.plan else ():
                action()

    def _check_health(self, todo: list[_Prepared]) -> None:
        for p in todo:
            for label, fn in self._health_checks_of(p.name, p.module):
                try:
                    run_with_deadline(
                        fn, timeout_s=self.health_timeout_s, name=f"health check {label}"
                    )
                except BaseException as exc:
                    rejection = _rejection(p.candidate, "health", f"health check {label}", exc)
                    log.warning("health_check.failed", check=label, **rejection.details())
                    self._undo(todo, reason=f"health check {label} failed")
                    raise rejection from None

    def _undo(self, todo: list[_Prepared], *, reason: str) -> None:
        """Restore the versions live before ``todo`` was committed, whatever threads are doing."""
        undos = [p.undo for p in reversed(todo) if p.undo is not None]
        codes = frozenset().union(*(u.replaced_codes() for u in undos))
        commit_at_safe_point(
            undos, codes=codes, timeout_s=self.safepoint_timeout_s, force_at_deadline=True
        )
        for p in todo:
            p.registered.undo()
            _cache_lines(p.live_entry.source)
            log.warning(
                "patch.rolled_back",
                module=p.name,
                version=version_id(p.source.sha256),
                restored=p.live_entry.version.id,
                reason=reason,
            )

    # -- trials: a change guarded now, committed later (hotpatch.trial) -------------------------
    def prepare(
        self,
        changes: Mapping[str, SourceInput] | Iterable[str],
        *,
        allow_removals: bool = False,
        holder: str | None = None,
    ) -> PreparedChange:
        """Run the guard on a change and keep it planned, uncommitted, for ``commit_prepared``.

        The guard of ``patch_many`` up to the commit (as ``check_many``); a refusal is recorded in
        the history as ``patch`` records it. Nothing live changes. A parallel run
        (``hotpatch.canary``...) runs the planned functions beside the live ones, then commits
        exactly this change or discards it.

        Args:
            changes: as for ``patch_many``.
            allow_removals: as for ``patch_many``.
            holder: the ``hold`` the caller took on these modules first (so that nothing can
                change them between the guard and the run); other holds refuse.

        Raises:
            PatchRejected: the change is refused; ``.stage`` says where.
        """
        changes = _as_changes(changes, "prepare")
        with self._lock, self._not_reentered(changes):
            self._refuse_held(changes, "a parallel run", unless=holder)
            try:
                prepared, todo = self._prepare_change_set(changes, allow_removals=allow_removals)
            except PatchRejected as exc:
                self._record_rejection(exc)
                raise
            finally:
                for name in changes:
                    self._attempted.pop(name, None)
        return PreparedChange(tuple(changes), prepared, todo)

    def commit_prepared(
        self,
        change: PreparedChange,
        *,
        restore: ChangeSet,
        originals: Mapping[int, FunctionState],
        codes: frozenset[types.CodeType],
        safepoint_timeout_s: float | None = None,
    ) -> list[PatchResult]:
        """Commit a change made by ``prepare``, exactly as ``patch_many`` commits (same history
        entry, fidelity and health checks), taking a parallel run's dispatch off in the same
        safe point.

        Args:
            change: what ``prepare`` returned.
            restore: puts the functions' own code back in place of the dispatch (applied first).
            originals: the functions' own states, by ``id(function)``: what a later rollback of
                this version restores (not the dispatch).
            codes: the dispatch's code objects (threads inside them hold the commit).
            safepoint_timeout_s: how long to wait for threads to leave the replaced code.

        Raises:
            PatchRejected: refused or rolled back: ``restore`` was not applied (the dispatch is
                still in place) or was undone with the rest (the functions' own code is live).
        """
        given_timeout = check_optional_seconds("safepoint_timeout_s", safepoint_timeout_s)
        timeout_s = self.safepoint_timeout_s if given_timeout is None else given_timeout
        started = time.perf_counter()
        with self._lock:
            todo = change._todo
            try:
                for p in change._prepared:
                    if self._histories[p.name].live() is not p.live_entry:
                        raise PatchRejected(
                            p.name,
                            "compatibility",
                            "the live version changed since this change was prepared",
                            filename=p.source.filename,
                        )
                    self._attempted[p.name] = p.source.sha256
                if todo:
                    self._namespace_ids.forget(p.name for p in todo)
                    trial = _TrialCommit(restore, codes, originals)
                    self._commit(todo, timeout_s=timeout_s, trial=trial)
                    self._check_fidelity(todo)
                    self._check_health(todo)
            except PatchRejected as exc:
                self._record_rejection(exc)
                raise
            duration = time.perf_counter() - started
            results: list[PatchResult] = []
            dependents = [p for p in todo if p.derived_from]
            for p in change._prepared:
                self._attempted.pop(p.name, None)
                if p.plan is None:
                    results.append(p.noop_result(duration))
                    continue
                mine = [d for d in dependents if d.derived_from == p.name] if p is todo[0] else []
                results.append(self._record_applied(p, duration, mine))
            return results

    def check_health(self, module: str) -> PatchRejected | None:
        """Run the health checks registered for ``module`` now (no commit); the first failure.

        A parallel run calls it at every step: both versions are live, and a failure ends the run.
        """
        with self._lock:
            target = sys.modules.get(module)
            if not isinstance(target, types.ModuleType):
                return PatchRejected(module, "health", f"{module!r} is no longer imported")
            checks = self._health_checks_of(module, target)
        for label, fn in checks:
            try:
                run_with_deadline(fn, timeout_s=self.health_timeout_s, name=f"health check {label}")
            except BaseException as exc:
                reason = (
                    str(exc)
                    if isinstance(exc, DeadlineExceeded)
                    else f"health check {label} raised {type(exc).__name__}: {exc}"
                )
                return PatchRejected(module, "health", reason)
        return None

    def hold(
        self,
        modules: Iterable[str],
        *,
        holder: str,
        controls: Mapping[str, Callable[[], dict[str, object]]] | None = None,
    ) -> None:
        """Refuse ``patch``, ``rollback`` and another hold of ``modules`` until ``release``.

        Args:
            modules: the modules to hold.
            holder: who holds them (named in the refusals).
            controls: what the control channel may ask of the holder, by action (``status``,
                ``promote``, ``abort``): each returns a JSON-ready description.

        Raises:
            PatchRejected: stage ``load``: a module is held already.
        """
        names = list(modules)
        with self._lock:
            self._refuse_held(names, "a parallel run")
            for name in names:
                self._held[name] = holder
            if controls is not None:
                self._controls[holder] = dict(controls)

    def release(self, modules: Iterable[str], *, holder: str) -> None:
        """Lift ``hold`` (only the holder's own)."""
        with self._lock:
            for name in modules:
                if self._held.get(name) == holder:
                    del self._held[name]
            if holder not in self._held.values():
                self._controls.pop(holder, None)

    def held_controls(self, module: str | None = None) -> dict[str, dict[str, Callable[[], Any]]]:
        """The controls of the holds (all, or the one on ``module``), by holder."""
        with self._lock:
            if module is None:
                return dict(self._controls)
            holder = self._held.get(module)
            found = self._controls.get(holder) if holder is not None else None
            return {holder: found} if holder is not None and found is not None else {}

    def record_discarded(self, module: str, sha256: str, *, stage: str, reason: str) -> None:
        """Record in ``module``'s history a version that ran beside the live one and was
        discarded (a parallel run rolled back): outcome ``rejected`` at ``stage``."""
        with self._lock:
            self._ensure_history(module).add_rejected(sha256, stage, reason)

    def _refuse_held(self, names: Iterable[str], action: str, unless: str | None = None) -> None:
        for name in names:
            holder = self._held.get(name)
            if holder is not None and holder != unless:
                raise PatchRejected(
                    name,
                    "load",
                    f"{name!r} is under {holder}; {action} is refused until it ends "
                    "(promote or abort it: Trial.promote() / Trial.abort())",
                )

    def _health_checks_of(
        self, name: str, module: types.ModuleType
    ) -> list[tuple[str, HealthCheck]]:
        checks: list[tuple[str, HealthCheck]] = []
        own = module.__dict__.get("__hotpatch_health__")
        if callable(own):
            checks.append(("__hotpatch_health__", own))
        for fn in (*self._health_checks.get(name, ()), *self._health_checks.get(None, ())):
            checks.append((getattr(fn, "__qualname__", repr(fn)), fn))
        return checks

    # -- rollback --------------------------------------------------------------------------------
    def rollback(
        self, module: str, *, to: str | None = None, safepoint_timeout_s: float | None = None
    ) -> Version:
        """Restore the previous applied version of ``module``, or the version ``to`` from history.

        The restored version's own objects come back: the same code objects, the same namespace.

        Returns:
            The version now live.

        Raises:
            ConfigError: ``module`` is unknown (never patched and not imported); also a
                negative or NaN ``safepoint_timeout_s``.
            TypeError: ``module`` or ``to`` is not a str.
            HotpatchError: nothing to roll back to, or ``to`` is not a restorable version.
            PatchRejected: stage ``safepoint``: threads stayed inside the code being replaced.
        """
        check_module_name("rollback(module)", module)
        if to is not None and not isinstance(to, str):
            raise TypeError(f"rollback(to) must be a version id (str), not {type(to).__name__}")
        given_timeout = check_optional_seconds("safepoint_timeout_s", safepoint_timeout_s)
        timeout_s = self.safepoint_timeout_s if given_timeout is None else given_timeout
        with self._lock:
            self._refuse_held([module], "rollback")
            record = self._histories.get(module)
            if record is None:
                require_imported("rollback(module)", module)
                raise HotpatchError(f"{module!r} has no earlier version to roll back to")
            target, undone = record.plan_rollback(to)
            undos = [e.undo for e in reversed(undone) if e.undo is not None]
            codes = frozenset().union(*(u.replaced_codes() for u in undos))
            try:
                commit_at_safe_point(undos, codes=codes, timeout_s=timeout_s)
            except SafePointTimeout as exc:
                raise PatchRejected(
                    module,
                    "safepoint",
                    str(exc),
                    filename=exc.busy.filename,
                    lineno=exc.busy.lineno,
                ) from None
            record.mark_rolled_back(target, undone, reason="rolled back by request")
            _cache_lines(target.source)
            log.info(
                "patch.rolled_back",
                module=module,
                restored=target.version.id,
                undone=[e.version.id for e in undone],
                reason="requested",
            )
            return target.version

    # -- bookkeeping -----------------------------------------------------------------------------
    def _ensure_history(self, name: str, *, unless_sha: str | None = None) -> ModuleHistory:
        """The module's history, made on first contact with its file as the baseline.

        ``unless_sha``: the new source about to be applied. When the file on disk already holds
        it, the file was edited before hotpatch saw the module, so the baseline is unknown; so it
        is when the file changed since the namespace index first saw the module.
        """
        record = self._histories.get(name)
        if record is not None:
            return record
        module = live_module(name, importing_ok=True)  # the file is the baseline
        baseline = None
        if not self._namespace_ids.file_changed(name, module):  # else not what was imported
            baseline = _baseline_source(module, self.max_source_bytes)
        if baseline is not None and baseline.sha256 == unless_sha:
            baseline = None
        record = ModuleHistory.start(name, baseline, limit=self.history_limit)
        self._histories[name] = record
        return record

    def _record_applied(
        self, p: _Prepared, duration_s: float, dependents: list[_Prepared] | None = None
    ) -> PatchResult:
        assert p.plan is not None and p.undo is not None
        undo = p.undo
        derived: list[str] = []
        for d in dependents or []:  # their undo rides on this version's, so that a rollback
            assert d.undo is not None  # restores them too (the last committed, first undone)
            undo = ChangeSet(d.undo.assignments + undo.assignments)
        for d in dependents or []:
            assert d.plan is not None
            derived += [f"{d.name}.{n}" for n in (*d.plan.changed, *d.plan.added, *d.plan.removed)]
        previous, version = self._histories[p.name].add_applied(p.source, undo)
        log.info(
            "patch.applied",
            module=p.name,
            version=version.id,
            previous=previous.id,
            changed=list(p.plan.changed),
            added=list(p.plan.added),
            removed=list(p.plan.removed),
            derived=derived,
            duration_s=round(duration_s, 6),
        )
        return PatchResult(
            p.name,
            version.id,
            previous.id,
            p.plan.changed,
            p.plan.added,
            p.plan.removed,
            duration_s,
            tuple(derived),
        )

    def _record_rejection(self, exc: PatchRejected) -> None:
        sha = self._attempted.pop(exc.module, None)
        record = self._histories.get(exc.module)
        if record is None and exc.stage != "load":
            # The module is live: start its record (a file holding the refused source is not
            # taken as the baseline).
            record = self._ensure_history(exc.module, unless_sha=sha)
        log.warning("patch.rejected", **exc.details())
        if record is None:
            return
        record.add_rejected(sha, exc.stage, str(exc))


@dataclass
class _ChangeSetContext:
    """What the modules of one change set share while they are prepared, in order."""

    candidates: dict[str, types.ModuleType] = field(default_factory=dict)
    remap: IdentityMap = field(default_factory=IdentityMap)
    changes: dict[str, ModuleChange] = field(default_factory=dict)


class _HolderImports(NamedTuple):
    """What a holder module's file imports, as far as it was read (``Engine._holder_history``)."""

    state: tuple[int, object]  # id of the module, its file's state (``file_key``)
    named: frozenset[str] | None  # every module its imports may name (None: unknown)
    absent: frozenset[str]  # top-level packages none of its imports can name

    def excludes(self, changed: Iterable[str], tops: set[str]) -> bool:
        """Whether the file imports none of the modules ``changed`` (``tops``: their top-level
        packages)."""
        if self.named is not None:
            return self.named.isdisjoint(changed)
        return tops <= self.absent


class _Compiled:
    """A module's new version compiled while ordering a change set (``_in_dependency_order``)."""

    __slots__ = ("code", "source")

    def __init__(self, source: Source, code: ModuleCode) -> None:
        self.source = source
        self.code = code


@dataclass
class _Prepared:
    module: types.ModuleType
    source: Source
    plan: Plan | None
    live_entry: Entry
    candidate: Candidate | None
    undo: ChangeSet | None = None
    registrations: Registrations = field(default_factory=Registrations)  # undone after execute
    remap: IdentityMap = field(default_factory=IdentityMap)
    # the candidate modules of the whole change set, by name (shared, as ``remap`` is)
    candidates: dict[str, types.ModuleType] = field(default_factory=dict)
    registered: Registrations = field(default_factory=Registrations)  # redone after commit
    derived_from: str | None = None  # re-derived (source unchanged) because this module changed
    forced: frozenset[str] = frozenset()  # names taken from the candidate whatever the statements

    @property
    def name(self) -> str:
        return self.module.__name__

    def noop_result(self, duration_s: float) -> PatchResult:
        vid = self.live_entry.version.id
        return PatchResult(self.name, vid, vid, (), (), (), duration_s)


@dataclass(frozen=True)
class PreparedModule:
    """One module of a ``PreparedChange``: the planned assignments and what they replace."""

    name: str
    module: types.ModuleType
    version: str
    previous: str
    sha256: str
    changeset: ChangeSet
    replaced_codes: frozenset[types.CodeType]
    changed: tuple[str, ...]
    added: tuple[str, ...]


class PreparedChange:
    """A change guarded and planned by ``Engine.prepare``, not committed."""

    def __init__(self, names: tuple[str, ...], prepared: list[_Prepared], todo: list[_Prepared]):
        self.names = names
        self._prepared = prepared
        self._todo = todo
        self.modules = tuple(
            PreparedModule(
                p.name,
                p.module,
                version_id(p.source.sha256),
                p.live_entry.version.id,
                p.source.sha256,
                p.plan.changeset,
                p.plan.replaced_codes,
                p.plan.changed,
                p.plan.added,
            )
            for p in todo
            if p.plan is not None
        )


@dataclass(frozen=True)
class _TrialCommit:
    """What ``commit_prepared`` adds to a commit: the dispatch to take off, and the states a
    rollback of the committed version must restore (the functions' own, not the dispatch)."""

    restore: ChangeSet
    codes: frozenset[types.CodeType]
    originals: Mapping[int, FunctionState]

    def undo_to_originals(self, undo: ChangeSet) -> ChangeSet:
        return ChangeSet(
            tuple(
                SetFunction(a.func, self.originals[id(a.func)])
                if isinstance(a, SetFunction) and id(a.func) in self.originals
                else a
                for a in undo.assignments
            )
        )


def _code_holders(todo: list[_Prepared], earlier: list[types.ModuleType]) -> list[object]:
    """What refers to the codes a commit takes out of service and runs nothing, besides the
    live functions (``safepoint.suspended_inside``): each plan's set of them, the definitions
    replaced, the statement code kept for the old and the new version (``pieces``: run only
    while a candidate is built), and every function of the change set's candidates and of
    ``earlier`` ones not collected yet (a candidate's function may have been given the live
    code; a function runs nothing by being there, only a frame does)."""
    holders: list[object] = []
    candidates = {id(module): module for module in earlier}
    # a code taken out of service is counted as one already (``suspended_inside``'s ``codes``)
    replaced = frozenset().union(*(p.plan.replaced_codes for p in todo if p.plan is not None))
    for p in todo:
        if p.plan is not None:
            holders.append(p.plan.replaced_codes)
            for _, old, _ in p.plan.replaced_definitions:
                holders.extend(functions_of(old))
        for source in (p.live_entry.source, p.source):  # statement code kept for the next version
            if source is not None:
                holders.extend(c for c in piece_codes(source.pieces) if c not in replaced)
        if p.candidate is not None:
            candidates[id(p.candidate.module)] = p.candidate.module
        candidates.update((id(module), module) for module in p.candidates.values())
    for module in candidates.values():
        holders.extend(_functions_in(module.__dict__))
    return holders


def _functions_in(namespace: dict[str, object]) -> list[types.FunctionType]:
    """The functions of a module's namespace and of the classes it defines, nested ones too."""
    found: list[types.FunctionType] = []
    todo = list(namespace.values())
    classes: set[int] = set()
    name = namespace.get("__name__")
    while todo:
        value = todo.pop()
        if issubclass(type(value), type):  # not isinstance: a proxy's __class__ is its code
            if id(value) in classes:
                continue
            classes.add(id(value))
            members = dict(vars(value))
            if members.get("__module__") == name:
                todo.extend(members.values())
        else:
            found.extend(functions_of(value))
    return found


def _as_changes(
    changes: Mapping[str, SourceInput] | Iterable[str], method: str
) -> Mapping[str, SourceInput]:
    """``patch_many``/``check_many``'s argument as a mapping (names alone read their files)."""
    if isinstance(changes, str | bytes):
        single = method.removesuffix("_many")
        raise TypeError(
            f"{method}(changes) takes a mapping or an iterable of module names, not a "
            f"single {type(changes).__name__} (use {single}() for one module)"
        )
    if not isinstance(changes, Mapping):
        return dict.fromkeys(changes)
    return changes


def _rejection(
    candidate: Candidate | None,
    stage: Literal["execute", "verify", "health"],
    label: str,
    exc: BaseException,
) -> PatchRejected:
    assert candidate is not None
    reason = (
        str(exc)
        if isinstance(exc, DeadlineExceeded)
        else f"{label} raised {type(exc).__name__}: {exc}"
    )
    lineno = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == candidate.source.filename:
            lineno = tb.tb_lineno
        tb = tb.tb_next
    return PatchRejected(
        candidate.name, stage, reason, filename=candidate.source.filename, lineno=lineno
    )


def _raise_problems(name: str, plan: Plan, filename: str, where: str | None = None) -> None:
    if not plan.problems:
        return
    # A problem that needs a restart comes first: allow_removals=True would not lift it.
    first = min(plan.problems, key=lambda problem: problem.policy)
    more = f" (and {len(plan.problems) - 1} more)" if len(plan.problems) > 1 else ""
    prefix = f"{where} (re-derived): " if where and where != name else ""
    message = prefix + first.message + more
    if first.policy:
        message = (
            f"compatibility policy, not a restart: {message}; the same callers would break "
            "after a restart (pass allow_removals=True to apply it)"
        )
    raise PatchRejected(name, "compatibility", message, filename=filename, lineno=first.lineno)


def _raise_derivation(name: str, derivation: Derivation, filename: str, where: str) -> None:
    if derivation.refusal is None:
        return
    lineno, reason = derivation.refusal
    prefix = "" if where == name else f"{where}: "
    raise PatchRejected(
        name,
        "compatibility",
        f"needs a restart: {prefix}{reason}; hotpatch cannot redo that in place",
        filename=filename,
        lineno=lineno,
    )


def _baseline_source(module: types.ModuleType, max_bytes: int) -> Source | None:
    """The module's file as it is now, taken as the version that was imported."""
    filename = getattr(module, "__file__", None)
    if not filename:
        return None
    try:
        data = Path(filename).read_bytes()
        if len(data) > max_bytes:
            return None
        text = decode_source(module.__name__, data, filename, max_bytes=max_bytes)
    except (OSError, HotpatchError):
        return None
    return source_from_text(module.__name__, text, filename)


def _cache_lines(source: Source | None) -> None:
    """Tracebacks through the live code show the live version's lines, saved to disk or not.

    The lines are those ``linecache`` reads from a file: split at newlines alone (``\\n``,
    ``\\r\\n``, ``\\r``), as the compiler counts them. ``str.splitlines`` also splits at a
    form feed (a page break in a comment), ``\\x1c``-``\\x1e``, ``\\x85``, ``\\u2028`` and
    ``\\u2029``: every line after one would be shown for the line above it.
    """
    if source is None:
        return
    text = source.text
    lines = text.splitlines(keepends=True)  # in C; right unless it split at another break:
    if len(lines) != text.count("\n") + (not text.endswith("\n") and bool(text)):
        lines = io.StringIO(text, newline=None).readlines()  # universal newlines, as a file
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"  # as linecache does
    linecache.cache[source.filename] = (len(text), None, lines, source.filename)


_default_engine: Engine | None = None
_default_lock = threading.Lock()


def default_engine() -> Engine:
    """The engine the module-level functions use, made on first use."""
    global _default_engine
    with _default_lock:
        if _default_engine is None:
            _default_engine = Engine()
        return _default_engine


def patch(
    module: str,
    *,
    source: SourceInput = None,
    allow_removals: bool = False,
    safepoint_timeout_s: float | None = None,
) -> PatchResult:
    """Verify and apply a new version of ``module`` in place (see ``Engine.patch_many``).

    Args:
        module: the name of an imported module, e.g. ``"pkg.mod"``.
        source: the new source text or bytes; ``None`` reads the module's file again.
        allow_removals: lift the compatibility policy (a public name removed, a signature
            that refuses calls the old one took) instead of refusing at ``compatibility``.
        safepoint_timeout_s: how long to wait for threads to leave the replaced code.

    Returns:
        What changed: ``PatchResult``.

    Raises:
        PatchRejected: refused or rolled back; the live module is exactly as before.
    """
    return default_engine().patch(
        module,
        source=source,
        allow_removals=allow_removals,
        safepoint_timeout_s=safepoint_timeout_s,
    )


def patch_many(
    changes: Mapping[str, SourceInput] | Iterable[str],
    *,
    allow_removals: bool = False,
    safepoint_timeout_s: float | None = None,
) -> list[PatchResult]:
    """Apply several modules' new versions as one change: all or none (``Engine.patch_many``)."""
    return default_engine().patch_many(
        changes, allow_removals=allow_removals, safepoint_timeout_s=safepoint_timeout_s
    )


def rollback(module: str, *, to: str | None = None) -> Version:
    """Restore the previous version of ``module``, or version ``to`` (``Engine.rollback``)."""
    return default_engine().rollback(module, to=to)


def history(module: str) -> list[Version]:
    """The versions of ``module``, newest first (``Engine.history``)."""
    return default_engine().history(module)


def verifier(module: str | None = None) -> Callable[[F], F]:
    """Decorator: ``fn(candidate_module)`` must not raise for a patch to go ahead."""
    return default_engine().verifier(module)


def health_check(module: str | None = None) -> Callable[[F], F]:
    """Decorator: ``fn()`` runs after each commit; raising rolls the patch back."""
    return default_engine().health_check(module)


def track(*modules: str) -> None:
    """Record the current source of ``modules`` as their baseline (``Engine.track``)."""
    default_engine().track(*modules)
