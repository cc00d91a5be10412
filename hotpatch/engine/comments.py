"""Edits of comments only: the previous version's statement index and code stand for what they touch.

Releases often edit comments alone (cachetools 8.0.2: three of its six changed modules) or beside
code (the other three). A comment is no token: a stretch of lines rewritten in place (as many
lines as before, each changed line the same code in both versions, with another comment after
it or none, or a blank or comment line in both) parses to the same statements at the same lines
and columns and compiles to the same code. So re-reading and recompiling the statements those
lines lie in (every method of a class, for a comment in one) gives back what the previous
version has: ``comment_edits`` sets such stretches apart from the other changes, the statement
index re-reads the others only, and the code of a statement changed in such stretches only is
the previous version's, found by its new text (``rekeyed``).

Except where the text itself is kept or read:

- in a string, ``#`` is text: a changed line inside a string literal (a docstring) changes its
  value. The strings are found from the start of the statement (where no string is open) by a
  scanner of strings and comments, and on the changed line itself: a string that does not close
  on it (where a ``#`` would be text) does not qualify. From 3.12 a statement with an f-string
  is not scanned (its fields may nest its quotes, PEP 701) and does not qualify;
- the index keeps the text of plain statements (``StatementIndex.texts``, module level and in
  class bodies: whether a name's statement changed is decided by its text), and what the
  compiler is told of a plain statement is found in its text (``pieces._facts``): only lines in
  a ``def`` or ``class`` statement qualify, and in a class, not in a plain statement of its body;
- a backslash at the end of the line before joins the lines (and ends the code of its own); a
  null character or a lone surrogate does not compile: none of them qualifies.

Lines between statements qualify (outside every statement, no string is open). A version whose
every change qualifies runs as the live version does: the engine takes it as a no-op without
executing a candidate, as it takes an unchanged version (``ModuleCode.unchanged``).
"""

from __future__ import annotations

import bisect
import itertools
import operator
import re
import sys
from collections.abc import Sequence
from typing import NamedTuple

from hotpatch.engine.alignment import Aligned, line_hunks
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


Hunk = tuple[int, int, int, int]  # (old first, old last, new first, new last), 1-based


class CommentEdits(NamedTuple):
    """An alignment's hunks set apart: those that change comments only, and the others."""

    pairs: dict[int, int]  # the lines those change, old -> new line number
    others: list[Hunk]


def comment_edits(lined: Aligned, units: Sequence[Unit]) -> CommentEdits:
    """The changed lines of ``lined`` that edit comments only (see the module docstring; the
    old version indexed as ``units``), old -> new, and the hunks left (those that change code).
    A hunk qualifies whole or not at all; one that joins a statement edited in comments to one
    edited in code (hunks of whole chunks: ``alignment.chunk_hunks``) is cut where its lines are
    equal first. Only the lines of the hunks are read."""
    old, new, hunks = lined
    pairs: dict[int, int] = {}
    found: list[tuple[Hunk, list[int]]] = []
    others: list[Hunk] = []
    for hunk in hunks:
        changed = _comment_lines(old, new, hunk)
        if changed is not None:
            found.append((hunk, changed))
            continue
        # A hunk of whole chunks may join a statement edited in comments to its neighbour
        # edited in code: its lines aligned, each stretch is looked at alone. One stretch
        # changes code as the whole hunk does (it holds the same lines that do, and as many
        # more or fewer lines): not looked at again.
        finer = _by_line(old, new, hunk)
        if len(finer) < 2:
            others.append(hunk)
            continue
        for line_hunk in finer:
            changed = _comment_lines(old, new, line_hunk)
            if changed is None:
                others.append(line_hunk)
            else:
                found.append((line_hunk, changed))
    for hunk, changed in found:
        delta = hunk[2] - hunk[0]
        pairs.update((line, line + delta) for line in changed)
    refused = _in_code(old, units, pairs)
    for hunk, changed in found:
        if not refused.isdisjoint(changed):
            others.append(hunk)
            for line in changed:
                del pairs[line]
    return CommentEdits(pairs, sorted(others))


def _by_line(old: list[str], new: list[str], hunk: Hunk) -> list[Hunk]:
    """``hunk`` cut where its lines are equal (``line_hunks``), when it has a comment on either
    side; else (or when it is a data table's thousands of lines) the hunk as it is."""
    first, last, new_first, new_last = hunk
    before, after = old[first - 1 : last], new[new_first - 1 : new_last]
    if len(before) > _MAX_ALIGNED or len(after) > _MAX_ALIGNED:
        return [hunk]
    if not any("#" in line for line in before) and not any("#" in line for line in after):
        return [hunk]  # no comment to set apart
    return [
        (a + first - 1, b + first - 1, c + new_first - 1, d + new_first - 1)
        for a, b, c, d in line_hunks(before, after)
    ]


_MAX_ALIGNED = 5_000  # lines: a longer hunk (a generated table) is taken whole


