"""File path -> names of the imported modules loaded from it, and the order to patch them in.

``ModuleIndex`` maps the source files of imported modules under the watched roots to module names
(a script run as ``__main__`` maps to ``"__main__"``; a file imported under two names maps to both).
It is refreshed from a snapshot of ``sys.modules`` and resolves each module's file once.
``dependency_order`` sorts changed modules so that a module comes after the ones it imports.
Neither touches threads; only ``ModuleIndex.refresh`` reads the disk (to resolve symbolic links).
"""

from __future__ import annotations

import ast
import os
import sys
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hotpatch.engine.statements import StatementIndex


def normalize(path: str) -> str:
    """The canonical spelling of ``path``: absolute, symbolic links resolved, case-normalized."""
    return os.path.normcase(os.path.realpath(path))


def is_under(path: str, roots: Iterable[str]) -> bool:
    """Whether the normalized ``path`` is one of, or inside one of, the normalized ``roots``."""
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


@dataclass
class ModuleIndex:
    """Which imported modules each source file under ``roots`` holds.

    Args:
        roots: normalized directories and files; modules loaded from elsewhere are left out.
    """

    roots: tuple[str, ...]
    _by_path: dict[str, set[str]] = field(default_factory=dict)
    _seen: dict[str, tuple[Callable[[], object], str | None]] = field(default_factory=dict)

    def refresh(self, modules: Mapping[str, object]) -> list[str]:
        """Bring the index up to date with ``modules`` (a copy of ``sys.modules``).

        Returns:
            The names of modules under the roots that are new to the index (or were re-imported
            as a new module object), sorted.
        """
        fresh: list[str] = []
        for name in [n for n in self._seen if n not in modules]:
            self._forget(name)
        for name, module in modules.items():
            known = self._seen.get(name)
            if known is not None and known[0]() is module:
                continue
            if known is not None:
                self._forget(name)
            path = self._source_path(module)
            self._seen[name] = (_reference(module), path)
            if path is not None:
                self._by_path.setdefault(path, set()).add(name)
                fresh.append(name)
        return sorted(fresh)

    def modules_for(self, path: str) -> tuple[str, ...]:
        """The names of the modules loaded from the normalized ``path``, sorted."""
        return tuple(sorted(self._by_path.get(path, ())))

    def path_of(self, name: str) -> str | None:
        known = self._seen.get(name)
        return known[1] if known else None

    def names(self) -> list[str]:
        """Every indexed module under the roots, sorted."""
        return sorted(n for names in self._by_path.values() for n in names)

    def _forget(self, name: str) -> None:
        _, path = self._seen.pop(name)
        if path is not None:
            names = self._by_path.get(path, set())
            names.discard(name)
            if not names:
                self._by_path.pop(path, None)

    def _source_path(self, module: object) -> str | None:
        filename = getattr(module, "__file__", None)
        if not isinstance(filename, str) or not filename.endswith(".py"):
            return None
        path = normalize(filename)
        return path if is_under(path, self.roots) else None


def _reference(value: object) -> Callable[[], object]:
    """A weak reference when possible, so a re-imported module is never taken for the old one."""
    try:
        return weakref.ref(value)
    except TypeError:  # not weak-referenceable: any object may sit in sys.modules
        return lambda: value


def imported_modules(text: str, *, package: str) -> set[str]:
    """Absolute names of the modules ``text`` may import (``from p import x`` gives p and p.x).

    Args:
        text: Python source; a source that does not parse imports nothing.
        package: the module's ``__package__``, to resolve relative imports.
    """
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return set()
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                found.update(".".join(parts[: i + 1]) for i in range(len(parts)))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module, node.level, package)
            if base is None:
                continue
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def executed_imports(index: StatementIndex, *, package: str) -> set[str]:
    """``imported_modules`` read off a statement index: the modules the module's top-level
    statements import when it is executed (imports inside function bodies run later, and do not
    order a change set). Costs nothing more than the index, which compiling builds anyway."""
    found: set[str] = set()
    for unit in index.units:
        for ref in unit.reads.imports:
            if not ref.is_from:
                parts = ref.name.split(".")
                found.update(".".join(parts[: i + 1]) for i in range(len(parts)))
                continue
            base = _resolve(ref.module, ref.level, package)
            if base is None:
                continue
            found.add(base)
            if ref.name != "*":
                found.add(f"{base}.{ref.name}")
    return found


def _resolve(module: str | None, level: int, package: str) -> str | None:
    if level == 0:
        return module
    parts = package.split(".") if package else []
    if level - 1 > len(parts) or (level - 1 == len(parts) and not module):
        return None  # beyond the top-level package: the import itself would fail
    base = parts[: len(parts) - (level - 1)]
    if module:
        base.append(module)
    return ".".join(base) or None


def package_of(name: str) -> str:
    """The ``__package__`` of live module ``name`` (what its relative imports resolve against)."""
    module = sys.modules.get(name)
    package = getattr(module, "__package__", None)
    return package if isinstance(package, str) else name.rpartition(".")[0]


def in_dependency_order(sources: Mapping[str, str]) -> list[str]:
    """Live module names (name -> new source text), each after the ones of them it imports."""
    return dependency_order(
        {name: imported_modules(text, package=package_of(name)) for name, text in sources.items()}
    )


def dependency_order(imports: Mapping[str, set[str]]) -> list[str]:
    """Sort module names so that each comes after the modules it imports (among those given).

    Args:
        imports: module name -> the names it imports (``imported_modules``).

    Returns:
        Every key of ``imports``; ties and import cycles resolve by name, so the order is stable.
    """
    pending = {
        name: {d for d in deps if d in imports and d != name} for name, deps in imports.items()
    }
    order: list[str] = []
    while pending:
        ready = sorted(name for name, deps in pending.items() if not deps)
        if not ready:
            ready = [min(pending)]  # a cycle: break it at the first name
        for name in ready:
            del pending[name]
            order.append(name)
        for deps in pending.values():
            deps.difference_update(ready)
    return order
