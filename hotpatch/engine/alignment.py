"""Where two versions of a text differ, line by line, as the Python tokenizer counts lines.

Pure text logic for the statement index (``statements``): the changed stretches between two
versions, found by aligning equal lines (unique lines anchor the alignment, as in patience diff),
first over chunks of lines that start at column 0 (where top-level statements start), so that an
edit to a 17,000-line data table aligns a few hundred chunks, not 17,000 lines.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections import Counter
from typing import NamedTuple


def split_lines(text: str) -> list[str]:
    """The lines of ``text`` as the Python tokenizer counts them (``\\n``, ``\\r\\n``, ``\\r``).

    ``str.splitlines`` also splits at form feeds, ``\\x1c``-``\\x1e``, ``\\x85`` and ``\\u2028``,
    which would put line numbers out of step with the parser's.
    """
    lines = _NEWLINE.split(text) if "\r" in text else text.split("\n")
    if lines and not lines[-1]:
        lines.pop()  # the text ends with a newline: no empty last line (as splitlines)
    return lines


_NEWLINE = re.compile(r"\r\n|\r|\n")


class Aligned(NamedTuple):
    """Two versions of a text in lines (``split_lines``) and where they differ (``chunk_hunks``)."""

    old: list[str]
    new: list[str]
    hunks: list[tuple[int, int, int, int]]


def aligned(old_text: str, new_text: str) -> Aligned:
    old, new = split_lines(old_text), split_lines(new_text)
    if "\r" in old_text or "\r" in new_text:  # lines not all ended by "\n": joined again
        return Aligned(old, new, chunk_hunks(old, new))
    return Aligned(old, new, chunk_hunks(old, new, old_text, new_text))


def _chunks(
    lines: list[str], first: int, end: int, text: str | None
) -> tuple[list[str], list[int]]:
    """``lines[first:end]`` cut before every non-empty line that starts with neither a space nor
    a tab (where top-level statements start): the chunks' texts (their lines joined), and the
    0-based first line of each in the slice (plus ``end - first``). No chunk is empty.

    ``text``: the text ``lines`` were split from at "\n" alone, read in place (a 17,000-line
    module is neither joined nor copied again); ``None``: the lines are joined.
    """
    if first >= end:
        return [], [0]
    if text is None:
        text, at = "\n".join(lines[first:end]), 0
        stop = len(text)
    else:
        at = sum(map(len, lines[:first])) + first  # where line ``first`` begins
        # the lines end where the text does, but for a newline that ends it (no line of its own)
        stop = (len(text) - 1 if text.endswith("\n") else len(text)) - (
            sum(map(len, lines[end:])) + len(lines) - end
        )
    # Found in the text (in C): a line of a 17,000-line table costs nothing in Python.
    starts, offsets = [0], [at]  # each chunk's first line, and where it begins in ``text``
    line = 0
    for found in _UNINDENTED.finditer(text, at, stop):
        begins = found.start() + 1  # after the newline
        line += text.count("\n", at, begins)
        at = begins
        starts.append(line)
        offsets.append(at)
    starts.append(end - first)
    offsets.append(stop + 1)
    # A chunk's text is its lines joined: ``text`` up to the newline before the next chunk.
    texts = [text[a : b - 1] for a, b in itertools.pairwise(offsets)]
    return texts, starts


# The newline before a line that is not empty and starts with neither a space nor a tab (the
# first line is a chunk's start anyway). Searched from its newline, four times faster than ``^``.
_UNINDENTED = re.compile(r"\n[^ \t\n]")


def chunk_hunks(
    old: list[str], new: list[str], old_text: str | None = None, new_text: str | None = None
) -> list[tuple[int, int, int, int]]:
    """``line_hunks`` over chunks of lines (``_chunks``) instead of single lines, in line numbers
    (``old_text``, ``new_text``: the texts ``old`` and ``new`` are split from at "\n" alone).

    Paired chunks are equal lines, so the alignment is one ``line_hunks`` accepts; a hunk of whole
    chunks only widens a stretch that ``updated`` widens to whole statements anyway (the lines
    of a chunk after its first are indented, blank or continued: inside the statement its first
    line begins or continues). A release that edits a 17,000-line data table then aligns a few
    hundred chunks, not 17,000 lines.
    """
    if old == new:
        return []
    prefix, suffix = _common_ends(old, new)  # in lines: a chunk may start anywhere
    old_texts, old_starts = _chunks(old, prefix, len(old) - suffix, old_text)
    new_texts, new_starts = _chunks(new, prefix, len(new) - suffix, new_text)
    return [
        (
            prefix + old_starts[a - 1] + 1,
            prefix + old_starts[b],
            prefix + new_starts[c - 1] + 1,
            prefix + new_starts[d],
        )
        for a, b, c, d in line_hunks(old_texts, new_texts)
    ]


def _common_ends(old: list[str], new: list[str]) -> tuple[int, int]:
    """How many first and last lines ``old`` and ``new`` have in common (not overlapping),
    found by comparing slices (in C, a few times over)."""
    lo, hi = 0, min(len(old), len(new))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if old[:mid] == new[:mid]:
            lo = mid
        else:
            hi = mid - 1
    prefix = lo
    lo, hi = 0, min(len(old), len(new)) - prefix
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if old[len(old) - mid :] == new[len(new) - mid :]:
            lo = mid
        else:
            hi = mid - 1
    return prefix, lo


def line_hunks(old: list[str], new: list[str]) -> list[tuple[int, int, int, int]]:
    """The changed stretches between two line lists, as (first, last) lines (1-based) of ``old``
    and (first, last) of ``new``; ``last == first - 1`` for an empty side (an insertion).

    Any alignment in which paired lines are equal and in order is correct here (the changed
    stretches are parsed again); a small one keeps that cheap. Lines unique to both sides anchor
    it (the longest in-order run of them, as in patience diff), equal neighbours extend it; the
    whole costs a few dictionary passes, where ``difflib`` takes seconds on a 5,000-line module.
    """
    if old == new:
        return []
    prefix, suffix = _common_ends(old, new)
    if prefix or suffix:
        inner = line_hunks(old[prefix : len(old) - suffix], new[prefix : len(new) - suffix])
        return [(a + prefix, b + prefix, c + prefix, d + prefix) for a, b, c, d in inner]
    count_old = Counter(old)
    count_new = Counter(new)
    where_new = {text: j for j, text in enumerate(new) if count_new[text] == 1}
    anchors = [
        (i, where_new[text])
        for i, text in enumerate(old)
        if count_old[text] == 1 and text in where_new
    ]
    # Longest run of anchors in order on both sides (patience sorting on the new positions).
    tails: list[int] = []  # tails[k]: index in anchors of the smallest end of a run of k + 1
    ends: list[int] = []  # ends[k]: that anchor's new position
    parent: list[int] = []
    for k, (_, j) in enumerate(anchors):
        pos = bisect.bisect_left(ends, j)
        parent.append(tails[pos - 1] if pos else -1)
        if pos == len(tails):
            tails.append(k)
            ends.append(j)
        else:
            tails[pos] = k
            ends[pos] = j
    chain: list[tuple[int, int]] = [(len(old), len(new))]
    k = tails[-1] if tails else -1
    while k >= 0:
        chain.append(anchors[k])
        k = parent[k]
    chain.append((-1, -1))
    chain.reverse()
    # Between two anchors: equal lines from either end, the rest (if any) is one hunk.
    hunks: list[tuple[int, int, int, int]] = []
    for (i, j), (i2, j2) in itertools.pairwise(chain):
        if i2 - i == j2 - j and old[i + 1 : i2] == new[j + 1 : j2]:
            continue
        a, b = i + 1, j + 1
        while a < i2 and b < j2 and old[a] == new[b]:
            a, b = a + 1, b + 1
        c, d = i2 - 1, j2 - 1
        while c >= a and d >= b and old[c] == new[d]:
            c, d = c - 1, d - 1
        hunks.append((a + 1, c + 1, b + 1, d + 1))  # 1-based; an empty side has last = first - 1
    return hunks
