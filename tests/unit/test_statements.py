"""The statement index, and its incremental update matching a full re-index for every edit."""

from __future__ import annotations

import ast
import gc
import re
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from hotpatch.engine import statements, tables
from hotpatch.engine.alignment import _chunks, aligned, chunk_hunks, line_hunks, split_lines
from hotpatch.engine.statements import StatementIndex, parse
from hotpatch.engine.tables import blank_literal_rows

BASE = textwrap.dedent(
    '''\
    """Doc."""
    import os
    from json import dumps as to_json

    LIMIT = 3
    ROUTES = {
        "a": 1,
        "b": 2,
    }

    @decorator
    def f(x):
        return x + LIMIT

    class C:
        A = 1
        B, D = 2, 3

        def m(self):
            return self.A

        class Inner:
            Z = 0

    if os.environ.get("X"):
        FLAG = True
    else:
        FLAG = False

    for _i in range(2):
        pass
    '''
)

EDITS = {
    "function body": ("    return x + LIMIT", "    y = x * 2\n    return y + LIMIT"),
    "constant": ("LIMIT = 3", "LIMIT = 4"),
    "inside a multi-line dict": ('    "b": 2,', '    "b": 20,\n    "c": 3,'),
    "class attribute": ("    A = 1", "    A = 10"),
    "nested class": ("        Z = 0", "        Z = 1\n        Y = 2"),
    "new statement at the end": ("    pass\n", "    pass\nNEW = 1\n"),
    "new statement at the start": ('"""Doc."""', '"""Doc."""\nFIRST = 0'),
    "statement removed": ("from json import dumps as to_json\n", ""),
    "blank lines added between": ("\n\n@decorator", "\n\n\n\n@decorator"),
    "decorator changed": ("@decorator", "@other_decorator"),
    "two statements merged": ("LIMIT = 3", "LIMIT = 3; OTHER = 5"),
}


def full(text: str) -> StatementIndex:
    return StatementIndex.build(ast.parse(text), text)


@pytest.mark.parametrize("edit", EDITS)
def test_incremental_update_matches_a_full_index(edit: str) -> None:
    old, new = EDITS[edit]
    assert old in BASE
    edited = BASE.replace(old, new, 1)
    updated = full(BASE).updated(BASE, edited)
    expected = full(edited)
    assert updated is not None
    assert updated.texts == expected.texts
    assert updated.bound == expected.bound
    assert [(u.start, u.end) for u in updated.units] == [(u.start, u.end) for u in expected.units]


def test_index_contents() -> None:
    index = full(BASE)
    assert index.texts[""]["LIMIT"] == ("LIMIT = 3",)
    assert index.texts[""]["to_json"] == ("from json import dumps as to_json",)
    assert index.texts["C"]["D"] == ("    B, D = 2, 3",)
    assert index.texts["C.Inner"]["Z"] == ("        Z = 0",)
    assert {"f", "C", "FLAG", "_i", "os"} <= index.bound[""]
    assert index.binds("C", "m") and not index.binds("C", "Z")
    assert index.statement_changed(full(BASE.replace("LIMIT = 3", "LIMIT = 4")), "", "LIMIT")
    assert not index.statement_changed(full(BASE.replace("x + LIMIT", "x - LIMIT")), "", "LIMIT")


# Several edits at once, as in a release: each is re-read on its own, the rest is kept.
MULTI_EDITS = {
    "constant and method": [
        ("LIMIT = 3", "LIMIT = 4"),
        ("        return self.A", "        return 1"),
    ],
    "insert at start, change at end": [
        ('"""Doc."""', '"""Doc."""\nFIRST = 0\n'),
        ("    pass\n", "    pass\nLAST = 9\n"),
    ],
    "delete and insert": [
        ("from json import dumps as to_json\n", ""),
        ("        Z = 0", "        Z = 1\n        Y = 2"),
    ],
    "method appended at the end of a class": [
        ("        Z = 0\n", "        Z = 0\n\n    def added(self):\n        return 2\n"),
    ],
    "decorator put on a def": [("\n\nclass C:", "\n\n@decorate\nclass C:")],
    "else branch added": [
        ("for _i in range(2):\n    pass\n", "for _i in range(2):\n    pass\nelse:\n    DONE = 1\n")
    ],
    "string opened in one place, closed in another": [
        ("LIMIT = 3", 'LIMIT = """3'),
        ("@decorator", '"""\n@decorator'),
    ],
    "lines swapped": [
        (
            "import os\nfrom json import dumps as to_json",
            "from json import dumps as to_json\nimport os",
        )
    ],
}


