"""Versions that rewrite comments only keep the previous index and code (engine.comments)."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json.decoder
import random
import sys
import textwrap
import tokenize
import types
from collections.abc import Sequence
from pathlib import Path

import pytest

import hotpatch.engine.pipeline
import hotpatch.engine.swap
from hotpatch import Engine
from hotpatch.engine import pieces as pieces_module
from hotpatch.engine.alignment import Aligned, aligned
from hotpatch.engine.candidate import compile_source
from hotpatch.engine.comments import comment_edits
from hotpatch.engine.compare import nested_codes
from hotpatch.engine.pieces import compile_module, statement_spans
from hotpatch.engine.statements import StatementIndex, Unit, parse

REAL_FILES = [
    Path(m.__file__)  # type: ignore[arg-type]
    for m in (
        hotpatch.engine.pipeline,
        hotpatch.engine.swap,
        argparse,
        dataclasses,
        json.decoder,
        textwrap,
    )
]


def comments_changed(lined: Aligned, units: Sequence[Unit]) -> list[int] | None:
    """The changed lines, when every change of ``lined`` edits comments only; else ``None``."""
    edits = comment_edits(lined, units)
    return None if edits.others or not edits.pairs else sorted(edits.pairs)


def _index(text: str) -> StatementIndex:
    return StatementIndex.build(parse(text), text)


def _whole(text: str, filename: str) -> tuple[types.CodeType, ...]:
    """Every statement compiled from nothing (the reference the pieces are compared with)."""
    return compile_module(text, filename, _index(text).units, None).codes


def _edit(text: str, rng: random.Random, count: int) -> str:
    """``text`` with ``count`` blank or comment-only lines rewritten, line for line."""
    lines = text.split("\n")
    spots = [k for k, line in enumerate(lines) if not line.strip() or line.strip()[0] == "#"]
    for k in rng.sample(spots, min(count, len(spots))):
        indent = " " * rng.choice([0, 4, 8, 3])
        lines[k] = rng.choice(["", f"{indent}# edited {rng.random()}", indent, f"# {k} 'quote\""])
    return "\n".join(lines)


@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: p.name)
def test_what_qualifies_parses_and_compiles_as_the_previous_version(path: Path) -> None:
    # Random rewrites of blank and comment lines in real modules: some fall in docstrings,
    # plain statements or strings (refused), the rest must index and compile to exactly what
    # the previous version gives; and the engine's compile takes the previous code for them.
    text = path.read_text("utf-8")
    filename = str(path)
    previous, _ = compile_source("m", text, filename)
    reference = _whole(text, filename)
    rng = random.Random(path.name)
    taken = refused = 0
    for round_ in range(40):
        new = _edit(text, rng, 1 + round_ % 4)
        if new == text:
            continue
        lines = comments_changed(aligned(text, new), previous.index.units)
        if lines is None:
            refused += 1
            continue
        taken += 1
        assert _index(new) == StatementIndex(
            previous.index.units, previous.index.texts, previous.index.bound
        )
        assert _whole(new, filename) == reference
        source, code = compile_source("m", new, filename, previous=previous)
        assert source.index is previous.index
        assert code.codes == reference
        assert (
            set(code.pieces or ())
            >= {  # found by the new texts next time
                "\n".join(new.split("\n")[first - 1 : last])
                for first, last in statement_spans(source.index.units)
            }
        )
    assert taken >= 5, (taken, refused)  # refusals: their own tests below


@pytest.fixture(name="compiled")
def _compiled(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The texts of the statements ``pieces`` compiles from now on, in order."""
    compiled: list[str] = []
    real = pieces_module._compiled

    def spy(body: str, *args: object, **kwargs: object) -> object:
        compiled.append(body)
        return real(body, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pieces_module, "_compiled", spy)
    return compiled


