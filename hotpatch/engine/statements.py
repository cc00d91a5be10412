"""Which names each statement binds, so that unchanged statements keep their live values.

A commit keeps the live object of every module-level (or class-level) name whose assigning statement
did not change between the live version and the new one: a cache dict keeps its contents, a Flask app
stays the same object. A name whose statement changed takes the new value. This module is pure logic:
it reads two parsed sources and answers "did the statement that binds this name change?".

Each top-level statement also records what it does at import time (``Reads``: the names it reads,
calls, imports and changes), so that ``derived`` can tell which statements a restart would compute
differently after other names changed, without parsing the module again.
"""

from __future__ import annotations

import ast
import bisect
import gc
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import filterfalse

from hotpatch.engine.alignment import Aligned, aligned, line_hunks, split_lines
from hotpatch.engine.tables import blank_literal_rows

_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_NESTED_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


@dataclass(frozen=True)
class ImportRef:
    """One name an import statement binds: ``from module import name as asname`` or
    ``import name as asname`` (``is_from`` false; ``module`` is then ``None``)."""

    module: str | None
    level: int
    name: str
    asname: str | None
    is_from: bool


@dataclass(frozen=True)
class Reads:
    """What one top-level statement does at import time, for ``derived`` (see that module).

    ``names``: names it reads (outside function bodies: decorators, defaults, class bodies
    included); ``bare``: those read other than as ``name.attr``; ``attrs``: ``(name, attr)``
    pairs read; ``calls``: names it calls (``name(...)`` or ``name.attr(...)``); ``mutates``:
    names whose object it changes (``name.m(...)``, ``name[k] = v``, ``name.a = v``);
    ``effect``: a call whose effect is not an assignment (``print(...)``), if any.
    """

    kind: str = "plain"  # "def", "class" or "plain"
    names: frozenset[str] = frozenset()
    bare: frozenset[str] = frozenset()
    attrs: frozenset[tuple[str, str]] = frozenset()
    calls: frozenset[str] = frozenset()
    mutates: frozenset[str] = frozenset()
    effect: str | None = None
    imports: tuple[ImportRef, ...] = ()
    decorators: frozenset[str] = frozenset()  # names read by a def's or class's decorators
    # For a class: each plain statement of its body (nested classes too), as
    # ("Class.name" it binds, what it reads), so that only those reading changed names are redone.
    members: tuple[tuple[str, Reads], ...] = ()
    # For a def or class: the global names and ``name.attr`` pairs its function bodies read when
    # called, so that a function calling a changed one counts as changed too.
    body: frozenset[str] = frozenset()
    body_attrs: frozenset[tuple[str, str]] = frozenset()
    # A decorated def's or class's decorators and a def's signature (``ast.dump``), to tell
    # whether what a registering decorator read (``@app.get("/x")``, FastAPI: the parameters)
    # changed.
    decorated: str = ""


@dataclass(frozen=True, slots=True)
class Part:
    """A top-level class's header (decorators, bases, keywords) or one statement of its body,
    with its share of the class's index, so that an edit inside a method re-reads that method.

    ``first``/``last``: its lines, counted from the class's first line (0), so that a class moved
    by an edit above it keeps its parts as they are. ``reads`` holds this part's share of the
    class's ``Reads`` (names, calls, members, construction-method reads; the header's also
    decorators and ``decorated``).
    """

    first: int
    last: int
    texts: tuple[tuple[str, str, str], ...]
    bound: tuple[tuple[str, str], ...]
    reads: Reads
    # A ``def`` whose body begins a line of its own: (that line, counted from the part's first
    # line; the def's end column, in bytes), for ``pieces`` to compile the class with the body
    # of an unchanged method left out (``pieces._hollowed``). ``None`` for anything else.
    hollow: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Unit:
    """One top-level statement: its lines and what it binds, in the module and in class bodies.

    A class with a body on lines of its own also keeps its ``parts`` (header, then each body
    statement), from which its texts, bindings and reads are made.
    """

    start: int  # first line, 1-based, decorators included
    end: int  # last line
    texts: tuple[tuple[str, str, str], ...]  # (scope, name, statement text) of plain statements
    bound: tuple[tuple[str, str], ...]  # (scope, name) of every name bound
    reads: Reads = Reads()
    parts: tuple[Part, ...] = ()

    def shifted(self, delta: int) -> Unit:
        if not delta:
            return self
        return Unit(
            self.start + delta, self.end + delta, self.texts, self.bound, self.reads, self.parts
        )

    @property
    def body_start(self) -> int | None:
        """For a class whose body starts on a line after its header: that line."""
        if len(self.parts) < 2 or self.parts[1].first <= self.parts[0].last:
            return None
        return self.start + self.parts[1].first