def _apply(text: str, edits: list[tuple[str, str]]) -> str:
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    return text


@pytest.mark.parametrize("edit", MULTI_EDITS)
def test_incremental_update_of_several_edits_matches_a_full_index(edit: str) -> None:
    edited = _apply(BASE, MULTI_EDITS[edit])
    for old_text, new_text in ((BASE, edited), (edited, BASE)):
        updated = full(old_text).updated(old_text, new_text)
        expected = full(new_text)
        assert updated is not None
        assert updated.units == expected.units  # lines, texts, bindings and what each reads
        assert updated.texts == expected.texts
        assert updated.bound == expected.bound


def test_statements_between_two_edits_are_not_read_again() -> None:
    edited = _apply(BASE, [("LIMIT = 3", "LIMIT = 4"), ("    pass\n", "    pass\nLAST = 9\n")])
    before = full(BASE)
    updated = before.updated(BASE, edited)
    assert updated is not None and updated.units == full(edited).units
    kept = {id(u) for u in before.units}
    # f, C and the if statement lie between the two edits: the same Unit objects, not re-read.
    between = [u for u in updated.units if u.bound and u.bound[0][1] in {"f", "C", "FLAG"}]
    assert len(between) == 3
    assert all(id(u) in kept for u in between)


def test_a_bracket_opened_in_one_edit_and_closed_in_another() -> None:
    # The unchanged lines between the two edits move into the list: they must be read again.
    old_text = "A = 1\nf(x),\ng(y),\nB = 2\n"
    new_text = "A = [1,\nf(x),\ng(y),\n]\n"
    for a, b in ((old_text, new_text), (new_text, old_text)):
        updated = full(a).updated(a, b)
        assert updated is not None
        assert updated.units == full(b).units


def test_a_backslash_at_the_end_of_an_edit_joins_the_next_line() -> None:
    # "x = f \\" then "(1)": one statement, x = f(1). Parsed apart from the line it joins (a
    # blank line after it), the edit would read as "x = f" and "(1)" as a statement of its own.
    old_text = "x = f\n(1)\ny = 2\n"
    new_text = "x = f \\\n(1)\ny = 3\n"
    updated = full(old_text).updated(old_text, new_text)
    assert updated is not None
    assert updated.units == full(new_text).units
    assert updated.texts[""]["x"] == ("x = f \\\n(1)",)
    assert "f" in updated.units[0].reads.calls


def test_many_scattered_edits_in_a_long_module() -> None:
    blocks = [
        f"def f{i}(x):\n    y = x + {i}\n    return y\n\n\nV{i} = f{i}(1)\n" for i in range(300)
    ]
    old_text = "\n\n".join(blocks)
    new_blocks = list(blocks)
    for i in range(0, 300, 7):
        new_blocks[i] = new_blocks[i].replace(f"x + {i}", f"x * {i}\n    y += 1")
    for i in range(3, 300, 50):
        new_blocks[i] += "\n\nEXTRA = 1\n"
    del new_blocks[150]
    new_text = "\n\n".join(new_blocks)
    updated = full(old_text).updated(old_text, new_text)
    assert updated is not None
    assert updated.units == full(new_text).units


@pytest.mark.parametrize("newline", ["\r\n", "\r"])
def test_other_line_endings(newline: str) -> None:
    old_text = BASE.replace("\n", newline)
    new_text = _apply(BASE, MULTI_EDITS["constant and method"]).replace("\n", newline)
    updated = full(old_text).updated(old_text, new_text)
    assert updated is not None
    assert updated.units == full(new_text).units
    assert updated.texts[""]["LIMIT"] == ("LIMIT = 4",)


