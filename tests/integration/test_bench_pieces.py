"""The statement-pieces study (``benchmarks/bench_pieces.py``) on the committed sdists.

The study compiles real releases statement by statement, reusing the previous release's code for
statements that did not change, and compares every function and class-body code object with a
whole-module compile. It is what a faster candidate compile would rest on, so its exactness
claim is checked here, and so is the one dependency between statements it knows of (3.11+
compiles ``name.attr(...)`` differently when an import anywhere in the module binds ``name``):
without the import context the pieces must differ there, or the comparison is blind.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run(*args: str) -> list[dict]:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_pieces
    finally:
        sys.path.remove(str(BENCHMARKS))
    rows: list[dict] = bench_pieces.main(["--packages", "six,cachetools", "--repeat", "1", *args])
    return rows


def test_pieces_give_the_code_a_whole_module_compile_gives() -> None:
    rows = run()
    assert rows, "no release step found in benchmarks/replay_data"
    assert [r["module"] for r in rows if not r["exact"]] == []
    # Statements that did not change were reused, not compiled again.
    assert any(r["compiled"] < r["statements"] for r in rows)


def test_without_the_import_context_311_compiles_method_calls_differently() -> None:
    rows = run("--no-import-context")
    inexact = [r["module"] for r in rows if not r["exact"]]
    if sys.version_info >= (3, 11):
        assert inexact, "the comparison did not see the known difference"
    else:
        assert inexact == []


def test_a_module_level_super_symbol_is_part_of_the_context() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_pieces as bp
    finally:
        sys.path.remove(str(BENCHMARKS))
    text = "_safe_super = super\n\nclass A:\n    def f(self):\n        return super().f()\n"
    whole = bp.nested(compile(text, "m.py", "exec", dont_inherit=True))
    layout = bp.Layout(text, "m.py", context=True)
    assert layout.top_super
    codes, _, _ = bp.compile_pieces(layout, {})
    assert [c for piece in codes for c in bp.nested(piece)] == whole
    layout.top_super = False  # as if the module's own "super" were not known
    codes, _, _ = bp.compile_pieces(layout, {})
    alone = [c for piece in codes for c in bp.nested(piece)]
    assert (alone == whole) is (sys.version_info < (3, 12))
