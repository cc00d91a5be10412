"""Versions that rewrite comments only: the previous version's statement index and code stand.

Releases often edit comments alone (cachetools 8.0.2: three of its six changed modules). A
comment is no token: a text that differs from the previous one only in whole-line comments and
blank lines, rewritten in place (the same number of lines; each changed line a comment or blank
in both versions), parses to the same statements at the same lines and columns and compiles to
the same code, so re-reading and recompiling the statements those lines lie in (every method of
a class, for a comment in one) gives back what the previous version has.

Except where the text itself is kept or read:

- in a string, ``#`` is text: a changed line inside a string literal (a docstring) changes its
  value. The strings are found from the start of the statement (where no string is open) by a
  scanner of strings and comments; from 3.12 a statement with an f-string is not scanned (its
  fields may nest its quotes, PEP 701) and does not qualify;
- the index keeps the text of plain statements (``StatementIndex.texts``, module level and in
  class bodies: whether a name's statement changed is decided by its text), and what the
  compiler is told of a plain statement is found in its text (``pieces._facts``): only lines in
  a ``def`` or ``class`` statement qualify, and in a class, not in a plain statement of its body;
- a backslash at the end of the line before joins the lines; a null character or a lone
  surrogate does not compile: none of them qualifies.

Lines between statements qualify (outside every statement, no string is open). What qualifies
runs as the live version does: the engine takes it as a no-op without executing a candidate, as
it takes an unchanged version (``ModuleCode.unchanged``).
"""

from __future__ import annotations

import bisect
import re
import sys
from collections.abc import Sequence

from hotpatch.engine.alignment import Aligned
from hotpatch.engine.pieces import Pieces, statement_spans
from hotpatch.engine.statements import Unit

# Strings and comments, as the tokenizer reads them from a point where no string is open: a
# backslash escapes the next character in every kind of string (raw ones too, for finding where
# they end), a single-quoted string continues after a backslash at a line's end. Each character
# has one way to match inside each alternative (no backtracking on a long string).
_LITERALS = re.compile(
    r"#[^\n]*"
    r'|"""(?:[^"\\]|\\.|"(?!""))*"""'
    r"|'''(?:[^'\\]|\\.|'(?!''))*'''"
    r'|"(?:[^"\\\n]|\\.)*"'
    r"|'(?:[^'\\\n]|\\.)*'",
    re.DOTALL,
)
_NESTED_QUOTES = sys.version_info >= (3, 12)  # PEP 701: an f-string's fields may hold its quotes
# An f-string's opening (any case, ``rf``/``fr`` too), not inside a longer name.
_F_STRING = re.compile(r"(?<![\w])(?:[fF][rR]?|[rR][fF])['\"]")


def comments_changed(lined: Aligned, units: Sequence[Unit]) -> list[int] | None:
    """The lines (1-based) that differ, when the new version of ``lined`` differs from the old
    one (indexed as ``units``) only in comments that change nothing the index or the compiler
    sees (see the module docstring); else ``None``. Only the lines of ``lined``'s hunks are
    read: an edit of code is seen at its first line."""
    old, new, hunks = lined
    if not hunks or len(old) != len(new):
        return None
    changed = []
    for first, last, new_first, new_last in hunks:
        if (first, last) != (new_first, new_last):
            return None  # lines added or taken out
        for k in range(first - 1, last):
            if old[k] == new[k]:
                continue
            if not (_comment(old[k]) and _comment(new[k])):
                return None
            if k and (old[k - 1].endswith("\\") or new[k - 1].endswith("\\")):
                return None
            changed.append(k + 1)
    if not changed:
        return None
    starts = [u.start for u in units]
    by_unit: dict[int, list[int]] = {}
    for line in changed:
        k = bisect.bisect_right(starts, line) - 1
        if k >= 0 and line <= units[k].end:
            by_unit.setdefault(k, []).append(line)
    for k, lines in by_unit.items():
        unit = units[k]
        if unit.reads.kind not in ("def", "class") or not _outside_plain_parts(unit, lines):
            return None
        if _inside_strings(old, unit.start, unit.end, lines):
            return None
    return changed


def _comment(line: str) -> bool:
    """A line that is blank or holds a comment alone (the tokenizer's spaces: space, tab, form
    feed), with nothing that does not compile (a null character) or encode."""
    stripped = line.lstrip(" \t\f")
    if stripped and not stripped.startswith("#"):
        return False
    if "\0" in line:
        return False
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def _outside_plain_parts(unit: Unit, lines: list[int]) -> bool:
    """Whether none of ``lines`` lies in a part of ``unit`` whose text the index keeps."""
    if not unit.parts:
        return not unit.texts
    for line in lines:
        at = line - unit.start
        for part in unit.parts:
            if part.first <= at <= part.last and part.texts:
                return False
    return True


def _inside_strings(lines: list[str], start: int, end: int, changed: list[int]) -> bool:
    """Whether a string literal of the statement on lines ``start`` to ``end`` is open at the
    start of any of the ``changed`` lines (or, from 3.12, the statement has an f-string: not
    scanned; before, an f-string is one token, read as any string)."""
    text = "\n".join(lines[start - 1 : end])
    if _NESTED_QUOTES and _F_STRING.search(text):
        return True
    last = max(changed)
    # Where each line starts in ``text``: a line is inside a string that started before it.
    offsets = [0]
    for line in lines[start - 1 : last - 1]:
        offsets.append(offsets[-1] + len(line) + 1)
    inside: set[int] = set()
    for found in _LITERALS.finditer(text):
        if "\n" not in found.group():
            continue  # a comment, or a string on one line
        after = bisect.bisect_right(offsets, found.start())  # lines after the one it opens on
        until = bisect.bisect_left(offsets, found.end())
        inside.update(range(start + after, start + until))
    return any(line in inside for line in changed)


def rekeyed(lined: Aligned, units: Sequence[Unit], changed: list[int], pieces: Pieces) -> Pieces:
    """``pieces`` with each statement that has a ``changed`` line also found by its new text
    (the previous code, for ``pieces.compile_module`` to take as for an unchanged statement)."""
    out = dict(pieces)
    spans = statement_spans(units)
    lasts = [last for _, last in spans]
    for line in changed:
        k = bisect.bisect_left(lasts, line)
        if k == len(spans) or spans[k][0] > line:
            continue  # between statements
        first, last = spans[k]
        piece = pieces.get("\n".join(lined.old[first - 1 : last]))
        if piece is not None:
            out["\n".join(lined.new[first - 1 : last])] = piece
    return out