def _comment_lines(old: list[str], new: list[str], hunk: Hunk) -> list[int] | None:
    """The old numbers of the lines ``hunk`` changes, when each is the same code in both
    versions (a comment edited, added or taken out, or a blank or comment line rewritten) and
    the hunk has as many lines on both sides; else ``None``."""
    first, last, new_first, new_last = hunk
    if last - first != new_last - new_first:
        return None  # lines added or taken out
    before, after = old[first - 1 : last], new[new_first - 1 : new_last]
    changed = []
    for k in itertools.compress(range(len(before)), map(operator.ne, before, after)):
        code = _code_of(before[k])
        if code is None or code != _code_of(after[k]):
            return None
        at, new_at = first - 1 + k, new_first - 1 + k  # 0-based
        if (at and old[at - 1].endswith("\\")) or (new_at and new[new_at - 1].endswith("\\")):
            return None
        changed.append(first + k)
    return changed


def _code_of(line: str) -> str | None:
    """The code of ``line`` (no string open at its start) before its comment, without the
    tokenizer's spaces at its end (space, tab, form feed); ``None`` when a string on it does not
    close on it (a ``#`` after its opening is text), when the code ends with a backslash (the
    line is joined to the next), or the line holds what does not compile (a null character) or
    encode (a lone surrogate)."""
    if "\0" in line:
        return None
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return None
    end, at, quotes = len(line), 0, False
    for found in _LITERALS.finditer(line):
        if line.startswith("#", found.start()):
            end = found.start()
            break
        quotes = quotes or _has_quote(line, at, found.start())
        at = found.end()
    code = line[:end].rstrip(" \t\f")
    if quotes or _has_quote(line, at, end) or code.endswith("\\"):
        return None
    return code


def _has_quote(line: str, start: int, end: int) -> bool:
    return line.find('"', start, end) >= 0 or line.find("'", start, end) >= 0


def _in_code(old: list[str], units: Sequence[Unit], pairs: dict[int, int]) -> set[int]:
    """Which of the changed lines ``pairs`` (old numbers) lie where a comment can change what
    the index or the compiler sees: in a plain statement, a plain part of a class, a string."""
    if not pairs:
        return set()
    starts = [u.start for u in units]
    by_unit: dict[int, list[int]] = {}
    for line in pairs:
        k = bisect.bisect_right(starts, line) - 1
        if k >= 0 and line <= units[k].end:
            by_unit.setdefault(k, []).append(line)
    refused: set[int] = set()
    for k, lines in by_unit.items():
        unit = units[k]
        if unit.reads.kind not in ("def", "class"):
            refused.update(lines)
            continue
        refused.update(line for line in lines if _in_plain_part(unit, line))
        refused.update(_inside_strings(old, unit.start, unit.end, lines))
    return refused


def _in_plain_part(unit: Unit, line: int) -> bool:
    """Whether ``line`` lies in a part of ``unit`` whose text the index keeps."""
    if not unit.parts:
        return bool(unit.texts)
    at = line - unit.start
    return any(part.first <= at <= part.last and part.texts for part in unit.parts)


def _inside_strings(lines: list[str], start: int, end: int, changed: list[int]) -> list[int]:
    """Those of the ``changed`` lines that a string literal of the statement on lines ``start``
    to ``end`` is open at the start of (all of them when, from 3.12, the statement has an
    f-string: not scanned; before, an f-string is one token, read as any string)."""
    text = "\n".join(lines[start - 1 : end])
    if _NESTED_QUOTES and _F_STRING.search(text):
        return changed
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
    return [line for line in changed if line in inside]


def rekeyed(lined: Aligned, units: Sequence[Unit], pairs: dict[int, int], pieces: Pieces) -> Pieces:
    """``pieces`` with each statement whose new text differs from its old one (``units``) only
    in the changed lines ``pairs`` (``comment_edits``) also found by that new text: the previous
    code, for ``pieces.compile_module`` to take as for an unchanged statement (shifted where
    lines were added or taken out above it)."""
    old, new = lined.old, lined.new
    out = dict(pieces)
    spans = statement_spans(units)
    lasts = [last for _, last in spans]
    seen: set[int] = set()
    for line, new_line in pairs.items():
        k = bisect.bisect_left(lasts, line)
        if k == len(spans) or spans[k][0] > line or k in seen:
            continue  # between statements, or looked at already
        seen.add(k)
        first, last = spans[k]
        delta = new_line - line
        if first + delta < 1 or last + delta > len(new):
            continue
        if not all(  # every other line is the same: no other change in the statement
            old[at - 1] == new[at - 1 + delta] or pairs.get(at) == at + delta
            for at in range(first, last + 1)
        ):
            continue
        piece = pieces.get("\n".join(old[first - 1 : last]))
        if piece is not None:
            out["\n".join(new[first - 1 + delta : last + delta])] = piece
    return out