def test_lines_are_counted_as_python_counts_them() -> None:
    # A form feed (and \x1c, \x85, \u2028) ends a line for str.splitlines, not for Python.
    text = 'A = 1\nS = "a\x0cb\u2028c"\n\x0cB = 2\n'
    index = full(text)
    assert index.texts[""]["S"] == ('S = "a\x0cb\u2028c"',)
    assert index.texts[""]["B"] == ("\x0cB = 2",)
    assert [(u.start, u.end) for u in index.units] == [(1, 1), (2, 2), (3, 3)]
    edited = text.replace("A = 1", "A = 2")
    updated = index.updated(text, edited)
    assert updated is not None and updated.units == full(edited).units


def test_parse_pauses_the_collector_and_leaves_its_state_as_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A syntax tree is many acyclic objects: collecting while they are made only costs time.
    # (The collection they set off runs once, after the collector is enabled again.)
    real_parse = ast.parse
    parsing: list[bool] = []

    def watched(*args: Any, **kwargs: Any) -> ast.Module:
        parsing.append(True)
        try:
            return real_parse(*args, **kwargs)
        finally:
            parsing.pop()

    monkeypatch.setattr(ast, "parse", watched)
    seen: list[bool] = []
    gc.callbacks.append(lambda phase, info: seen.append(bool(parsing) and phase == "start"))
    try:
        assert gc.isenabled()
        gc.collect()
        seen.clear()
        tree = parse("T = (\n" + "    (1, 'a'),\n" * 20000 + ")\n")
        assert not any(seen)  # none ran during the parse (20,000 tuples set off several)
        assert isinstance(tree.body[0], ast.Assign)
        assert gc.isenabled()
        gc.disable()
        try:
            parse("x = 1\n")
            assert not gc.isenabled()  # disabled by the host: stays disabled
        finally:
            gc.enable()
        with pytest.raises(SyntaxError):
            parse("def (:\n")
        assert gc.isenabled()
    finally:
        gc.callbacks.pop()


def test_compiling_and_planning_run_with_the_collector_paused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # compile() makes symbol tables, constants and code objects by the thousand: no collection
    # while it runs, nor while the planner pairs the two namespaces; the host's setting after.
    import builtins

    from hotpatch.engine import candidate, pieces, swap

    states: list[tuple[str, bool]] = []

    def compiling(*args: Any, **kwargs: Any) -> Any:
        states.append(("compile", gc.isenabled()))
        return builtins.compile(*args, **kwargs)

    real_plan_module = swap._Planner.plan_module

    def planning(self: Any) -> None:
        states.append(("plan", gc.isenabled()))
        real_plan_module(self)

    monkeypatch.setattr(candidate, "compile", compiling, raising=False)
    monkeypatch.setattr(pieces, "compile", compiling, raising=False)
    monkeypatch.setattr(swap._Planner, "plan_module", planning)
    old_source, _ = candidate.compile_source("m", "def f():\n    return 1\n", "m.py")
    new_source, code = candidate.compile_source(
        "m", "def f():\n    return 2\n", "m.py", previous=old_source
    )
    live: dict[str, Any] = {"__name__": "m"}
    exec(compile("def f():\n    return 1\n", "m.py", "exec"), live)
    fresh: dict[str, Any] = {"__name__": "m"}
    code.run(fresh)
    plan = swap.plan_update(
        "m",
        live,
        fresh,
        old_index=old_source.index,
        new_index=new_source.index,
        allow_removals=False,
    )
    assert plan.changed == ("f",)
    assert states == [("compile", False), ("compile", False), ("plan", False)]  # one statement
    assert gc.isenabled()


def test_chunk_alignment_pairs_equal_lines_and_covers_every_changed_line() -> None:
    old_text = _apply(BASE, MULTI_EDITS["method appended at the end of a class"])
    for a, b in ((BASE, old_text), (old_text, BASE), (BASE, BASE + "\n# tail\nZ = 1\n")):
        old, new = split_lines(a), split_lines(b)
        hunks = chunk_hunks(old, new)
        by_line = line_hunks(old, new)
        i = j = 0
        for first, last, new_first, new_last in [*hunks, (len(old) + 1, 0, len(new) + 1, 0)]:
            assert old[i : first - 1] == new[j : new_first - 1]  # the lines between are paired
            i, j = max(i, last), max(j, new_last)
        changed = {n for f, e, _, _ in hunks for n in range(f, e + 1)}
        assert {n for f, e, _, _ in by_line for n in range(f, e + 1)} <= changed