@dataclass(frozen=True)
class StatementIndex:
    """For each scope ("" for the module, "A" or "A.B" for class bodies): the names it binds.

    ``texts[scope][name]`` holds the text of every plain statement (not a ``def`` or ``class``)
    that binds ``name``, with trailing white space dropped; ``bound[scope]`` every bound name.
    The index is kept per top-level statement (``units``), so that the index of a new version
    can be derived from the previous one by re-parsing only the statements an edit touched.
    """

    units: tuple[Unit, ...]
    texts: dict[str, dict[str, tuple[str, ...]]]
    bound: dict[str, frozenset[str]]

    @classmethod
    def build(cls, tree: ast.Module, text: str) -> StatementIndex:
        return cls.from_units(_units(tree.body, split_lines(text)))

    @classmethod
    def from_units(cls, units: list[Unit]) -> StatementIndex:
        texts: dict[str, dict[str, tuple[str, ...]]] = {"": {}}
        bound: dict[str, set[str]] = {"": set()}
        for unit in units:
            for scope, name in unit.bound:
                bound.setdefault(scope, set()).add(name)
            for scope, name, text in unit.texts:
                scope_texts = texts.setdefault(scope, {})
                scope_texts[name] = (*scope_texts.get(name, ()), text)
        return cls(tuple(units), texts, {k: frozenset(v) for k, v in bound.items()})

    def updated(
        self,
        old_text: str,
        new_text: str,
        *,
        keep: Callable[[ast.stmt], bool] | None = None,
        lined: Aligned | None = None,
    ) -> StatementIndex | None:
        """The index of ``new_text``, re-parsing only the statements that changed.

        The two texts are aligned line by line (``line_hunks``); each changed stretch is widened to the
        whole top-level statements it touches, and only those stretches are parsed again, in one
        ``ast.parse`` of ``new_text`` with every other line blanked (so line numbers come out
        right without ``ast.increment_lineno``, and no unchanged statement is re-read). A class
        whose changed lines all lie in its body has only the body statements they touch parsed
        again (``_rebuilt_class``): a method edited in a 500-line class costs that method. The
        other statements are the previous index's, shifted. ``None`` when a stretch does not
        parse on its own, or a statement it yields reaches beyond it (the caller parses the
        whole text). ``lined``: ``aligned(old_text, new_text)``, when the caller has it.
        """
        old, new, hunks = lined if lined is not None else aligned(old_text, new_text)
        plain, rebuilt = self._class_bodies_updated(hunks, old, new)
        if rebuilt:  # classes edited inside their bodies only: those statements alone re-read
            found = self._reparse_or_widen(plain, new, keep)
            classes = sorted(region for region, _ in rebuilt)
            los = [region[0] for region in classes]
            if found is None or any(_meets((r[0], r[1]), classes, los) for r in found[0]):
                found, rebuilt = None, []  # read the classes whole, as below
        if not rebuilt:
            found = self._reparse_or_widen(hunks, new, keep)
        if found is None:
            return None
        regions, body = found
        fresh_units = _units(body, new)
        if rebuilt:
            regions = sorted([*regions, *(region for region, _ in rebuilt)])
            fresh_units = sorted([*fresh_units, *(u for _, u in rebuilt)], key=lambda u: u.start)
        units: list[Unit] = []
        fresh = iter(fresh_units)
        pending = next(fresh, None)
        delta = 0
        old_units = iter(self.units)
        unit = next(old_units, None)
        for lo, hi, _, new_hi in [*regions, [sys.maxsize, sys.maxsize, 0, 0]]:
            while unit is not None and unit.end < lo:
                units.append(unit.shifted(delta))
                unit = next(old_units, None)
            while unit is not None and unit.start <= hi:
                unit = next(old_units, None)  # re-read below
            while pending is not None and pending.start <= new_hi:
                units.append(pending)
                pending = next(fresh, None)
            delta = new_hi - hi
        return StatementIndex.from_units(units)

    def _reparse_or_widen(
        self,
        hunks: list[tuple[int, int, int, int]],
        new: list[str],
        keep: Callable[[ast.stmt], bool] | None,
    ) -> tuple[list[list[int]], list[ast.stmt]] | None:
        # A stretch that does not parse alone usually continues a neighbouring statement (a method
        # added at the end of a class, a decorator put on a def, an ``else:``): widen to those.
        found = self._reparse(hunks, new, keep, widen=False)
        if found is None:
            found = self._reparse(hunks, new, keep, widen=True)
        return found

    def _class_bodies_updated(
        self, hunks: list[tuple[int, int, int, int]], old: list[str], new: list[str]
    ) -> tuple[list[tuple[int, int, int, int]], list[tuple[list[int], Unit]]]:
        """The hunks left to ``_reparse``, and the classes rebuilt from their parts: a class
        whose every changed line lies in its body gets only the body statements those lines
        touch parsed again (``_rebuilt_class``), as ``[old first, old last, new first, new last]``
        of the whole class and its new unit."""
        starts = [u.start for u in self.units]
        ends = [u.end for u in self.units]
        plain: list[tuple[int, int, int, int]] = []
        inside: dict[int, list[tuple[int, int, int, int]]] = {}
        whole: set[int] = set()  # classes that some hunk touches outside their bodies
        for hunk in hunks:
            first, last, new_first, new_last = hunk
            k, stop = bisect.bisect_left(ends, first), bisect.bisect_right(starts, last)
            near = range(k, stop) if stop > k else range(max(k - 1, 0), k)  # or the one before
            classes = [u for u in (self.units[j] for j in near) if u.body_start is not None]
            in_classes = sum(min(u.end, last) - max(u.start, first) + 1 for u in classes)
            if not classes or (stop > k and in_classes * 3 < last - first + 1):
                # No class, or mostly other statements (a module of functions with a few small
                # exception classes): aligning its lines costs more than the classes' re-parse
                # saves.
                plain.append(hunk)
                continue
            # A hunk over whole chunks (several statements, perhaps): align its lines to find
            # the lines that changed, and where each stretch of them lies.
            for a, b, c, d in line_hunks(old[first - 1 : last], new[new_first - 1 : new_last]):
                line_hunk = (a + first - 1, b + first - 1, c + new_first - 1, d + new_first - 1)
                lo, hi = line_hunk[0], line_hunk[1]
                if hi < lo:
                    lo, hi = hi, lo  # an insertion: the lines on both sides
                j, j_stop = bisect.bisect_left(ends, lo), bisect.bisect_right(starts, hi)
                if j == j_stop and j:  # between statements: perhaps added to the class before
                    j -= 1
                unit = self.units[j] if j_stop - j == 1 else None
                body = None if unit is None else unit.body_start
                where = "across"
                if unit is not None and body is not None:
                    where = _where(
                        line_hunk[0], line_hunk[1], (unit.start, unit.end), (body, unit.end)
                    )
                    if where == "after" and _appended(unit.end, line_hunk, old, new):
                        where = "body"  # methods added at the class's end
                if where == "body":
                    inside.setdefault(j, []).append(line_hunk)
                else:
                    plain.append(line_hunk)  # outside the classes, or across a header
                    if where == "across":
                        whole.update(range(j, j_stop))
        rebuilt: list[tuple[list[int], Unit]] = []
        for k, stretches in inside.items():
            made = None if k in whole else _rebuilt_class(self.units[k], stretches, old, new)
            if made is None:
                plain.extend(stretches)
            else:
                rebuilt.append(made)
        plain.sort()
        return plain, rebuilt

    def _reparse(
        self,
        hunks: list[tuple[int, int, int, int]],
        new: list[str],
        keep: Callable[[ast.stmt], bool] | None,
        *,
        widen: bool,
    ) -> tuple[list[list[int]], list[ast.stmt]] | None:
        """Parse the stretches of ``new`` that ``hunks`` touch, widened to whole statements.

        Returns the stretches, as ``[old lo, old hi, new lo, new hi]`` (1-based, inclusive), and
        the statements parsed in them, or ``None`` when that does not parse or a statement
        reaches beyond its stretch. ``widen`` adds the statements either side of each hunk.
        """
        starts = [u.start for u in self.units]
        ends = [u.end for u in self.units]  # in order too: the units do not overlap
        regions: list[list[int]] = []
        for first, last, new_first, new_last in hunks:
            touched = list(
                self.units[bisect.bisect_left(ends, first) : bisect.bisect_right(starts, last)]
            )
            if widen:
                before = bisect.bisect_left(starts, first) - 1
                after = bisect.bisect_right(starts, last)
                touched += [self.units[k] for k in (before, after) if 0 <= k < len(self.units)]
            _add_region(
                regions,
                min(u.start for u in touched) if touched else first,
                max(u.end for u in touched) if touched else last,
                (first, last, new_first, new_last),
            )
        if any(
            _joined(new, new_lo - 1) or _joined(new, new_hi) for _, _, new_lo, new_hi in regions
        ):
            return None  # a backslash joins a stretch to the line after it: parsed apart, a
            # blank line would end the statement that the real line continues
        pieces: list[str] = []
        line = 1
        for _, _, new_lo, new_hi in regions:
            pieces.append("\n" * (new_lo - line))
            stretch = new[new_lo - 1 : new_hi]
            # each line ended by a newline: joined with an empty last line (not concatenated:
            # a second copy of a 17,000-line table)
            pieces.append(blank_literal_rows("\n".join([*stretch, ""]) if stretch else ""))
            line = max(line, new_hi + 1)
        try:
            tree = parse("".join(pieces))
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return None
        body: list[ast.stmt] = []
        new_ends = [r[3] for r in regions]
        for stmt in tree.body:
            start = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", ())])
            end = stmt.end_lineno or stmt.lineno
            k = bisect.bisect_left(new_ends, start)  # the first stretch not over before it starts
            if k == len(regions) or not regions[k][2] <= start <= end <= regions[k][3]:
                return None  # one statement across two stretches: the blanked lines were in it
            if keep is None or keep(stmt):
                body.append(stmt)
        return regions, body

    def statement_changed(self, new: StatementIndex, scope: str, name: str) -> bool:
        """Whether the plain statements binding ``name`` in ``scope`` differ in ``new``."""
        old_texts = self.texts.get(scope, {}).get(name)
        new_texts = new.texts.get(scope, {}).get(name)
        return old_texts != new_texts

    def binds(self, scope: str, name: str) -> bool:
        return name in self.bound.get(scope, frozenset())


