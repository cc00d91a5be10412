"""The statement index, and its incremental update matching a full re-index for every edit."""

from __future__ import annotations

import ast
import textwrap

import pytest

from hotpatch.engine.statements import StatementIndex

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
