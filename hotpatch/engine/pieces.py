"""Compile a module by the statement, taking the previous version's code for unchanged statements.

``importlib.reload`` is almost all ``compile`` (six: 10.5 of 10.9 ms), and so was the floor of a
patch: the candidate was the whole module compiled again for a one-line edit. Here each top-level
statement (statements sharing a line are one *piece*) is compiled on its own, a statement whose
text did not change takes the previous version's code (its line numbers shifted when it moved),
and the candidate runs the pieces in order in its namespace (``ModuleCode.run``).

The code must be the very code a restart compiles (every function and class body: the engine
compares code objects and installs them), and a statement compiled alone is not compiled as it
is in its module in two ways, both reads of the module's top-level symbol table by CPython's
compiler:

- from 3.11, ``name.attr(...)`` is a plain attribute load, not a method call, when an import
  anywhere at module level binds ``name`` (``is_import_originated``);
- from 3.12, ``super().attr`` is one instruction only when the module scope has no symbol
  ``super`` (``_safe_super = super``, ``unittest/mock.py``).

So each statement is compiled with those of the module's import-bound names that it mentions
(and ``super`` when the module has that symbol) declared in dead code after it (``if 0: import
a, b; super``: the symbol table sees them, no instruction is emitted), and with the module's
future flags; a statement is compiled again when any of that changed for it. 3.13 keeps a
class's first line in a constant (``__firstlineno__``) that a shift does not change: a statement
that may hold a class is compiled at its own lines there and compiled again when it moves.

A class statement that changed is compiled with the bodies of its unchanged methods left out,
and takes their code from the previous version (``_hollowed``): a method's body is a constant of
the class body, which builds the function from the header alone (not on 3.13, whose class body
also lists the attributes its methods assign).

The module-level code differs from a whole compile only where nothing compares it: each piece
ends in its own ``return`` (a tracer sees one more line event), a non-first statement that is a
bare string is compiled after a ``0`` on the line before it (alone it would be a docstring),
``__annotations__`` is set up before the first piece when any piece sets it up (a whole compile
does it at the module's start), and equal constants of two statements are two objects.

The module is compiled whole, as before, when this cannot be shown to give the same code or the
same error: a module-level ``global`` statement or a ``__future__`` import after other
statements (errors only the whole module has), any statement that does not compile (the whole
compile gives the error a restart would), a Python outside 3.10 to 3.13.
``benchmarks/bench_pieces.py`` measured it on real releases; the unit tests compare every piece
with a whole compile.
"""

from __future__ import annotations
import __future__

import ast
import dis
import re
import symtable
import sys
import types
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from hotpatch.engine.alignment import split_lines
from hotpatch.engine.compare import nested_codes
from hotpatch.engine.statements import Unit

_FUTURE_MASK = 0
for _feature in __future__.all_feature_names:
    _FUTURE_MASK |= getattr(__future__, _feature).compiler_flag
_SETUP_ANNOTATIONS = dis.opmap["SETUP_ANNOTATIONS"]
_CLASS_LINE_CONST = sys.version_info >= (3, 13)
_LONG = 20_000  # characters
SUPPORTED = (3, 10) <= sys.version_info[:2] <= (3, 13)


class Facts(NamedTuple):
    """What a statement's text declares to the module's symbol table, found once per text."""

    imports: frozenset[str]  # names an import in it binds at module level
    super_symbol: bool  # it gives the module scope a symbol ``super``
    module_global: bool  # a ``global`` statement at module level
    future: bool  # it names ``__future__``


class Piece(NamedTuple):
    """One statement's code, what its text declares, and what it was compiled with."""

    first: int  # its first line
    code: types.CodeType
    facts: Facts
    flags: int  # the module's future flags
    imported: frozenset[str]  # the names an import bound at module level when it was compiled
    reads: frozenset[str]  # the global names its code reads (the code inside it too)
    with_super: bool  # compiled with the module's symbol ``super``
    padded: bool  # compiled at its own lines (3.13, a class): compiled again when moved
    leading: bool  # compiled as the module's first statement (a bare string is its docstring)
    annotations: bool  # its code sets up ``__annotations__`` first
    # A class statement: its header's text and, for each method ``_hollowed`` can leave out,
    # (its text, its first line counted from the statement's): what the next version of the
    # class takes the methods' code from.
    header: str = ""
    methods: tuple[tuple[str, int], ...] = ()


