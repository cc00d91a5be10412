"""The rows of data tables, emptied before the statement index parses a changed stretch again.

A row of literals inside brackets reads, binds and calls nothing, so the index of the statements
around it is the same without it, and a 17,000-row table parses as its few lines of code.
"""

from __future__ import annotations

import re

# One row of a data table: indented literals (numbers, strings without an ``f`` prefix, None,
# True, False; signs between them), tuples of those, separated by commas or colons, then perhaps
# a comment. Whatever such a line parses as reads, binds and calls no name, and it opens and
# closes no bracket but its tuples'. (A word that starts with a digit is a number to the
# tokenizer, or a number and a keyword: ``1if 2else 3`` reads nothing either.)
# A string's characters as runs between escapes (each character matched one way only, and no
# alternation tried at every character: a fifth of the time on a table of strings).
_STR = r"""[bBrRuU]{0,2}(?:'[^'\\\n]*(?:\\.[^'\\\n]*)*'|"[^"\\\n]*(?:\\.[^"\\\n]*)*")"""
# Every line has one way to match (no two quantifiers can share a character): a number runs to
# the end of its word, a separator is spaces with at most one sign in them. With several ways,
# a line that matches none (a long number, then a name) took exponential time to reject.
_NUMBER = r"[0-9][0-9a-zA-Z_.]*(?![0-9a-zA-Z_.])"
_TOKEN = rf"(?:{_NUMBER}|{_STR}|None\b|True\b|False\b)"
_ATOMS = rf"(?:[-+][ \t]*)?{_TOKEN}(?:[ \t]*(?:[-+][ \t]*)?{_TOKEN})*"
_TUPLE = rf"\([ \t]*(?:{_ATOMS}(?:[ \t]*,[ \t]*{_ATOMS})*[ \t]*(?:,[ \t]*)?)?\)"
_ITEM = rf"(?:{_ATOMS}|{_TUPLE})"
_ROW = rf"[ \t]+{_ITEM}(?:[ \t]*[,:][ \t]*{_ITEM})*[ \t]*(?:,[ \t]*)?(?:#[^\n]*)?"
# The rows after a line that ends with an opening bracket: rows, comments and blank lines, all
# inside that bracket, found by ``_rows_end``. Most rows of a generated table are one number, one
# string or None, and a comma: ``_FAST_ROWS`` runs over them (a subset of ``_ROW``, each line one
# way to match, no alternation between lines: twice as fast as trying every line as any row);
# a line it stops at is tried as one ``_ROW``, a comment or a blank line (``_ONE_ROW``), then the
# fast run goes on. Nothing follows either loop, so a line that is not a row ends the rows.
_PLAIN_STR = r"'[^'\\\n]*(?:\\.[^'\\\n]*)*'" r'|"[^"\\\n]*(?:\\.[^"\\\n]*)*"'  # no prefix
_FAST_ROWS = re.compile(rf"(?:[ \t]+(?:[0-9][0-9a-zA-Z_.]*|{_PLAIN_STR}|None),\n)*")
_ONE_ROW = re.compile(rf"(?:{_ROW}|[ \t]*(?:#[^\n]*)?)\n")
_OPEN_AT_END = re.compile(r"[\[({][ \t]*\n")  # an opening bracket, then only the line's end


def blank_literal_rows(block: str) -> str:
    """``block`` (whole top-level statements, each line ending in a newline) with the rows of
    its data tables emptied, line numbers unchanged: what the index re-parses of a changed table.

    A row (``_ROW``) reads, binds, calls and changes nothing, so the index of the statements is
    the same without it (their texts are taken from the real lines), and a 17,000-row table
    parses as its few lines of code. A row is emptied only where it is surely inside brackets:
    in the run of rows after a line that ends with an opening bracket (a row opens and closes no
    bracket) and has no ``#`` (a comment could hide where it ends), so no statement starts or
    ends on an emptied line.
    Only after the last triple quote (no string token spans a line there) and with no backslash
    at a line's end; not at all in a block with a decorator (the index compares the syntax tree
    of a decorator's arguments). An expression statement's description in a refusal (``the
    expression [...]``) shows such a table empty.
    """
    last = max(block.rfind('"""'), block.rfind("'''"))
    cut = 0 if last < 0 else block.find("\n", last) + 1
    tail = block[cut:]
    if (last >= 0 and not cut) or "\\\n" in tail or _has_decorator(block):
        return block
    pieces = [block[:cut]]
    done = 0  # tail[:done] is in pieces
    opening = _OPEN_AT_END.search(tail)
    while opening is not None:
        bracket, start = opening.start(), opening.end()
        end = start  # no rows: the next bracket is looked for after this one
        if tail.find("#", tail.rfind("\n", 0, bracket) + 1, bracket) < 0:  # no comment before
            end = _rows_end(tail, start)
            if end > start:
                pieces.append(tail[done : bracket + 1])
                pieces.append("\n" * (1 + tail.count("\n", start, end)))
                done = end
        # from the end of the rows: a 17,000-row table is not searched again for brackets
        opening = _OPEN_AT_END.search(tail, end)
    pieces.append(tail[done:])
    return "".join(pieces)


def _rows_end(text: str, at: int) -> int:
    """Where the run of rows, comments and blank lines (each ending in a newline) that starts
    at ``at`` in ``text`` ends (``at`` when there is none)."""
    while True:
        at = _FAST_ROWS.match(text, at).end()  # type: ignore[union-attr]  # matches empty
        one = _ONE_ROW.match(text, at)
        if one is None:
            return at
        at = one.end()


def _has_decorator(block: str) -> bool:
    """Whether a line of ``block`` begins with ``@`` after spaces and tabs (a decorator).

    Found from each ``@`` (a search in C), every line looked at once at most, rather than a
    pattern tried at every line's start (2 ms on a 17,000-line table).
    """
    at = block.find("@")
    while at >= 0:
        if not block[block.rfind("\n", 0, at) + 1 : at].strip(" \t"):
            return True
        end = block.find("\n", at)
        if end < 0:
            return False
        at = block.find("@", end)
    return False