def _comment_edits(text: str, rng: random.Random, count: int) -> str:
    """``text`` with ``count`` comments rewritten or added after code, line for line, where the
    tokenizer says a comment is or may be (the truth the scanner under test is held to)."""
    tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    comments = [t.start for t in tokens if t.type == tokenize.COMMENT]
    ends = [
        t.start[0] - 1
        for t in tokens
        if t.type in (tokenize.NEWLINE, tokenize.NL) and t.string == "\n"
    ]
    lines = text.split("\n")
    for _ in range(count):
        if comments and rng.random() < 0.6:
            row, column = rng.choice(comments)
            lines[row - 1] = lines[row - 1][:column] + f"# edited {rng.random():.3f}"
        else:
            row = rng.choice(ends)
            if "#" not in lines[row] and not lines[row].endswith("\\"):
                lines[row] += "  # added"
    return "\n".join(lines)


@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: p.name)
def test_comments_beside_a_change_take_the_previous_code(path: Path, compiled: list[str]) -> None:
    # Comments rewritten or added after code (where the tokenizer finds them) beside a real
    # change: the index is a full parse's, every function's and class's code a whole compile's,
    # and statements changed in comments take the previous code (those refused, in a plain
    # statement for one, are compiled). With the change at the end, and at the top (moving
    # every statement).
    text = path.read_text("utf-8")
    filename = str(path)
    previous, _ = compile_source("m", text, filename)
    rng = random.Random(path.name)
    added = "def _added_by_the_test():\n    return 1\n"
    known = set(previous.pieces or ())
    taken = 0  # statements changed in comments whose code was not compiled again
    for round_ in range(12):
        edited = _comment_edits(text, rng, 1 + round_ % 4)
        at_end = round_ % 2 == 0
        if at_end:
            new = edited + "\n\n" + added
        else:  # before the first definition: every one moves
            first = next(u.start for u in _index(edited).units if u.reads.kind != "plain")
            lines = edited.split("\n")
            new = "\n".join([*lines[: first - 1], added, *lines[first - 1 :]])
        compiled.clear()
        source, code = compile_source("m", new, filename, previous=previous)
        whole = compile(new, filename, "exec", dont_inherit=True)
        assert [c for k in code.codes for c in nested_codes(k)] == list(nested_codes(whole))
        assert source.index == _index(new)
        lines = new.split("\n")
        changed = [
            body
            for first, last in statement_spans(source.index.units)
            if (body := "\n".join(lines[first - 1 : last])) not in known
        ]
        if pieces_module._CLASS_LINE_CONST:  # 3.13: a class keeps its line, compiled if moved
            changed += [body for body in compiled if "class" in body]
        assert set(compiled) <= set(changed) and added.rstrip("\n") in compiled
        taken += len(set(changed)) - len(compiled)
    assert taken >= 1  # (fewer from 3.12: a statement with an f-string does not qualify)


BASE = '''\
"""Module doc.

# not a comment: the module's docstring
"""
import os

TABLE = [
    1,
    # a row's comment
    2,
]


def f(x):
    """Doc.

    # heading, in the docstring
    """
    # a comment in a function
    text = """
# in a string
"""
    return x + len(text)


class C:
    LIMIT = {
        # in a class-body plain statement
        "a": 1,
    }

    def m(self):
        # a comment in a method
        return 1
    # between methods

# between statements
'''


def _rewritten(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1
    return text.replace(old, new)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("    # a comment in a function", "    # edited"),
        ("        # a comment in a method", ""),
        ("    # between methods", "    # edited"),
        ("# between statements", "# edited"),
        ("        return 1", "        return 1  # one"),  # a comment after code, added
        ("    return x + len(text)", "    return x + len(text)\t"),  # spaces after it
        ("    def m(self):", "    def m(self):  # '#' \"quoted\""),
    ],
)
def test_comments_in_code_qualify(old: str, new: str) -> None:
    text = _rewritten(BASE, old, new)
    assert comments_changed(aligned(BASE, text), _index(BASE).units) == [
        BASE.split("\n").index(old) + 1
    ]