@pytest.mark.parametrize("ending", ["\n", "", "\n\n"])
def test_chunks_read_in_the_text_are_the_chunks_of_its_lines(ending: str) -> None:
    # ``aligned`` cuts the chunks from each version's text in place (not joined again): the
    # same hunks as from the joined lines, whatever the common ends and the last line.
    old_text = _apply(BASE, MULTI_EDITS["method appended at the end of a class"])
    pairs = [
        (BASE, old_text),
        (old_text, BASE),
        ("X = 1\n" + BASE, BASE + "Z = 1"),
        ("", BASE),
        (BASE, ""),
        ("A = 1\nB = 2\n", "A = 1\nB = 3\n"),
    ]
    for before, after in pairs:
        a, b = before.rstrip("\n") + ending, after.rstrip("\n") + ending
        old, new = split_lines(a), split_lines(b)
        assert aligned(a, b).hunks == chunk_hunks(old, new, a, b) == chunk_hunks(old, new)
        crlf = aligned(a.replace("\n", "\r\n"), b.replace("\n", "\r\n"))
        assert crlf.hunks == chunk_hunks(old, new)  # lines ended by "\r\n": joined, the same
        for first in range(len(old) + 1):  # each stretch of lines, read in place or joined
            for end in range(first, len(old) + 1):
                assert _chunks(old, first, end, a) == _chunks(old, first, end, None)


def test_lists_of_nodes_with_none_are_read_around_the_none() -> None:
    # A dict display's keys hold None for ``**spread`` entries, a signature's keyword-only
    # defaults hold None for a parameter without one; a None first left a list unread, a None
    # later crashed the index ("'NoneType' object has no attribute '_fields'", idna 3.19).
    text = (
        "X = {**BASE, KEY: 1}\n"
        "Y = {KEY2: 1, **BASE2}\n"
        "def f(*, a=DEFAULT, b):\n"
        "    return {**LOCAL, K: v}\n"
        "def g(*, b, a=DEFAULT2):\n"
        "    pass\n"
    )
    index = full(text)
    reads = {u.bound[0][1]: u.reads for u in index.units}
    assert {"BASE", "KEY"} <= reads["X"].names
    assert {"BASE2", "KEY2"} <= reads["Y"].names
    assert "DEFAULT" in reads["f"].names and {"LOCAL", "K"} <= reads["f"].body
    assert "DEFAULT2" in reads["g"].names


# -- data tables: their rows are not parsed again ------------------------------------------------
TABLE_MODULE = '''"""A module with data tables."""
from array import array

HEADER = "v1"

def _seg_0():
    return [
        (0x0, "3"),
        (0x1, '3', b"x" b'y'),  # a comment with a quote "
        # a comment line

        (-2, 1.5e-3, None, True),
    ]

starts = array(
    "I",
    (
        0x0,
        0x1,
        0x2,
    ),
)

classes = {
    "Greek": (0x370, 0x374),
    0xAD: 84,
    "Latin": (first, 0x41),
    0xAE: 85,
}

def f():
    x = 1,
    2,
    doc = """
    (1, 2),
    """
    return x
'''