_BODY_HEADER = "class __hotpatch_body__:\n"


def _rebuilt_class(
    unit: Unit, hunks: list[tuple[int, int, int, int]], old: list[str], new: list[str]
) -> tuple[list[int], Unit] | None:
    """A top-level class whose changed lines (``hunks``, sorted) all lie in its body, rebuilt
    from its parts with only the body statements they touch parsed again: as
    ``([old first, old last, new first, new last], new unit)``, or ``None`` when that cannot be
    shown to read as the whole class would (the caller parses the class whole).

    Each stretch of touched statements is parsed under a header of its own on the line before
    it (``_BODY_HEADER``), every other line blank. It reads as in the real class when it parses
    alone, everything it holds lies inside it, and its statements start at the indentation of
    the class's other statements: the lines before and after it are statement boundaries, as
    in the old version, and unchanged.
    """
    base = unit.start
    spans = [(base + p.first, base + p.last) for p in unit.parts[1:]]
    # In order, by first and by last line alike (statements only share a line at their ends):
    # found by bisection, so that a class of thousands of methods with thousands of edits costs
    # no more than its lines.
    firsts, lasts = [a for a, _ in spans], [b for _, b in spans]
    regions: list[list[int]] = []
    for hunk in hunks:
        lo, hi = sorted(hunk[:2])  # an insertion: the statements on both sides are touched
        while True:  # widened to whole statements (two may share a line: ``a = 1; b = 2``)
            touched = spans[bisect.bisect_left(lasts, lo) : bisect.bisect_right(firsts, hi)]
            wider = (min([lo] + [a for a, _ in touched]), max([hi] + [b for _, b in touched]))
            if wider == (lo, hi):
                break
            lo, hi = wider
        _add_region(regions, lo, hi, hunk)
    region_los, region_his = [r[0] for r in regions], [r[1] for r in regions]
    unchanged = {span for span in spans if not _meets(span, regions, region_los)}
    indent = _indentation(old[min(unchanged)[0] - 1]) if unchanged else None
    pieces: list[str] = []
    # The text parsed starts at the first region's header line, ``origin``: the lines above it
    # blanked would cost each class its position in the module (a module of thousands of
    # edited classes, quadratic), and moving the tree's line numbers costs more than the parse.
    # Its statements are read in its own numbering, against ``view``, the lines from ``origin``.
    origin = line = max(regions[0][2] - 1, 1)
    off = origin - 1
    parsed: list[list[int]] = []
    for region in regions:
        _, _, new_lo, new_hi = region
        stretch = new[new_lo - 1 : new_hi]
        if not any(map(_holds_code, stretch)):
            if _joined(new, new_lo - 1):
                return None
            continue  # blank lines and comments only: no statement here now
        if new_lo - 1 < line or _joined(new, new_lo - 1) or _joined(new, new_hi):
            return None  # no free line for the header, or a backslash joins a neighbour
        pieces.append("\n" * (new_lo - 1 - line) + _BODY_HEADER)
        pieces.append(blank_literal_rows("\n".join([*stretch, ""])))
        line = new_hi + 1
        parsed.append(region)
    try:
        tree = parse("".join(pieces)) if pieces else ast.Module(body=[], type_ignores=[])
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if len(tree.body) != len(parsed):
        return None
    shift = regions[0][2] - regions[0][0]  # lines added or removed above the class
    new_base = base + shift
    scope = unit.parts[0].bound[0][1]
    view = new[off : parsed[-1][3]] if parsed else []
    fresh: list[Part] = []
    for block, (_, _, new_lo, new_hi) in zip(tree.body, parsed, strict=True):
        if (
            not isinstance(block, ast.ClassDef)
            or block.lineno + off != new_lo - 1
            or block.decorator_list
            or block.name != "__hotpatch_body__"
        ):
            return None
        for stmt in block.body:
            first = _first_line(stmt)
            start, end = first + off, (stmt.end_lineno or first) + off
            if not new_lo <= start <= end <= new_hi:
                return None
            indent = _indentation(new[start - 1]) if indent is None else indent
            if not indent or _indentation(new[start - 1]) != indent:
                return None  # not a statement of the class body itself
            fresh.append(_member_part(stmt, scope, view, new_base - off))
    parts = [unit.parts[0]]
    for part, span in zip(unit.parts[1:], spans, strict=True):
        if span in unchanged:
            before = bisect.bisect_left(region_his, span[0])  # the regions ending before it
            moved = (regions[before - 1][3] - regions[before - 1][1]) if before else shift
            parts.append(
                Part(
                    part.first + moved - shift,
                    part.last + moved - shift,
                    part.texts,
                    part.bound,
                    part.reads,
                    part.hollow,
                )
                if moved != shift
                else part
            )
    parts[1:] = sorted([*parts[1:], *fresh], key=lambda part: part.first)
    if len(parts) < 2:
        return None  # the body is gone: the class reads as a whole again
    end_shift = regions[-1][3] - regions[-1][1]
    return [unit.start, unit.end, new_base, unit.end + end_shift], _class_from_parts(
        new_base, parts
    )