@pytest.mark.parametrize(
    ("old", "new", "why"),
    [
        ("# not a comment: the module's docstring", "# edited", "a docstring"),
        ("    # heading, in the docstring", "    # edited", "a function's docstring"),
        ("# in a string", "# edited", "a string"),
        ("    # a row's comment", "    # edited", "a plain statement's text is indexed"),
        ("        # in a class-body plain statement", "", "a class-body plain statement"),
        ("    # a comment in a function", "    x = 1", "code, not a comment"),
        ("    # a comment in a function", "    # a\0", "a null character"),
        ("    # a comment in a function", "    # \udcff", "a lone surrogate"),
        ("    # a comment in a function", "    # a\n    # b", "a line more"),
        ("        return 1", "        return 2  # one", "code changed, beside a comment"),
        ("        return 1", "        return '1'  # one", "a string added"),
        ("        return 1", "        return 1 \\", "joined to the next line"),
        ('    text = """', '    text = """  # in the string', "in a string opened on the line"),
        ("import os", "import os  # the module", "a plain statement's text is indexed"),
    ],
)
def test_what_does_not_qualify(old: str, new: str, why: str) -> None:
    assert (
        comments_changed(aligned(BASE, _rewritten(BASE, old, new)), _index(BASE).units) is None
    ), why


def test_after_a_backslash_refused_and_carriage_returns_are_line_ends() -> None:
    text = "def f():\n    x = [1, \\\n    # c\n    2]\n    return x\n"
    assert comments_changed(aligned(text, text.replace("# c", "# d")), _index(text).units) is None
    crlf = "def f():\n    # c\n    return 1\n".replace("\n", "\r\n")
    edited = crlf.replace("# c", "# d")
    assert comments_changed(aligned(crlf, edited), _index(crlf).units) == [2]
    previous, _ = compile_source("m", crlf, "m.py")
    _, code = compile_source("m", edited, "m.py", previous=previous)
    assert code.codes == _whole(edited, "m.py")


def test_f_strings_are_scanned_only_where_they_nest_no_quotes() -> None:
    text = 'def f(a):\n    # c\n    return f"{a}"\n'
    changed = comments_changed(aligned(text, text.replace("# c", "# d")), _index(text).units)
    assert changed == (None if sys.version_info >= (3, 12) else [2])


def test_engine_comment_edit_is_a_no_op_and_the_next_edit_applies(make_module) -> None:
    source = textwrap.dedent(
        """
        class C:
            def m(self):
                # the old comment
                return "old"

            def n(self):
                return "n"
        """
    )
    mod = make_module(source)
    engine = Engine()
    live = mod.C
    edited = source.replace("# the old comment", "# the new comment")
    (result,) = engine.patch_many({mod.__name__: edited})
    assert result.is_noop and mod.C is live and mod.C().m() == "old"
    (result,) = engine.patch_many({mod.__name__: edited.replace('"old"', '"new"')})
    assert not result.is_noop and result.changed == ("C.m",)
    assert mod.C is live and live().m() == "new" and live().n() == "n"


def test_a_comment_added_and_another_taken_out_moves_the_lines_between() -> None:
    # As many lines as before, but the statements between the two edits moved a line down.
    text = _rewritten(BASE, "        # a comment in a method\n", "")
    text = _rewritten(
        text, "    # a comment in a function\n", "    # a comment in a function\n    # more\n"
    )
    assert len(text.split("\n")) == len(BASE.split("\n"))
    assert comments_changed(aligned(BASE, text), _index(BASE).units) is None