Pieces = Mapping[str, Piece]  # by statement text


@dataclass(frozen=True)
class ModuleCode:
    """A module body's code: one code object compiled whole, or one per top-level statement."""

    codes: tuple[types.CodeType, ...]
    annotations: bool = False  # set up ``__annotations__`` first, as a whole compile does
    pieces: Pieces | None = None  # when compiled by the statement: for the next version
    # The previous version's code, statement for statement: the text differs from it in
    # comments only (``comments``), so the version changes nothing that runs.
    unchanged: bool = False

    def run(self, namespace: dict[str, object]) -> None:
        """Execute the module body in ``namespace``, as ``exec`` of a whole compile would."""
        if self.annotations and "__annotations__" not in namespace:
            namespace["__annotations__"] = {}
        for code in self.codes:
            exec(code, namespace)


def compile_whole(text: str, filename: str) -> ModuleCode:
    return ModuleCode((compile(text, filename, "exec", dont_inherit=True),))


def compile_module(
    text: str,
    filename: str,
    units: Sequence[Unit],
    previous: Pieces | None,
    *,
    lines: list[str] | None = None,
) -> ModuleCode:
    """``text``'s code, by the statement (``units``: its statement index) where that gives the
    same code as a whole compile, reusing ``previous``'s pieces; else compiled whole.
    ``lines``: ``split_lines(text)``, when the caller has it.

    Raises what ``compile`` of the whole text raises (``SyntaxError``...).
    """
    if SUPPORTED and units:
        try:
            made = _by_statement(
                text, filename, units, previous or {}, split_lines(text) if lines is None else lines
            )
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            made = None  # the whole compile below gives the error a restart would
        if made is not None:
            return made
    return compile_whole(text, filename)


def _by_statement(
    text: str, filename: str, units: Sequence[Unit], previous: Pieces, lines: list[str]
) -> ModuleCode | None:
    spans = statement_spans(units)
    bodies = ["\n".join(lines[first - 1 : last]) for first, last in spans]
    classes = _class_units(units, spans)
    known = [previous.get(body) for body in bodies]
    facts = [
        piece.facts if piece is not None else _facts(body, filename)
        for body, piece in zip(bodies, known)
    ]
    if any(f.module_global for f in facts):
        return None
    flags = 0
    for k, f in enumerate(facts):
        if not f.future:
            continue
        if any(
            not (g.future or (j == 0 and _is_string(bodies[0]))) for j, g in enumerate(facts[:k])
        ):
            return None  # a __future__ import after other statements: the whole compile's error
        flags |= compile(bodies[k], filename, "exec", dont_inherit=True).co_flags & _FUTURE_MASK
    context = _Context(
        filename,
        flags,
        frozenset().union(*(f.imports for f in facts)),
        any(f.super_symbol for f in facts),
    )
    codes: list[types.CodeType] = []
    pieces: dict[str, Piece] = {}
    by_header: dict[str, Piece] | None = None
    for k, ((first, _), body, old) in enumerate(zip(spans, bodies, known)):
        with_super = context.super_symbol and "super" in body
        if (
            old is not None
            and old.code.co_filename == filename  # the code names its file (tracebacks)
            and old.flags == flags
            and _imports_alike(old.reads, old.imported, context.imported)
            and old.with_super == with_super
            and old.leading == (k == 0)
            and (old.first == first or not old.padded)
        ):
            piece = old._replace(first=first, code=_shifted(old.code, first - old.first))
        else:
            cls = classes.get(k)
            hollow = None
            if cls is not None:
                header, methods = _class_layout(cls, lines)
                if by_header is None:
                    by_header = {p.header: p for p in previous.values() if p.methods}
                old_class = by_header.get(header)
                if old_class is not None:
                    hollow = _hollowed(
                        cls, methods, lines, old_class, context=context, with_super=with_super
                    )
            piece = _compiled(
                body, first, k, facts[k], context, with_super=with_super, hollow=hollow
            )
            if cls is not None:
                piece = piece._replace(header=header, methods=methods)
        codes.append(piece.code)
        pieces[body] = piece
    return ModuleCode(tuple(codes), any(p.annotations for p in pieces.values()), pieces)