def _count_rows_read(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The texts the index's re-parse reads from now on, in order."""
    seen: list[str] = []
    real = statements.parse

    def recording(text: str, filename: str = "<unknown>") -> ast.Module:
        seen.append(text)
        return real(text, filename)

    monkeypatch.setattr(statements, "parse", recording)
    return seen


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("(0x1, '3', b\"x\" b'y')", "(0x1, '4')"),  # a row of the first table
        ("        0x1,\n", "        0x1,\n        0x9,\n"),  # a row added to the array
        ('"Latin": (first, 0x41)', '"Latin": (second, 0x41)'),  # a row that reads a name
        ("0xAE: 85", "0xAE: 86"),  # after the row that reads a name
        ("    2,\n", "    3,\n"),  # a statement of its own, not a table row
        ('    (1, 2),\n    """', '    (1, 3),\n    """'),  # inside a string
    ],
)
def test_an_edited_data_table_is_indexed_as_a_full_parse_would(
    old: str, new: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    edited = TABLE_MODULE.replace(old, new, 1)
    assert edited != TABLE_MODULE
    before = full(TABLE_MODULE)
    read = _count_rows_read(monkeypatch)
    updated = before.updated(TABLE_MODULE, edited)
    assert updated is not None
    expected = full(edited)
    assert updated.units == expected.units
    assert updated.texts == expected.texts
    assert read  # the index was updated by a re-parse


def test_the_rows_of_a_changed_table_are_not_parsed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = "".join(f'        ({i:#x}, "V"),\n' for i in range(2000))
    old = f"def _seg_0():\n    return [\n{rows}    ]\n"
    new = old.replace('(0x7, "V")', '(0x7, "M", "x")')
    read = _count_rows_read(monkeypatch)
    updated = full(old).updated(old, new)
    assert updated is not None and updated.units == full(new).units
    (text,) = read
    assert text.count("\n") == new.count("\n")  # line numbers kept
    assert "0x" not in text  # not one row of the 2,000 read again
    assert "def _seg_0():\n    return [\n" in text


@pytest.mark.parametrize(
    ("block", "kept"),
    [
        ("x = [\n    1,\n    2,\n]\n", False),
        ("def f():\n    x = 1,\n    2,\n", True),  # after a comma, not a bracket: a statement
        ("x = [  # (\n    1,\n]\n", True),  # a comment may hide where the line ends
        ('@deco(\n    "GET",\n)\ndef f(): pass\n', True),  # a decorator's syntax is compared
        ('x = """\ny = [\n    1,\n"""\n', True),  # inside a string
        ("x = f(\n    g,\n    1,\n)\n", True),  # g is a name: the run stops there
        ("x = [\n    f'{a}',\n]\n", True),  # an f-string reads names
        ("x = [\n    1, \\\n    2,\n]\n", True),  # a backslash continuation
        ("x = [\n    0o17, 1_000,\n    -1.5e3j, +0.5,\n]\n", False),  # literals only
        ("x = [\n    None,\n    None,\n]\n", False),
        ('x = [\n    "a@b",\n]\n', False),  # an @ in a string is no decorator
        ("class C:\n    @deco\n    def f(self): pass\n    x = [\n        1,\n    ]\n", True),
    ],
)
def test_which_rows_are_left_out_of_the_re_parse(block: str, kept: bool) -> None:
    blanked = blank_literal_rows(block)
    assert blanked.count("\n") == block.count("\n")
    assert (blanked == block) is kept
    if not kept:
        ast.parse(blanked)  # still Python, with the same statements
        assert [type(s) for s in ast.parse(blanked).body] == [
            type(s) for s in ast.parse(block).body
        ]


def test_rows_of_every_shape_in_one_run_and_the_line_that_ends_it() -> None:
    # The common rows (one number, string or None, and a comma) and the others (a comment, a
    # tuple, a prefix, a colon, signs, a blank or comment line) interleaved: one run, up to the
    # first line that is not a row, wherever it falls among them.
    rows = [
        "    0x1F,",
        '    "a\\"b",',
        "    '\"',",
        "    None,",
        "    1,  # a comment",
        "    (1, 'x'),",
        '    b"VV"',
        "    1: 2,",
        "    -1.5e3j,",
        "",
        "    # a comment line",
        "    0x2,",
    ]
    for stop in ("    name,", "    0x1, name,", "    None.attr,", "    f(1),", '    "a" + x,'):
        for at in (0, 3, len(rows)):
            lines = ["x = [", *rows[:at], stop, *rows[at:], "]"]
            block = "\n".join(lines) + "\n"
            blanked = blank_literal_rows(block).split("\n")
            assert blanked[: at + 1] == ["x = [", *[""] * at], (stop, at)
            assert blanked[at + 1 :] == [*lines[at + 1 :], ""], (stop, at)


def test_rows_emptied_are_not_searched_again_for_brackets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The search for the next opening bracket goes on after the rows emptied: a 17,000-row
    # table is read once, by the rows pattern (not scanned again for brackets).
    rows = "".join(f"    {i:#x},\n" for i in range(2000))
    block = f"A = (\n{rows})\nB = [\n{rows}]\nC = 1\n"
    scanned = []

    class Spy:
        def search(self, text: str, pos: int = 0) -> re.Match[str] | None:
            found = real.search(text, pos)
            scanned.append((found.start() if found else len(text)) - pos)
            return found

        def finditer(self, text: str, pos: int = 0) -> Iterator[re.Match[str]]:
            scanned.append(len(text) - pos)
            return real.finditer(text, pos)

    real = tables._OPEN_AT_END
    monkeypatch.setattr(tables, "_OPEN_AT_END", Spy())
    blanked = blank_literal_rows(block)
    assert blanked == "A = (\n" + "\n" * 2000 + ")\nB = [\n" + "\n" * 2000 + "]\nC = 1\n"
    assert sum(scanned) < len(rows) / 10  # the code between the tables, not the rows


def test_a_name_that_begins_like_none_ends_the_rows() -> None:
    block = "x = [\n    None,\n    Nonesuch,\n    None,\n]\n"
    assert blank_literal_rows(block) == "x = [\n\n    Nonesuch,\n    None,\n]\n"


@pytest.mark.timeout(30)  # a deadline against a hang: the old pattern took 2^n steps here
@pytest.mark.parametrize(
    "line",
    [
        "1" * 60 + " name,",  # a long number, then a name: not a row
        " + ".join(["1"] * 60) + " name,",
        "(1" + " " * 60 + ", 2" + " " * 60 + "name),",
    ],
    ids=["long number", "signs", "spaces in a tuple"],
)
def test_a_line_that_is_almost_a_row_is_rejected_at_once(line: str) -> None:
    block = f"x = [\n    {line}\n]\n"
    assert blank_literal_rows(block) == block


# -- classes edited inside their bodies: only the touched body statements are parsed again ------
CLASS_BASE = textwrap.dedent(
    '''\
    import functools

    X = 1


    @functools.total_ordering
    class Big(
        object,
    ):
        """A class with a body on lines of its own."""

        LIMIT = X
        W = max
        (1, 2)
        A = 1; B = (2,
            3)

        def __init__(self, n):
            self.n = n + X

        @property
        def size(self):
            return self.n

        # helpers
        def helper(self):
            text = """
    a line at column 0 inside a string
    """
            return text

        class Inner:
            Z = 0

            def m(self):
                return self.Z

        def last(self):
            return 1


    class One: x = 1


    def after():
        return Big
    '''
)

CLASS_EDITS = {
    "method body": [("        return self.n\n", "        return self.n * 2\n")],
    "two methods": [
        ("        return self.n\n", "        return self.n * 2\n"),
        ("        return 1\n", "        return 2\n"),
    ],
    "construction method": [("self.n = n + X", "self.n = n + X + LIMIT")],
    "class attribute": [("    LIMIT = X\n", "    LIMIT = X + 1\n")],
    "one of two statements on a line": [("A = 1; B", "A = 10; B")],
    "comment between methods": [("    # helpers\n", "    # helpers, and more\n    # of them\n")],
    "comment lines only": [("    # helpers\n", "\n")],
    "method added in the middle": [
        ("    # helpers\n", "    def added(self, y=X):\n        return y\n\n    # helpers\n")
    ],
    "method appended at the end": [
        ("        return 1\n", "        return 1\n\n    def appended(self):\n        return 2\n")
    ],
    "method removed": [("    @property\n    def size(self):\n        return self.n\n\n", "")],
    "decorator added": [("    def helper(self):", "    @staticmethod\n    def helper(self):")],
    "nested class": [("        Z = 0\n", "        Z = 1\n        Y = Z\n")],
    "inside the column-0 string": [("a line at column 0", "another line at column 0")],
    "a method moved out of the class": [("    def last(self):\n", "def last(self):\n")],
    "a line nested deeper": [
        (
            "    def last(self):\n        return 1\n",
            "    def last(self):\n        return 1\n        def x(): pass\n",
        )
    ],
    "header changed": [("    object,\n", "    object, dict,\n")],
    "decorator of the class": [("@functools.total_ordering\n", "")],
    "one-line class": [("class One: x = 1", "class One: x = 2")],
    "lines added above": [("X = 1\n", "X = 1\nY = 2\n\n")],
    "above and inside": [
        ("X = 1\n", "X = 1\nY = 2\n\n"),
        ("        return self.n\n", "        return self.n + Y\n"),
    ],
    "a backslash joins the next statement": [("    W = max\n", "    W = max \\\n")],
}


def _edit_all(text: str, edits: list[tuple[str, str]]) -> str:
    for old, new in edits:
        assert text.count(old) >= 1, old
        text = text.replace(old, new, 1)
    return text


@pytest.mark.parametrize("edit", CLASS_EDITS)
def test_a_class_edited_in_its_body_is_indexed_as_a_full_parse_would(edit: str) -> None:
    new_text = _edit_all(CLASS_BASE, CLASS_EDITS[edit])
    try:
        expected = full(new_text)
    except SyntaxError:
        pytest.skip("the edit does not make Python")
    for a, b in ((CLASS_BASE, new_text), (new_text, CLASS_BASE)):
        updated = full(a).updated(a, b)
        assert updated is not None
        assert updated == full(b)
    big = next(unit for unit in expected.units if ("", "Big") in unit.bound)
    assert big.parts


@pytest.mark.parametrize(
    ("edit", "read", "unread"),
    [
        (
            "two methods",
            ["return self.n * 2", "return 2"],
            ["LIMIT = X", "def __init__", "class Inner", "a line at column 0"],
        ),
        # a method added at the class's end (after a blank line): read alone
        ("method appended at the end", ["def appended"], ["def __init__", "W = max", "def last"]),
    ],
)
def test_only_the_touched_statements_of_a_class_are_parsed_again(
    edit: str, read: list[str], unread: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    new_text = _edit_all(CLASS_BASE, CLASS_EDITS[edit])
    before = full(CLASS_BASE)
    seen = _count_rows_read(monkeypatch)
    updated = before.updated(CLASS_BASE, new_text)
    assert updated == full(new_text)
    parsed = "".join(seen)
    assert all(text in parsed for text in read)
    assert not any(text in parsed for text in unread)
    big = updated.units[2]
    kept = {id(part) for part in before.units[2].parts}
    assert sum(id(part) not in kept for part in big.parts) == len(read)  # the ones read again
    assert updated.texts["Big"]["LIMIT"] == ("    LIMIT = X",)
    assert "X" in big.reads.body  # __init__ reads X when Big is called


def test_many_classes_edited_in_their_bodies_read_only_their_edits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Hundreds of classes, each with a method edited, between functions edited too (idna's
    # generated test module: 6,000 methods, half of them changed by a release). Each class is
    # read from its own first edit: the text parsed for it does not hold the lines above it
    # (blanked, they made the whole quadratic in the module's length), and the index is a full
    # parse's.
    def module(version: int) -> str:
        return "".join(
            f"class C{i}:\n    X = {i}\n\n    def f(self):\n        return {version}\n\n"
            f"    def g(self):\n        return {i}\n\n\n"
            f"def h{i}():\n    return {version if i % 3 else i}\n\n\n"
            for i in range(400)
        )

    old_text, new_text = module(1), module(2)
    before = full(old_text)
    seen = _count_rows_read(monkeypatch)
    updated = before.updated(old_text, new_text)
    assert updated == full(new_text)
    assert len(seen) == 401  # one per class, then one for the functions
    assert max(len(text) for text in seen[:-1]) < 100  # a header and a method, no lines above
    kept = {id(part) for unit in before.units for part in unit.parts}
    assert sum(id(part) in kept for unit in updated.units for part in unit.parts) == 400 * 3


def test_a_class_body_parsed_apart_must_keep_its_indentation() -> None:
    # The edited method is now indented under the one before it: a nested function of that
    # method, not a method. Parsed alone under a header, it would read as a method.
    old_text = "class A:\n    def f(self):\n        pass\n\n    def g(self):\n        return 1\n"
    new_text = (
        "class A:\n    def f(self):\n        pass\n\n        def g(self):\n            return 2\n"
    )
    updated = full(old_text).updated(old_text, new_text)
    assert updated is not None
    assert updated == full(new_text)
    assert "g" not in updated.bound["A"]


@pytest.mark.skipif(not hasattr(ast, "TypeVar"), reason="type parameters: Python 3.12+")
def test_a_generic_class_edited_in_its_body() -> None:
    old_text = "class Box[T: Base]:\n    def get(self) -> T:\n        return self.v\n"
    new_text = "class Box[T: Base]:\n    def get(self) -> T:\n        return self.w\n"
    updated = full(old_text).updated(old_text, new_text)
    assert updated == full(new_text)
    assert "Base" in updated.units[0].reads.names