def _add_region(
    regions: list[list[int]], lo: int, hi: int, hunk: tuple[int, int, int, int]
) -> None:
    """Add ``hunk``'s stretch, widened to old lines ``lo..hi``, to ``regions`` (each
    ``[old lo, old hi, new lo, new hi]``, in order), merged with the last one if they touch."""
    first, last, new_first, new_last = hunk
    lo, hi = min(lo, first), max(hi, last)
    if regions and lo <= regions[-1][1] + 1:
        region = regions[-1]
        region[1] = max(region[1], hi)
    else:
        region = [lo, hi, lo + (new_first - first), 0]  # lo..first-1: equal lines
        regions.append(region)
    region[3] = region[1] + (new_last - last)  # last+1..hi: equal lines after this hunk


def _indentation(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t\f"))]


def _where(first: int, last: int, unit: tuple[int, int], body: tuple[int, int]) -> str:
    """Where old lines ``first..last`` lie ("before", "after", "body" or "across"), for a unit
    spanning lines ``unit`` whose body spans ``body``; ``last == first - 1``: lines inserted
    between lines ``last`` and ``first``."""
    if last >= first:
        if last < unit[0]:
            return "before"
        if first > unit[1]:
            return "after"
        return "body" if body[0] <= first and last <= body[1] else "across"
    if first <= unit[0]:
        return "before"
    if last >= unit[1]:
        return "after"  # at the class's end: a method appended, or a statement after it
    return "body" if body[0] <= last else "across"


def _appended(end: int, hunk: tuple[int, int, int, int], old: list[str], new: list[str]) -> bool:
    """Whether the lines ``hunk`` puts after a top-level class ending on line ``end`` continue
    its body: no code between the class and them (blank lines and comments only, before and
    in the old side), and the first of the new lines that holds code is indented."""
    _, last, new_first, new_last = hunk
    if any(_holds_code(line) for line in old[end:last]):
        return False
    code = next((line for line in new[new_first - 1 : new_last] if _holds_code(line)), None)
    return code is not None and code[:1] in (" ", "\t")


def _holds_code(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def _meets(span: tuple[int, int], regions: list[list[int]], los: list[int]) -> bool:
    """Whether old lines ``span`` meet any of ``regions`` (in order, apart; ``los``: their first
    lines): the last region starting within ``span``'s end is the one that can."""
    k = bisect.bisect_right(los, span[1]) - 1
    return k >= 0 and regions[k][1] >= span[0]


def _joined(lines: list[str], number: int) -> bool:
    """Whether line ``number`` (1-based; 0: none) ends with a backslash that joins the next."""
    return 0 < number <= len(lines) and lines[number - 1].endswith("\\")


def parse(text: str, filename: str = "<unknown>") -> ast.Module:
    """``ast.parse`` with the cyclic garbage collector paused (``collector_paused``).

    Raises:
        SyntaxError, ValueError, RecursionError, MemoryError: as ``ast.parse``.
    """
    with collector_paused():
        return ast.parse(text, filename=filename)


@contextmanager
def collector_paused() -> Iterator[None]:
    """A stretch of the engine's own work with the cyclic garbage collector paused.

    Compiling, parsing and planning make thousands of new objects (a syntax tree, a compiler's
    symbol tables; a data table: hundreds of thousands), none in a reference cycle that outlives
    the stretch; made with the collector running, they set off collections of every generation,
    and in a process with a large heap (a server, a test run) those cost more than the work
    itself (idna's 17,000-line table parsed in 350 ms instead of 100). The collector runs as
    usual afterwards; if it was disabled, it stays so. Never around the user's code.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _children(node: ast.AST) -> list[ast.AST]:
    """``ast.iter_child_nodes`` without its two generators, without the ``Load``/``Store``
    markers and without constants (no reader here looks at either: a constant reads, binds
    and calls nothing). A data table of thousands of literals is then one list of its rows,
    not thousands of nodes each popped and tested: the index reads every node it keeps."""
    found: list[ast.AST] = []
    for name in node._fields:
        value = getattr(node, name, None)
        if type(value) is list:  # nodes, names (``global a, b``), or nodes and None
            found.extend(filterfalse(_IS_CONSTANT, filter(_IS_AST, value)))
        elif (
            isinstance(value, _AST)
            and type(value) is not _CONSTANT
            and not isinstance(value, ast.expr_context)
        ):
            found.append(value)
    return found


_AST = ast.AST
_CONSTANT = ast.Constant
_IS_CONSTANT = ast.Constant.__instancecheck__  # a C call per item: tables are long lists
# Lists of nodes may hold None: a dict display's keys (``{**base, k: v}``), the keyword-only
# defaults of a signature (``def f(*, a=1, b)``).
_IS_AST = ast.AST.__instancecheck__


def _walk(root: ast.AST) -> list[ast.AST]:
    """Every node under ``root`` (``root`` included, ``ctx`` markers left out), in no particular
    order: what ``ast.walk`` yields, for readers that only collect into sets."""
    found = [root]
    for node in found:  # the list grows while it is read (``_children``, inlined: a hot loop)
        if type(node) in _LEAVES:
            continue
        for name in node._fields:
            value = getattr(node, name, None)
            if type(value) is list:  # nodes, names (``global a, b``), or nodes and None
                found.extend(filterfalse(_IS_CONSTANT, filter(_IS_AST, value)))
            elif isinstance(value, _AST) and not isinstance(value, ast.expr_context):
                found.append(value)
    return found


_LEAVES = frozenset({ast.Name, ast.Constant})  # nodes with no child nodes but their ctx marker


def _units(body: list[ast.stmt], lines: list[str]) -> list[Unit]:
    units = []
    for stmt in body:
        start = _first_line(stmt)
        if isinstance(stmt, ast.ClassDef) and stmt.body:
            units.append(_class_unit(stmt, start, lines))
            continue
        texts: list[tuple[str, str, str]] = []
        bound: list[tuple[str, str]] = []
        _index_statement(stmt, "", lines, texts, bound)
        units.append(
            Unit(start, stmt.end_lineno or stmt.lineno, tuple(texts), tuple(bound), _reads(stmt))
        )
    return units


def _first_line(stmt: ast.stmt) -> int:
    """A statement's first line, its decorators' included."""
    decorators: list[ast.expr] = getattr(stmt, "decorator_list", [])
    return min([stmt.lineno] + [d.lineno for d in decorators])


def _class_unit(stmt: ast.ClassDef, start: int, lines: list[str]) -> Unit:
    """A top-level class's unit, made of its parts (what ``_reads`` and ``_index_statement``
    find for the whole statement, as the header's share and each body statement's)."""
    nodes: list[ast.AST] = [*stmt.bases, *stmt.keywords, *stmt.decorator_list]
    nodes += getattr(stmt, "type_params", ())
    decorators = {
        n.id
        for decorator in stmt.decorator_list
        for n in _walk(decorator)
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
    }
    header_end = max([stmt.lineno] + [getattr(n, "end_lineno", None) or 0 for n in nodes])
    header = Part(
        0,
        header_end - start,
        (),
        (("", stmt.name),),
        Reads(
            "class",
            *_import_time_reads(nodes),
            decorators=frozenset(decorators),
            decorated="\n".join(ast.dump(d) for d in stmt.decorator_list),
        ),
    )
    parts = [header, *(_member_part(child, stmt.name, lines, start) for child in stmt.body)]
    return _class_from_parts(start, parts)


def _member_part(stmt: ast.stmt, scope: str, lines: list[str], base: int) -> Part:
    """One statement of the body of top-level class ``scope``, lines counted from ``base``."""
    texts: list[tuple[str, str, str]] = []
    bound: list[tuple[str, str]] = []
    _index_statement(stmt, scope, lines, texts, bound)
    members: list[tuple[str, Reads]] = []
    if isinstance(stmt, ast.ClassDef):
        _class_members(stmt, f"{scope}.{stmt.name}", members)
    elif not isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
        reads = _reads(stmt)
        members.extend((f"{scope}.{name}", reads) for name in sorted(bound_names(stmt)))
    body: set[str] = set()
    body_attrs: set[tuple[str, str]] = set()
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef) and stmt.name in _MAKING_METHODS:
        _names_read_in(stmt, body, body_attrs)
    return Part(
        _first_line(stmt) - base,
        (stmt.end_lineno or stmt.lineno) - base,
        tuple(texts),
        tuple(bound),
        Reads(
            "class",
            *_import_time_reads([stmt]),
            members=tuple(members),
            body=frozenset(body),
            body_attrs=frozenset(body_attrs),
        ),
        _hollow(stmt, lines),
    )


def _hollow(stmt: ast.stmt, lines: list[str]) -> tuple[int, int] | None:
    """``Part.hollow`` of a class body statement: for a def whose first body statement begins
    its line (nothing of the header before it) and whose last line joins no next line."""
    if not isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef) or stmt.end_lineno is None:
        return None
    opening = stmt.body[0]
    line, last = opening.lineno, stmt.end_lineno
    if (
        getattr(opening, "decorator_list", None)
        or stmt.end_col_offset is None
        or not _first_line(stmt) < line <= last <= len(lines)
        or lines[line - 1].encode("utf-8", "surrogatepass")[: opening.col_offset].strip()
        or _joined(lines, last)
    ):
        return None
    return line - _first_line(stmt), stmt.end_col_offset


def _import_time_reads(
    nodes: list[ast.AST],
) -> tuple[frozenset[str], frozenset[str], frozenset[tuple[str, str]], frozenset[str]]:
    """``_walk_reads`` of ``nodes``: (names, bare names, ``name.attr`` pairs, calls)."""
    names: set[str] = set()
    bare: set[str] = set()
    attrs: set[tuple[str, str]] = set()
    calls: set[str] = set()
    _walk_reads(list(nodes), names, bare, attrs, calls)
    return frozenset(names), frozenset(bare), frozenset(attrs), frozenset(calls)


def _class_from_parts(start: int, parts: list[Part]) -> Unit:
    header = parts[0].reads
    shares = [part.reads for part in parts]
    reads = Reads(
        "class",
        frozenset().union(*(r.names for r in shares)),
        frozenset().union(*(r.bare for r in shares)),
        frozenset().union(*(r.attrs for r in shares)),
        frozenset().union(*(r.calls for r in shares)),
        decorators=header.decorators,
        members=tuple(member for r in shares for member in r.members),
        body=frozenset().union(*(r.body for r in shares)),
        body_attrs=frozenset().union(*(r.body_attrs for r in shares)),
        decorated=header.decorated,
    )
    return Unit(
        start,
        start + parts[-1].last,
        tuple(text for part in parts for text in part.texts),
        tuple(name for part in parts for name in part.bound),
        reads,
        tuple(parts),
    )


def _reads(stmt: ast.stmt) -> Reads:
    """What ``stmt`` reads, calls and changes when the module is imported (``Reads``)."""
    if _runs_only_as_script(stmt):
        return Reads()  # ``if __name__ == "__main__":`` does nothing when the module is imported
    names: set[str] = set()
    bare: set[str] = set()
    attrs: set[tuple[str, str]] = set()
    calls: set[str] = set()
    _walk_reads([stmt], names, bare, attrs, calls)
    kind = (
        "def"
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef)
        else "class"
        if isinstance(stmt, ast.ClassDef)
        else "plain"
    )
    mutates: set[str] = set()
    effects: list[str] = []
    imports: list[ImportRef] = []
    decorators: set[str] = set()
    if kind == "plain":
        _effects(stmt, mutates, effects, imports)
    members: list[tuple[str, Reads]] = []
    if isinstance(stmt, ast.ClassDef):
        _class_members(stmt, stmt.name, members)
    body: set[str] = set()
    body_attrs: set[tuple[str, str]] = set()
    decorated = ""
    if kind != "plain":
        _body_reads(stmt, body, body_attrs)
        decorators_of = getattr(stmt, "decorator_list", ())
        if decorators_of:  # what a registering decorator may read: itself, and the signature
            signature: list[ast.AST | None] = (
                [stmt.args, stmt.returns]
                if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef)
                else []
            )
            decorated = "\n".join(ast.dump(d) for d in [*decorators_of, *signature] if d)
        for decorator in getattr(stmt, "decorator_list", ()):
            decorators.update(
                n.id
                for n in _walk(decorator)
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
            )
    return Reads(
        kind,
        frozenset(names),
        frozenset(bare),
        frozenset(attrs),
        frozenset(calls),
        frozenset(mutates),
        effects[0] if effects else None,
        tuple(imports),
        frozenset(decorators),
        tuple(members),
        frozenset(body),
        frozenset(body_attrs),
        decorated,
    )


def _walk_reads(
    todo: list[ast.AST],
    names: set[str],
    bare: set[str],
    attrs: set[tuple[str, str]],
    calls: set[str],
) -> None:
    """Add what the nodes in ``todo`` read and call at import time (not in function bodies)."""
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            todo.extend(node.decorator_list)
            todo.extend(args.defaults)
            todo.extend(d for d in args.kw_defaults if d is not None)
            todo.extend(
                a.annotation
                for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg)
                if a is not None and a.annotation is not None
            )
            if node.returns is not None:
                todo.append(node.returns)
            continue  # the body runs when called, not at import
        if isinstance(node, ast.Lambda):
            todo.extend(node.args.defaults)
            todo.extend(d for d in node.args.kw_defaults if d is not None)
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            names.add(node.id)
            bare.add(node.id)
            continue
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            names.add(node.value.id)
            if isinstance(node.ctx, ast.Load):
                attrs.add((node.value.id, node.attr))
            continue
        if isinstance(node, ast.Call):
            root = _root_name(node.func)
            if root is not None:
                calls.add(root)
        todo.extend(_children(node))


# Methods that run when a class is called: a class whose instances they make uses what they read.
_MAKING_METHODS = frozenset({"__init__", "__new__", "__post_init__", "__attrs_post_init__"})


def _body_reads(stmt: ast.stmt, names: set[str], attrs: set[tuple[str, str]]) -> None:
    """Names (and ``name.attr``) read when a definition is called: a function's whole body, a
    class's construction methods (its other methods run on instances made before the patch)."""
    roots: list[ast.AST] = [stmt]
    if isinstance(stmt, ast.ClassDef):
        roots = [
            child
            for child in stmt.body
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            and child.name in _MAKING_METHODS
        ]
    for root in roots:
        _names_read_in(root, names, attrs)


def _names_read_in(root: ast.AST, names: set[str], attrs: set[tuple[str, str]]) -> None:
    for node in _walk(root):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            attrs.add((node.value.id, node.attr))


def _class_members(node: ast.ClassDef, scope: str, out: list[tuple[str, Reads]]) -> None:
    for child in node.body:
        if isinstance(child, ast.ClassDef):
            _class_members(child, f"{scope}.{child.name}", out)
        elif not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            reads = _reads(child)
            out.extend((f"{scope}.{name}", reads) for name in sorted(bound_names(child)))


def _runs_only_as_script(stmt: ast.stmt) -> bool:
    """``if __name__ == "__main__":`` (either way round)."""
    if not isinstance(stmt, ast.If) or not isinstance(stmt.test, ast.Compare):
        return False
    test = stmt.test
    if len(test.ops) != 1 or not isinstance(test.ops[0], ast.Eq):
        return False
    sides = [test.left, test.comparators[0]]
    return any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides) and any(
        isinstance(s, ast.Constant) and s.value == "__main__" for s in sides
    )