def statement_spans(units: Sequence[Unit]) -> list[list[int]]:
    """The pieces' lines, ``[first, last]``: each statement's, statements sharing a line one."""
    spans: list[list[int]] = []
    for unit in units:
        if spans and unit.start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], unit.end)  # statements sharing a line
        else:
            spans.append([unit.start, unit.end])
    return spans


class _Context(NamedTuple):
    """What every statement of one version is compiled with."""

    filename: str
    flags: int  # the module's future flags
    imported: frozenset[str]  # names an import binds at module level
    super_symbol: bool  # the module scope has a symbol ``super``


def _compiled(
    body: str,
    first: int,
    k: int,
    facts: Facts,
    context: _Context,
    *,
    with_super: bool,
    hollow: _Hollow | None = None,
) -> Piece:
    """Compile one statement at its lines, with its share of the module's symbol table
    (``hollow``: a class statement's text with the bodies of methods known from its previous
    version left out, and their code)."""
    # The import-bound names it mentions (⊇ those it reads; one more is harmless: the module
    # binds it by an import anyway). A long statement (a data table) gets them all: looking
    # costs more than the dead code does.
    if len(body) > _LONG:
        mentioned: Collection[str] = context.imported
    else:
        mentioned = [name for name in context.imported if name in body]
    dead = [f"import {', '.join(sorted(mentioned))}"] if mentioned else []
    if with_super:
        dead.append("super")
    padded = _CLASS_LINE_CONST and "class" in body
    code = None
    if hollow is not None:
        compiled = _compile_at(hollow.text + _dead_code(dead), context, first, padded)
        code = _filled(compiled, hollow)
    source = body + _dead_code(dead)
    if code is None:
        code = _compile_at(source, context, first, padded)
    if k and "__doc__" in code.co_names and _is_string(body):
        # A bare string that is not the module's first statement: alone it would be taken as
        # the module's docstring. After a ``0`` on the line before, it is an expression.
        code = _compile_at(source, context, first, padded, after_zero=True)
    return Piece(
        first,
        code,
        facts,
        context.flags,
        context.imported,
        _read_names(code),
        with_super,
        padded,
        k == 0,
        _SETUP_ANNOTATIONS in code.co_code[::2],
    )


def _dead_code(dead: list[str]) -> str:
    return f"\nif 0: {'; '.join(dead)}\n" if dead else "\n"


def _compile_at(
    source: str, context: _Context, first: int, padded: bool, *, after_zero: bool = False
) -> types.CodeType:
    line = first - 1 if after_zero else first  # where the compiled text starts
    text = ("0\n" if after_zero else "") + source
    padding = "\n" * (line - 1) if padded else ""
    code = compile(padding + text, context.filename, "exec", flags=context.flags, dont_inherit=True)
    return code if padded else _shifted(code, line - 1)


class _Hollow(NamedTuple):
    """A class statement's text with the bodies of some methods left out, and their code."""

    text: str
    name: str  # the class's
    codes: dict[tuple[int, str], types.CodeType]  # by (first line, name), at their lines now


def _class_units(units: Sequence[Unit], spans: list[list[int]]) -> dict[int, Unit]:
    """The pieces (by number) that are one class statement with a body on lines of its own:
    those whose methods ``_hollowed`` may take from the previous version (not on 3.13, where a
    class body also holds the attributes its methods assign, ``__static_attributes__``)."""
    if _CLASS_LINE_CONST:
        return {}
    found: dict[int, Unit] = {}
    k = 0
    for unit in units:
        while spans[k][1] < unit.start:
            k += 1
        if unit.body_start is not None and spans[k] == [unit.start, unit.end]:
            found[k] = unit
    return found


def _class_layout(unit: Unit, lines: list[str]) -> tuple[str, tuple[tuple[str, int], ...]]:
    """``Piece.header`` and ``Piece.methods`` of a class statement."""
    start = unit.start
    return "\n".join(lines[start - 1 : start + unit.parts[0].last]), tuple(
        ("\n".join(lines[start + p.first - 1 : start + p.last]), p.first)
        for p in unit.parts[1:]
        if p.hollow is not None
    )