def test_a_comment_only_version_is_left_as_an_unchanged_one(make_module, monkeypatch) -> None:
    # Once the module has been patched (its statements' code is known), a version that rewrites
    # comments only runs nothing: no candidate is executed (the spy counts the real builder's
    # calls), the live objects and their state stay as they are, as for an unchanged version.
    source = textwrap.dedent(
        """
        def f(seen=[]):
            # counts its calls
            seen.append(1)
            return len(seen)

        def g():
            return "g1"
        """
    )
    mod = make_module(source)
    built: list[str] = []
    real = hotpatch.engine.pipeline.build_candidate

    def spy(module, *args, **kwargs):
        built.append(module.__name__)
        return real(module, *args, **kwargs)

    monkeypatch.setattr(hotpatch.engine.pipeline, "build_candidate", spy)
    engine = Engine()
    v2 = source.replace('"g1"', '"g2"')
    (result,) = engine.patch_many({mod.__name__: v2})
    assert result.changed == ("g",) and built == [mod.__name__]
    f, defaults = mod.f, mod.f.__defaults__
    assert f() == 1 and f() == 2
    v3 = v2.replace("# counts its calls", "# counts how often it was called")
    (result,) = engine.patch_many({mod.__name__: v3})
    assert result.is_noop and built == [mod.__name__]  # nothing executed
    assert mod.f is f and f.__defaults__ is defaults and f() == 3  # its state kept
    (result,) = engine.patch_many({mod.__name__: v3.replace('"g2"', '"g3"')})
    # (A real edit of g resets f's used default as well: pre-existing, see docs/in-process.md.)
    assert "g" in result.changed and mod.g() == "g3"
    assert mod.g.__code__.co_firstlineno == v3.split("\n").index("def g():") + 1


def test_a_comment_only_module_derives_from_a_sibling_changed_with_it(make_module) -> None:
    # In one change set with a module it reads, a comment-only version follows the new values
    # as an unchanged module does (found as a holder of the changed module's objects).
    kinds = make_module("KINDS = ['a']\n")
    user_source = (
        f"from {kinds.__name__} import KINDS\n\n"
        "def table():\n    # the kinds, doubled\n    return TABLE\n\n"
        "TABLE = [k * 2 for k in KINDS]\n"
    )
    user = make_module(user_source)
    engine = Engine()
    engine.patch(user.__name__, source=user_source.replace("return TABLE", "return list(TABLE)"))
    edited = user_source.replace("return TABLE", "return list(TABLE)").replace(
        "# the kinds, doubled", "# each kind, twice"
    )
    results = engine.patch_many({user.__name__: edited, kinds.__name__: "KINDS = ['a', 'b']\n"})
    assert user.table() == ["aa", "bb"] and user.KINDS == ["a", "b"]
    assert results[0].is_noop and not results[1].is_noop
    assert f"{user.__name__}.TABLE" in results[1].derived


def test_engine_a_change_beside_comment_edits_changes_only_what_changed(
    make_module, compiled: list[str]
) -> None:
    # A release that edits comments in one class (one after code) and code in a function: the
    # class's code is the previous version's (not compiled again; the live methods keep their
    # code objects), only the function is compiled and reported changed, and runs the new code.
    source = textwrap.dedent(
        """
        class C:
            def m(self):
                return "m"  # the old comment

            def n(self):
                # explained
                return "n"


        def g():
            return "g1"
        """
    )
    mod = make_module(source)
    engine = Engine()
    engine.patch(mod.__name__, source=source.replace('"g1"', '"g2"'))  # the code is known now
    codes = (mod.C.m.__code__, mod.C.n.__code__)
    edited = (
        source.replace("# the old comment", "# the new comment")
        .replace("# explained", "# explained again")
        .replace('"g1"', '"g3"')
    )
    compiled.clear()
    (result,) = engine.patch_many({mod.__name__: edited})
    assert compiled == ['def g():\n    return "g3"']
    assert result.changed == ("g",) and mod.g() == "g3"
    assert (mod.C.m.__code__, mod.C.n.__code__) == codes
    assert mod.C.m.__code__ is codes[0] and mod.C.n.__code__ is codes[1]