def _root_name(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute | ast.Subscript):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _effects(
    stmt: ast.stmt, mutates: set[str], effects: list[str], imports: list[ImportRef]
) -> None:
    """Collect the objects a plain statement changes and the calls whose effect is unknown."""
    todo: list[ast.stmt] = [stmt]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            imports.extend(ImportRef(None, 0, a.name, a.asname, False) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imports.extend(
                ImportRef(node.module, node.level, a.name, a.asname, True) for a in node.names
            )
        elif isinstance(node, ast.Expr):
            value = node.value
            if isinstance(value, ast.Await):
                value = value.value
            if isinstance(value, ast.Call):
                func = value.func
                root = _root_name(func)
                if isinstance(func, ast.Attribute) and root is not None:
                    mutates.add(root)  # name.method(...): assume it changes name's object
                else:
                    effects.append(f"the call {ast.unparse(func)}(...)")
            elif not isinstance(value, ast.Constant):
                effects.append(f"the expression {ast.unparse(value)[:60]}")
        elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign | ast.Delete):
            targets = node.targets if isinstance(node, ast.Assign | ast.Delete) else [node.target]
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Attribute | ast.Subscript):
                        root = _root_name(sub)
                        if root is not None:
                            mutates.add(root)
        elif isinstance(node, _DEFS):
            continue
        else:
            for field_name in ("body", "orelse", "finalbody", "handlers", "cases"):
                for child in getattr(node, field_name, ()):
                    if isinstance(child, ast.ExceptHandler | getattr(ast, "match_case", ())):
                        todo.extend(child.body)
                    elif isinstance(child, ast.stmt):
                        todo.append(child)