def _hollowed(
    unit: Unit,
    methods: tuple[tuple[str, int], ...],
    lines: list[str],
    old: Piece,
    *,
    context: _Context,
    with_super: bool,
) -> _Hollow | None:
    """The class statement ``unit`` (its ``methods``: ``_class_layout``) with the body of each
    method whose text is as in ``old``, the previous version of the class (the piece with the
    same header), replaced by an expression that ends where the body ended, and those methods'
    previous code (lines shifted).

    A method's body is its own code object: the class body holds it as a constant, and builds
    the function from the header alone (decorators, defaults, annotations, at the header's
    lines; positions end where the def ends). What a body gives the class besides is the
    ``__class__`` cell (``super()``): the expression names ``__class__`` when the method's code
    does. The code is taken only when it was compiled as it would be now: same file, future
    flags, ``super`` symbol, and import-bound names among those it reads (``_by_statement``'s
    rules); a method with other free variables (3.12's type parameters) is compiled in full.
    """
    start = unit.start
    if (
        old.code.co_filename != context.filename
        or old.flags != context.flags
        or old.with_super != with_super
        or old.padded
    ):
        return None
    name = unit.parts[0].bound[0][1]
    body = _class_body(old.code, name)
    if body is None:
        return None
    old_codes: dict[tuple[int, str], types.CodeType | None] = {}
    for const in body.co_consts:
        if isinstance(const, types.CodeType):
            key = (const.co_firstlineno, const.co_name)
            old_codes[key] = None if key in old_codes else const  # two alike: neither
    was_at = {text: old.first + first for text, first in old.methods}
    text = lines[start - 1 : unit.end]
    codes: dict[tuple[int, str], types.CodeType] = {}
    parts = [p for p in unit.parts[1:] if p.hollow is not None]  # as ``methods``
    for part, (method, _) in zip(parts, methods, strict=True):
        if part.hollow is None or len(part.bound) != 1:  # (the first: for the type checker)
            continue
        first, last = start + part.first, start + part.last
        was = was_at.get(method)
        code = None if was is None else old_codes.get((was, part.bound[0][1]))
        if was is None or code is None or not set(code.co_freevars) <= {"__class__"}:
            continue
        if old.imported != context.imported and not _imports_alike(
            _read_names(code), old.imported, context.imported
        ):
            continue  # (the names it reads looked for only when the imports changed)
        offset, end = part.hollow
        stub = _stub(lines[first + offset - 1], last - first - offset, end, code.co_freevars)
        if stub is None:
            continue
        text[first + offset - start : last - start + 1] = stub
        codes[first, code.co_name] = _shifted(code, first - was)
    if not codes:
        return None
    return _Hollow("\n".join(text), name, codes)


def _stub(line: str, below: int, end: int, free: tuple[str, ...]) -> list[str] | None:
    """The lines of an expression statement that replaces a method body: it begins where the
    body began (at the start of ``line``, after its indentation), spans ``below`` more lines and
    ends at column ``end`` (in bytes, as the syntax tree counts) of its last, naming
    ``__class__`` when the body's code has that free variable; ``None`` if none fits."""
    indent = line[: len(line) - len(line.lstrip(" \t\f"))]
    opening = "(__class__" if free else "("
    if below:
        return [indent + opening, *([""] * (below - 1)), " " * (end - 1) + ")"]
    width = end - len(indent)
    if free:
        return [indent + opening + " " * (width - 11) + ")"] if width >= 11 else None
    if width < 1:
        return None
    return [indent + ("0" if width == 1 else "(" + " " * (width - 2) + ")")]


def _class_body(code: types.CodeType, name: str) -> types.CodeType | None:
    """The body code of class ``name`` that a class statement's ``code`` holds, if just one."""
    found = [c for c in code.co_consts if isinstance(c, types.CodeType) and c.co_name == name]
    return found[0] if len(found) == 1 else None


