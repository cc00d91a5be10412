"""Which names each statement binds, so that unchanged statements keep their live values.

A commit keeps the live object of every module-level (or class-level) name whose assigning statement
did not change between the live version and the new one: a cache dict keeps its contents, a Flask app
stays the same object. A name whose statement changed takes the new value. This module is pure logic:
it reads two parsed sources and answers "did the statement that binds this name change?".
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_NESTED_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


@dataclass(frozen=True)
class StatementIndex:
    """For each scope ("" for the module, "A" or "A.B" for class bodies): the names it binds.

    ``texts[scope][name]`` holds the text of every plain statement (not a ``def`` or ``class``)
    that binds ``name``, with trailing white space dropped; ``bound[scope]`` every bound name.
    """

    texts: dict[str, dict[str, tuple[str, ...]]]
    bound: dict[str, frozenset[str]]

    @classmethod
    def build(cls, tree: ast.Module, text: str) -> StatementIndex:
        lines = text.splitlines()
        texts: dict[str, dict[str, tuple[str, ...]]] = {}
        bound: dict[str, frozenset[str]] = {}
        _index_body(tree.body, "", lines, texts, bound)
        return cls(texts, bound)

    def statement_changed(self, new: StatementIndex, scope: str, name: str) -> bool:
        """Whether the plain statements binding ``name`` in ``scope`` differ in ``new``."""
        old_texts = self.texts.get(scope, {}).get(name)
        new_texts = new.texts.get(scope, {}).get(name)
        return old_texts != new_texts

    def binds(self, scope: str, name: str) -> bool:
        return name in self.bound.get(scope, frozenset())


def _index_body(
    body: list[ast.stmt],
    scope: str,
    lines: list[str],
    texts: dict[str, dict[str, tuple[str, ...]]],
    bound: dict[str, frozenset[str]],
) -> None:
    scope_texts: dict[str, tuple[str, ...]] = {}
    names: set[str] = set()
    for stmt in body:
        if isinstance(stmt, _DEFS):
            names.add(stmt.name)
            if isinstance(stmt, ast.ClassDef):
                _index_body(
                    stmt.body, f"{scope}.{stmt.name}" if scope else stmt.name, lines, texts, bound
                )
            continue
        stmt_names = bound_names(stmt)
        if not stmt_names:
            continue
        segment = "\n".join(
            line.rstrip() for line in lines[stmt.lineno - 1 : (stmt.end_lineno or stmt.lineno)]
        )
        names.update(stmt_names)
        for name in stmt_names:
            scope_texts[name] = (*scope_texts.get(name, ()), segment)
    texts[scope] = scope_texts
    bound[scope] = frozenset(names)


def bound_names(stmt: ast.stmt) -> set[str]:
    """Names a statement binds in its own scope (not inside nested functions or classes)."""
    found: set[str] = set()
    todo: list[ast.AST] = [stmt]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
            found.add(node.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                if alias.name != "*":
                    found.add(alias.asname or alias.name.partition(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            found.add(node.name)
        elif isinstance(node, _DEFS) and node is not stmt:
            found.add(node.name)
            continue
        type_alias = getattr(ast, "TypeAlias", None)
        if type_alias is not None and isinstance(node, type_alias):
            found.add(node.name.id)
            continue
        if isinstance(node, (_NESTED_SCOPES, ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp)):
            continue
        todo.extend(ast.iter_child_nodes(node))
    return found