def _index_statement(
    stmt: ast.stmt,
    scope: str,
    lines: list[str],
    texts: list[tuple[str, str, str]],
    bound: list[tuple[str, str]],
) -> None:
    if isinstance(stmt, _DEFS):
        bound.append((scope, stmt.name))
        if isinstance(stmt, ast.ClassDef):
            inner = f"{scope}.{stmt.name}" if scope else stmt.name
            for child in stmt.body:
                _index_statement(child, inner, lines, texts, bound)
        return
    segment = "\n".join(map(str.rstrip, lines[stmt.lineno - 1 : (stmt.end_lineno or stmt.lineno)]))
    names = bound_names(stmt, walrus=":=" in segment)
    if not names:
        return
    for name in sorted(names):
        bound.append((scope, name))
        texts.append((scope, name, segment))


def bound_names(stmt: ast.stmt, *, walrus: bool = True) -> set[str]:
    """Names a statement binds in its own scope (not inside nested functions or classes).

    ``walrus=False``: the statement's text has no ``:=``, so an expression binds nothing unless
    it is an assignment target: the values (a table of thousands of constants) are not walked.
    """
    found: set[str] = set()
    todo: list[ast.AST] = [stmt]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Store | ast.Del):
                found.add(node.id)
            continue
        if (
            not walrus
            and isinstance(node, ast.expr)
            and not (
                isinstance(node, ast.Tuple | ast.List | ast.Starred)
                and isinstance(node.ctx, ast.Store | ast.Del)
            )
        ):
            continue  # a value, or an attribute or subscript target: binds no name here
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
        if isinstance(
            node, (_NESTED_SCOPES, ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp)
        ):
            continue
        todo.extend(_children(node))
    return found