def _filled(code: types.CodeType, hollow: _Hollow) -> types.CodeType | None:
    """``code``, compiled from ``hollow.text``, with the left-out methods' code put back in the
    class body; ``None`` if the class body is not laid out as expected."""
    body = _class_body(code, hollow.name)
    if body is None:
        return None
    consts = list(body.co_consts)
    put = 0
    for k, const in enumerate(consts):
        if not isinstance(const, types.CodeType):
            continue
        method = hollow.codes.get((const.co_firstlineno, const.co_name))
        if method is not None:
            if const.co_freevars != method.co_freevars:
                return None  # the class body would not give it the same closure
            consts[k] = method
            put += 1
    if put != len(hollow.codes):
        return None
    filled = body.replace(co_consts=tuple(consts))
    return code.replace(co_consts=tuple(filled if c is body else c for c in code.co_consts))


_DEFINITION = ("def ", "async def ", "class ", "@")


def _facts(body: str, filename: str) -> Facts:
    if body.startswith(_DEFINITION):
        # A def or a class: an import in it binds in its own scope, a ``global`` in it is its
        # scope's. Only its decorators, bases, defaults and annotations are read in the module
        # scope: a ``super`` named there (never seen in practice) is not looked for; missed, it
        # would make methods compile with the optimised ``super()`` call a whole compile leaves
        # out (the same behaviour: the instruction checks at run time that it has the builtin).
        return Facts(frozenset(), False, False, False)
    imports: frozenset[str] = frozenset()
    super_symbol = False
    if "super" in body or ("import" in body and _IMPORT_STATEMENT.search(body)):
        table = symtable.symtable(body + "\n", filename, "exec")
        imports = frozenset(s.get_name() for s in table.get_symbols() if s.is_imported())
        super_symbol = "super" in table.get_identifiers()
    module_global = "global" in body and bool(_GLOBAL_STATEMENT.search(body))
    module_global = module_global and _has_module_global(body)
    return Facts(imports, super_symbol, module_global, "__future__" in body)


# Where a statement can begin: a line's start (after indentation), after ``;`` or ``:``. Text
# inside strings may match too: that only costs a closer look.
_IMPORT_STATEMENT = re.compile(r"(?:^|[;:])[ \t]*(?:import|from)[ \t\\(]", re.MULTILINE)
_GLOBAL_STATEMENT = re.compile(r"(?:^|[;:])[ \t]*global[ \t\\]", re.MULTILINE)


def _has_module_global(body: str) -> bool:
    todo: list[ast.AST] = list(ast.parse(body).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Global):
            return True
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt | ast.excepthandler) or type(child).__name__ == (
                "match_case"
            ):
                todo.append(child)
    return False


def _is_string(body: str) -> bool:
    """Whether the statement's first statement is a bare string (a docstring, were it first)."""
    stripped = body.lstrip()
    if not stripped or stripped[0] not in "\"'rRbBuUfF":
        return False
    try:
        tree = ast.parse(body)
    except SyntaxError:
        return False
    first = tree.body[0] if tree.body else None
    return (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    )


def _shifted(code: types.CodeType, delta: int) -> types.CodeType:
    """``code`` and the code it holds with every line number moved by ``delta``."""
    if not delta:
        return code
    if types.CodeType not in map(type, code.co_consts):  # no code inside (in C: a long table)
        return code.replace(co_firstlineno=code.co_firstlineno + delta)
    consts = tuple(
        _shifted(c, delta) if isinstance(c, types.CodeType) else c for c in code.co_consts
    )
    return code.replace(co_firstlineno=code.co_firstlineno + delta, co_consts=consts)


def _imports_alike(reads: frozenset[str], was: frozenset[str], now: frozenset[str]) -> bool:
    """Whether code that reads ``reads``, compiled when imports bound ``was`` at module level,
    compiles the same now that they bind ``now`` (3.11+: ``name.attr(...)`` compiles by whether
    an import binds ``name``)."""
    return was == now or reads & was == reads & now


def _read_names(code: types.CodeType) -> frozenset[str]:
    return frozenset(code.co_names).union(*(c.co_names for c in nested_codes(code)))


def piece_codes(pieces: Pieces | None) -> list[types.CodeType]:
    """The code objects the pieces hold that hold other code as constants: each statement's and
    the class and function bodies in it with code inside (what refers to a function's code
    besides the function, for ``safepoint.suspended_inside``'s count)."""
    return [
        code
        for piece in (pieces or {}).values()
        for code in (piece.code, *nested_codes(piece.code))
        if types.CodeType in map(type, code.co_consts)
    ]
